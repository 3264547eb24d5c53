"""The two model paths of the long-context suite, with one interface: `tokenizer`, `name`,
`generate(prompts, max_new_tokens) -> list of new token ids` (greedy, EOS dropped).

  JaxBackend    an LWM checkpoint through the inference engine (`jax_generate`, the one place that
                calls it), under a ('dp','fsdp','tp','sp') mesh; long prompts use the model config's
                attention_impl ('ring' and the other sequence-parallel strategies over the mesh's sp axis).
  TorchBackend  any local Hugging Face causal LM through transformers' PyTorch classes (a directory saved
                with save_pretrained; nothing is downloaded), batched with left padding and an attention mask.
"""
from __future__ import annotations

import os
from typing import Sequence


def _rows_for(n: int, data: int) -> int:
    """Batch rows for n prompts: the next power of two (few compiled shapes), a multiple of the data size."""
    rows = 1 << max(0, (n - 1).bit_length())
    return data * -(-rows // data)


def jax_generate(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens for each prompt through the generation engine (`lwm.inference.engine.Engine`; call
    under the mesh). The batch is padded with copies of the first prompt to a power of two rows and the budget
    rounded up to a power of two (the answers cut back to max_new_tokens: greedy tokens are a prefix), so that
    batches of one length share compiled shapes."""
    from lwm.inference.sampling import SamplingConfig

    data, _ = engine.mesh_sizes()
    rows = list(prompts) + [prompts[0]] * (_rows_for(len(prompts), data) - len(prompts))
    budget = max(16, 1 << (max_new_tokens - 1).bit_length())     # tasks with budgets 24..32 share a cache shape
    out = engine.generate(rows, budget, sampling=SamplingConfig()).tokens[:len(prompts)]
    return [row[:max_new_tokens] for row in out]


class JaxBackend:
    """An LWM text checkpoint through the one runtime set-up (lwm.inference.runtime: the original's flags
    --load_llama_config, --update_llama_config, --llama.*, --load_checkpoint, --tokenizer, --mesh_dim, --dtype,
    --cache_dtype, --jax_distributed.*), the one loader and the engine."""

    def __init__(self, flags):
        import jax

        from lwm.inference import runtime
        from lwm.inference.engine import Engine
        from lwm.inference.loader import load_model

        rt = runtime.setup(flags, modality="text")
        self.tokenizer, self.mesh, self.config = rt.tokenizer, rt.mesh, rt.model_config
        with jax.set_mesh(self.mesh):
            model, params = load_model(self.config, flags.load_checkpoint, rt.dtype, self.mesh)
        self.engine = Engine(model, params, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                             vocab_size=self.tokenizer.vocab_size, cache_dtype=flags.cache_dtype or None)
        self.name = f"lwm:{flags.load_checkpoint}"

    def generate(self, prompts, max_new_tokens):
        import jax

        with jax.set_mesh(self.mesh):
            return jax_generate(self.engine, prompts, max_new_tokens)


class TorchBackend:
    """A local Hugging Face causal LM (`AutoModelForCausalLM`, PyTorch) and its tokenizer (the directory's
    tokenizer.model through sentencepiece, else its Hugging Face tokenizer). dtype: fp32 | bf16 | fp16."""

    def __init__(self, path: str, dtype: str = "fp32", device: str = "cpu", tokenizer: str = ""):
        import torch
        from transformers import AutoModelForCausalLM

        from lwm.text.tokenizer import load_tokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--hf_model={path}: not a local directory (a model saved with "
                                    "save_pretrained; nothing is downloaded)")
        dtypes = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
        if dtype not in dtypes:
            raise ValueError(f"--dtype={dtype}: use one of {', '.join(dtypes)}")
        self.tokenizer = load_tokenizer(tokenizer or path)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtypes[dtype])
        self.model.to(device).eval()
        self.device, self.name = device, f"hf:{path}"

    def generate(self, prompts, max_new_tokens):
        import torch

        t = max(len(p) for p in prompts)
        pad, eos = self.tokenizer.pad_id, self.tokenizer.eos_id
        ids = torch.full((len(prompts), t), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, t - len(p):] = torch.tensor(list(p))
            mask[r, t - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None,
                                      top_k=None)
        outs = []
        for row in out[:, t:].tolist():
            outs.append(row[:row.index(eos)] if eos in row else row)
        return outs
