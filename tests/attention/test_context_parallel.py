"""Context parallelism (ring, all_gather, ulysses) x load balance (none, zigzag, striped) vs dense attention.

Float32, forward and gradients wrt q, k, v, on 2, 4 and 8 simulated devices, causal and not, with packed
segment ids and grouped-query attention (N=8 query heads, K=2 kv heads). Each check lays the natural-order
inputs out with `layout.to_layout`, runs the strategy, and undoes the layout on the output, as the model
does at its boundary. Negative controls: the data permuted but the masks assuming the natural order (the
permutation applied without moving the positions), and the ring with its offsets dropped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import layout
from lwm.attention.context_parallel import context_parallel_attention
from support import rel_err

RTOL = 1e-5
B, T, N, K, H = 2, 64, 8, 2, 8
CHUNKS = dict(q_chunk=8, k_chunk=8)


def make_mesh(shape):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, ("dp", "fsdp", "tp", "sp"))


def cp_value_and_grads(mesh, data, use_seg, **kw):
    """Output and gradients of strategy `kw` on natural-order inputs laid out as kw['load_balance']."""
    sp, balance = mesh.shape["sp"], kw["load_balance"]
    to = lambda x: layout.to_layout(x, sp, balance)
    back = lambda x: layout.from_layout(x, sp, balance)

    def fn(q, k, v, do, seg):
        s = to(seg) if use_seg else None
        f = lambda q, k, v: back(context_parallel_attention(to(q), to(k), to(v), s, **kw, **CHUNKS))
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    with jax.set_mesh(mesh):
        return jax.jit(fn)(data["q"], data["k"], data["v"], data["do"], data["seg"])


def assert_parity(got, want):
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(g, w) < RTOL, (name, rel_err(g, w))


STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")


FAST = {("ring", "zigzag"), ("all_gather", "striped"), ("ulysses", "none")}  # the rest run with the slow tests


@pytest.mark.parametrize("strategy,balance", [
    pytest.param(s, b, marks=() if (s, b) in FAST else pytest.mark.slow) for s in STRATEGIES for b in BALANCES])
def test_sp4_causal_packed_gqa(data, dense_reference, strategy, balance):
    got = cp_value_and_grads(make_mesh((1, 1, 1, 4)), data, True, strategy=strategy, load_balance=balance)
    assert_parity(got, dense_reference(True, True))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("balance", BALANCES)
@pytest.mark.parametrize("sp,causal,use_seg", [(2, False, True), (8, True, True), (2, True, False)])
def test_sp2_sp8_causal_and_not(data, dense_reference, strategy, balance, sp, causal, use_seg):
    got = cp_value_and_grads(make_mesh((1, 1, 1, sp)), data, use_seg, strategy=strategy, load_balance=balance,
                             causal=causal)
    assert_parity(got, dense_reference(causal, use_seg))


@pytest.mark.slow
@pytest.mark.parametrize("strategy,balance", [("ring", "zigzag"), ("all_gather", "striped"), ("ulysses", "zigzag")])
def test_with_dp_and_tp_on_the_same_mesh(data, dense_reference, strategy, balance):
    """dp=2, tp=2, sp=2: batch and heads sharded as well (ulysses: 4 query heads and 1 kv head per tp
    shard, kv heads repeated x2)."""
    got = cp_value_and_grads(make_mesh((2, 1, 2, 2)), data, True, strategy=strategy, load_balance=balance)
    assert_parity(got, dense_reference(True, True))


@pytest.mark.parametrize("strategy,balance", [
    ("ring", "zigzag"), pytest.param("all_gather", "striped", marks=pytest.mark.slow),
    pytest.param("ring", "striped", marks=pytest.mark.slow)])
def test_permutation_without_moving_positions_fails(data, dense_reference, strategy, balance):
    """Negative control: the data laid out, the masks computed as if it were in natural order."""
    got = cp_value_and_grads(make_mesh((1, 1, 1, 4)), data, True, strategy=strategy, load_balance=balance,
                             mask_balance="none")
    assert rel_err(got[0], dense_reference(True, True)[0]) > 1e-2


def test_ulysses_head_error_names_the_numbers(data):
    x = jnp.zeros((2, 64, 4, 8))
    with jax.set_mesh(make_mesh((1, 1, 1, 8))):
        with pytest.raises(ValueError, match=r"num_attention_heads=4 / tp=1 = 4 heads, sp=8"):
            context_parallel_attention(x, x, x, strategy="ulysses")


def test_zigzag_length_error(data):
    with jax.set_mesh(make_mesh((1, 1, 1, 4))):
        with pytest.raises(ValueError, match=r"sequence length 36 is not divisible by 8"):
            x = jnp.zeros((2, 36, 4, 8))
            context_parallel_attention(x, x, x, load_balance="zigzag")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,balance", [("ring", "zigzag"), ("all_gather", "striped"), ("ulysses", "zigzag")])
def test_pallas_kernel_inside_every_strategy(data, dense_reference, strategy, balance):
    """The Pallas (Triton-style) block kernel, in interpret mode, inside each strategy with a layout."""
    got = cp_value_and_grads(make_mesh((1, 1, 1, 2)), data, True, strategy=strategy, load_balance=balance,
                             block_impl="pallas", pallas_interpret=True)
    assert_parity(got, dense_reference(True, True))
