"""The engine is stateless (lwm.inference.engine, module docstring (f)): the slot API leaves the Engine's attributes
untouched, every per-slot setting travels in the decode state, so one engine serves several states with different
sampling side by side; the top-k/top-p filter is chosen per step from the live slots' own settings; the sampled
head is an argument (of the engine or of a call), not a rebuilt model. Tiny presets, a few compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.inference.engine import Engine
from lwm.inference.sampling import SamplingConfig
from lwm.inference.vision import CompileClock
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM

EOS, PAD, NEW = 2, 0, 6
PROMPTS = [[1, 17, 250, 33, 9], [1, 300, 5, 77, 123, 99, 4]]
HOT = SamplingConfig(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def engine():
    cfg = LLaMAConfig.load("tiny").replace(max_sequence_length=64)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return Engine(model, params, eos_id=EOS, pad_id=PAD)


def _snapshot(engine) -> dict:
    """Every attribute: its identity and, for plain containers and scalars, its value."""
    return {k: (id(v), repr(v) if isinstance(v, (list, dict, tuple, set, int, float, str, bool)) else None)
            for k, v in vars(engine).items()}


def _run(engine, state, slot, n):
    """n tokens of `slot` (the insert's first, then steps), one step call at a time."""
    out = [int(engine.drawn(state)[0][slot])]
    while len(out) < n:
        state, toks, emitted = engine.step(state, 1)
        out += [int(t) for t in toks[slot][emitted[slot]]]
    return state, out


def test_the_slot_api_leaves_the_engine_unchanged_and_states_do_not_share_flags(engine):
    """init_state / prefill / insert / step / drawn / move / free change no attribute of the engine, and two
    states decoding side by side on it (one with a top-p slot, one greedy) each give the tokens generate gives
    for their prompt alone. Negative control: generate (which records last_stats) does change the snapshot,
    so the check sees a change."""
    want_hot = engine.generate(PROMPTS[:1], NEW, sampling=HOT, seeds=5, stop_ids=()).tokens[0]
    want_greedy = engine.generate(PROMPTS[1:], NEW, stop_ids=()).tokens[0]
    before = _snapshot(engine)
    hot = engine.init_state(slots=2, cache_length=32, stop_ids=())
    greedy = engine.init_state(slots=2, cache_length=32, stop_ids=())
    hot = engine.insert(engine.prefill(PROMPTS[0]), hot, 1, max_new_tokens=NEW, sampling=HOT, seed=5)
    greedy = engine.insert(engine.prefill(PROMPTS[1]), greedy, 0, max_new_tokens=NEW)
    got_hot, got_greedy = [int(engine.drawn(hot)[0][1])], [int(engine.drawn(greedy)[0][0])]
    for _ in range(2):                                   # interleaved: the states' steps alternate
        hot, toks, emitted = engine.step(hot, 1)
        got_hot += [int(t) for t in toks[1][emitted[1]]]
        greedy, toks, emitted = engine.step(greedy, 1)
        got_greedy += [int(t) for t in toks[0][emitted[0]]]
    greedy, hot = engine.move(greedy, 0, hot, 0)         # the greedy slot joins the top-p one's state
    while engine.active(hot).any():
        hot, toks, emitted = engine.step(hot, 2)
        got_hot += [int(t) for t in toks[1][emitted[1]]]
        got_greedy += [int(t) for t in toks[0][emitted[0]]]
    hot = engine.free(hot, [0, 1])
    assert _snapshot(engine) == before
    assert got_hot == want_hot and got_greedy == want_greedy, (got_hot, want_hot, got_greedy, want_greedy)
    engine.generate(PROMPTS[:1], 1)
    assert _snapshot(engine) != before                   # negative control


def test_the_filter_follows_the_live_slots_settings(engine):
    """A slot at temperature 1 with top_k=1 keeps only the argmax, so it draws the greedy tokens beside a
    greedy slot in one state (the step takes the filtered branch because of that slot alone); control: the same
    slot with top_k=0 draws other tokens, so the filter is what makes them equal."""
    greedy = engine.generate(PROMPTS[:1], NEW, stop_ids=()).tokens[0]
    for top_k, equal in ((1, True), (0, False)):
        state = engine.init_state(slots=2, cache_length=32, stop_ids=())
        state = engine.insert(engine.prefill(PROMPTS[1]), state, 0, max_new_tokens=NEW)
        state = engine.insert(engine.prefill(PROMPTS[0]), state, 1, max_new_tokens=NEW,
                              sampling=SamplingConfig(temperature=1.0, top_k=top_k), seed=11)
        _, got = _run(engine, state, 1, NEW)
        assert (got == greedy) == equal, (top_k, got, greedy)


@pytest.fixture(scope="module")
def vision_model():
    cfg = VisionLLaMAConfig.load("tiny").replace(max_sequence_length=64, sample_mode="text", initializer_range=0.1)
    model = VisionLLaMAForCausalLM(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.PRNGKey(1), ids, ids.astype(bool))["params"]
    return model, params


def test_the_head_is_an_argument_of_the_call(vision_model):
    """One engine over a text-mode vision model draws vision codes with head='vision' exactly as an engine over
    a model rebuilt with sample_mode='vision' (the old way, whose config key still sets the default head); a
    second call of the same shape compiles nothing; the text head gives other tokens (control); bad heads raise."""
    model, params = vision_model
    engine = Engine(model, params, eos_id=-1, pad_id=PAD)
    old = Engine(VisionLLaMAForCausalLM(model.config.replace(sample_mode="vision")), params, eos_id=-1, pad_id=PAD)
    assert (engine.head, old.head) == ("text", "vision")
    prompt, mask = [[1, 17, 250, 33, 9, 40]], [[False, False, True, True, True, True]]
    want = old.generate(prompt, NEW, vision=mask, stop_ids=()).tokens
    got = engine.generate(prompt, NEW, vision=mask, stop_ids=(), head="vision").tokens
    assert got == want and max(want[0]) < model.config.vision_vocab_size
    with CompileClock() as clock:
        again = engine.generate(prompt, NEW, vision=mask, stop_ids=(), head="vision").tokens
    assert again == want and clock.compiles == 0
    assert engine.generate(prompt, NEW, vision=mask, stop_ids=()).tokens != want      # text head: control
    with pytest.raises(ValueError, match="head='image'"):
        engine.generate(prompt, NEW, head="image")
    text = Engine(LLaMAForCausalLM(LLaMAConfig.load("tiny")), None, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="head='vision' needs a vision-language model"):
        text.init_state(slots=1, cache_length=16, head="vision")
    with pytest.raises(ValueError, match="prefill with the same head"):
        engine.insert(engine.prefill(prompt[0], mask[0], head="vision"), engine.init_state(1, 32), 0,
                      max_new_tokens=2)
