"""lwm.text_chat keeps going when the conversation outgrows the context: the oldest turns are dropped (the
system prompt stays, on the new first turn), the user is told once, and a message too long on its own is
refused with one line while the chat goes on. Unit tests on a recording stand-in for the sampler (exact
prompts), then the real entry point on the tiny model."""
import io
import types

import pytest

from lwm import text_chat
from lwm.inference import chat as chat_lib
from lwm.inference.engine import Engine
from lwm.inference.sampling import PromptTooLongError, SamplingConfig


class RecordingSampler:
    """Answers every prompt with ANSWER and records the prompts and budgets it was given; the length check
    is the real engine's."""
    ANSWER = [10, 11, 12]

    def __init__(self, limit):
        self.config = types.SimpleNamespace(max_sequence_length=limit)
        self.calls = []

    check_length = Engine.check_length

    def generate(self, prompts, max_new_tokens, *, sampling, seeds, stream=None, prefix_cache=None,
                 prefill_chunk=None):
        (prompt,) = prompts
        assert len(prompt) + max_new_tokens <= self.config.max_sequence_length
        self.calls.append((list(prompt), max_new_tokens))
        return types.SimpleNamespace(tokens=[list(self.ANSWER)], stats={})


def _chat(tok, limit, max_new=4):
    notes = []
    chat = chat_lib.Chat(RecordingSampler(limit), tok, SamplingConfig(), max_new, notify=notes.append)
    return chat, notes


def _expected(tok, turns, message):
    """The prompt the chat template gives for `turns` (message, answer) then `message`, built by hand."""
    ids = []
    for i, (m, a) in enumerate(turns):
        ids += chat_lib.turn_tokens(tok, m, first=i == 0) + a + [tok.eos_id]
    return ids + chat_lib.turn_tokens(tok, message, first=not turns)


MESSAGES = ["the quick brown fox", "jumps over a lazy dog", "while world models read", "long videos and text",
            "in one million token context", "with ring attention packing"]


def test_history_is_kept_while_it_fits(tok):
    chat, notes = _chat(tok, limit=10_000)
    for i, m in enumerate(MESSAGES):
        chat.reply(m)
        prompt, _ = chat.engine.calls[-1]
        assert prompt == _expected(tok, [(x, RecordingSampler.ANSWER) for x in MESSAGES[:i]], m)
    assert notes == [] and chat.dropped_turns == 0


def test_oldest_turns_are_dropped_the_system_prompt_kept_and_the_user_told_once(tok):
    first_prompt = _expected(tok, [], MESSAGES[0])
    limit = 3 * len(first_prompt)                     # about two turns fit
    chat, notes = _chat(tok, limit)
    full = []
    for m in MESSAGES:
        chat.reply(m)
        full.append(m)
    # Negative control: the whole conversation does not fit, so the chat would have stopped without dropping.
    assert len(_expected(tok, [(x, RecordingSampler.ANSWER) for x in MESSAGES[:-1]], MESSAGES[-1])) + 4 > limit
    assert len(chat.engine.calls) == len(MESSAGES) and chat.dropped_turns > 0
    assert len(notes) == 1 and "oldest turns are dropped" in notes[0] and f"max_sequence_length={limit}" in notes[0]
    for prompt, budget in chat.engine.calls:
        assert prompt[0] == tok.bos_id
        assert tok.decode(prompt[1:]).startswith("You are a helpful assistant. USER: ")   # the system prompt
        assert budget == 4 and len(prompt) + budget <= limit
    # The last prompt is exactly the template over the most recent turns that fit, nothing cut mid-turn.
    prompt, _ = chat.engine.calls[-1]
    kept = len(MESSAGES) - 1 - chat.dropped_turns
    assert kept >= 1
    assert prompt == _expected(tok, [(x, RecordingSampler.ANSWER) for x in MESSAGES[-1 - kept:-1]], MESSAGES[-1])
    assert prompt != _expected(tok, [(x, RecordingSampler.ANSWER) for x in MESSAGES[-2 - kept:-1]], MESSAGES[-1])


def test_a_message_too_long_alone_is_refused_and_the_conversation_kept(tok):
    limit = len(_expected(tok, [("the quick brown fox", RecordingSampler.ANSWER)], "a lazy dog")) + 4
    chat, _ = _chat(tok, limit)
    chat.reply("the quick brown fox")
    turns = list(chat.turns)
    with pytest.raises(PromptTooLongError, match=f"max_sequence_length={limit}"):
        chat.reply(" ".join(["ring attention packing"] * 40))
    assert chat.turns == turns                        # nothing dropped by the refused message
    chat.reply("a lazy dog")
    assert len(chat.turns) == 2


@pytest.mark.slow
def test_entry_point_chats_past_the_context(tmp_path):
    """The real model: a 96-token context, 8 new tokens a turn, six turns and one oversized message."""
    import jax
    import jax.numpy as jnp

    from support import small_tokenizer
    from lwm.checkpoint.formats import save_streaming
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    small_tokenizer(tmp_path)
    params = LLaMAForCausalLM(LLaMAConfig.load("tiny")).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    save_streaming(str(tmp_path / "params"), params["params"])
    lines = MESSAGES[:3] + [" ".join(["ring attention packing"] * 40)] + MESSAGES[3:]
    out = io.StringIO()
    answers = text_chat.main(["--load_llama_config=tiny", f"--load_checkpoint=params::{tmp_path / 'params'}",
                              f"--tokenizer={tmp_path / 'tokenizer.model'}", "--max_new_tokens=8", "--temperature=0",
                              "--mesh_dim=1,-1,1,1", "--update_llama_config=dict(max_sequence_length=96)"],
                             stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out)
    text = out.getvalue()
    assert len(answers) == len(MESSAGES)                          # every fitting message answered
    assert text.count("oldest turns are dropped") == 1
    assert text.count("[message not sent:") == 1 and "max_sequence_length=96" in text


class _ScriptedEngine:
    """Stands in for lwm.inference.engine.Engine in text_chat.main: every reply streams the ids of `text`
    through the printer (step by step, as the decode loop's callback does) and returns them."""
    text = "just We"

    def __init__(self, model, params, *, eos_id, pad_id, vocab_size, cache_dtype=None):
        self.config = types.SimpleNamespace(max_sequence_length=10_000)
        self.eos_id, self.calls = eos_id, 0

    check_length = Engine.check_length

    def prefix_cache(self, budget_bytes=None, block_size=None):
        return None

    def generate(self, prompts, max_new_tokens, *, sampling, seeds, stream=None, prefix_cache=None,
                 prefill_chunk=None):
        self.calls += 1
        ids = self.tokenizer.encode(self.text)
        for step, t in enumerate(ids + [self.eos_id]):
            if stream is not None:
                stream(step, [t])
        return types.SimpleNamespace(tokens=[ids], stats={})


def _scripted_chat(tmp_path, monkeypatch, typed: str, extra=()):
    """text_chat.main on the tiny preset with the engine and the weights stubbed out (no compile): the transcript
    and the answers for the input `typed`."""
    from support import small_tokenizer
    from lwm.inference import engine as engine_lib, loader

    tokenizer = small_tokenizer(tmp_path)
    _ScriptedEngine.tokenizer = tokenizer
    monkeypatch.setattr(engine_lib, "Engine", _ScriptedEngine)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: (None, None))
    out = io.StringIO()
    answers = text_chat.main(["--load_llama_config=tiny", f"--tokenizer={tmp_path / 'tokenizer.model'}",
                              "--mesh_dim=1,-1,1,1", *extra], stdin=io.StringIO(typed), stdout=out)
    return out.getvalue(), answers


@pytest.mark.parametrize("stream", [True, False])
def test_answers_print_after_a_space_and_the_chat_says_how_to_leave(tmp_path, monkeypatch, stream):
    text, answers = _scripted_chat(tmp_path, monkeypatch, "hello\n", [f"--stream={stream}"])
    # Control: the decoded answer itself starts without the space (the tokenizer drops the word-start space of
    # the first piece), so the space in the transcript comes from the prefix.
    assert answers == ["just We"]
    assert "ASSISTANT: just We\n" in text and "ASSISTANT:just" not in text
    assert text.startswith(text_chat.LEAVE_HINT + "\n") and "Ctrl-D" in text_chat.LEAVE_HINT
    assert text.endswith("USER: \n")                  # end of input (Ctrl-D) closes the prompt's line


def test_exit_and_quit_leave_empty_lines_are_ignored(tmp_path, monkeypatch):
    for word in text_chat.EXIT_WORDS:
        text, answers = _scripted_chat(tmp_path, monkeypatch, f"hello\n\n  \nsecond\n{word}\nnever read\n")
        assert answers == ["just We", "just We"]       # the blank lines sent nothing; nothing after the word
        assert text.count("USER: ") == 5 and text.count("ASSISTANT: ") == 2
    # Control: without the exit word the line after it is answered too.
    _, answers = _scripted_chat(tmp_path, monkeypatch, "hello\nnever read\n")
    assert len(answers) == 2


def test_turn_two_reuses_turn_one_through_the_prefix_cache(tok, tiny_sharp_head):
    """Three greedy turns on the real engine with a prefix cache (16-token blocks) give the tokens of the same
    turns without one; turn 2 and 3 take their earlier turns' blocks from the cache (cached_tokens > 0, whole
    blocks of the previous prompt), turn 1 none. Control: each turn's answer differs, so a wrong prefix shows."""
    from lwm.model.llama import LLaMAForCausalLM

    cfg, _, params = tiny_sharp_head
    cfg = cfg.replace(max_sequence_length=256, decode_chunk_size=8)
    engine = Engine(LLaMAForCausalLM(cfg), params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    messages = ["the quick brown fox jumps over a lazy dog", "while world models read long videos",
                "and text in one million token context"]

    def turns(**kw):
        chat = chat_lib.Chat(engine, tok, SamplingConfig(), max_new_tokens=6, **kw)
        out = []
        for m in messages:
            chat.reply(m)
            out.append((list(chat.turns[-1][1]), chat.last_stats["cached_tokens"], chat.last_stats["prompt_tokens"]))
        turns.chat = chat
        return out

    plain = turns()
    pc = engine.prefix_cache(1 << 24, 16)
    cached = turns(prefix_cache=pc)
    assert [a for a, _, _ in cached] == [a for a, _, _ in plain]
    assert len({tuple(a) for a, _, _ in plain}) == 3
    assert [c for _, c, _ in plain] == [0, 0, 0] and cached[0][1] == 0
    for (_, c, _), (_, _, before) in zip(cached[1:], cached[:-1]):
        assert c == before // 16 * 16 > 0                   # every whole block of the previous turn's prompt
    # A follow-up's prefill runs one chunk of the uncached rest's bucket, not of the whole prompt's.
    follow = turns.chat.history + chat_lib.turn_tokens(tok, "one more", first=False)
    run = engine.start_prefill(follow, prefix_cache=pc)
    assert run.cached > 0 and run.chunk == engine.padded_length(len(follow) - run.cached) < \
        engine.padded_length(len(follow))
    # Chunked without a cache: the same tokens, nothing cached.
    assert [(a, c) for a, c, _ in turns(prefill_chunk=8)] == [(a, 0) for a, _, _ in plain]
