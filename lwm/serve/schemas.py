"""Request bodies of the OpenAI-compatible API, declared once and validated at the edge (pydantic).

Unknown fields are refused (`extra="forbid"`): a misspelt `max_token` is an error, not a silent default.
Responses are plain dicts in the OpenAI shapes (built in `lwm.serve.app`).

Accepted content of a chat message: a string, or a list of parts
    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}      PNG or JPEG (or an mp4 video)
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}      (vLLM's spelling)
Several image parts in one message are the frames of one video, in order. Plain paths are read only when the
server runs with --allow_local_media.
"""
from __future__ import annotations

from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

_STRICT = ConfigDict(extra="forbid")


class MediaURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None      # accepted for compatibility; no effect


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(BaseModel):
    model_config = _STRICT
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[ContentPart]]
    name: Optional[str] = None                                    # accepted; not part of the LWM template


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
    """Fields both completion endpoints share. temperature 0 is greedy (argmax)."""
    model_config = _STRICT
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: Optional[str] = None
    return_token_ids: bool = False          # vLLM's extension: token ids beside the text (streamed per token)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)      # the newer name of max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int]]
    max_tokens: Optional[int] = Field(16, ge=1)                   # OpenAI's default for /v1/completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a token-id prompt needs at least one id")
        return value


class ImageRequest(BaseModel):
    model_config = _STRICT
    prompt: str = Field(min_length=1)
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=4)
    size: Optional[str] = None                                    # must be the VQGAN's "RxR" when given
    response_format: Literal["b64_json"] = "b64_json"
    seed: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0)                                   # 0 = every code
    cfg_scale: float = Field(1.0, ge=0.0, le=50.0)               # classifier-free guidance; 1 = none
    user: Optional[str] = None
