"""The demo's model side, without any UI: load a base + slow-fast adapter, read a video once, answer questions.

`VideoQA.ask(path, question)` answers twice, with the slow path (slow-fast) and without it (fast tokens only), and
says how much each frame's slow tokens were read for the answer. Each video is read and encoded once
(`SlowFastModel.encode`) and kept in a small LRU cache keyed by a digest of the file's bytes, so follow-up
questions on the same video reuse its features and slow K/V (not the prompt's KV cache: the map covers the whole
prompt, so `where_it_looked` runs it).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slowfast_adapter as sfa
from slowfast_adapter.core.pooling import plan_fast_frames
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


@dataclass
class _Video:
    clip: VideoClip
    encoded: sfa.EncodedVideos | None = None


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
    """A slow-fast model, its processor, and the videos asked about so far.

    num_frames: frames read from each video, spread uniformly over it (`read_clip`).
    cache_size: videos kept encoded (least recently asked dropped first).
    """

    def __init__(
        self, model: sfa.SlowFastModel, processor, *, num_frames: int, max_new_tokens: int = 8, cache_size: int = 8
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.num_frames = num_frames
        self.max_new_tokens = max_new_tokens
        self.cache_size = cache_size
        self._videos: OrderedDict[str, _Video] = OrderedDict()
        units = num_frames // self.frames_per_unit
        if units * self.frames_per_unit != num_frames:
            raise ValueError(f"{num_frames} frames: the base takes frames in groups of {self.frames_per_unit}.")
        plan_fast_frames(units, model.slowfast_config)  # raises now, not at the first question, if the pooling can't
        self._lock = threading.Lock()  # one question at a time: the model and the cache are shared

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

    # ------------------------------------------------------------------------------------------- inputs
    def prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def inputs(self, clip: VideoClip, question: str) -> dict[str, Any]:
        """The stock processor's output for one question about `clip` (every frame read is kept)."""
        inputs = self.processor(
            text=[self.prompt(question)],
            videos=[clip.frames],
            video_metadata=[clip.metadata()],
            do_sample_frames=False,
            return_tensors="pt",
        )
        inputs.pop("token_type_ids", None)
        return dict(inputs.to(self.model.device))

    def clip(self, path: str | Path) -> VideoClip:
        """The frames of `path` (read once, then cached with its encoded features)."""
        return self._video(path).clip

    def _video(self, path: str | Path) -> _Video:
        key = file_digest(path)  # by content: an upload of the same file again is the same video
        if key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        video = _Video(read_clip(path, self.num_frames))
        self._videos[key] = video
        while len(self._videos) > self.cache_size:
            self._videos.popitem(last=False)
        return video

    # ------------------------------------------------------------------------------------------- answers
    def decode(self, sequences: torch.Tensor, prompt_length: int) -> str:
        return self.processor.decode(sequences[0, prompt_length:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def ask(self, path: str | Path, question: str) -> Answer:
        """Answer `question` about the video at `path`, slow-fast and fast-only, with the per-frame map."""
        question = question.strip() or DEMO_QUESTION
        with self._lock:
            video = self._video(path)
            inputs = self.inputs(video.clip, question)
            reused = video.encoded is not None
            if video.encoded is None:  # vision tower, projector and slow K/V once per video; no prompt prefix:
                videos = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
                video.encoded = self.model.encode(**videos)  # where_it_looked runs the whole prompt to map it
            length = inputs["input_ids"].shape[1]
            sequences, per_frame, times = where_it_looked(
                self.model,
                inputs,
                encoded=video.encoded,
                max_new_tokens=self.max_new_tokens,
                timestamps=video.clip.timestamps,
            )
            with self.model.slow_path_disabled():
                fast = self.model.generate(
                    **inputs, encoded=video.encoded, max_new_tokens=self.max_new_tokens, do_sample=False
                )
            return Answer(
                slowfast=self.decode(sequences, length),
                fast_only=self.decode(fast, length),
                per_frame=per_frame,
                timestamps=times,
                unit=self.model.family.unit_name,
                fast_frames=fast_frames(video.clip, self.model, self.frames_per_unit),
                reused=reused,
                stats=dict(video.encoded.stats),
            )

    @property
    def frames_per_unit(self) -> int:
        """Frames per temporal unit of the base's video tokens (Qwen families: 2 frames per temporal patch)."""
        return int(getattr(self.model.base_model.config.vision_config, "temporal_patch_size", 1) or 1)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """A BLAKE2 digest of the file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_frames(model: sfa.SlowFastModel) -> int:
    """The frame count the adapter's pooling is built for: `min_fast_frames` fast frames at the configured strides
    (32 for the demo's adapter; 64 for the released s1/t4 configs), times the base's frames per temporal unit."""
    config = model.slowfast_config
    per_unit = int(getattr(model.base_model.config.vision_config, "temporal_patch_size", 1) or 1)
    return config.min_fast_frames * config.temporal_sampling_stride * config.temporal_pooling_stride * per_unit


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
