"""The generation engine's slot API and generate options: continuous batching through slots gives the
tokens of batched generation; per-row budgets, stop ids and cancellation from the stream callback; a bf16
KV cache for an fp32 model; the length checks; a row's tokens do not depend on its batch (exactly, non-empty).
Elsewhere: decoding == full forward in tests/model/test_llama.py::test_kv_cache_decoding_equals_full_forward and
tests/inference/test_sampling.py::test_greedy_with_cache_equals_repeated_full_forwards; the cache over sp in
test_llama.py::test_kv_cache_sharded_over_sp and test_sampling.py::test_ring_sampler_matches_single_device; 2
processes in tests/inference/test_engine_multihost.py."""
import os

os.environ.setdefault("NPROC", "32")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.inference.engine import Engine
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.inference.sampling import PromptTooLongError, SamplingConfig

EOS, PAD = 2, 0
PROMPTS = [[1, 17, 250, 33, 9], [1, 300, 5, 77, 123, 99, 4, 8, 201, 6, 45, 11, 12], [1, 402]]
NEW = 10


@pytest.fixture(scope="module")
def engine():
    cfg = LLaMAConfig.load("tiny").replace(max_sequence_length=64)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree_util.tree_map_with_path(       # a sharp head: greedy choices far from ties
        lambda p, x: x * 8.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    return Engine(model, params, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def batched(engine):
    return engine.generate(PROMPTS, NEW)


def _collect(outs, toks, emitted):
    for r in range(len(outs)):
        outs[r] += [int(t) for t, e in zip(toks[r], emitted[r]) if e]


def test_slots_equal_batched_generate(engine, batched):
    """Prompts enter free slots at different times (continuous batching) and decode side by side at their
    own fill lengths; each slot's tokens are the batched run's. Slot 3 stays free throughout."""
    state = engine.init_state(slots=4, cache_length=48)
    outs = [[], [], [], []]
    state = engine.insert(engine.prefill(PROMPTS[0]), state, 0, max_new_tokens=NEW)
    outs[0].append(int(engine.drawn(state)[0][0]))                       # token 0 comes from the insert
    state, toks, emitted = engine.step(state, 3)
    _collect(outs, toks, emitted)
    state = engine.insert(engine.prefill(PROMPTS[1]), state, 1, max_new_tokens=NEW)
    state = engine.insert(engine.prefill(PROMPTS[2]), state, 2, max_new_tokens=NEW)
    first, going = engine.drawn(state)
    outs[1].append(int(first[1]))
    outs[2].append(int(first[2]))
    assert going[1] and going[2] and not going[3]                       # slot 3 is free
    while engine.active(state).any():
        state, toks, emitted = engine.step(state, 4)
        _collect(outs, toks, emitted)
    cut = [o[:o.index(EOS)] if EOS in o else o for o in outs]
    assert cut[:3] == batched.tokens and outs[3] == []
    assert len({tuple(t) for t in batched.tokens}) == 3                     # the rows really differ
    # A freed slot takes a new prompt and gives the same tokens again.
    state = engine.free(state, 1)
    state = engine.insert(engine.prefill(PROMPTS[1]), state, 1, max_new_tokens=NEW)
    again = [[], [int(engine.drawn(state)[0][1])], [], []]
    while engine.active(state).any():
        state, toks, emitted = engine.step(state, 5)
        _collect(again, toks, emitted)
    assert again[1][:len(batched.tokens[1])] == batched.tokens[1] and again[0] == again[2] == []


def test_batched_insert_puts_each_row_in_its_slot(engine, batched):
    """One prefill_batch of 4 rows inserted with one call: row r goes to slots[r] (-1 leaves row 3 out),
    with its own budget, sampling and seed; greedy rows give the batched run's tokens, sampled rows the
    tokens `generate` draws with the same seeds (a wrong row-to-seed mapping would change them)."""
    from lwm.inference.engine import Prefix

    t = engine.padded_length(max(map(len, PROMPTS)))
    rows = PROMPTS + [PROMPTS[0]]
    hot = SamplingConfig(temperature=0.9)
    sampled = engine.generate(PROMPTS, NEW, sampling=hot, seeds=[5, 6, 7])
    assert sampled.tokens != batched.tokens
    for sampling, seeds, want in ((SamplingConfig(), [0, 0, 0, 0], batched.tokens),
                                  (hot, [5, 6, 7, 0], sampled.tokens)):
        logits, cache = engine.prefill_batch(rows, t, t)
        state = engine.init_state(slots=4, cache_length=48)
        state = engine.insert(Prefix(cache, logits, t, [len(p) for p in rows]), state, [2, 0, 3, -1],
                              max_new_tokens=[NEW, NEW, 3, 1], sampling=sampling, seed=seeds)
        first, going = engine.drawn(state)
        assert list(going) == [True, False, True, True]                # slot 1 took no row
        outs = [[int(first[s])] if going[s] else [] for s in range(4)]
        while engine.active(state).any():
            state, toks, emitted = engine.step(state, 4)
            _collect(outs, toks, emitted)
        cut = [o[:o.index(EOS)] if EOS in o else o for o in outs]
        assert cut[2] == want[0] and cut[0] == want[1] and cut[3] == want[2][:3] and cut[1] == []
    state = engine.insert(Prefix(cache, logits, t, [len(p) for p in rows]), state, [2, 0, 3, -1], max_new_tokens=4)
    assert list(engine.free(state, [0, 2]).active) == [False, False, False, True]   # several slots, one call
    with pytest.raises(ValueError, match="slot=5 is not in"):
        engine.free(state, [1, 5])
    with pytest.raises(ValueError, match="a slot may take one prefix row only"):
        engine.insert(Prefix(cache, logits, t, [len(p) for p in rows]), state, [0, 0, 1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="3 slots for a prefix of 4 rows"):
        engine.insert(Prefix(cache, logits, t, [len(p) for p in rows]), state, [0, 1, 2], max_new_tokens=2)


def test_budgets_stop_ids_cancel_and_timings(engine, batched):
    want = batched.tokens
    # A stop id that row 0 draws at step i and no row draws before the steps checked below.
    i = next(i for i in range(1, NEW) if want[0][i] not in want[0][:i] + want[1][:4] + want[2][:2])
    stop = want[0][i]
    seen, calls = [], []

    def stream(step, tokens):
        calls.append(list(tokens))
        seen.append(step)
        return [2] if step == 1 else None                                  # cancel row 2 after two tokens

    res = engine.generate(PROMPTS, [NEW, 4, NEW], stop_ids=[stop], stream=stream)
    assert res.tokens[0] == want[0][:i] and res.finish[0] == "stop"
    assert res.tokens[1] == want[1][:4] and res.finish[1] == "length"
    assert res.tokens[2] == want[2][:2] and res.finish[2] == "cancelled"
    assert seen == list(range(len(seen))) and calls[0] == [want[0][0], want[1][0], want[2][0]]
    assert all(c[2] is None for c in calls[2:])                            # nothing after the cancel
    s = res.stats
    assert s["prefill_s"] > 0 and s["decode_s"] > 0 and s["time_to_first_token_s"] >= s["prefill_s"]
    assert s["new_tokens"] == i + 4 + 2 and s["prompt_tokens"] == sum(map(len, PROMPTS))
    with pytest.raises(ValueError, match="may return only row indices"):
        engine.generate(PROMPTS[:1], 2, stream=lambda step, tokens: ["row 0"])


def test_bf16_cache_for_an_fp32_model(engine, batched):
    low = Engine(engine.model, engine.params, eos_id=EOS, pad_id=PAD, cache_dtype="bf16")
    assert low.generate(PROMPTS, NEW).tokens == batched.tokens             # sharp head: same greedy tokens
    logits32, cache32 = engine.prefill_batch(PROMPTS, 16, 20)
    logits16, cache16 = low.prefill_batch(PROMPTS, 16, 20)
    assert cache32["k"].dtype == jnp.float32 and cache16["k"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(logits16, logits32)                      # the prefill does not read the cache
    np.testing.assert_allclose(np.asarray(cache16["k"], np.float32), cache32["k"], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="--cache_dtype='int4'"):
        Engine(engine.model, engine.params, eos_id=EOS, pad_id=PAD, cache_dtype="int4")


def test_length_checks_name_the_limit(engine):
    state = engine.init_state(slots=1, cache_length=32)
    prefix = engine.prefill([1] * 20)
    with pytest.raises(ValueError, match="does not fit the state's cache_length=32"):
        engine.insert(prefix, state, 0, max_new_tokens=20)
    with pytest.raises(PromptTooLongError, match="max_sequence_length=64"):
        engine.generate([[1] * 60], 5)
    with pytest.raises(ValueError, match="slot=3 is not in"):
        engine.insert(prefix, state, 3, max_new_tokens=2)


def test_per_row_seeds_do_not_depend_on_the_batch(engine):
    """A row's draws depend on its seed and settings only: alone or beside other rows, the same tokens."""
    hot = SamplingConfig(temperature=1.0, top_p=0.9)
    together = engine.generate(PROMPTS, NEW, sampling=hot, seeds=[7, 8, 9]).tokens
    alone = engine.generate(PROMPTS[1:2], NEW, sampling=hot, seeds=8).tokens
    assert alone[0] == together[1] and alone[0], (alone, together)
    other = engine.generate(PROMPTS[1:2], NEW, sampling=hot, seeds=9).tokens
    assert other != alone                                                  # negative control: seed matters


def test_a_slot_moved_to_another_state_goes_on_unchanged(engine, batched):
    """Engine.move (the server moves a lone request into the bigger state others decode in): a slot that drew
    three tokens in a one-slot state goes on in slot 2 of a four-slot state and gives the batched run's tokens;
    the source slot is freed and no other slot starts. Both states belong to one engine (no per-state engine:
    everything per slot travels in the state)."""
    other = engine
    small, big = engine.init_state(slots=1, cache_length=48), other.init_state(slots=4, cache_length=48)
    small = engine.insert(engine.prefill(PROMPTS[1]), small, 0, max_new_tokens=NEW)
    out = [int(engine.drawn(small)[0][0])]
    small, toks, emitted = engine.step(small, 2)
    out += [int(t) for t in toks[0][emitted[0]]]
    small, big = other.move(small, 0, big, 2)
    assert not engine.active(small)[0] and list(other.active(big)) == [False, False, True, False]
    while other.active(big).any():
        big, toks, emitted = other.step(big, 4)
        assert not emitted[[0, 1, 3]].any()
        out += [int(t) for t in toks[2][emitted[2]]]
    assert (out[:out.index(EOS)] if EOS in out else out) == batched.tokens[1]
    with pytest.raises(ValueError, match="cache lengths differ"):
        other.move(engine.init_state(slots=1, cache_length=32), 0, big, 0)
