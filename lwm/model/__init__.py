"""The models (layer: model; imports attention and foundation only, never training or inference).

  llama.py         LLaMAConfig (presets, tiny included) and the LLaMA decoder with the original's parameter tree
  vision_llama.py  the vision-language decoder over text tokens and VQGAN codes
  vqgan.py         the VQGAN image tokenizer
  loss.py          chunked cross entropy that never materialises the (B, T, V) logits
  registry.py      --modality -> config class and model class
  shapes.py        the one parameter-shape tracer (jax.eval_shape of a model's init)
"""
