"""`python -m lwm.text_chat`: chat with an LWM text model, tokens printed as they are produced.

Hardware: a CPU runs the tiny/debug presets; LWM-Text-Chat 7B needs an accelerator with ~16 GB (bf16).
    python -m lwm.text_chat --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Text-Chat-1M/params \
        --tokenizer=/ckpt/tokenizer.model --dtype=bf16 \
        --update_llama_config="dict(theta=50000000,max_sequence_length=1048576)"
    python -m lwm.text_chat ... --prompt="Summarise this: ..."      # one answer, then exit
Prompt format (the original's): "You are a helpful assistant. USER: {message} ASSISTANT:"; later turns are
appended to the same token history (each answer closed by EOS), so the model sees the whole conversation.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ml_collections import ConfigDict

SYSTEM = "You are a helpful assistant."
TURN = " USER: {message} ASSISTANT:"


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    c.load_llama_config = ""
    c.update_llama_config = ""
    c.load_checkpoint = ""
    c.tokenizer = "LargeWorldModel/LWM-Text-Chat-1M"
    c.mesh_dim = "1,-1,1,1"
    c.dtype = "fp32"
    c.prompt = ""                   # answer this one message and exit; '' = interactive
    c.max_new_tokens = 512
    c.temperature = 0.7             # 0 = greedy
    c.top_k = 0
    c.top_p = 0.9
    c.seed = 0
    c.stream = True
    c.llama = ConfigDict()          # --llama.<field>=value
    return c


def turn_tokens(tokenizer, message: str, first: bool) -> list[int]:
    """Tokens of one user turn; the first carries BOS and the system prompt:
    "Hi" -> [bos] + encode("You are a helpful assistant. USER: Hi ASSISTANT:"), later ones
    encode("USER: ... ASSISTANT:") (the tokenizer's word-start marker supplies the space)."""
    if first:
        return [tokenizer.bos_id] + tokenizer.encode(SYSTEM + TURN.format(message=message))
    return tokenizer.encode(TURN.format(message=message).lstrip())


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
    """The conversation state: token history and one generation engine (lwm.inference.engine.Engine)."""

    def __init__(self, engine, tokenizer, sampling, max_new_tokens: int, seed: int = 0,
                 printer: Optional[TokenPrinter] = None):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.max_new_tokens, self.printer = max_new_tokens, printer
        self.history: list[int] = []
        self.seed, self.turns = seed, 0

    def reply(self, message: str) -> str:
        """Append the user's message, generate the answer (streamed if a printer is set), return its text.
        The budget shrinks as the history grows; an over-long history raises before anything runs."""
        prompt = self.history + turn_tokens(self.tokenizer, message, first=not self.history)
        budget = min(self.max_new_tokens, self.engine.config.max_sequence_length - len(prompt))
        if budget < 1:
            self.engine.check_length(len(prompt), self.max_new_tokens)
        if self.printer is not None:
            self.printer.reset()
        result = self.engine.generate([prompt], budget, sampling=self.sampling, seeds=self.seed + self.turns,
                                      stream=self.printer)
        self.turns += 1
        (answer,) = result.tokens
        self.history = prompt + answer + [self.tokenizer.eos_id]
        return self.tokenizer.decode(answer)


def main(argv: Optional[Sequence[str]] = None, stdin=None, stdout=None) -> list[str]:
    import jax

    from lwm.checkpoint import parse_float_dtype
    from lwm.inference.engine import Engine
    from lwm.sampling import SamplingConfig, load_model
    from lwm.sharding import check_model_mesh, make_mesh
    from lwm.tokenizer import load_tokenizer
    from lwm.train import model_config_from_flags, parse_flags

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p)
    if config.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={config.max_new_tokens}: must be >= 1")
    dtype = parse_float_dtype(config.dtype)
    tokenizer = load_tokenizer(config.tokenizer)
    flags = ConfigDict(dict(modality="text", load_llama_config=config.load_llama_config, llama=config.llama,
                            update_llama_config=config.update_llama_config))
    model_config = model_config_from_flags(flags, tokenizer)
    mesh = make_mesh(config.mesh_dim)
    check_model_mesh(model_config, mesh)
    answers = []
    with jax.set_mesh(mesh):
        model, params = load_model(model_config, config.load_checkpoint, dtype, mesh)
        engine = Engine(model, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                        vocab_size=tokenizer.vocab_size)
        printer = TokenPrinter(tokenizer, stdout) if config.stream else None
        chat = Chat(engine, tokenizer, sampling, config.max_new_tokens, config.seed, printer)
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
    main()
