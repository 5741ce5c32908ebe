"""The OpenAI chat-completions protocol, as far as this server speaks it: the request body, the response and stream
chunk bodies, and OpenAI-style error bodies.

Per-request frame sampling follows vLLM's extension field, so clients written for vLLM work unchanged:
`extra_body={"mm_processor_kwargs": {"num_frames": 32}}` (or `{"fps": 1, "max_frames": 64}`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..inference.chat import FrameSampling, SamplingParams
from ..inference.engine import ChatJob, Completion
from ..inference.media import RequestError

# Fields of OpenAI's request this server does not implement: refused unless left at their neutral value.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"}), "frequency_penalty": (None, 0, 0.0),
               "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {})}  # fmt: skip


class FrameOptions(BaseModel):
    """`mm_processor_kwargs`: how many frames to read from each video of this request."""

    model_config = ConfigDict(extra="forbid")
    num_frames: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0)
    max_frames: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are ignored, except those in `UNSUPPORTED` when set."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    mm_processor_kwargs: FrameOptions | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n must be 1 (one answer per request), got {self.n}.", param="n")
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                raise RequestError(f"{name} is not supported by this server; leave it out.", param=name)
        if self.mm_processor_kwargs and self.mm_processor_kwargs.num_frames and self.mm_processor_kwargs.fps:
            raise RequestError("Give num_frames or fps in mm_processor_kwargs, not both.", param="mm_processor_kwargs")

    def job(self, generation_config: Any, default_max_tokens: int) -> ChatJob:
        """The engine's job for this request. Sampling settings the request leaves out come from the model's
        generation config (greedy unless it samples), as vLLM does."""
        self.check_supported()
        temperature = self.temperature
        if temperature is None:
            temperature = float(generation_config.temperature or 1.0) if generation_config.do_sample else 0.0
        top_p = self.top_p if self.top_p is not None else float(getattr(generation_config, "top_p", None) or 1.0)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        sampling = SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=self.seed,
            stop=stop,
        )
        frames = FrameSampling(**self.mm_processor_kwargs.model_dump()) if self.mm_processor_kwargs else FrameSampling()
        return ChatJob(self.model, self.messages, sampling=sampling, frames=frames)


def usage(result: Completion) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip


def completion_body(job: ChatJob) -> dict[str, Any]:
    result = job.result
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason":
              result.finish_reason, "logprobs": None}  # fmt: skip
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": [choice], "usage": usage(result)}  # fmt: skip


def chunk_body(job: ChatJob, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
            "choices": [choice], **extra}  # fmt: skip


ErrorType = Literal["invalid_request_error", "not_found_error", "server_error"]


def error_body(message: str, *, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind: ErrorType = "invalid_request_error"
    if status >= 500 or status == 404:
        kind = "server_error" if status >= 500 else "not_found_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
