"""A chat request in the OpenAI chat-completions shape, read into what the model needs.

`parse_messages` turns OpenAI `messages` (content as a string or a list of `text`, `video_url` and `image_url` parts)
into the conversation the processor's chat template takes (`{"type": "video"}` placeholders in place) and the list of
media URLs in reading order. `SamplingParams` and `FrameSampling` are a request's generation and frame settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .media import RequestError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class MediaRef:
    """A video or image a message names: `kind` ('video' / 'image'), the `url` as sent, where it was (`param`)."""

    kind: str
    url: str
    param: str


def _part(part: Any, where: str) -> tuple[dict, MediaRef | None]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where} must be an object with a 'type'.", param=where)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string.", param=where)
        return {"type": "text", "text": part["text"]}, None
    if kind in ("video_url", "image_url"):
        media = part.get(kind)
        url = media.get("url") if isinstance(media, dict) else media
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}.{kind}.url must be a non-empty string.", param=where)
        return {"type": kind[:5]}, MediaRef(kind[:5], url, where)
    raise RequestError(f"{where}: unsupported content part type {kind!r} (text, video_url, image_url).", param=where)


def parse_messages(messages: Any) -> tuple[list[dict], list[MediaRef]]:
    """(chat-template conversation, media in reading order) of OpenAI `messages`; `RequestError` names a bad part."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list.", param="messages")
    conversation, media = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where} needs a role among {list(ROLES)}.", param=where)
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts.", param=where)
        parts = []
        for j, part in enumerate(content):
            parsed, ref = _part(part, f"{where}.content[{j}]")
            if ref is not None and message["role"] != "user":
                raise RequestError(f"{where}: only user messages may hold videos or images.", param=where)
            parts.append(parsed)
            media += [ref] if ref else []
        conversation.append({"role": message["role"], "content": parts})
    if conversation[-1]["role"] == "assistant":
        raise RequestError("The last message must not be the assistant's: nothing to answer.", param="messages")
    return conversation, media


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: greedy when `temperature` is 0, else sampling (`top_p`, `seed` for a repeatable
    draw); `max_tokens` new tokens at most; the answer ends before the first of `stop`."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}.", param="max_tokens")
        if not 0 <= self.temperature <= 2:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}.", param="temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}.", param="top_p")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be up to 4 non-empty strings.", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may share a batch: the same decoding rule. A seeded draw runs alone (its key is
        None): its random numbers must not depend on the requests beside it."""
        if self.greedy:
            return ("greedy",)
        return None if self.seed is not None else ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of each video are read: `num_frames` uniformly, or `fps` (at most `max_frames`)."""

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None

    def key(self) -> tuple:
        return (self.num_frames, self.fps, self.max_frames)
