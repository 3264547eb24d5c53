"""Checkpoint formats (layer: formats; imports model, never training or inference).

  formats.py     the original LWM streaming format, flax msgpack, orbax; `load_checkpoint(TYPE::PATH)`
  manager.py     the training loop's Checkpointer: one directory per save, written aside and renamed into place
  hf_tensors.py  Hugging Face LLaMA tensors <-> the LWM parameter tree (the rotary column permutation)
  hf_folders.py  Hugging Face folders read and written (config.json, safetensors shards, tokenizer)
A new checkpoint format: a save/load pair in formats.py and its TYPE in `load_checkpoint` (docs/architecture.md).
"""
