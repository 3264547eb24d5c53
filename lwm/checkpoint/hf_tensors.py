"""LWM linen parameters <-> Hugging Face `LlamaForCausalLM` state dict and config.

    LWM linen tree (kernels (in, out))                   transformers (weights (out, in))
    transformer/wte/embedding            (V, D)          model.embed_tokens.weight               (V, D)
    .../attention/wq/kernel              (D, N*H)        model.layers.i.self_attn.q_proj.weight  (N*H, D)  *
    .../attention/wk/kernel              (D, K*H)        model.layers.i.self_attn.k_proj.weight  (K*H, D)  *
    .../attention/wv/kernel              (D, K*H)        model.layers.i.self_attn.v_proj.weight  (K*H, D)
    .../attention/wo/kernel              (N*H, D)        model.layers.i.self_attn.o_proj.weight  (D, N*H)
    .../feed_forward/w1/kernel           (D, F)          model.layers.i.mlp.gate_proj.weight     (F, D)
    .../feed_forward/w2/kernel           (F, D)          model.layers.i.mlp.down_proj.weight     (D, F)
    .../feed_forward/w3/kernel           (D, F)          model.layers.i.mlp.up_proj.weight       (F, D)
    .../attention_norm/kernel            (D,)            model.layers.i.input_layernorm.weight
    .../ffn_norm/kernel                  (D,)            model.layers.i.post_attention_layernorm.weight
    transformer/ln_f/kernel              (D,)            model.norm.weight
    lm_head/kernel                       (D, V)          lm_head.weight                          (V, D)
  vision models (lwm.model.vision_llama) add, in the export's vision.safetensors:
    transformer/vte/embedding            (W, D)          model.vision_embed_tokens.weight        (W, D)
    vision_head/kernel                   (D, W)          vision_head.weight                      (W, D)

`...` is `transformer/h/scan_decoder` (every layer stacked on axis `param_scan_axis`) or `transformer/h/<i>`.
* LWM rotates interleaved pairs (dims 2j, 2j+1 of a head), transformers rotates halves (dims j, j+H/2), so
the output features of wq and wk are reordered within each head: HF feature h*H + c*H/2 + j is LWM feature
h*H + 2j + c. For H=4 the order within a head is [0, 2, 1, 3]: LWM pairs (0,1), (2,3) become HF halves
(0,2), (1,3). Attention scores are unchanged because q and k are permuted alike.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_LAYER_MAP = {  # LWM path inside a layer -> (HF name inside model.layers.i, kind)
    ("attention", "wq", "kernel"): ("self_attn.q_proj.weight", "q"),
    ("attention", "wk", "kernel"): ("self_attn.k_proj.weight", "k"),
    ("attention", "wv", "kernel"): ("self_attn.v_proj.weight", "linear"),
    ("attention", "wo", "kernel"): ("self_attn.o_proj.weight", "linear"),
    ("feed_forward", "w1", "kernel"): ("mlp.gate_proj.weight", "linear"),
    ("feed_forward", "w2", "kernel"): ("mlp.down_proj.weight", "linear"),
    ("feed_forward", "w3", "kernel"): ("mlp.up_proj.weight", "linear"),
    ("attention_norm", "kernel"): ("input_layernorm.weight", "norm"),
    ("ffn_norm", "kernel"): ("post_attention_layernorm.weight", "norm"),
}


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _dims(config: Any) -> dict[str, int]:
    """D, N, K, H, F, L, V of an LWM config (an `LLaMAConfig` or a dict with the same field names)."""
    d, n = int(_cfg(config, "hidden_size")), int(_cfg(config, "num_attention_heads"))
    k = int(_cfg(config, "num_key_value_heads") or n)
    return dict(D=d, N=n, K=k, H=d // n, F=int(_cfg(config, "intermediate_size")),
                L=int(_cfg(config, "num_hidden_layers")), V=int(_cfg(config, "vocab_size")))


def _interleaved_to_halves(kernel: np.ndarray, heads: int) -> np.ndarray:
    """(D, heads*H) with rotary pairs (2j, 2j+1) -> (D, heads*H) with pairs (j, j+H/2), per head."""
    d, out = kernel.shape
    h = out // heads
    return kernel.reshape(d, heads, h // 2, 2).transpose(0, 1, 3, 2).reshape(d, out)


def _halves_to_interleaved(kernel: np.ndarray, heads: int) -> np.ndarray:
    d, out = kernel.shape
    h = out // heads
    return kernel.reshape(d, heads, 2, h // 2).transpose(0, 1, 3, 2).reshape(d, out)


def _expected_layer_shapes(dims: dict[str, int]) -> dict[tuple[str, ...], tuple[int, ...]]:
    D, N, K, H, F = dims["D"], dims["N"], dims["K"], dims["H"], dims["F"]
    return {
        ("attention", "wq", "kernel"): (D, N * H), ("attention", "wk", "kernel"): (D, K * H),
        ("attention", "wv", "kernel"): (D, K * H), ("attention", "wo", "kernel"): (N * H, D),
        ("feed_forward", "w1", "kernel"): (D, F), ("feed_forward", "w2", "kernel"): (F, D),
        ("feed_forward", "w3", "kernel"): (D, F), ("attention_norm", "kernel"): (D,),
        ("ffn_norm", "kernel"): (D,),
    }


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    node = tree
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise KeyError(f"LWM params: missing {'/'.join(path[:i + 1])} (looking for {'/'.join(path)})")
        node = node[name]
    return node


def _check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(array.shape)} does not match the config's {tuple(shape)}")
    return array


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, prefix + (key,)) if isinstance(value, Mapping) else [prefix + (key,)]
    return out


def lwm_params_to_hf_state_dict(params: Mapping, config: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """LWM linen params (scanned or unscanned; found from the tree, `{'params': ...}` accepted) ->
    {HF name: numpy array}. Arrays keep their dtype unless `dtype` is given. With tied embeddings there is
    no lm_head in the LWM tree and `lm_head.weight` is the embedding. A vision config (one with
    `vision_vocab_size`) adds `VISION_KEYS` (the vision embedding and head, (W, D) each).

    >>> sd = lwm_params_to_hf_state_dict(params, LLaMAConfig.load("tiny"))            # doctest: +SKIP
    >>> sd["model.layers.0.self_attn.q_proj.weight"].shape                             # doctest: +SKIP
    (64, 64)
    """
    if set(params.keys()) == {"params"}:
        params = params["params"]
    dims = _dims(config)
    axis = int(_cfg(config, "param_scan_axis", 0) or 0)
    cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x).astype(dtype))
    layers = _get(params, ("transformer", "h"))
    scanned = "scan_decoder" in layers
    expected_layer_count = dims["L"]
    if not scanned and sorted(layers, key=int) != [str(i) for i in range(expected_layer_count)]:
        raise ValueError(f"LWM params: transformer/h has layers {sorted(layers, key=int)}, the config says "
                         f"num_hidden_layers={expected_layer_count}")
    used = {("transformer", "wte", "embedding"), ("transformer", "ln_f", "kernel")}

    sd: dict[str, np.ndarray] = {}
    sd["model.embed_tokens.weight"] = _check("transformer/wte/embedding",
                                             cast(_get(params, ("transformer", "wte", "embedding"))),
                                             (dims["V"], dims["D"]))
    for sub, shape in _expected_layer_shapes(dims).items():
        hf_name, kind = _LAYER_MAP[sub]
        if scanned:
            path = ("transformer", "h", "scan_decoder") + sub
            stacked = cast(_get(params, path))
            used.add(path)
            full = list(shape)
            full.insert(axis, dims["L"])
            _check("/".join(path), stacked, tuple(full))
        for i in range(dims["L"]):
            if scanned:
                w = np.take(stacked, i, axis=axis)
            else:
                path = ("transformer", "h", str(i)) + sub
                w = _check("/".join(path), cast(_get(params, path)), shape)
                used.add(path)
            if kind == "q":
                w = _interleaved_to_halves(w, dims["N"])
            elif kind == "k":
                w = _interleaved_to_halves(w, dims["K"])
            sd[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(w.T if w.ndim == 2 else w)
    sd["model.norm.weight"] = _check("transformer/ln_f/kernel", cast(_get(params, ("transformer", "ln_f",
                                                                                   "kernel"))), (dims["D"],))
    if _cfg(config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        head = _check("lm_head/kernel", cast(_get(params, ("lm_head", "kernel"))), (dims["D"], dims["V"]))
        sd["lm_head.weight"] = np.ascontiguousarray(head.T)
        used.add(("lm_head", "kernel"))
    if _is_vision(config):
        W = int(_cfg(config, "vision_vocab_size"))
        sd[VISION_KEYS[0]] = _check("transformer/vte/embedding", cast(_get(params, ("transformer", "vte",
                                                                                   "embedding"))), (W, dims["D"]))
        used.add(("transformer", "vte", "embedding"))
        if _cfg(config, "tie_vision_embeddings", False):
            sd[VISION_KEYS[1]] = sd[VISION_KEYS[0]]
        else:
            head = _check("vision_head/kernel", cast(_get(params, ("vision_head", "kernel"))), (dims["D"], W))
            sd[VISION_KEYS[1]] = np.ascontiguousarray(head.T)
            used.add(("vision_head", "kernel"))
    unused = [p for p in _leaves(params) if p not in used]
    if unused:
        raise ValueError(f"LWM params: entries not in a LLaMA model (a vision model's? pass its vision config): "
                         f"{['/'.join(p) for p in unused[:5]]}")
    return sd


VISION_KEYS = ("model.vision_embed_tokens.weight", "vision_head.weight")


def _is_vision(config: Any) -> bool:
    return _cfg(config, "vision_vocab_size") is not None


def hf_to_lwm_items(state_dict: Mapping[str, Any], config: Any, scan_layers: bool | None = None,
                    dtype: Any = None):
    """Yield (LWM key path, numpy array) one LWM tensor at a time from {HF name: array or torch tensor}
    (a lazy mapping is read one entry at a time: a scanned stack reads its L layers, then is yielded).
    scan_layers defaults to the config's; scanned layers are stacked on `param_scan_axis`. A vision config
    (one with `vision_vocab_size`) also takes the vision embedding and head. Raises KeyError naming a missing
    HF entry, ValueError naming a shape mismatch or entries the model does not have (checked at the end)."""
    dims = _dims(config)
    if scan_layers is None:
        scan_layers = bool(_cfg(config, "scan_layers", True))
    axis = int(_cfg(config, "param_scan_axis", 0) or 0)
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    used = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state_dict:
            raise KeyError(f"HF state dict: missing {name}")
        used.add(name)
        array = to_numpy(state_dict[name])
        return _check(name, array if dtype is None else array.astype(dtype), shape)

    D, V = dims["D"], dims["V"]
    yield ("transformer", "wte", "embedding"), take("model.embed_tokens.weight", (V, D))
    for sub, shape in _expected_layer_shapes(dims).items():
        hf_name, kind = _LAYER_MAP[sub]
        ws = []
        for i in range(dims["L"]):
            w = take(f"model.layers.{i}.{hf_name}", shape[::-1])
            w = w.T if w.ndim == 2 else w
            if kind == "q":
                w = _halves_to_interleaved(w, dims["N"])
            elif kind == "k":
                w = _halves_to_interleaved(w, dims["K"])
            if scan_layers:
                ws.append(w)
            else:
                yield ("transformer", "h", str(i)) + sub, np.ascontiguousarray(w)
        if scan_layers:
            yield ("transformer", "h", "scan_decoder") + sub, np.ascontiguousarray(np.stack(ws, axis=axis))
            del ws
    yield ("transformer", "ln_f", "kernel"), take("model.norm.weight", (D,))
    if not tied:
        yield ("lm_head", "kernel"), np.ascontiguousarray(take("lm_head.weight", (V, D)).T)
    elif "lm_head.weight" in state_dict:
        used.add("lm_head.weight")
    if _is_vision(config):
        W = int(_cfg(config, "vision_vocab_size"))
        yield ("transformer", "vte", "embedding"), take(VISION_KEYS[0], (W, D))
        if not _cfg(config, "tie_vision_embeddings", False):
            yield ("vision_head", "kernel"), np.ascontiguousarray(take(VISION_KEYS[1], (W, D)).T)
        elif VISION_KEYS[1] in state_dict:
            used.add(VISION_KEYS[1])
    unexpected = [k for k in state_dict if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(f"HF state dict: entries a LLaMA of this config does not have: {unexpected[:5]}")


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers' `rope_parameters` for an LWM config's theta and RoPE scaling fields (the inverse of the
    mapping in `hf_config_to_lwm`; 'dynamic' also needs max_position_embeddings = rope_original_max_position,
    which `lwm_config_to_hf` writes). Optional yarn/longrope keys are written only when they differ from
    transformers' defaults, so a base's own config.json comes back unchanged."""
    kind = _cfg(config, "rope_scaling_type", "") or ""
    out: dict[str, Any] = {"rope_type": kind or "default", "rope_theta": float(_cfg(config, "theta", 10000.0))}
    if kind:
        out["factor"] = float(_cfg(config, "rope_scaling_factor", 1.0))
    if kind in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = int(_cfg(config, "rope_original_max_position", 8192))
    if kind == "llama3":
        out.update(low_freq_factor=float(_cfg(config, "rope_low_freq_factor", 1.0)),
                   high_freq_factor=float(_cfg(config, "rope_high_freq_factor", 4.0)))
    if kind in ("yarn", "longrope") and _cfg(config, "rope_attention_factor", None) is not None:
        out["attention_factor"] = float(_cfg(config, "rope_attention_factor", None))
    if kind == "yarn":
        out.update(beta_fast=float(_cfg(config, "rope_beta_fast", 32.0)),
                   beta_slow=float(_cfg(config, "rope_beta_slow", 1.0)))
        for ours, theirs in (("rope_mscale", "mscale"), ("rope_mscale_all_dim", "mscale_all_dim")):
            if _cfg(config, ours, 0.0):
                out[theirs] = float(_cfg(config, ours, 0.0))
        if not _cfg(config, "rope_truncate", True):
            out["truncate"] = False
    if kind == "longrope":
        out.update(short_factor=[float(v) for v in _cfg(config, "rope_short_factor", ())],
                   long_factor=[float(v) for v in _cfg(config, "rope_long_factor", ())])
    return out


def lwm_config_to_hf(config: Any, bos_token_id: int | None = None, eos_token_id: int | None = None,
                     **overrides):
    """An LWM config -> `transformers.LlamaConfig` for the same network (the text part of a vision config).
    bos/eos default to the config's; pass the tokenizer's (`lwm.checkpoint.hf_folders.export_text` does)."""
    from transformers import LlamaConfig

    dims = _dims(config)
    fields = dict(
        vocab_size=dims["V"], hidden_size=dims["D"], intermediate_size=dims["F"], num_hidden_layers=dims["L"],
        num_attention_heads=dims["N"], num_key_value_heads=dims["K"], head_dim=dims["H"],
        rms_norm_eps=float(_cfg(config, "rms_norm_eps", 1e-6)), rope_parameters=rope_parameters(config),
        max_position_embeddings=int(_cfg(config, "rope_original_max_position", 8192)
                                    if _cfg(config, "rope_scaling_type", "") == "dynamic"
                                    else _cfg(config, "max_sequence_length", 4096)),
        tie_word_embeddings=bool(_cfg(config, "tie_word_embeddings", False)),
        bos_token_id=int(_cfg(config, "bos_token_id", 1) if bos_token_id is None else bos_token_id),
        eos_token_id=int(_cfg(config, "eos_token_id", 2) if eos_token_id is None else eos_token_id),
        initializer_range=float(_cfg(config, "initializer_range", 0.02)),
        hidden_act="silu", attention_bias=False, mlp_bias=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ROPE_FIELDS = {"default": set(), "linear": {"factor"},
                "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
                "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                         "mscale", "mscale_all_dim", "truncate"},
                "dynamic": {"factor"},
                "longrope": {"factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                             "long_factor"}}


def _rope_fields(kind: str, rope: dict[str, Any], hf_config: Any, where) -> dict[str, Any]:
    """The LLaMAConfig RoPE scaling fields of transformers' `rope_parameters` (`hf_config_to_lwm`). Missing
    optional keys take transformers' defaults (modeling_rope_utils): yarn beta_fast 32, beta_slow 1, truncate
    true; yarn/longrope factor = max_position_embeddings / original_max_position_embeddings when absent."""
    get = lambda name, default=None: getattr(hf_config, name, default)
    out: dict[str, Any] = {}
    original = None
    if kind in ("llama3", "yarn", "longrope"):
        # transformers gives a top-level original_max_position_embeddings (Phi-3) priority over the rope dict's
        original = get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        if original is None:
            raise ValueError(f"{where('rope_parameters.original_max_position_embeddings')} is missing")
        out["rope_original_max_position"] = int(original)
    if kind == "dynamic":                # the NTK base grows above max_position_embeddings (transformers)
        out["rope_original_max_position"] = int(hf_config.max_position_embeddings)
    if kind != "default":
        factor = rope.get("factor")
        if factor is None and kind in ("yarn", "longrope"):
            factor = hf_config.max_position_embeddings / original
        if factor is None:
            raise ValueError(f"{where('rope_parameters.factor')} is missing")
        out["rope_scaling_factor"] = float(factor)
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]))
    if kind in ("yarn", "longrope") and rope.get("attention_factor") is not None:
        out["rope_attention_factor"] = float(rope["attention_factor"])
    if kind == "yarn":
        out.update(rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                   rope_mscale=float(rope.get("mscale") or 0.0),
                   rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
                   rope_truncate=bool(rope.get("truncate", True)))
    if kind == "longrope":
        for theirs, ours in (("short_factor", "rope_short_factor"), ("long_factor", "rope_long_factor")):
            if not isinstance(rope.get(theirs), (list, tuple)):
                raise ValueError(f"{where('rope_parameters.' + theirs)} must be a list of numbers")
            out[ours] = [float(v) for v in rope[theirs]]
    return out


def hf_config_to_lwm(hf_config: Any, source: str = "HF config") -> dict[str, Any]:
    """A transformers config of a LLaMA-family model (Llama 1-3.x, GQA, RoPE scaling of any type in
    lwm.model.llama.ROPE_SCALING_TYPES (`linear`, `llama3`, `yarn`, `dynamic`, `longrope`), tied
    embeddings; Mistral without a sliding window shorter than its context) -> a dict of LLaMAConfig fields.
    Anything this model cannot run exactly raises ValueError naming `source` and the config field."""
    get = lambda name, default=None: getattr(hf_config, name, default)
    where = lambda field: f"{source}: {field}"
    model_type = get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where('model_type')} {model_type!r} is not a LLaMA-family model "
                         f"(supported: {SUPPORTED_MODEL_TYPES})")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where('hidden_act')} {get('hidden_act')!r}: LWM's MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if get(field, False):
            raise ValueError(f"{where(field)} is true: LWM's projections have no bias")
    head_dim = get("head_dim")
    if head_dim and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"{where('head_dim')} {head_dim} * num_attention_heads {hf_config.num_attention_heads} "
                         f"!= hidden_size {hf_config.hidden_size}: LWM needs head_dim = hidden_size / heads")
    window, context = get("sliding_window"), hf_config.max_position_embeddings
    if window is not None and get("use_sliding_window", True) and window < context:
        raise ValueError(f"{where('sliding_window')} {window} < max_position_embeddings {context}: LWM attends "
                         "to the whole context (no sliding window)")
    rope = dict(get("rope_parameters", None) or {})
    if "rope_theta" not in rope and get("rope_theta") is not None:
        rope["rope_theta"] = get("rope_theta")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_FIELDS:
        raise ValueError(f"{where('rope_parameters.rope_type')} {kind!r} is not supported (only "
                         f"{sorted(_ROPE_FIELDS)})")
    if float(rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ValueError(f"{where('partial_rotary_factor')} != 1: LWM rotates the whole head")
    out = dict(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=get("num_key_value_heads") or hf_config.num_attention_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps), theta=float(rope.get("rope_theta", 10000.0)),
        max_sequence_length=int(context), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        rope_scaling_type="" if kind == "default" else kind)
    out.update(_rope_fields(kind, rope, hf_config, where))
    for field in ("bos_token_id", "eos_token_id"):
        value = get(field)
        if isinstance(value, (list, tuple)):  # Llama 3.x lists several EOS ids; the first is the main one
            value = value[0] if value else None
        if value is not None:
            out[field] = int(value)
    if get("initializer_range") is not None:
        out["initializer_range"] = float(get("initializer_range"))
    return out


def to_numpy(x: Any) -> np.ndarray:
    """A numpy/jax array or torch tensor (bf16 included) -> numpy, without a float32 detour."""
    if type(x).__module__.startswith("torch"):
        import ml_dtypes
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def to_torch(x: np.ndarray):
    """numpy (bf16 included) -> torch tensor sharing memory where torch allows it."""
    import ml_dtypes
    import torch

    x = np.ascontiguousarray(x)
    if not x.flags.writeable:         # torch wants writable memory (a safetensors/mmap read is not)
        x = x.copy()
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
