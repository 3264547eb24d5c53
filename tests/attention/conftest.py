"""Fixtures of the attention tests: one set of random inputs and the dense reference on them.

`data` takes its shapes from the module that asks for it (module constants B, T, N, K, H, and SEGMENTS, the
number of segment ids, 4 when the module sets none), so each kernel's tests pick sizes that exercise that
kernel (padding for blockwise, several shards for the ring) while drawing their inputs the same way."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.attention import dense_attention
from support import value_and_grads


@pytest.fixture(scope="module")
def data(request):
    """dict(q (B, T, N, H), k, v (B, T, K, H), do (B, T, N, H): float32 standard normals, seg (B, T) int32: packed
    rows, sorted ids in [0, SEGMENTS) with 0 as padding at the start), drawn from default_rng(0) in that order."""
    B, T, N, K, H = (getattr(request.module, name) for name in "BTNKH")
    segments = getattr(request.module, "SEGMENTS", 4)
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                   for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)])
    seg = np.sort(rng.integers(0, segments, size=(B, T)), axis=1).astype(np.int32)
    return dict(q=q, k=k, v=v, do=do, seg=jnp.asarray(seg))


@pytest.fixture(scope="module")
def dense_reference(data):
    """get(causal, use_seg) -> (out, dq, dk, dv) of dense attention on `data` (the gradients of <out, do>),
    computed once per setting."""
    cache = {}

    def get(causal, use_seg):
        if (causal, use_seg) not in cache:
            seg = data["seg"] if use_seg else None
            fn = lambda q, k, v: dense_attention(q, k, v, seg, causal=causal)
            cache[causal, use_seg] = jax.jit(lambda *a: value_and_grads(fn, *a))(
                data["q"], data["k"], data["v"], data["do"])
        return cache[causal, use_seg]

    return get
