"""Request bodies of the OpenAI-compatible API, declared once and validated at the edge (pydantic).

Unknown fields are refused (`extra="forbid"`): a misspelt `max_token` is an error, not a silent default.
Responses are plain dicts in the OpenAI shapes (built in `lwm.serve.app`).

Every value is checked here, before any work, and a bad one is refused as one 400 line naming its field
(`lwm.serve.errors.validation_error`):
  - text fields (`Text`: message content and parts, prompt, stop, model, user, ...) must be valid Unicode: a
    lone UTF-16 surrogate ("\\ud800", which JSON can carry but UTF-8 cannot) is refused, never handed to the
    tokenizer;
  - float fields (`Finite`: temperature, top_p, the penalties, cfg_scale) refuse NaN and +-infinity by name
    (Python's JSON reader accepts `NaN` and `Infinity`);
  - `seed` takes OpenAI's int64 range and is folded to the engine's uint32 seeds by `fold_seed`;
  - OpenAI fields this server does not implement (`frequency_penalty`, `presence_penalty`, `logit_bias`,
    `best_of`, ...) are accepted at their neutral value (the one that changes nothing) and refused in one
    line ("not supported") at any other;
  - log-probabilities and several choices, as OpenAI defines them: `n` (1..MAX_N choices per prompt);
    completions: `logprobs` (0..MAX_COMPLETION_LOGPROBS alternatives per token), `echo` (the prompt and, with
    `logprobs`, its log-probabilities), `max_tokens` 0 only with `echo` (scoring alone), `prompt` as one
    text, one token-id list, or a list of either (a batch); chat: `logprobs` (bool) and `top_logprobs`
    (0..MAX_CHAT_TOP_LOGPROBS, only with `logprobs: true`). Streaming with log-probabilities, echo scoring or
    several choices is refused in one line (`check_stream`).

Accepted content of a chat message: a string, or a list of parts
    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}      PNG or JPEG (or an mp4 video)
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}      (vLLM's spelling)
Several image parts in one message are the frames of one video, in order. Plain paths are read only when the
server runs with --allow_local_media.
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      field_validator)

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
MAX_N = 16                      # choices per prompt (each its own job: counted against --max_queue)
MAX_COMPLETION_LOGPROBS = 5     # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20      # OpenAI's limit for chat `top_logprobs` (= lwm.inference.engine.TOP_LOGPROBS)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(value: str) -> str:
    """Refuse a lone UTF-16 surrogate (U+D800..U+DFFF): JSON's "\\ud800" escape decodes to one, which no UTF-8
    text (and so no tokenizer) can hold. One regex scan, no copy of the text."""
    hit = _SURROGATE.search(value)
    if hit is not None:
        raise ValueError(f"contains a lone surrogate U+{ord(hit.group()):04X} at character {hit.start()}; text must "
                         "be valid Unicode (a surrogate is only valid as half of a \\ud83d\\ude00-style pair)")
    return value


def _finite(value: Any) -> Any:
    """Refuse NaN and +-infinity by name (before the range checks, which would call NaN 'not <= 2')."""
    if isinstance(value, (float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            return value                          # not a number: pydantic's type check says so
        if not math.isfinite(number):
            raise ValueError(f"NaN and infinity are not accepted (got {value!r}); give a finite number")
    return value


Text = Annotated[str, AfterValidator(_no_surrogates)]
Finite = BeforeValidator(_finite)


def fold_seed(seed: int) -> int:
    """An OpenAI seed (int64, [-2**63, 2**63 - 1]) -> the engine's seed (uint32, [0, 2**32), what
    `jax.random.PRNGKey` takes): the seed's 64-bit two's complement word w, then (w >> 32) XOR (w mod 2**32).
    Seeds in [0, 2**32) are unchanged; -1 -> 0 (0xFFFFFFFF ^ 0xFFFFFFFF), 2**32 -> 1. Deterministic: one seed
    always draws the same stream. Raises ValueError outside int64."""
    if not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"must be an integer in OpenAI's int64 range [-2**63, 2**63 - 1]; got {seed}")
    word = seed % 2 ** 64
    return (word >> 32) ^ (word & 0xFFFFFFFF)


def _seed(value: Optional[int]) -> Optional[int]:
    return None if value is None else fold_seed(value)


Seed = Annotated[Optional[int], AfterValidator(_seed)]


def _json(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _either(text, other):
    """`text` for a JSON string, `other` for anything else: a union whose refusal reports only the branch the
    value's JSON type picks (a plain Union reports the string branch's 'should be a valid string' for a list).
    The tags hold a '-' so `lwm.serve.errors` leaves them out of the field's name."""
    return Annotated[Union[Annotated[text, Tag("as-string")], Annotated[other, Tag("as-other")]],
                     Discriminator(lambda v: "as-string" if isinstance(v, str) else "as-other")]


def _neutral(*accepted, what: str):
    """A validator for an OpenAI field this server does not implement: null and the values in `accepted` (its
    neutral values, which change nothing) pass; any other is refused as 'not supported'."""
    def check(value):
        if value is None or any(value == a for a in accepted):
            return value
        raise ValueError(f"{_json(value)} is not supported by this server ({what}); leave it out or send "
                         + " or ".join(_json(a) for a in accepted))
    return AfterValidator(check)


_NO_PENALTY = _neutral(0, what="it samples without repetition penalties")
Penalty = Annotated[Optional[float], Finite, _NO_PENALTY]
LogitBias = Annotated[Optional[Dict[str, float]], _neutral({}, what="it does not bias logits")]


class MediaURL(BaseModel):
    model_config = _STRICT
    url: Text
    detail: Optional[Literal["auto", "low", "high"]] = None      # accepted for compatibility; no effect


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(BaseModel):
    model_config = _STRICT
    type: Literal["video_url"]
    video_url: MediaURL


_PART_TYPES = ("text", "image_url", "video_url")


def _part_tag(value):
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"part-{kind}" if kind in _PART_TYPES else None


# Tagged 'part-...' (not by the bare "type", which would name a field 'content[0].text.text' in a refusal).
ContentPart = Annotated[Union[Annotated[TextPart, Tag("part-text")], Annotated[ImagePart, Tag("part-image_url")],
                              Annotated[VideoPart, Tag("part-video_url")]],
                        Discriminator(_part_tag, custom_error_type="invalid_part_type",
                                      custom_error_message="a content part's type must be 'text', 'image_url' or "
                                                           "'video_url'")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: _either(Text, List[ContentPart])
    name: Optional[Text] = None                                   # accepted; not part of the LWM template


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


def _stops(value):
    if value is None:
        return []
    value = [value] if isinstance(value, str) else list(value)
    if len(value) > 4:
        raise ValueError(f"at most 4 stop sequences, got {len(value)}")
    if any(not s for s in value):
        raise ValueError("stop sequences must be non-empty")
    return value


class _Sampling(BaseModel):
    """Fields both completion endpoints share. temperature 0 is greedy (argmax). seed: int64, folded to the
    engine's uint32 (`fold_seed`). n: choices per prompt (choice i draws with seed (s + i) mod 2**32, s the
    folded seed). The penalties and logit_bias: neutral values only."""
    model_config = _STRICT
    model: Text
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Annotated[float, Finite] = Field(1.0, ge=0.0, le=2.0)
    top_p: Annotated[float, Finite] = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[_either(Text, List[Text])] = None
    seed: Seed = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: Optional[Text] = None
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    logit_bias: LogitBias = None
    return_token_ids: bool = False          # vLLM's extension: token ids beside the text (streamed per token)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)

    def check_stream(self) -> None:
        """ValueError (a 400 naming `stream`) when streaming is asked with what this server returns in one
        body only: several choices, log-probabilities, echo."""
        if not self.stream:
            return
        logprobs = getattr(self, "logprobs", None)
        for field, on in (("n", self.n > 1), ("logprobs", logprobs not in (None, False)),
                          ("max_tokens", self.max_tokens == 0)):
            if on:
                raise ValueError(f"stream=true with {field}={_json(getattr(self, field))} is not supported by "
                                 f"this server (it returns that in one response body); send stream=false")


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)      # the newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    response_format: Annotated[Optional[Dict[str, Any]],
                               _neutral({"type": "text"}, what="it generates plain text only")] = None
    tools: Annotated[Optional[List[Dict[str, Any]]], _neutral([], what="it does not call tools")] = None
    tool_choice: Annotated[Optional[_either(Text, Dict[str, Any])],
                           _neutral("none", what="it does not call tools")] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError(f"top_logprobs={value} needs logprobs=true (as in OpenAI's API)")
        return value


def _prompt_kind(value):
    """The branch of a completion prompt by its JSON shape: one text, one id list, or a batch of either."""
    if isinstance(value, str):
        return "as-string"
    if isinstance(value, list) and value and isinstance(value[0], (list, str)):
        return "as-batch-of-texts" if isinstance(value[0], str) else "as-batch-of-ids"
    return "as-ids"


CompletionPrompt = Annotated[Union[Annotated[Text, Tag("as-string")], Annotated[List[int], Tag("as-ids")],
                                   Annotated[List[Text], Tag("as-batch-of-texts")],
                                   Annotated[List[List[int]], Tag("as-batch-of-ids")]],
                             Discriminator(_prompt_kind)]


class CompletionRequest(_Sampling):
    prompt: CompletionPrompt
    max_tokens: Optional[int] = Field(16, ge=0)                   # OpenAI's default; 0 with echo: scoring only
    echo: bool = Field(False, validate_default=True)
    best_of: Annotated[Optional[int], _neutral(1, what="it draws one answer per request")] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: Annotated[Optional[Text], _neutral("", what="it does not fill in the middle")] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a prompt list needs at least one token id (or one prompt)")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("a token-id prompt needs at least one id")
        return value

    @field_validator("echo")
    @classmethod
    def _zero_needs_echo(cls, value, info):
        if info.data.get("max_tokens") == 0 and not value:
            raise ValueError("max_tokens=0 (scoring the prompt alone) needs echo=true")
        return value

    def prompts(self) -> list:
        """The prompt as a batch: a list of texts or of token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (text only): ids of `prompt`; add_special_tokens prepends BOS."""
    model_config = _STRICT
    prompt: Text
    model: Optional[Text] = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize body: the text of `tokens`."""
    model_config = _STRICT
    tokens: List[int]
    model: Optional[Text] = None


class ImageRequest(BaseModel):
    model_config = _STRICT
    prompt: Text = Field(min_length=1)
    model: Optional[Text] = None
    n: int = Field(1, ge=1, le=4)
    size: Optional[Text] = None                                   # must be the VQGAN's "RxR" when given
    response_format: Literal["b64_json"] = "b64_json"
    seed: Seed = None
    temperature: Annotated[float, Finite] = Field(1.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0)                                   # 0 = every code
    cfg_scale: Annotated[float, Finite] = Field(1.0, ge=0.0, le=50.0)   # classifier-free guidance; 1 = none
    user: Optional[Text] = None
