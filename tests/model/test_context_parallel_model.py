"""The model with context parallelism: every strategy x load balance gives the dense model's logits, KV
cache and greedy tokens, and the needle eval's answers under every strategy (non-empty, varied reference answers;
each run traced its own strategy).

The layout is applied inside the model (lwm.model.llama.LLaMABlockCollection), so these checks feed natural-order
batches and compare natural-order results, as every caller sees them. The model and engine fixtures
(tiny_sharp_head, greedy_batch) and the needle eval's files (golden_workdir) come from tests/conftest.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.model.llama import CacheMode, LLaMAForCausalLM, init_cache, sequence_layout
from lwm.inference.engine import Engine
from lwm.parallel.sharding import make_mesh, param_shardings
from golden.cases import needle_flags
from support import EOS, NEW, PAD, PROMPTS, rel_err
from support.cp_trace import layouts_of, strategies_of, traced_strategies

STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")
FAST = {("ring", "zigzag"), ("ulysses", "striped")}


def grid(fast=FAST):
    return [pytest.param(s, b, marks=() if (s, b) in fast else pytest.mark.slow) for s in STRATEGIES
            for b in BALANCES]


@pytest.fixture(scope="module")
def packed():
    """Two rows of 64 tokens, each packed with three sequences (segment ids 1..3, positions restart)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, size=(2, 64)).astype(np.int32)
    seg = np.repeat(np.array([[1, 2, 3, 3], [1, 1, 2, 3]]), 16, axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in (16, 16, 32)] + [np.arange(n) for n in (32, 16, 16)]).reshape(2, 64)
    return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos, jnp.int32)


@pytest.mark.parametrize("strategy,balance", grid())
def test_model_logits_and_prefill_cache_match_dense(tiny_sharp_head, packed, strategy, balance):
    cfg, _, params = tiny_sharp_head
    ids, seg, pos = packed
    dense = LLaMAForCausalLM(cfg.replace(attention_impl="dense"))
    want, want_cache = dense.apply({"params": params}, ids, position_ids=pos, segment_ids=seg,
                                   cache=init_cache(cfg, 2, 72), cache_mode=CacheMode.PREFILL)
    cp_cfg = cfg.replace(attention_impl="ring", context_parallel_strategy=strategy,
                         context_parallel_load_balance=balance, scan_query_chunk_size=8, scan_key_chunk_size=8)
    model = LLaMAForCausalLM(cp_cfg)
    mesh = make_mesh("1,2,1,4")
    with jax.set_mesh(mesh):
        assert sequence_layout(cp_cfg) == (balance, 4)  # the layout is really applied inside
        placed = jax.device_put(params, param_shardings(params, cp_cfg, mesh))
        fn = jax.jit(lambda p, i, s, q: model.apply({"params": p}, i, position_ids=q, segment_ids=s,
                                                     cache=init_cache(cp_cfg, 2, 72), cache_mode=CacheMode.PREFILL))
        got, got_cache = fn(placed, ids, seg, pos)
    assert rel_err(got, want) < 1e-5
    for name in ("k", "v"):  # the cache comes back in natural order
        assert rel_err(got_cache[name], want_cache[name]) < 1e-5, name
    np.testing.assert_array_equal(got_cache["segment_ids"], want_cache["segment_ids"])


@pytest.mark.parametrize("strategy,balance", grid(fast={("ring", "zigzag")}))
def test_greedy_sampling_is_identical(tiny_sharp_head, greedy_batch, strategy, balance):
    cfg, _, params = tiny_sharp_head
    cp_cfg = cfg.replace(attention_impl="ring", context_parallel_strategy=strategy,
                         context_parallel_load_balance=balance)
    mesh = make_mesh("1,2,1,4")
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, param_shardings(params, cp_cfg, mesh))
        s = Engine(LLaMAForCausalLM(cp_cfg), placed, eos_id=EOS, pad_id=PAD)
        assert s.generate(PROMPTS, NEW).tokens == greedy_batch


@pytest.mark.slow
def test_needle_eval_answers_are_identical_under_every_strategy(golden_workdir, tmp_path):
    """python -m lwm.eval_needle on 8 devices (fsdp=2, sp=4) under each strategy (with a balanced layout where
    one applies) gives the single-device blockwise run's responses token for token. The reference responses are
    non-empty and not all the same (all-empty answers would match under any attention), and each run traced its
    own strategy and balance (support.cp_trace; the reference none)."""
    import json

    from lwm import eval_needle

    d = golden_workdir
    with traced_strategies() as seen:
        ref = eval_needle.main(needle_flags(d, tmp_path / "ref.json"))
    want = [r["response"] for r in ref]
    assert all(want) and len(set(want)) >= 2, want
    assert not strategies_of(seen), seen
    for strategy, balance in (("ring", "zigzag"), ("all_gather", "striped"), ("ulysses", "none")):
        extra = ["--mesh_dim=1,2,1,4", "--llama.attention_impl=ring",
                 f"--update_llama_config=dict(context_parallel_strategy='{strategy}',"
                 f"context_parallel_load_balance='{balance}')"]
        with traced_strategies() as seen:
            got = eval_needle.main(needle_flags(d, tmp_path / f"{strategy}.json", extra))
        assert strategies_of(seen) == {(strategy, balance)} and balance in layouts_of(seen), (strategy, seen)
        assert [r["response"] for r in got] == want, strategy
        assert json.loads((tmp_path / f"{strategy}.json").read_text())
