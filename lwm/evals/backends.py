"""The backend protocol of the one runner (lwm.evals.runner) and its two backends.

A backend has
  name            a label for the report ("lwm:<checkpoint>", "hf:<dir>")
  tokenizer       encode / decode / bos_id / eos_id / pad_id (lwm.text.tokenizer)
  data_size       rows of one call must be a multiple of it (the runner pads to it): the mesh's dp x fsdp, or 1
  padded_length(n) -> the prompt length a batch whose longest prompt has n tokens is padded to
  check_length(n, max_new_tokens)  raises when n + max_new_tokens exceeds the model (before any compile)
  generate(prompts, max_new_tokens, *, padded_length=None, vision=None) -> new token ids per prompt
                  greedy, cut before EOS, at most max_new_tokens each (B prompts in, B lists out)

  prefix_cache    optional: a PrefixCache (lwm.inference.prefix_cache) the backend reuses prompt prefixes
                  with, or None; the runner orders a group's prompts by prefix when it is set

  JaxBackend    an LWM checkpoint through the generation engine (lwm.inference.engine.Engine) under the
                ('dp','fsdp','tp','sp') mesh; long prompts use the model config's attention_impl ('ring' and
                the other sequence-parallel strategies over the mesh's sp axis); vision inputs for the
                vision-language model; the prefix cache and chunked prefill of --prefix_cache_mb and
                --prefill_chunk (`JaxBackend.from_flags`).
  TorchBackend  any local Hugging Face causal LM through transformers' PyTorch classes (a directory saved
                with save_pretrained; nothing is downloaded), batched with left padding and an attention mask.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence


class JaxBackend:
    """An LWM model through the engine. Build with `from_flags` (the one runtime set-up, lwm.inference.runtime:
    the original's flags --load_llama_config, --update_llama_config, --llama.*, --load_checkpoint, --tokenizer,
    --mesh_dim, --dtype, --cache_dtype, --prefix_cache_mb, --prefix_cache_block, --prefill_chunk,
    --jax_distributed.*, and the one loader), or from an engine.

    prefix_cache (a PrefixCache of the engine) / prefill_chunk (tokens): given to `Engine.generate`, which then
    prefills each prompt alone, reusing the cached blocks of the prompts before it (the haystack before a
    needle, across depths) and prefilling the rest in chunks; the answers are those of the batched whole
    prefill (lwm.inference.engine). None for both: one batched whole prefill per call."""

    def __init__(self, engine, tokenizer, mesh, name: str, config=None, prefix_cache=None,
                 prefill_chunk: Optional[int] = None):
        self.engine, self.tokenizer, self.mesh, self.name, self.config = engine, tokenizer, mesh, name, config
        self.prefix_cache, self.prefill_chunk = prefix_cache, prefill_chunk

    @property
    def data_size(self) -> int:
        """dp x fsdp of the backend's mesh (the engine reads the ambient mesh, so it is entered here)."""
        import jax

        with jax.set_mesh(self.mesh):
            return self.engine.mesh_sizes()[0]

    @classmethod
    def from_flags(cls, flags, modality: str = "text", sample_mode: Optional[str] = None,
                   random_if_empty: bool = False) -> "JaxBackend":
        """flags: a ConfigDict with lwm.inference.runtime's flags. random_if_empty: an empty --load_checkpoint
        gives seeded random parameters (flags.seed), for tiny test models."""
        import jax

        from lwm.inference import runtime
        from lwm.inference.engine import Engine
        from lwm.inference.loader import load_model

        kw = {} if sample_mode is None else dict(sample_mode=sample_mode)
        rt = runtime.setup(flags, modality=modality, **kw)
        extra = dict(random_if_empty=True, seed=flags.seed) if random_if_empty else {}
        with jax.set_mesh(rt.mesh):
            model, params = load_model(rt.model_config, flags.load_checkpoint, rt.dtype, rt.mesh, **extra)
        engine = Engine(model, params, eos_id=rt.tokenizer.eos_id, pad_id=rt.tokenizer.pad_id,
                        vocab_size=rt.tokenizer.vocab_size, cache_dtype=flags.cache_dtype or None)
        with jax.set_mesh(rt.mesh):
            prefix_cache, chunk = prefix_cache_settings(engine, flags)
        return cls(engine, rt.tokenizer, rt.mesh, f"lwm:{flags.load_checkpoint or 'random'}", rt.model_config,
                   prefix_cache, chunk)

    def padded_length(self, n: int) -> int:
        return self.engine.padded_length(n)

    def check_length(self, n: int, max_new_tokens: int) -> None:
        self.engine.check_length(n, max_new_tokens)

    def generate(self, prompts, max_new_tokens, *, padded_length=None, vision=None) -> list[list[int]]:
        import jax

        from lwm.inference.sampling import SamplingConfig

        with jax.set_mesh(self.mesh):
            return self.engine.generate(prompts, max_new_tokens, sampling=SamplingConfig(), vision=vision,
                                        padded_length=padded_length, prefix_cache=self.prefix_cache,
                                        prefill_chunk=self.prefill_chunk).tokens


def prefix_cache_settings(engine, flags, say=print):
    """(PrefixCache or None, prefill chunk or None) for an eval's engine from --prefix_cache_mb,
    --prefix_cache_block and --prefill_chunk (lwm.inference.runtime), under the ambient mesh.

    The engine's prefix-cached prefill runs one prompt at a time over every data shard (dp x fsdp rows of the
    same prompt), where the batched whole prefill gives each shard its own prompts: with dp x fsdp > 1 the
    default (--prefix_cache_mb=-1) leaves the cache off and says so once (`say`), since a whole haystack
    recomputed per shard costs more than the blocks save; an explicit --prefix_cache_mb > 0 or --prefill_chunk
    (e.g. for the chunk's smaller working memory) is used as given. Raises the flags' one-line ValueErrors."""
    from lwm.inference import runtime

    data, _ = engine.mesh_sizes()
    chunk = runtime.prefill_chunk_from_flags(engine, flags)
    if float(flags.prefix_cache_mb) == -1 and data > 1:
        say(f"prefix cache: off by default under a mesh with dp x fsdp = {data} (each prompt would be prefilled "
            f"alone on all {data} data shards; the batched prefill is faster); give --prefix_cache_mb=N to use "
            "it anyway, or a mesh with dp = fsdp = 1 (e.g. --mesh_dim=1,1,1,-1)")
        return None, chunk
    return runtime.prefix_cache_from_flags(engine, flags), chunk


class TorchBackend:
    """A local Hugging Face causal LM (`AutoModelForCausalLM`, PyTorch) and its tokenizer (the directory's
    tokenizer.model through sentencepiece, else its Hugging Face tokenizer). dtype: a name of lwm.utils.dtypes.
    FileNotFoundError for a path that is not a local directory, ValueError for another dtype."""
    data_size = 1

    def __init__(self, path: str, dtype: str = "fp32", device: str = "cpu", tokenizer: str = ""):
        import torch
        from transformers import AutoModelForCausalLM

        from lwm.text.tokenizer import load_tokenizer
        from lwm.utils.dtypes import parse_float_dtype

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--hf_model={path}: not a local directory (a model saved with "
                                    "save_pretrained; nothing is downloaded)")
        np_dtype = parse_float_dtype(dtype, what="--dtype")  # the one dtype table
        if np_dtype is None:
            raise ValueError("--dtype is empty: use fp32, bf16 or fp16")
        torch_dtype = getattr(torch, np_dtype.name)
        self.tokenizer = load_tokenizer(tokenizer or path)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        self.model.to(device).eval()
        self.device, self.name = device, f"hf:{path}"

    def padded_length(self, n: int) -> int:
        return n                                # each call is left-padded to its own longest prompt

    def check_length(self, n: int, max_new_tokens: int) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={limit}")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, padded_length=None,
                 vision=None) -> list[list[int]]:
        """(B, T) left-padded ids and attention mask -> transformers' greedy generate -> B lists of new ids."""
        import torch

        if vision is not None:
            raise ValueError("the PyTorch backend runs text models only (no vision inputs)")
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


def prefix_cache_line(pc) -> str:
    """One line of a prefix cache's counters (lwm.inference.prefix_cache.PrefixCache.stats)."""
    st = pc.stats()
    return (f"prefix cache: {st['hit_tokens']} prompt tokens reused over {st['lookups']} prompts; {st['blocks']} "
            f"blocks of {st['block_size']} tokens held ({st['bytes'] / 2**20:.1f} of {st['budget_bytes'] / 2**20:.0f} "
            f"MiB), {st['evictions']} evicted")
