"""VQGAN: shapes and code ranges, parity with an independent torch float64 reference written from the original's
module structure, the released parameter layout (pickle), the restricted unpickler, the native msgpack format."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict

from lwm.utils import safe_pickle
from lwm.model.shapes import param_shapes
from lwm.model.vqgan import VQGAN, VQGANConfig, decode_jit, encode_jit

CFG = VQGANConfig.load("tiny")  # 32x32 frames -> 8x8 codes, attention in two levels and the mid blocks


@pytest.fixture(scope="module")
def vqgan():
    """Tiny random VQGAN whose norm scales/biases and conv biases are perturbed away from their 1/0 init."""
    model = VQGAN.load(None, CFG, seed=0)
    rng = np.random.default_rng(1)
    model.params = jax.tree.map(
        lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32) if p.ndim == 1 else p, model.params)
    return model


@pytest.fixture(scope="module")
def frames():
    return jax.random.uniform(jax.random.key(2), (1, 2, CFG.resolution, CFG.resolution, 3), minval=-1, maxval=1)


# ---- independent reference (torch, float64, NCHW), walking the parameter tree by the original's names ----

def _t(a):
    return torch.from_numpy(np.asarray(a, np.float64))


def _conv(x, p, stride=1, padding=None):
    w = _t(p["kernel"]).permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    if padding is None:
        padding = w.shape[-1] // 2
    return F.conv2d(x, w, _t(p["bias"]), stride=stride, padding=padding)


def _norm(x, p):
    return F.group_norm(x, 32, _t(p["scale"]), _t(p["bias"]), eps=1e-6)


def _resnet(x, p):
    h = _conv(F.silu(_norm(x, p["GroupNorm_0"])), p["Conv_0"])
    h = _conv(F.silu(_norm(h, p["GroupNorm_1"])), p["Conv_1"])
    return (_conv(x, p["Conv_2"]) if "Conv_2" in p else x) + h


def _attn(x, p):
    B, C, H, W = x.shape
    h = _norm(x, p["GroupNorm_0"])
    q, k, v = (_conv(h, p[f"Conv_{i}"]).reshape(B, C, H * W) for i in range(3))
    w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) * C ** -0.5, dim=-1)
    h = torch.einsum("bqk,bck->bcq", w, v).reshape(B, C, H, W)
    return x + _conv(h, p["Conv_3"])


def _level(x, p, n_res, attn_sizes):
    for i in range(n_res):
        x = _resnet(x, p[f"ResnetBlock_{i}"])
        if x.shape[-1] in attn_sizes:
            x = _attn(x, p[f"AttnBlock_{i}"])  # the size is constant within a level: AttnBlock_i follows
    return x                                   # ResnetBlock_i


def _mid(x, p):
    x = _resnet(x, p["ResnetBlock_0"])
    if "AttnBlock_0" in p:
        x = _attn(x, p["AttnBlock_0"])
    return _resnet(x, p["ResnetBlock_1"])


def ref_encode(params, pixels, down_pad=(0, 1, 0, 1)):
    """(F, H, W, 3) -> pre-quantization z (F, h, w, E), float64."""
    p, cfg = params["encoder"], CFG
    x = _conv(_t(pixels).permute(0, 3, 1, 2), p["Conv_0"])
    for lvl in range(cfg.num_resolutions):
        blk = p[f"DownsamplingBlock_{lvl}"]
        x = _level(x, blk, cfg.num_res_blocks, cfg.attn_resolutions)
        if lvl != cfg.num_resolutions - 1:
            x = _conv(F.pad(x, down_pad), blk["Downsample_0"]["Conv_0"], stride=2, padding=0)
    x = _mid(x, p["MidBlock_0"])
    x = _conv(F.silu(_norm(x, p["GroupNorm_0"])), p["Conv_1"])
    return _conv(x, params["quant_conv"]).permute(0, 2, 3, 1).numpy()


def ref_decode(params, codes):
    """(F, h, w) codes -> (F, H, W, 3) pixels clipped to [-1, 1], float64."""
    p, cfg = params["decoder"], CFG
    x = _t(params["quantize"]["embeddings"])[torch.from_numpy(np.asarray(codes, np.int64))].permute(0, 3, 1, 2)
    x = _conv(_conv(x, params["post_quant_conv"]), p["Conv_0"])
    x = _mid(x, p["MidBlock_0"])
    for i, lvl in enumerate(reversed(range(cfg.num_resolutions))):  # UpsamplingBlock_0 is the deepest level
        blk = p[f"UpsamplingBlock_{i}"]
        x = _level(x, blk, cfg.num_res_blocks + 1, cfg.attn_resolutions)
        if lvl != 0:
            x = _conv(F.interpolate(x, scale_factor=2, mode="nearest"), blk["Upsample_0"]["Conv_0"])
    x = _conv(F.silu(_norm(x, p["GroupNorm_0"])), p["Conv_1"])
    return x.clamp(-1, 1).permute(0, 2, 3, 1).numpy()


def _numpy_tree(params):
    return jax.tree.map(lambda a: np.asarray(a), params)


# ---- tests ----

def test_encode_decode_shapes_and_code_ranges(vqgan, frames):
    s, E = CFG.codes_per_side, CFG.quantized_embed_dim
    q_vid, c_vid = vqgan.encode(frames)                                    # video (B, T, H, W, 3)
    assert q_vid.shape == (1, 2, s, s, E) and c_vid.shape == (1, 2, s, s) and c_vid.dtype == jnp.int32
    q_img, c_img = vqgan.encode(frames[0])                                 # images (B, H, W, 3)
    assert q_img.shape == (2, s, s, E) and c_img.shape == (2, s, s)
    np.testing.assert_array_equal(c_img, c_vid[0])
    assert 0 <= int(c_vid.min()) and int(c_vid.max()) < CFG.num_embeddings
    assert len(np.unique(np.asarray(c_vid))) > 10                          # not a constant code map
    emb = vqgan.params["quantize"]["embeddings"]
    np.testing.assert_allclose(q_vid, emb[c_vid], atol=1e-6)               # quantized = codebook[codes]
    out_vid, out_img = vqgan.decode(c_vid), vqgan.decode(c_img)
    assert out_vid.shape == frames.shape and out_img.shape == frames[0].shape
    assert float(jnp.abs(out_vid).max()) <= 1.0 and float(jnp.abs(out_vid).std()) > 1e-3
    np.testing.assert_array_equal(out_img, out_vid[0])
    np.testing.assert_allclose(vqgan.decode_vectors(q_vid), out_vid, atol=1e-4)  # z_q up to rounding
    # Batching: one frame alone gets the codes it gets in the batch.
    np.testing.assert_array_equal(vqgan.encode(frames[0, 1:])[1], c_img[1:])


def test_matches_float64_torch_reference(vqgan, frames):
    params = _numpy_tree(vqgan.params)
    pixels = np.asarray(frames[0])                                         # (F, H, W, 3)
    z_ref = ref_encode(params, pixels)                                     # (F, h, w, E)
    _, codes = vqgan.encode(pixels)
    # The chosen code is a nearest codebook entry of the reference z (up to float32 rounding of distances).
    emb = params["quantize"]["embeddings"].astype(np.float64)             # (V, E)
    dist = (z_ref ** 2).sum(-1)[..., None] + (emb ** 2).sum(-1) - 2 * z_ref @ emb.T   # (F, h, w, V)
    chosen = np.take_along_axis(dist, np.asarray(codes)[..., None], -1)[..., 0]
    assert np.all(chosen <= dist.min(-1) + 1e-5 * (1 + np.abs(dist.min(-1))))
    # Pre-quantization activations agree; a wrong Downsample padding (symmetric, the usual default) does not.
    z = jax.jit(lambda p, x: vqgan.model.apply({"params": p}, x, method=lambda m, x: m.quant_conv(m.encoder(x))))(
        vqgan.params, jnp.asarray(pixels))
    scale = np.abs(z_ref).max()
    np.testing.assert_allclose(np.asarray(z, np.float64), z_ref, atol=1e-4 * scale)
    z_wrong = ref_encode(params, pixels, down_pad=(1, 1, 1, 1))
    assert np.abs(z_wrong - z_ref).max() > 100 * 1e-4 * scale
    # Decoding the same codes.
    np.testing.assert_allclose(np.asarray(vqgan.decode(codes), np.float64), ref_decode(params, codes), atol=1e-4)


def test_jit_compiles_once_per_shape(vqgan, frames):
    vqgan.encode(frames)
    n = encode_jit._cache_size()
    VQGAN(CFG, vqgan.params).encode(frames * 0.5)                          # same config: shared cache
    vqgan.encode(frames[0])                                                # 2 images = 1 video of 2 frames
    assert encode_jit._cache_size() == n
    odd = jnp.concatenate([frames[0]] * 6 + [frames[0, :1]])              # 13 frames: used nowhere else
    vqgan.encode(odd), vqgan.encode(odd[None])
    assert encode_jit._cache_size() == n + 1                                  # new frame count: one more
    m = decode_jit._cache_size()
    codes = jnp.zeros((1, CFG.codes_per_side, CFG.codes_per_side), jnp.int32)
    vqgan.decode(codes), vqgan.decode(codes + 5), vqgan.decode(codes[None])
    assert decode_jit._cache_size() <= m + 1


def test_released_config_shapes():
    cfg = VQGANConfig()                                                    # the released defaults
    assert cfg == VQGANConfig.load("released") and cfg.codes_per_side == 16
    shapes = flatten_dict(param_shapes(cfg), sep="/")
    n = sum(int(np.prod(s.shape)) for s in shapes.values())
    assert 145e6 < n < 147.5e6, n
    # Paths and shapes that the original's module structure produces.
    expected = {
        "encoder/Conv_0/kernel": (3, 3, 3, 128),
        "encoder/DownsamplingBlock_1/ResnetBlock_0/Conv_2/kernel": (1, 1, 128, 256),
        "encoder/DownsamplingBlock_3/Downsample_0/Conv_0/kernel": (3, 3, 512, 512),
        "encoder/DownsamplingBlock_4/ResnetBlock_1/GroupNorm_1/scale": (768,),
        "encoder/MidBlock_0/ResnetBlock_1/Conv_1/kernel": (3, 3, 768, 768),
        "encoder/Conv_1/kernel": (3, 3, 768, 64),
        "quant_conv/kernel": (1, 1, 64, 64),
        "quantize/embeddings": (8192, 64),
        "post_quant_conv/kernel": (1, 1, 64, 64),
        "decoder/Conv_0/kernel": (3, 3, 64, 768),
        "decoder/UpsamplingBlock_0/ResnetBlock_2/Conv_1/kernel": (3, 3, 768, 768),   # deepest level, 3 blocks
        "decoder/UpsamplingBlock_0/Upsample_0/Conv_0/kernel": (3, 3, 768, 768),
        "decoder/UpsamplingBlock_1/ResnetBlock_0/Conv_2/kernel": (1, 1, 768, 512),
        "decoder/UpsamplingBlock_4/ResnetBlock_2/Conv_0/kernel": (3, 3, 128, 128),
        "decoder/Conv_1/kernel": (3, 3, 128, 3),
    }
    for path, shape in expected.items():
        assert shapes[path].shape == shape, path
    assert not any("AttnBlock" in k for k in shapes)                       # released: no attention
    assert "encoder/DownsamplingBlock_4/Downsample_0/Conv_0/kernel" not in shapes
    assert "decoder/UpsamplingBlock_4/Upsample_0/Conv_0/kernel" not in shapes


def test_released_pickle_layout_loads(vqgan, frames, tmp_path):
    path = tmp_path / "vqgan"                                              # the release has no suffix
    with open(path, "wb") as f:
        pickle.dump(_numpy_tree(vqgan.params), f)                          # nested dicts of numpy arrays
    loaded = VQGAN.load(str(path), CFG)
    q0, c0 = vqgan.encode(frames)
    q1, c1 = loaded.encode(frames)
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(q0, q1)
    np.testing.assert_array_equal(vqgan.decode(c0), loaded.decode(c1))
    # A tree that does not match the config is refused with the offending path named.
    bad = _numpy_tree(vqgan.params)
    bad["decoder"]["Conv_1"]["kernel"] = bad["decoder"]["Conv_1"]["kernel"][..., :2]
    del bad["quant_conv"]["bias"]
    with open(path, "wb") as f:
        pickle.dump(bad, f)
    with pytest.raises(ValueError, match=r"quant_conv/bias.*decoder/Conv_1/kernel"):
        VQGAN.load(str(path), CFG)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil"
    with open(path, "wb") as f:
        pickle.dump({"encoder": _RunsCode(marker)}, f)
    with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
        VQGAN.load(str(path), CFG)
    assert not marker.exists()
    with open(path, "rb") as f:                                            # control: plain pickle runs it
        pickle.load(f)
    assert marker.exists()


def test_native_format_round_trips(vqgan, frames, tmp_path):
    path = str(tmp_path / "vqgan.msgpack")
    vqgan.save(path)
    with open(path, "rb") as f:
        assert not f.read(2).startswith(b"\x80\x04")                       # not a pickle
    loaded = VQGAN.load(path, CFG)
    for a, b in zip(jax.tree.leaves(vqgan.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(vqgan.encode(frames)[1], loaded.encode(frames)[1])
    with pytest.raises(ValueError, match="msgpack"):
        vqgan.save(str(tmp_path / "vqgan.pkl"))
    with pytest.raises(ValueError, match="do not match"):                  # wrong config for the file
        VQGAN.load(path, CFG.replace(z_channels=32))


def test_bad_inputs_raise(vqgan):
    with pytest.raises(ValueError, match="H = W = 32"):
        vqgan.encode(jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"\[0, 8192\)"):
        vqgan.decode(jnp.full((1, 8, 8), 8192, jnp.int32))
    with pytest.raises(ValueError, match="codes"):
        vqgan.decode(jnp.zeros((1, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGANConfig(hidden_channels=48)
    with pytest.raises(ValueError, match="unknown VQGANConfig field"):
        CFG.replace(n_embed=4)
