"""The demo's model side, without any UI: load a base + slow-fast adapter, read a video once, answer questions.

`VideoQA.ask(path, question)` answers twice, with the slow path (slow-fast) and without it (fast tokens only), and
says how much each frame's slow tokens were read for the answer. It runs on the library's inference engine
(`slowfast_adapter.inference.engine.Engine`, as the server and the lmms-eval plugin do): the engine builds the
prompt and inputs, keeps each video's frames and encoding (`SlowFastModel.encode`: features and slow K/V) in its
encode cache (an LRU bounded in bytes) keyed by a digest of the file's bytes, and generates the fast-only answer.
The slow-fast answer comes with its per-frame map from `where_it_looked`, called on the engine's inputs and cached
encoding; it runs the whole prompt to map it, so videos are encoded without a prompt prefix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slowfast_adapter as sfa
from slowfast_adapter.core.pooling import plan_fast_frames
from slowfast_adapter.inference.chat import SamplingParams
from slowfast_adapter.inference.encode_cache import CachedVideos
from slowfast_adapter.inference.engine import (
    FAST_ONLY,
    ChatJob,
    Engine,
    EngineSettings,
    default_frames,
    frames_per_unit,
)
from slowfast_adapter.inference.media import file_digest
from slowfast_adapter.inference.video import VideoClip, read_clip

DEMO_QUESTION = "What color is the square?"  # the needle videos' question (slowfast_adapter/demo/needle_data.py)


@dataclass
class FastFrame:
    """One fast frame shown in pixel space: the mean of the frames whose token grids the model pools into it."""

    image: np.ndarray  # uint8 [H, W, 3]
    frames: list[int]  # indices into the clip's frames
    units: list[int]  # indices of their temporal units (frames; Qwen families: groups of 2 frames)
    caption: str


@dataclass
class Answer:
    """Everything the app shows for one question."""

    slowfast: str
    fast_only: str
    per_frame: list[float]  # slow-token reading of each frame (or temporal group: `unit`) for the slow-fast answer
    timestamps: list[float]  # seconds of each of those frames (a group's first frame)
    unit: str  # "frame", or "temporal group" (Qwen families encode 2 frames per slice of slow tokens)
    fast_frames: list[FastFrame]
    reused: bool  # whether the video's encoded features were already cached (a follow-up question)
    stats: dict[str, int]  # the video's `EncodedVideos.stats` after this question


def where_it_looked(
    model: sfa.SlowFastModel, inputs: dict[str, Any], *, encoded, max_new_tokens: int, timestamps: np.ndarray
) -> tuple[torch.Tensor, list[float], list[float]]:
    """The library's per-frame "where it looked" for one prompt: (generated sequences, per-frame values, seconds).

    The one place the app touches `sfa.where_it_looked` (slowfast_adapter/core/frame_attention.py).
    """
    looked = sfa.where_it_looked(model, inputs, encoded=encoded, max_new_tokens=max_new_tokens, timestamps=[timestamps])
    frames = int(looked.num_frames[0])
    per_frame = looked.per_frame(row=0, tokens="answer")[:frames]
    return looked.sequences, per_frame.tolist(), looked.timestamps[0, :frames].tolist()


class VideoQA:
    """A slow-fast model and its processor in an inference `Engine`, which keeps the videos asked about so far.

    num_frames: frames read from each video, spread uniformly over it (`read_clip`).
    cache_bytes: bytes of videos kept read and encoded (least recently asked dropped first).
    """

    def __init__(
        self,
        model: sfa.SlowFastModel,
        processor,
        *,
        num_frames: int,
        max_new_tokens: int = 8,
        cache_bytes: int = 2**30,
    ) -> None:
        settings = EngineSettings(num_frames=num_frames, cache_bytes=cache_bytes, max_batch_size=1,
                                  expose_baselines=True)  # fmt: skip
        self.engine = Engine(model, processor, settings=settings)
        self.model, self.processor = self.engine.model, processor
        self.adapter = model.active_adapter  # the slow-fast answer's model id; + FAST_ONLY: the fast-only one
        self.num_frames = num_frames
        self.max_new_tokens = max_new_tokens
        self.frames_per_unit = frames_per_unit(model)
        units = num_frames // self.frames_per_unit
        if units * self.frames_per_unit != num_frames:
            raise ValueError(f"{num_frames} frames: the base takes frames in groups of {self.frames_per_unit}.")
        plan_fast_frames(units, model.slowfast_config)  # raises now, not at the first question, if the pooling can't
        self._lock = threading.Lock()  # one question at a time: each answer's two runs follow each other

    @classmethod
    def load(cls, base: str | Path, adapter: str | Path, *, num_frames: int | None = None, **kwargs: Any) -> VideoQA:
        """Load a saved base (model + processor folder) and wrap it with a saved adapter.

        num_frames: by default the frame count the adapter's pooling is built for (`default_frames`).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as transformers_logging

        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # no "Loading weights" bar in the app's log
        try:
            base_model = AutoModelForImageTextToText.from_pretrained(base)
            processor = AutoProcessor.from_pretrained(base)
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
        model = sfa.SlowFastModel.from_pretrained(base_model, adapter)
        return cls(model, processor, num_frames=num_frames or default_frames(model), **kwargs)

    # ------------------------------------------------------------------------------------------- answers
    def job(self, path: str | Path, question: str) -> ChatJob:
        """The engine's slow-fast job for `question` about the video at `path`: its frames come from the encode
        cache when the same file (by content: an upload of it again too) was asked about before."""
        key = f"{file_digest(path)}:{self.num_frames}"
        clips = self.engine.cached_clips(self.adapter, [key]) or [read_clip(path, self.num_frames)]
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        job = ChatJob(self.adapter, [], sampling=SamplingParams(max_tokens=self.max_new_tokens))
        return self.engine.prepare_read(job, conversation, clips=clips, video_keys=[key])

    @torch.no_grad()
    def ask(self, path: str | Path, question: str) -> Answer:
        """Answer `question` about the video at `path`, slow-fast and fast-only, with the per-frame map."""
        question = question.strip() or DEMO_QUESTION
        with self._lock:
            job = self.job(path, question)
            clip = job.clips[0]
            reused = self.engine.cache.peek(job.cache_key) is not None
            used: list[CachedVideos] = []

            def look(entry: CachedVideos) -> tuple[torch.Tensor, list[float], list[float]]:
                used.append(entry)
                return where_it_looked(self.model, job.inputs, encoded=entry.encoded,
                                       max_new_tokens=self.max_new_tokens, timestamps=clip.timestamps)  # fmt: skip

            sequences, per_frame, times = self.engine.call_model(job, look, prefix=False)
            fast = self.engine.prepare_as(ChatJob(self.adapter + FAST_ONLY, [], sampling=job.sampling), job)
            self.engine.run_batch([fast])  # the same cached encoding, read without the slow path
            if fast.error is not None:
                raise fast.error
            length = job.inputs["input_ids"].shape[1]
            return Answer(
                slowfast=self.processor.decode(sequences[0, length:], skip_special_tokens=True).strip(),
                fast_only=fast.result.text.strip(),
                per_frame=per_frame,
                timestamps=times,
                unit=self.model.family.unit_name,
                fast_frames=fast_frames(clip, self.model, self.frames_per_unit),
                reused=reused,
                stats=dict(used[0].encoded.stats),
            )


def fast_frames(clip: VideoClip, model: sfa.SlowFastModel, frames_per_unit: int = 1) -> list[FastFrame]:
    """The fast frames of `clip` in pixel space, following `plan_fast_frames` exactly: each is the mean of the frames
    whose token grids the model keeps (every `sampling_stride`-th unit) and averages (`pooling_stride` kept units).

    The model pools token features, not pixels, so these images show what each fast frame summarises, not what it
    sees; spatial pooling (if any) is not drawn.
    """
    units = len(clip.frames) // frames_per_unit
    unit = "frames" if frames_per_unit == 1 else "temporal groups"
    plan = plan_fast_frames(units, model.slowfast_config, unit=unit)
    kept = list(range(0, units, plan.sampling_stride))
    times = clip.timestamps
    result = []
    for k in range(plan.num_fast_frames):
        group = kept[k * plan.pooling_stride : (k + 1) * plan.pooling_stride]
        frames = [u * frames_per_unit + i for u in group for i in range(frames_per_unit)]
        image = clip.frames[frames].astype(np.float32).mean(axis=0).round().astype(np.uint8)
        span = f"{times[frames[0]]:.2f} s" + (f"-{times[frames[-1]]:.2f} s" if len(frames) > 1 else "")
        label = ("frames " if len(frames) > 1 else "frame ") + "+".join(map(str, frames))
        result.append(FastFrame(image, frames, group, f"{label} ({span})"))
    return result
