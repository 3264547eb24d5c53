"""`python -m lwm.text_chat`: chat with an LWM text model, tokens printed as they are produced.

Hardware: a CPU runs the tiny/debug presets; LWM-Text-Chat 7B needs an accelerator with ~16 GB (bf16).
    python -m lwm.text_chat --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Text-Chat-1M/params \
        --tokenizer=/ckpt/tokenizer.model --dtype=bf16 \
        --update_llama_config="dict(theta=50000000,max_sequence_length=1048576)"
    python -m lwm.text_chat ... --prompt="Summarise this: ..."      # one answer, then exit
Prompt format (the original's, lwm.text.chat_template): "You are a helpful assistant. USER: {message} ASSISTANT:";
later turns are appended to the same token history (each answer closed by EOS), so the model sees the whole
conversation. When the history no longer fits max_sequence_length (with room for max_new_tokens), the
oldest turns are dropped, the system prompt kept, and the user is told once; a single message too long for
the model is refused with one line and the chat goes on. Bad flags or files: one line, exit status 2.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from ml_collections import ConfigDict

from lwm.text.chat_template import user_turn_ids
from lwm.inference import runtime


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    runtime.runtime_flags(c, tokenizer="LargeWorldModel/LWM-Text-Chat-1M")
    c.prompt = ""                   # answer this one message and exit; '' = interactive
    c.max_new_tokens = 512
    c.temperature = 0.7             # 0 = greedy
    c.top_k = 0
    c.top_p = 0.9
    c.seed = 0
    c.stream = True
    c.lock()
    return c


def turn_tokens(tokenizer, message: str, first: bool) -> list[int]:
    """Tokens of one user turn (lwm.text.chat_template.user_turn_ids): the first carries BOS and the system
    prompt, "Hi" -> [bos] + encode("You are a helpful assistant. USER: Hi ASSISTANT:"); later ones
    encode("USER: ... ASSISTANT:") (the tokenizer's word-start marker supplies the space)."""
    return user_turn_ids(tokenizer, message, first)


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
    and leaves the conversation as it was."""

    def __init__(self, engine, tokenizer, sampling, max_new_tokens: int, seed: int = 0,
                 printer: Optional[TokenPrinter] = None, notify: Optional[Callable[[str], None]] = None):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.max_new_tokens, self.printer, self.notify = max_new_tokens, printer, notify
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
                                      stream=self.printer)
        self.replies += 1
        (answer,) = result.tokens
        self.turns.append((message, list(answer)))
        return self.tokenizer.decode(answer)


def main(argv: Optional[Sequence[str]] = None, stdin=None, stdout=None) -> list[str]:
    """Run the chat; returns the answers. Raises (ValueError, OSError) on bad flags or inputs; an
    interactive message too long for the model is refused with one line and the chat goes on."""
    import jax

    from lwm.cli.flags import parse_flags
    from lwm.inference.loader import load_model
    from lwm.inference.engine import Engine
    from lwm.inference.sampling import PromptTooLongError, SamplingConfig

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p)
    if config.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={config.max_new_tokens}: must be >= 1")
    rt = runtime.setup(config, modality="text")
    tokenizer = rt.tokenizer

    def say(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    answers = []
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, config.load_checkpoint, rt.dtype, rt.mesh)
        engine = Engine(model, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                        vocab_size=tokenizer.vocab_size, cache_dtype=config.cache_dtype)
        printer = TokenPrinter(tokenizer, stdout) if config.stream else None
        chat = Chat(engine, tokenizer, sampling, config.max_new_tokens, config.seed, printer, notify=say)
        messages = [config.prompt] if config.prompt else None
        while True:
            if messages is None:
                stdout.write("USER: ")
                stdout.flush()
                line = stdin.readline()
                if not line or line.strip() in ("exit", "quit"):
                    break
                message = line.strip()
                if not message:
                    continue
            elif not messages:
                break
            else:
                message = messages.pop(0)
            if messages is None:
                try:
                    chat.fit(message)
                except PromptTooLongError as e:
                    say(f"[message not sent: {e}]")
                    continue
            stdout.write("ASSISTANT:")
            stdout.flush()
            answer = chat.reply(message)
            if printer is None:
                stdout.write(answer)
            elif answer.startswith(printer.printed):
                stdout.write(answer[len(printer.printed):])        # what the last callback held back
            else:
                stdout.write("\n" + answer)
            stdout.write("\n")
            stdout.flush()
            answers.append(answer)
    return answers


if __name__ == "__main__":
    sys.exit(runtime.cli("lwm.text_chat", main, get_default_config, __doc__))
