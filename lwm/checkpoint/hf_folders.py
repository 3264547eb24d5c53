"""Hugging Face folders on disk: read a local LLaMA-family model (config + safetensors or .bin weights,
sharded or not, fp32/bf16/fp16) lazily; write our text models as `LlamaForCausalLM` folders and our vision
models as the same folder plus the vision embedding/head, the vision vocabulary and the VQGAN settings.
The tensor and config mappings are in `lwm.checkpoint.hf_tensors`; the CLI is `python -m lwm.convert`.

A vision export (read back by `read_hf_folder`, so `--load_checkpoint hf::DIR` loads it):

    config.json, model*.safetensors     LlamaForCausalLM of the shared decoder, text embedding and lm_head
    vision.safetensors                  model.vision_embed_tokens.weight (W, D), vision_head.weight (W, D)
    lwm_vision.json                     {"vision_vocab_size", "tie_vision_embeddings", "num_vision_codes",
                                         "end_of_frame", "end_of_vision", "vqgan": VQGANConfig fields}
    tokenizer files                     (when a tokenizer is given)

Reading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)` for .bin files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lwm.checkpoint.hf_tensors import (VISION_KEYS, hf_config_to_lwm, hf_to_lwm_items, lwm_config_to_hf,
                            lwm_params_to_hf_state_dict, to_numpy, to_torch)

VISION_FILE, VISION_CONFIG_FILE = "vision.safetensors", "lwm_vision.json"
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _safe_open(path: str):
    """safetensors' safe_open, with a header error (truncated, not safetensors) as ValueError naming `path`."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)}); truncated or "
                         f"corrupt shard?") from None


def _read_json(path: str) -> Any:
    """json.load of a file, with a parse or decode error as ValueError naming `path`."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class HFWeights(Mapping):
    """{HF tensor name: numpy array}, read one tensor at a time from a folder's weight files (a sharded
    index, one file, plus `vision.safetensors` if present). bf16 comes back as ml_dtypes.bfloat16."""

    def __init__(self, directory: str):
        self.directory = directory
        files: dict[str, str] = {}
        for index in _INDEXES:
            path = os.path.join(directory, index)
            if os.path.isfile(path):
                index_json = _read_json(path)
                weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{path}: not a weight index with a 'weight_map' object")
                files = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
                break
        else:
            for single in _SINGLE:
                path = os.path.join(directory, single)
                if os.path.isfile(path):
                    files = {name: path for name in self._names(path)}
                    break
        if not files:
            raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or their "
                                    f"*.index.json: not a Hugging Face model folder")
        vision = os.path.join(directory, VISION_FILE)
        if os.path.isfile(vision):
            files.update({name: vision for name in self._names(vision)})
        for path in set(files.values()):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: named by the weight index but missing")
        self.files = files
        self._open: dict[str, Any] = {}

    @staticmethod
    def _names(path: str) -> list[str]:
        if path.endswith(".safetensors"):
            with _safe_open(path) as f:
                return list(f.keys())
        return list(_torch_load(path).keys())

    def _handle(self, path: str):
        if path not in self._open:
            if path.endswith(".safetensors"):
                self._open = {path: _safe_open(path)}     # one shard open at a time
            else:
                self._open = {path: _torch_load(path)}
        return self._open[path]

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.files[name]
        handle = self._handle(path)
        if path.endswith(".safetensors"):
            try:
                return handle.get_tensor(name)
            except Exception as e:     # safetensors' errors name neither the file nor the tensor
                raise ValueError(f"{path}: cannot read tensor {name!r} ({_first_line(e)}); truncated or "
                                 f"corrupt shard?") from None
        return to_numpy(handle[name])


    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _torch_load(path: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:       # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path}: not a plain tensor state dict (torch.load weights_only=True: "
                         f"{str(e).splitlines()[0]})") from None


def read_hf_config(directory: str) -> tuple[Any, dict[str, Any]]:
    """(transformers config, LWM config fields) of a folder; a vision export's `lwm_vision.json` adds the
    vision fields (and its 'vqgan' dict). Raises ValueError naming the unsupported config field."""
    from transformers import AutoConfig

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no config.json: not a Hugging Face model folder")
    if not isinstance(_read_json(path), dict):       # transformers' own message is three lines
        raise ValueError(f"{path}: expected a JSON object of config fields")
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    fields = hf_config_to_lwm(hf_config, source=path)
    vision_path = os.path.join(directory, VISION_CONFIG_FILE)
    if os.path.isfile(vision_path):
        vision = _read_json(vision_path)
        if not isinstance(vision, dict) or "vision_vocab_size" not in vision:
            raise ValueError(f"{vision_path}: expected a JSON object with 'vision_vocab_size'")
        fields.update(vision_vocab_size=int(vision["vision_vocab_size"]),
                      tie_vision_embeddings=bool(vision.get("tie_vision_embeddings", False)))
        fields["vqgan"] = vision.get("vqgan")
    return hf_config, fields


def lwm_config_from_hf(directory: str, **updates):
    """The `LLaMAConfig` (or `VisionLLaMAConfig` for a vision export) of an HF folder, with `updates`."""
    from lwm.model.llama import LLaMAConfig

    _, fields = read_hf_config(directory)
    fields.pop("vqgan", None)
    if "vision_vocab_size" in fields:
        from lwm.model.vision_llama import VisionLLaMAConfig

        return VisionLLaMAConfig.from_dict({**fields, **updates}, source=directory)
    return LLaMAConfig.from_dict({**fields, **updates}, source=directory)


def iter_hf_params(directory: str, scan_layers: bool = True, param_scan_axis: int = 0,
                   dtype: Any = None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(LWM key path, numpy array) one tensor at a time from an HF folder (see `hf_to_lwm_items`)."""
    config = lwm_config_from_hf(directory, param_scan_axis=param_scan_axis)
    yield from hf_to_lwm_items(HFWeights(directory), config, scan_layers=scan_layers, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Export.


def _save_tokenizer(path: str, output_dir: str, chat_template: str | None):
    """Write transformers' LlamaTokenizer for a sentencepiece model (BOS added, as LLaMA prompts start with
    it) and the chat template; returns the tokenizer (its bos/eos ids go into the model config)."""
    from transformers import LlamaTokenizer

    model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"--tokenizer {path}: no sentencepiece tokenizer.model there")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, os.path.join(tmp, "tokenizer.model"))
        tokenizer = LlamaTokenizer.from_pretrained(tmp, local_files_only=True, add_bos_token=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(output_dir)
    shutil.copy(model_file, os.path.join(output_dir, "tokenizer.model"))
    return tokenizer


def export_hf(params: Mapping, config: Any, output_dir: str, tokenizer: str = "", dtype: Any = None,
              max_shard_size: str = "5GB", vqgan_config: Any = None, vqgan_checkpoint: str = "") -> dict:
    """Write `params` (the inner linen tree) of a text or vision model as a Hugging Face folder.

    Text: LlamaForCausalLM (config.json, generation_config.json, safetensors) and, with `tokenizer` (a
    sentencepiece tokenizer.model or a folder holding one), the tokenizer with the LWM chat template
    (`lwm.text.chat_template.HF_CHAT_TEMPLATE`); bos/eos/pad ids then come from the tokenizer. Vision (a config
    with `vision_vocab_size`): the same plus `vision.safetensors` and `lwm_vision.json` (module docstring);
    `vqgan_checkpoint` is copied beside them as `vqgan`. dtype: numpy dtype of the written floats (None: as
    stored). Returns a summary dict (parameters, files, token ids)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from lwm.text.chat_template import HF_CHAT_TEMPLATE

    os.makedirs(output_dir, exist_ok=True)
    tok = _save_tokenizer(tokenizer, output_dir, HF_CHAT_TEMPLATE) if tokenizer else None
    bos = tok.bos_token_id if tok is not None else None
    eos = tok.eos_token_id if tok is not None else None
    state_dict = lwm_params_to_hf_state_dict(params, config, dtype=dtype)
    vision = {k: state_dict.pop(k) for k in VISION_KEYS if k in state_dict}
    any_tensor = state_dict["model.embed_tokens.weight"]
    torch_dtype = to_torch(any_tensor[:1]).dtype
    hf_config = lwm_config_to_hf(config, bos_token_id=bos, eos_token_id=eos, dtype=torch_dtype)
    with torch.device("meta"):                  # no second copy of the weights: they are assigned below
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict({k: to_torch(v) for k, v in state_dict.items()}, strict=True, assign=True)
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=hf_config.bos_token_id,
                                               eos_token_id=hf_config.eos_token_id,
                                               pad_token_id=hf_config.eos_token_id)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    if vision:
        from safetensors.numpy import save_file

        from lwm.model.vision_llama import END_OF_FRAME, END_OF_VISION, NUM_VISION_CODES

        tied = bool(getattr(config, "tie_vision_embeddings", False))
        save_file({k: np.ascontiguousarray(v) for k, v in vision.items()
                   if not (tied and k == VISION_KEYS[1])}, os.path.join(output_dir, VISION_FILE))
        meta = dict(vision_vocab_size=int(config.vision_vocab_size), tie_vision_embeddings=tied,
                    num_vision_codes=NUM_VISION_CODES, end_of_frame=END_OF_FRAME, end_of_vision=END_OF_VISION,
                    vqgan=None if vqgan_config is None else dataclasses.asdict(vqgan_config))
        with open(os.path.join(output_dir, VISION_CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if vqgan_checkpoint:
            shutil.copy(vqgan_checkpoint, os.path.join(output_dir, "vqgan"))
    n = sum(v.size for k, v in state_dict.items() if not (hf_config.tie_word_embeddings and k == "lm_head.weight"))
    n += sum(v.size for k, v in vision.items()
             if not (getattr(config, "tie_vision_embeddings", False) and k == VISION_KEYS[1]))
    return dict(parameters=n, dtype=str(torch_dtype).replace("torch.", ""), vision=bool(vision),
                bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                tokenizer=tok is not None)
