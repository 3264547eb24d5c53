"""The LWM chat template: the one copy, used by text and vision chat, the needle evals, the server, the PyTorch
sampling script and the Hugging Face export; no other module spells "USER:" / "ASSISTANT:" in a prompt
(tests/test_one_home.py::test_rule_holds[chat_template]).

The original's format (LWM-Text-Chat and LWM-Chat), one BOS, then:

    You are a helpful assistant. USER: {user 1} ASSISTANT: {answer 1}</s>USER: {user 2} ASSISTANT:

Each piece is tokenized on its own (the original's practice): the first user turn with the system prompt,
every later turn as "USER: ... ASSISTANT:" (the tokenizer's word-start marker supplies the space after the
previous EOS), and each answer closed by EOS. A system message replaces the default system prompt. For
vision chat the vision tokens sit between "\\n<vision>" and "</vision>" at the end of the user's text.

Worked example (ids symbolic): messages [user "Hi", assistant "Hello", user "Bye"] ->
    [bos] + enc("You are a helpful assistant. USER: Hi ASSISTANT:") + enc("Hello") + [eos]
          + enc("USER: Bye ASSISTANT:")
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
USER_TURN = "USER: {message} ASSISTANT:"

# The same format for transformers' `apply_chat_template` (the Hugging Face export writes it into
# tokenizer_config.json). It renders the text that `conversation_ids` tokenizes, piece by piece.
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '" + SYSTEM_PROMPT + "' %}"
    "{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if m['role'] == 'user' %}{% if loop.first %}{{ system + ' ' }}{% endif %}"
    "{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def user_turn_text(message: str, first: bool, system: str = SYSTEM_PROMPT) -> str:
    """The text of one user turn: "You are a helpful assistant. USER: Hi ASSISTANT:" for the first,
    "USER: Hi ASSISTANT:" for later ones."""
    turn = USER_TURN.format(message=message)
    return f"{system} {turn}" if first else turn


def user_turn_ids(tokenizer, message: str, first: bool, system: str = SYSTEM_PROMPT) -> list[int]:
    """Token ids of one user turn; the first carries BOS and the system prompt (`tokenizer.encode` adds no
    special tokens)."""
    ids = list(tokenizer.encode(user_turn_text(message, first, system)))
    return [tokenizer.bos_id] + ids if first else ids


def conversation_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation ending with a user turn, ready for generation.

    messages: dicts with 'role' in {'system', 'user', 'assistant'} and 'content' (str). A system message may
    only come first; user and assistant turns alternate, starting and ending with a user turn.
    Raises ValueError naming the message index and the problem otherwise."""
    system = SYSTEM_PROMPT
    msgs = list(messages)
    if msgs and msgs[0].get("role") == "system":
        system = str(msgs[0].get("content", ""))
        msgs = msgs[1:]
    offset = len(messages) - len(msgs)
    if not msgs:
        raise ValueError("messages: no user message to answer")
    ids: list[int] = []
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise ValueError(f"messages[{i + offset}]: role {role!r} where {want!r} was expected (a system message "
                             "may only come first; user and assistant turns alternate, starting with user)")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i + offset}]: content must be a string, not {type(content).__name__}")
        if role == "user":
            ids += user_turn_ids(tokenizer, content, first=(i == 0), system=system)
        else:
            ids += list(tokenizer.encode(content)) + [tokenizer.eos_id]
    if msgs[-1]["role"] != "user":
        raise ValueError(f"messages[{len(messages) - 1}]: the last message must be the user's")
    return ids


# ------------------------------------------------------------------------------------------------ vision

VISION_OPEN, VISION_CLOSE = "<vision>", "</vision>"     # tokenized as text; only the codes between are vision ids


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt row: ids (T,) int32 and vision (T,) bool, True where ids are vision ids (which the vision
    model embeds with its vision table)."""
    ids: np.ndarray
    vision: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: Sequence[int], vision: bool) -> "Prompt":
        ids = np.asarray(ids, np.int32).reshape(-1)
        return Prompt(np.concatenate([self.ids, ids]), np.concatenate([self.vision, np.full(len(ids), vision)]))


def text_prompt(tokenizer, text: str, bos: bool = True) -> Prompt:
    """`text` tokenized (`encode` adds no special tokens), after one BOS: the original's leading "<s>"."""
    ids = ([tokenizer.bos_id] if bos else []) + list(tokenizer.encode(text))
    return Prompt(np.asarray(ids, np.int32), np.zeros(len(ids), bool))


def vision_chat_prompt(tokenizer, question: str, vision_ids, system: str = SYSTEM_PROMPT) -> Prompt:
    """The original's vision chat prompt, each text piece tokenized on its own:
        BOS "You are a helpful assistant. USER: {question}\\n" "<vision>" {vision ids} "</vision>" " ASSISTANT:"
    vision_ids (N,): the frames' codes with their end-of-frame / end-of-vision ids (lwm.vision_chat)."""
    head, tail = vision_chat_text(question, system)
    prompt = text_prompt(tokenizer, head)
    prompt = prompt.extend(tokenizer.encode(VISION_OPEN), False).extend(vision_ids, True)
    return prompt.extend(tokenizer.encode(VISION_CLOSE), False).extend(tokenizer.encode(tail), False)


def vision_chat_text(question: str, system: str = SYSTEM_PROMPT) -> tuple[str, str]:
    """The text pieces of `vision_chat_prompt` around "<vision>...</vision>": (head, tail) =
    ("You are a helpful assistant. USER: {question}\\n", " ASSISTANT:"). Training records that put these
    pieces around their codes (lwm.tools.vision_demo) tokenize to the prompt the vision evaluations ask with."""
    return f"{system} USER: {question}\n", " ASSISTANT:"


def vision_generation_prompts(tokenizer, request: str) -> tuple[Prompt, Prompt]:
    """(conditional, unconditional) prompts of the original's image / video generation: BOS + the first user
    turn asking `request` (e.g. "Generate an image of {caption}") + " <vision>", against BOS + "<vision>"."""
    cond = text_prompt(tokenizer, f"{user_turn_text(request, first=True)} {VISION_OPEN}")
    return cond, text_prompt(tokenizer, VISION_OPEN)
