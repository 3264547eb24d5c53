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
    no lm_head in the LWM tree and `lm_head.weight` is the embedding.

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
    unused = [p for p in _leaves(params) if p not in used]
    if unused:
        raise ValueError(f"LWM params: entries not in a LLaMA model (a vision model's?): "
                         f"{['/'.join(p) for p in unused[:5]]}")
    return sd


def hf_state_dict_to_lwm_params(state_dict: Mapping[str, Any], config: Any, scan_layers: bool | None = None,
                                dtype: Any = None) -> dict:
    """{HF name: array or torch tensor} -> LWM linen params (the inner tree, without {'params': ...}).
    scan_layers defaults to the config's; scanned layers are stacked on `param_scan_axis`."""
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
    params: dict[str, Any] = {"transformer": {"wte": {"embedding": take("model.embed_tokens.weight", (V, D))},
                                              "h": {}, "ln_f": {"kernel": take("model.norm.weight", (D,))}}}
    per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
    for sub, shape in _expected_layer_shapes(dims).items():
        hf_name, kind = _LAYER_MAP[sub]
        for i in range(dims["L"]):
            w = take(f"model.layers.{i}.{hf_name}", shape[::-1])
            w = w.T if w.ndim == 2 else w
            if kind == "q":
                w = _halves_to_interleaved(w, dims["N"])
            elif kind == "k":
                w = _halves_to_interleaved(w, dims["K"])
            per_layer.setdefault(sub, []).append(np.ascontiguousarray(w))
    layers = params["transformer"]["h"]
    for sub, ws in per_layer.items():
        if scan_layers:
            targets = [layers.setdefault("scan_decoder", {})]
            ws = [np.stack(ws, axis=axis)]
        else:
            targets = [layers.setdefault(str(i), {}) for i in range(dims["L"])]
        for node, w in zip(targets, ws):
            for name in sub[:-1]:
                node = node.setdefault(name, {})
            node[sub[-1]] = w
    if not tied:
        params["lm_head"] = {"kernel": np.ascontiguousarray(take("lm_head.weight", (V, D)).T)}
    elif "lm_head.weight" in state_dict:
        used.add("lm_head.weight")
    unexpected = [k for k in state_dict if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(f"HF state dict: entries a LLaMA of this config does not have: {unexpected[:5]}")
    return params


def lwm_config_to_hf(config: Any, **overrides):
    """An LWM config -> `transformers.LlamaConfig` for the same network."""
    from transformers import LlamaConfig

    dims = _dims(config)
    fields = dict(
        vocab_size=dims["V"], hidden_size=dims["D"], intermediate_size=dims["F"], num_hidden_layers=dims["L"],
        num_attention_heads=dims["N"], num_key_value_heads=dims["K"], head_dim=dims["H"],
        rms_norm_eps=float(_cfg(config, "rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(_cfg(config, "theta", 10000.0))},
        max_position_embeddings=int(_cfg(config, "max_sequence_length", 4096)),
        tie_word_embeddings=bool(_cfg(config, "tie_word_embeddings", False)),
        bos_token_id=_cfg(config, "bos_token_id", 1), eos_token_id=_cfg(config, "eos_token_id", 2),
        initializer_range=float(_cfg(config, "initializer_range", 0.02)),
        hidden_act="silu", attention_bias=False, mlp_bias=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def hf_config_to_lwm(hf_config: Any) -> dict[str, Any]:
    """A `transformers.LlamaConfig` -> a dict of LWM config fields (for `LLaMAConfig.from_dict`)."""
    if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "attention_bias", False):
        raise ValueError("HF config: only LLaMA with silu MLPs and no attention bias converts to LWM")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF config: rope_type {rope.get('rope_type')!r} is not LWM's plain rotary embedding")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"HF config: head_dim {head_dim} * heads != hidden_size {hf_config.hidden_size}")
    return dict(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=hf_config.num_key_value_heads,
        rms_norm_eps=hf_config.rms_norm_eps, theta=float(rope.get("rope_theta", 10000.0)),
        max_sequence_length=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings))


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
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
