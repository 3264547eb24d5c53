"""Two-level context parallelism ('ulysses_ring': Ulysses inside groups of u devices, the ring across the
sp/u groups) vs dense attention, and `lwm.train` under it vs one device.

Float32, forward and gradients wrt q, k, v, causal with packed segment ids and grouped-query attention
(N=8 query heads, K=2 kv heads: with u=4 each kv head is repeated twice inside a group, past the plain
Ulysses cap of u <= K), at sp=4 and sp=8 with inner groups of 2 and 4, zigzag and striped. Negative
controls: the masks assuming the natural order; the group's tokens described as the layout over the
sp/u groups (striped) or without the group reorder (zigzag), the two easy mistakes about which positions a
group holds; and a ring that skips its last hop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import layout, ring
from lwm.attention.context_parallel import context_parallel_attention
from support import rel_err
from support.train_runs import losses, run_train, text_args
from training.conftest import corpus  # noqa: F401  (the fixture: tokenizer and text.jsonl that lwm.train reads)

B, T, N, K, H = 1, 64, 8, 2, 8
RTOL = 1e-5
CHUNKS = dict(q_chunk=8, k_chunk=8)


def make_mesh(sp, tp=1):
    return Mesh(np.array(jax.devices()[: sp * tp]).reshape(1, 1, tp, sp), ("dp", "fsdp", "tp", "sp"))


def two_level(data, sp, u, balance, tp=1, **kw):
    """(out, dq, dk, dv) of 'ulysses_ring' on natural-order inputs laid out over sp devices as `balance`."""
    to = lambda x: layout.to_layout(x, sp, balance)
    back = lambda x: layout.from_layout(x, sp, balance)

    def fn(q, k, v, do, seg):
        f = lambda q, k, v: back(context_parallel_attention(to(q), to(k), to(v), to(seg), strategy="ulysses_ring",
                                                           ulysses_size=u, load_balance=balance, **kw, **CHUNKS))
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    with jax.set_mesh(make_mesh(sp, tp)):
        return jax.jit(fn)(data["q"], data["k"], data["v"], data["do"], data["seg"])


CASES = [(4, 2, "zigzag"), (8, 4, "striped"),
         pytest.param(4, 2, "striped", marks=pytest.mark.slow), pytest.param(8, 2, "zigzag", marks=pytest.mark.slow),
         pytest.param(8, 4, "zigzag", marks=pytest.mark.slow), pytest.param(4, 4, "none", marks=pytest.mark.slow),
         pytest.param(4, 1, "striped", marks=pytest.mark.slow)]


@pytest.mark.parametrize("sp,u,balance", CASES)
def test_equals_dense_forward_and_gradient(data, dense_reference, sp, u, balance):
    got = two_level(data, sp, u, balance)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, dense_reference(True, True)):
        assert rel_err(g, w) < RTOL, (name, rel_err(g, w))


@pytest.mark.slow
def test_with_tp_on_the_same_mesh(data, dense_reference):
    """tp=2, sp=4, u=2: 4 query heads and 1 kv head per tp shard; the kv head repeated x2 inside a group."""
    got = two_level(data, 4, 2, "zigzag", tp=2)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, dense_reference(True, True)):
        assert rel_err(g, w) < RTOL, (name, rel_err(g, w))


def _group_as_layout_over_groups(real):
    """The mistake: a group's tokens taken as the layout over sp/u devices (wrong for striped)."""
    return lambda balance, sp, local_len, group=1: real(balance, sp // group, local_len)


@pytest.mark.parametrize("control", ["natural_order_masks", "striped_over_groups", "zigzag_unordered",
                                     "ring_skips_a_hop"])
def test_negative_controls_fail(data, dense_reference, monkeypatch, control):
    balance = "zigzag" if control in ("natural_order_masks", "zigzag_unordered") else "striped"
    kw = {}
    if control == "natural_order_masks":
        kw["mask_balance"] = "none"
    elif control == "striped_over_groups":
        monkeypatch.setattr(layout, "runs", _group_as_layout_over_groups(layout.runs))
    elif control == "zigzag_unordered":
        monkeypatch.setattr(layout, "to_group_order", lambda x, *a, **k: x)
        monkeypatch.setattr(layout, "from_group_order", lambda x, *a, **k: x)
    else:
        real = ring.ring_size
        monkeypatch.setattr(ring, "ring_size", lambda cfg: real(cfg) - 1)
    got = two_level(data, 8, 2, balance, **kw)
    assert rel_err(got[0], dense_reference(True, True)[0]) > 1e-2, control


def test_errors_name_the_numbers(data):
    x = jnp.zeros((1, 64, 8, 8))
    with jax.set_mesh(make_mesh(8)):
        with pytest.raises(ValueError, match=r"context_parallel_ulysses_size=3 must be >= 1 and divide sp=8"):
            context_parallel_attention(x, x, x, strategy="ulysses_ring", ulysses_size=3)
    with jax.set_mesh(make_mesh(4, tp=2)):
        with pytest.raises(ValueError, match=r"num_attention_heads=4 / tp=2 = 2 heads"):
            y = jnp.zeros((1, 64, 4, 8))
            context_parallel_attention(y, y, y, strategy="ulysses_ring", ulysses_size=4, load_balance="zigzag")
    with jax.set_mesh(make_mesh(4)):
        with pytest.raises(ValueError, match=r"applies only to context_parallel_strategy='ulysses_ring'"):
            context_parallel_attention(x, x, x, strategy="ring", ulysses_size=2)


def test_config_field_errors():
    from lwm.model.llama import LLaMAConfig

    with pytest.raises(ValueError, match=r"needs context_parallel_ulysses_size >= 1"):
        LLaMAConfig.load("tiny").replace(attention_impl="ring", context_parallel_strategy="ulysses_ring")
    with pytest.raises(ValueError, match=r"context_parallel_ulysses_size=2 applies only to"):
        LLaMAConfig.load("tiny").replace(attention_impl="ring", context_parallel_ulysses_size=2)


def test_mesh_check_before_compiling():
    from jax.sharding import AbstractMesh

    from lwm.model.llama import LLaMAConfig
    from lwm.parallel.sharding import MESH_AXES, MeshError, check_model_mesh

    cfg = LLaMAConfig.load("tiny").replace(attention_impl="ring", context_parallel_strategy="ulysses_ring",
                                           context_parallel_ulysses_size=4)
    check_model_mesh(cfg, AbstractMesh((1, 1, 1, 8), MESH_AXES), seq_len=64)        # 4 heads, groups of 4
    with pytest.raises(MeshError, match=r"context_parallel_ulysses_size=4 must be >= 1 and divide sp=2"):
        check_model_mesh(cfg, AbstractMesh((1, 1, 1, 2), MESH_AXES), seq_len=64)
    with pytest.raises(MeshError, match=r"= 2 heads"):
        check_model_mesh(cfg, AbstractMesh((1, 1, 2, 4), MESH_AXES), seq_len=64)


@pytest.mark.slow
def test_train_losses_equal_one_device(corpus, tmp_path):
    """`python -m lwm.train` on the tiny preset (N=4, K=2), packed text, 4 steps: sp=4 in groups of 2 (zigzag)
    and sp=8 in groups of 4 (striped: the 2 kv heads repeated x2 in a group) give one device's losses (1e-5)."""
    steps = 4
    chunks = ["--llama.scan_query_chunk_size=16", "--llama.scan_key_chunk_size=16"]
    run_train(corpus, text_args(corpus, tmp_path, "one", steps) + chunks)
    want = losses(tmp_path / "one")
    assert sorted(want) == list(range(steps)) and want[steps - 1] < want[0]
    for sp, u, balance in ((4, 2, "zigzag"), (8, 4, "striped")):
        name = f"sp{sp}_u{u}_{balance}"
        flags = [f"--mesh_dim=1,1,1,{sp}", "--llama.attention_impl=ring",
                 "--update_llama_config=dict(context_parallel_strategy='ulysses_ring',"
                 f"context_parallel_ulysses_size={u},context_parallel_load_balance='{balance}')"]
        proc = run_train(corpus, text_args(corpus, tmp_path, name, steps) + chunks + flags, devices=sp)
        said = f"strategy ulysses_ring, load balance {balance}"
        assert said in proc.stderr, proc.stderr[-2000:]
        got = losses(tmp_path / name)
        assert sorted(got) == sorted(want)
        worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
        assert worst < 1e-5, (name, worst, got, want)


@pytest.mark.slow
def test_model_logits_and_prefill_cache_match_dense(tiny_sharp_head):
    """The tiny model (N=4, K=2) on mesh fsdp=2 x sp=4 with groups of 2 (zigzag): the dense model's logits and
    prefilled KV cache (natural order) on two packed rows of 64 tokens, through the model's layout boundary."""
    from lwm.model.llama import CacheMode, LLaMAForCausalLM, init_cache, sequence_layout
    from lwm.parallel.sharding import make_mesh as model_mesh, param_shardings

    cfg, _, params = tiny_sharp_head
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 500, size=(2, 64)), jnp.int32)
    seg = jnp.asarray(np.repeat(np.array([[1, 2, 3, 3], [1, 1, 2, 3]]), 16, axis=1), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in (16, 16, 32, 32, 16, 16)]).reshape(2, 64), jnp.int32)
    run = lambda model, c: model.apply({"params": c[0]}, ids, position_ids=pos, segment_ids=seg,
                                       cache=init_cache(c[1], 2, 72), cache_mode=CacheMode.PREFILL)
    want, want_cache = run(LLaMAForCausalLM(cfg.replace(attention_impl="dense")), (params, cfg))
    cp_cfg = cfg.replace(attention_impl="ring", context_parallel_strategy="ulysses_ring",
                         context_parallel_ulysses_size=2, context_parallel_load_balance="zigzag",
                         scan_query_chunk_size=8, scan_key_chunk_size=8)
    mesh = model_mesh("1,2,1,4")
    with jax.set_mesh(mesh):
        assert sequence_layout(cp_cfg) == ("zigzag", 4)
        placed = jax.device_put(params, param_shardings(params, cp_cfg, mesh))
        got, got_cache = jax.jit(lambda p: run(LLaMAForCausalLM(cp_cfg), (p, cp_cfg)))(placed)
    assert rel_err(got, want) < 1e-5
    for name in ("k", "v"):
        assert rel_err(got_cache[name], want_cache[name]) < 1e-5, name
