"""The text chat: one conversation over the generation engine (lwm.inference.engine.Engine), its prompt
rebuilt from the turns through the one chat template (lwm.text.chat_template), and the token printer that
streams an answer as it is decoded. `python -m lwm.text_chat` is the command-line front-end.

    chat = Chat(engine, tokenizer, SamplingConfig(0.7, 0, 0.9), max_new_tokens=512, printer=TokenPrinter(tok),
                prefix_cache=engine.prefix_cache())
    chat.reply("Hi")          # streams the answer, returns its text; the next reply sees this turn
    chat.last_stats           # the engine's stats of that reply; 'cached_tokens' counts the prompt tokens reused

Each turn's prompt begins with the previous turn's prompt (the history grows at its end), so with a prefix cache
(lwm.inference.prefix_cache) turn 2 copies turn 1's whole blocks and prefills only what follows them: the tail
of turn 1's prompt that did not fill a block, turn 1's answer (decoded, not stored as blocks) and the new
message. Dropping the oldest turns changes the prompt's start, so the turn after a drop is a miss.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from lwm.text.chat_template import user_turn_ids


def turn_tokens(tokenizer, message: str, first: bool) -> list[int]:
    """Tokens of one user turn (lwm.text.chat_template.user_turn_ids): the first carries BOS and the system
    prompt, "Hi" -> [bos] + encode("You are a helpful assistant. USER: Hi ASSISTANT:"); later ones
    encode("USER: ... ASSISTANT:") (the tokenizer's word-start marker supplies the space)."""
    return user_turn_ids(tokenizer, message, first)


def stats_line(stats: dict) -> str:
    """One line of a reply's `generate` stats: "[40 prompt tokens (32 from the prefix cache), 8 new; first token
    after 0.05 s, 120.0 tokens/s after it]" (seconds; the rate is the new tokens after the first over decode_s)."""
    rate = (stats["new_tokens"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 and stats["new_tokens"] > 1 else 0.0
    return (f"[{stats['prompt_tokens']} prompt tokens ({stats.get('cached_tokens', 0)} from the prefix cache), "
            f"{stats['new_tokens']} new; first token after {stats['time_to_first_token_s']:.2f} s, "
            f"{rate:.1f} tokens/s after it]")


class TokenPrinter:
    """Host callback for the decode loop: prints the text of row 0 as tokens arrive (decoding the whole
    answer so far, so multi-token characters and word joins come out right) and stops at EOS. Calls carry
    their step; a repeated or early call is held until the steps before it have arrived."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.reset()

    def reset(self):
        self.pending: dict[int, int] = {}
        self.tokens: list[int] = []
        self.printed = ""
        self.finished = False

    def __call__(self, step, tokens) -> None:
        self.pending.setdefault(int(step), int(tokens[0]))
        while not self.finished and len(self.tokens) in self.pending:
            token = self.pending.pop(len(self.tokens))
            if token == self.tokenizer.eos_id:
                self.finished = True
                break
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens).rstrip("\ufffd")   # hold back a character still incomplete
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


class Chat:
    """The conversation: earlier turns (each the user's message and the answer's token ids) and one generation
    engine (lwm.inference.engine.Engine).

    The prompt is rebuilt from the turns through the one chat template (lwm.text.chat_template): the first kept
    turn carries BOS and the system prompt, each answer is closed by EOS. When the prompt plus
    max_new_tokens would exceed the model's max_sequence_length, the oldest turns are dropped (the system
    prompt stays, on the new first turn) until the answer's full budget fits; `notify` (e.g. a print) is
    told the first time this happens. A message too long to answer even alone raises PromptTooLongError
    and leaves the conversation as it was.

    prefix_cache (a PrefixCache of the engine, `Engine.prefix_cache`) and prefill_chunk (tokens per prefill
    chunk): passed to `Engine.generate`, so each turn reuses the blocks of the turns before it (module
    docstring); None for both: one whole prefill per turn. `last_stats`: the last reply's `generate` stats
    (prompt_tokens, cached_tokens, time_to_first_token_s, ...)."""

    def __init__(self, engine, tokenizer, sampling, max_new_tokens: int, seed: int = 0,
                 printer: Optional[TokenPrinter] = None, notify: Optional[Callable[[str], None]] = None,
                 prefix_cache=None, prefill_chunk: Optional[int] = None):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.max_new_tokens, self.printer, self.notify = max_new_tokens, printer, notify
        self.prefix_cache, self.prefill_chunk = prefix_cache, prefill_chunk
        self.last_stats: dict = {}
        self.turns: list[tuple[str, list[int]]] = []
        self.dropped_turns = 0
        self.seed, self.replies = seed, 0                 # reply i draws with seed + i

    def _ids(self, turns, message: Optional[str]) -> list[int]:
        ids: list[int] = []
        for i, (user, answer) in enumerate(turns):
            ids += turn_tokens(self.tokenizer, user, first=(i == 0)) + answer + [self.tokenizer.eos_id]
        if message is not None:
            ids += turn_tokens(self.tokenizer, message, first=not turns)
        return ids

    @property
    def history(self) -> list[int]:
        """Token ids of the kept turns, answers closed by EOS (the next turn's prompt begins with them)."""
        return self._ids(self.turns, None)

    def fit(self, message: str) -> tuple[list[int], int]:
        """(prompt for `message`, how many of the oldest turns it leaves out so that the answer's full
        budget fits). Changes nothing; raises PromptTooLongError when the message cannot be answered even
        without any earlier turn (not one new token fits)."""
        limit = self.engine.config.max_sequence_length
        turns = list(self.turns)
        prompt = self._ids(turns, message)
        while turns and len(prompt) + self.max_new_tokens > limit:
            turns.pop(0)
            prompt = self._ids(turns, message)
        if len(prompt) >= limit:
            self.engine.check_length(len(prompt), self.max_new_tokens)       # raises, naming the limit
        return prompt, len(self.turns) - len(turns)

    def reply(self, message: str) -> str:
        """Append the user's message, generate the answer (streamed if a printer is set), return its text."""
        limit = self.engine.config.max_sequence_length
        prompt, dropped = self.fit(message)
        if dropped:
            if self.dropped_turns == 0 and self.notify is not None:
                self.notify(f"[the conversation no longer fits the model's context (max_sequence_length={limit} "
                            f"tokens with max_new_tokens={self.max_new_tokens}): the oldest turns are dropped "
                            "from now on; the system prompt is kept]")
            del self.turns[:dropped]
            self.dropped_turns += dropped
        budget = min(self.max_new_tokens, limit - len(prompt))
        if self.printer is not None:
            self.printer.reset()
        result = self.engine.generate([prompt], budget, sampling=self.sampling, seeds=self.seed + self.replies,
                                      stream=self.printer, prefix_cache=self.prefix_cache,
                                      prefill_chunk=self.prefill_chunk)
        self.replies += 1
        self.last_stats = dict(result.stats)
        (answer,) = result.tokens
        self.turns.append((message, list(answer)))
        return self.tokenizer.decode(answer)
