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
The conversation and the streaming printer are lwm.inference.chat (Chat, TokenPrinter).
Each turn's prompt begins with the turns before it, so the prefix cache (--prefix_cache_mb, default -1: a quarter
of the free memory; 0: off) lets turn 2 reuse turn 1's KV blocks and prefill only the rest (--prefill_chunk
tokens at a time); --show_stats prints, after each answer, its prompt tokens, how many came from the prefix
cache, and the time to the first token (docs/long_context.md, "Prefix cache and chunked prefill").
Leaving: type `exit` or `quit`, or end the input (Ctrl-D; Ctrl-Z then Enter on Windows); an empty line is
ignored; Ctrl-C stops at once (exit status 130), also in the middle of an answer.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.inference import runtime
from lwm.inference.chat import Chat, TokenPrinter, stats_line


EXIT_WORDS = ("exit", "quit")
LEAVE_HINT = "[chat: type a message and press Enter; 'exit', 'quit' or Ctrl-D (end of input) leaves]"


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
    c.show_stats = False            # after each answer: prompt tokens, prefix-cache hits, time to first token
    c.lock()
    return c


def main(argv: Optional[Sequence[str]] = None, stdin=None, stdout=None) -> list[str]:
    """Run the chat; returns the answers. Raises (ValueError, OSError) on bad flags or inputs; an
    interactive message too long for the model is refused with one line and the chat goes on."""
    import jax

    from lwm.inference.loader import load_model
    from lwm.inference.engine import Engine
    from lwm.inference.sampling import PromptTooLongError, SamplingConfig

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
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
        prefix_cache = runtime.prefix_cache_from_flags(engine, config)
        chunk = runtime.prefill_chunk_from_flags(engine, config)
        printer = TokenPrinter(tokenizer, stdout) if config.stream else None
        chat = Chat(engine, tokenizer, sampling, config.max_new_tokens, config.seed, printer, notify=say,
                    prefix_cache=prefix_cache, prefill_chunk=chunk)
        messages = [config.prompt] if config.prompt else None
        if messages is None:
            say(LEAVE_HINT)
        while True:
            if messages is None:
                stdout.write("USER: ")
                stdout.flush()
                line = stdin.readline()
                if not line:                                   # end of input (Ctrl-D): end the "USER: " line
                    stdout.write("\n")
                    stdout.flush()
                    break
                if line.strip() in EXIT_WORDS:
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
            # A console label, not the prompt: with a space, since decoding drops the word-start space of the
            # answer's first token (without it the transcript read "ASSISTANT:just We").
            stdout.write("ASSISTANT: ")
            stdout.flush()
            answer = chat.reply(message)
            if printer is None:
                stdout.write(answer)
            elif answer.startswith(printer.printed):
                stdout.write(answer[len(printer.printed):])        # what the last callback held back
            else:
                stdout.write("\n" + answer)
            stdout.write("\n")
            if config.show_stats:
                stdout.write(stats_line(chat.last_stats) + "\n")
            stdout.flush()
            answers.append(answer)
    return answers


if __name__ == "__main__":
    sys.exit(cli("lwm.text_chat", main, get_default_config, __doc__))
