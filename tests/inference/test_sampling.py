"""Text generation through the engine (lwm.inference.engine): KV-cache greedy decoding against repeated
full forwards, left padding, top-k / top-p against transformers' warpers, the over-length error, the ring
path on simulated devices, token rules and streaming, and the text chat entry point. The model, engine and
greedy batch are fixtures of tests/conftest.py (tiny_sharp_head, sampler, greedy_batch)."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.inference.engine import Engine, per_row_sampling
from lwm.model.llama import LLaMAForCausalLM
from lwm.inference.sampling import (PromptTooLongError, SamplingConfig, bucket_length, filter_logits, left_pad, sample_logits,
                          sample_rows)
from lwm.parallel.sharding import make_mesh, match_partition_rules, named_shardings
from support import EOS, NEW, PAD, PROMPTS


def reference_greedy(cfg, params, prompt, n):
    """argmax over full forwards of the whole sequence so far, dense attention, no cache."""
    model = LLaMAForCausalLM(cfg.replace(attention_impl="dense"))
    width = 32
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    ids = list(prompt)
    out = []
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids                     # right padding: causal, so it cannot reach position len-1
        token = int(jnp.argmax(forward(params, buf)[0, len(ids) - 1]))
        if token == EOS:
            break
        out.append(token)
        ids.append(token)
    return out


def test_greedy_with_cache_equals_repeated_full_forwards(tiny_sharp_head, greedy_batch):
    cfg, _, params = tiny_sharp_head
    for prompt, got in zip(PROMPTS, greedy_batch):
        assert got == reference_greedy(cfg, params, prompt, NEW)
    assert len({tuple(o) for o in greedy_batch}) == len(PROMPTS)   # the rows really differ


def test_left_padded_batch_equals_each_prompt_alone(tiny_sharp_head, sampler, greedy_batch):
    _, model, params = tiny_sharp_head
    batch_logits, _ = sampler.prefill_batch(PROMPTS, 16, 20)
    for r, prompt in enumerate(PROMPTS):
        alone, _ = sampler.prefill_batch([prompt], len(prompt), len(prompt) + 4)   # no padding at all
        np.testing.assert_allclose(batch_logits[r], alone[0], atol=2e-5, rtol=1e-5)
    # The most padded row decodes alone (no padding at all) to what it decoded in the batch.
    assert sampler.generate([PROMPTS[2]], NEW, padded_length=len(PROMPTS[2])).tokens == [greedy_batch[2]]
    # Negative control: without the padding segment the padded row sees the pad tokens and changes.
    ids, seg, pos = left_pad(PROMPTS, 16, PAD)
    leaky = model.apply({"params": params}, ids, position_ids=pos, segment_ids=np.ones_like(seg))[:, -1]
    assert np.abs(np.asarray(leaky[2]) - np.asarray(batch_logits[2])).max() > 1e-3


def test_left_pad_worked_example():
    ids, seg, pos = left_pad([[5, 6, 7], [8, 9]], 4, 0)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert seg.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert pos.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]
    assert bucket_length(300, 4, 64) == 512 and bucket_length(3000, 4, 64) == 3072 and bucket_length(5) == 8


def test_top_k_one_equals_greedy(sampler, greedy_batch):
    hot = SamplingConfig(temperature=1.5, top_k=1)
    assert sampler.generate(PROMPTS, NEW, sampling=hot, seeds=3).tokens == greedy_batch
    # Per-row settings: row 1 samples hot without filters (and differs), rows 0 and 2 stay greedy.
    mixed = sampler.generate(PROMPTS, NEW, sampling=[hot, SamplingConfig(2.0), SamplingConfig()], seeds=[3, 4, 5])
    assert mixed.tokens[0] == greedy_batch[0] and mixed.tokens[2] == greedy_batch[2]
    assert mixed.tokens[1] != greedy_batch[1]
    logits = jax.random.normal(jax.random.PRNGKey(0), (64, 50))
    drawn = sample_logits(logits, jax.random.PRNGKey(1), temperature=2.0, top_k=1)
    np.testing.assert_array_equal(drawn, jnp.argmax(logits, -1))
    # Negative control: without top-k the same temperature does not reproduce argmax.
    free = sample_logits(logits, jax.random.PRNGKey(1), temperature=2.0)
    assert (np.asarray(free) != np.asarray(jnp.argmax(logits, -1))).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.5)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (16, 100)) * 3, np.float32)
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert 0 < kept.sum() < kept.size


def test_top_p_draws_follow_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0, 0.85))(keys))[:, 0]
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0], atol=0.015)
    # The per-row sampler: the same nucleus for row 0, top-k 2 at temperature 1 for row 1 (one call).
    n = 20000
    rows = jnp.broadcast_to(logits, (n, 5))
    top_p = jnp.tile(jnp.array([0.85, 1.0]), n // 2)
    top_k = jnp.tile(jnp.array([0, 2]), n // 2)
    draws = np.asarray(sample_rows(rows, keys, jnp.ones(n), top_k, top_p)).reshape(-1, 2)
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=5) / (n // 2),
                               [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0], atol=0.02)
    np.testing.assert_allclose(np.bincount(draws[:, 1], minlength=5) / (n // 2), [0.625, 0.375, 0, 0, 0], atol=0.02)


def test_over_length_error_before_compile(tiny_sharp_head):
    _, model, params = tiny_sharp_head
    fresh = Engine(model, params, eos_id=EOS, pad_id=PAD)
    with pytest.raises(PromptTooLongError, match=r"50 tokens \+ max_new_tokens=15 = 65 exceeds .*max_sequence_length=64"):
        fresh.generate([[1] * 50, [1] * 3], 15)                 # 50 + 15 > 64
    assert fresh._prefill_jit._cache_size() == 0 and fresh._step_jit._cache_size() == 0   # nothing compiled
    assert len(fresh.generate([[1] * 49], 15).tokens[0]) <= 15   # 49 + 15 == 64 fits


def _ban_first(banned):
    """A token rule (hashable: a module-level function under functools.partial) that never draws `banned`."""
    import functools

    return functools.partial(_banning_rule, banned)


def _banning_rule(banned, logits, *rest):
    return per_row_sampling(logits.at[:, banned].set(-jnp.inf), *rest, filters=False)


def test_rules_and_streaming(sampler, greedy_batch):
    banned = greedy_batch[0][0]
    seen = {}
    record = lambda step, tokens: seen.update({int(step): list(tokens)})       # returns None: cancels nothing
    out = sampler.generate(PROMPTS[:1], NEW, rule=_ban_first(banned), stream=record).tokens[0]
    assert banned not in out and out != greedy_batch[0]
    assert [seen[i][0] for i in range(len(out))] == out


def test_ring_sampler_matches_single_device(tiny_sharp_head, greedy_batch):
    cfg, _, params = tiny_sharp_head
    mesh = make_mesh("1,2,1,4")
    ring_model = LLaMAForCausalLM(cfg.replace(attention_impl="ring"))
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, named_shardings(match_partition_rules(params, cfg), mesh))
        ring = Engine(ring_model, placed, eos_id=EOS, pad_id=PAD)
        assert ring.generate(PROMPTS, NEW).tokens == greedy_batch
        assert ring.last_stats["batch"] == 4 and ring.last_stats["padded_length"] % 4 == 0


@pytest.mark.slow
def test_text_chat_streams_the_answer(tiny_sharp_head, tmp_path):
    from lwm import text_chat
    from lwm.inference.chat import turn_tokens
    from lwm.checkpoint.formats import save_streaming
    from lwm.text.tokenizer import train_sentencepiece

    cfg, model, params = tiny_sharp_head
    tok = train_sentencepiece(["You are a helpful assistant. USER: hello there ASSISTANT: hi, how are you?"] * 20
                              + [f"line {i} of some text." for i in range(200)], str(tmp_path / "t.model"), 300)
    save_streaming(str(tmp_path / "params"), params)
    out = io.StringIO()
    flags = ["--load_llama_config=tiny", f"--load_checkpoint=params::{tmp_path / 'params'}",
             f"--tokenizer={tmp_path / 't.model'}", "--mesh_dim=1,-1,1,1", "--max_new_tokens=6",
             "--temperature=0", "--prompt=hello there"]
    (answer,) = text_chat.main(flags, stdout=out)
    assert out.getvalue() == f"ASSISTANT: {answer}\n" and answer          # streamed text == returned text
    ids = turn_tokens(tok, "hello there", first=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "You are a helpful assistant. USER: hello there ASSISTANT:"
    # The same greedy answer through the library: chat adds nothing but the template.
    ref = Engine(LLaMAForCausalLM(cfg.replace(max_sequence_length=2048)), params, eos_id=tok.eos_id,
                 pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    assert tok.decode(ref.generate([ids], 6).tokens[0]) == answer
