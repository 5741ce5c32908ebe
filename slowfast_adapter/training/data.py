"""Training data in the LLaVA conversation format (LLaVA-Video-178K, LLaVA-OneVision data).

A record (one element of a JSON list, or one line of a JSONL file)::

    {"id": "v_0001", "video": "clips/v_0001.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A red square moves left."}, ...]}

`video` / `image` may be a path or a list of paths (relative to `media_root`); `<video>` / `<image>` tags in
human turns mark where each one goes (without tags, the media open the first human turn). Records with
neither key are text-only.

`ConversationDataset` reads the media and renders the conversation with the base model's own chat template;
`ConversationCollator` runs the stock processor on a batch and labels the assistant tokens only (every other
token, including visual placeholders and padding, is -100).
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..inference.video import VideoReadError, read_clip

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAG = re.compile(r"<(video|image)>\n?")


@dataclass
class Sample:
    """One rendered training conversation, ready for the collator.

    text: the conversation rendered by the chat template (with the processor's placeholders, unexpanded);
    assistant_spans: [(start, end)] character spans of `text` that carry labels (each assistant reply and
    its end-of-turn marker); videos: uint8 [T_i, H, W, 3] each (T_i may differ); images: uint8 [H, W, 3].
    """

    index: int
    record_id: str
    text: str
    assistant_spans: list[tuple[int, int]]
    videos: list[np.ndarray] = field(default_factory=list)
    video_metadata: list[Any] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)


class TrainingDataError(ValueError):
    """Training data that cannot be used as given (a missing media file, an unreadable record file): one line
    naming the record and the file."""


# ------------------------------------------------------------------------------------------- records
def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON list (`.json`) or a JSON-lines file (anything else, one record per line)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}.")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON record ({err}).") from err
    for number, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{path}: record {number} has no 'conversations' list.")
    return records


def media_paths(record: dict[str, Any], kind: str) -> list[str]:
    """The record's `kind` ('video' or 'image') paths, as a list."""
    value = record.get(kind)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def missing_media(records: list[dict[str, Any]], media_root: str | os.PathLike) -> dict[int, str]:
    """Record index -> a description of its first video/image file that does not exist (an `os.stat` per file: the
    cheap check done before training starts; unreadable contents are found when read)."""
    missing: dict[int, str] = {}
    for index, record in enumerate(records):
        for kind in ("video", "image"):
            paths = media_paths(record, kind)
            bad = next((p for p in paths if not isinstance(p, str) or not (Path(media_root) / p).is_file()), None)
            if bad is not None and index not in missing:
                missing[index] = (
                    f"record {index} (id {record.get('id', '?')!r}): {kind} file {bad!r} does not exist "
                    f"(looked for {Path(media_root) / str(bad)})"
                )
    return missing


def to_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's turns as chat-template messages: role + a content list of text / video / image items."""
    media = {kind: len(media_paths(record, kind)) for kind in ("video", "image")}
    tagged = {kind: 0 for kind in media}
    messages = []
    for turn in record["conversations"]:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"Record {record.get('id', '?')}: unknown speaker {turn.get('from')!r} (use human/gpt).")
        value = turn.get("value", turn.get("content", ""))
        content: list[dict[str, Any]] = []
        position = 0
        for match in _TAG.finditer(value) if role == "user" else ():
            if value[position : match.start()]:
                content.append({"type": "text", "text": value[position : match.start()]})
            content.append({"type": match.group(1)})
            tagged[match.group(1)] += 1
            position = match.end()
        if value[position:] or not content:
            content.append({"type": "text", "text": value[position:]})
        messages.append({"role": role, "content": content})
    for kind, count in media.items():
        if tagged[kind] == 0 and count:  # untagged media open the first user turn
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError(f"Record {record.get('id', '?')} has a {kind} but no human turn to put it in.")
            first_user["content"][:0] = [{"type": kind} for _ in range(count)]
        elif tagged[kind] != count:
            raise ValueError(
                f"Record {record.get('id', '?')}: {tagged[kind]} <{kind}> tags in the human turns but {count} "
                f"{kind} file(s)."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"Record {record.get('id', '?')} has no gpt/assistant turn to train on.")
    return messages


def render(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the processor's chat template; return the text and the assistant spans.

    Each assistant span runs from the end of the generation prompt before the reply (the rendering of the
    earlier turns with `add_generation_prompt=True`) to the end of the reply's turn (its end-of-turn
    marker included, trailing whitespace excluded), so the role header is never trained on.
    """

    def apply(turns: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = apply(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, upto = apply(messages[:i], generation_prompt=True), apply(messages[: i + 1])
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise ValueError(
                "The chat template does not render conversations incrementally (a turn's rendering changes when "
                "later turns are added), so assistant tokens cannot be located. Use a template without "
                "history-dependent rendering."
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


# ------------------------------------------------------------------------------------------- dataset
class ConversationDataset(Dataset):
    """LLaVA-format conversations with their videos/images read from disk.

    Frames: `num_frames` uniform frames per video, or a target `fps` capped at `max_frames` (the count rounded
    down to a multiple of `frame_multiple`, which fast-token pooling strides need). A file that
    cannot be read raises `VideoReadError` naming it; with `skip_bad_videos=True` the sample is logged and
    replaced by the next readable one (so batch sizes, and every DDP rank's step count, stay the same).
    """

    def __init__(
        self,
        records: str | os.PathLike | list[dict[str, Any]],
        processor: Any,
        *,
        media_root: str | os.PathLike | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        frame_multiple: int = 1,
        video_backend: str = "auto",
        skip_bad_videos: bool = False,
    ) -> None:
        if isinstance(records, (str, os.PathLike)):
            media_root = media_root if media_root is not None else Path(records).parent
            records = load_records(records)
        if (num_frames is None) == (fps is None):
            raise ValueError("Give exactly one of num_frames (uniform sampling) or fps (with max_frames).")
        self.records = records
        self.processor = processor
        self.media_root = Path(media_root) if media_root is not None else Path.cwd()
        self.sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames, "multiple": frame_multiple}
        self.video_backend = video_backend
        self.skip_bad_videos = skip_bad_videos
        self.skipped: dict[int, str] = {}  # record index -> error (in this process)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        for attempt in range(len(self.records)):
            current = (index + attempt) % len(self.records)
            try:
                return self.load(current)
            except VideoReadError as err:
                if not self.skip_bad_videos:
                    raise
                if current not in self.skipped:
                    self.skipped[current] = str(err)
                    logger.warning("Skipping record %d (%s): %s", current, self._id(current), err)
        raise VideoReadError("No record of the dataset has readable media (skip_bad_videos=True skipped them all).")

    def _id(self, index: int) -> str:
        return str(self.records[index].get("id", index))

    def load(self, index: int) -> Sample:
        """Read and render record `index` (no skipping)."""
        record = self.records[index]
        text, spans = render(self.processor, to_messages(record))
        clips = [
            read_clip(self.media_root / path, **self.sampling, backend=self.video_backend)
            for path in media_paths(record, "video")
        ]
        images = [self._read_image(self.media_root / path) for path in media_paths(record, "image")]
        return Sample(
            index=index,
            record_id=self._id(index),
            text=text,
            assistant_spans=spans,
            videos=[clip.frames for clip in clips],
            video_metadata=[clip.metadata() for clip in clips],
            images=images,
        )

    @staticmethod
    def _read_image(path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                return np.array(image.convert("RGB"))
        except Exception as err:  # PIL raises many types for bad files
            raise VideoReadError(f"Cannot read image {path} ({err}).") from err


# ------------------------------------------------------------------------------------------- collator
class ConversationCollator:
    """Batches `Sample`s with the stock processor (right padding) and adds assistant-only `labels`.

    Variable frame counts: processors that flatten videos into patches (Qwen-VL: `video_grid_thw`) batch any
    counts natively. Processors that return one [V, T, C, H, W] tensor (LLaVA-OneVision) need equal T in a
    batch: shorter videos are padded by repeating their last frame (`pad_frames`, default: automatic).
    """

    def __init__(self, processor: Any, *, pad_frames: bool | None = None, **processor_kwargs: Any) -> None:
        self.processor = processor
        self.processor_kwargs = processor_kwargs
        if pad_frames is None:
            names = getattr(getattr(processor, "video_processor", None), "model_input_names", [])
            pad_frames = "video_grid_thw" not in names
        self.pad_frames = pad_frames
        tokenizer = processor.tokenizer
        visual = [getattr(processor, f"{kind}_token_id", None) for kind in ("image", "video")]
        visual += [
            tokenizer.convert_tokens_to_ids(getattr(processor, f"{kind}_token", None) or "")
            for kind in ("image", "video")
        ]
        self.visual_token_ids = sorted({t for t in visual if isinstance(t, int) and t != tokenizer.unk_token_id})

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        videos = [video for sample in samples for video in sample.videos]
        metadata = [meta for sample in samples for meta in sample.video_metadata]
        images = [image for sample in samples for image in sample.images]
        if self.pad_frames and len({len(v) for v in videos}) > 1:
            videos, metadata = pad_frame_counts(videos, metadata)
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
        if images:
            kwargs["images"] = images
        batch = self.processor(
            text=[sample.text for sample in samples],
            padding=True,
            padding_side="right",
            return_tensors="pt",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            **self.processor_kwargs,
            **kwargs,
        )
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets", None) or [[] for _ in samples]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, sample in enumerate(samples):
            mask = token_mask(offsets[row], sample.assistant_spans, replacements[row])
            labels[row, mask] = batch["input_ids"][row, mask]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        labels[torch.isin(batch["input_ids"], torch.tensor(self.visual_token_ids, dtype=torch.long))] = IGNORE_INDEX
        batch.pop("token_type_ids", None)
        batch["labels"] = labels
        return dict(batch)


def token_mask(offsets: torch.Tensor, spans: list[tuple[int, int]], replacements: list[dict[str, Any]]) -> torch.Tensor:
    """[L] bool: tokens whose characters overlap a span of the unexpanded text.

    offsets: [L, 2] character offsets of each token in the processor's expanded text (placeholders replaced
    by their full token runs); replacements: the processor's `text_replacement_offsets` for this sample,
    used to move span positions past the expansions before them.
    """
    ends = [r["span"][1] for r in replacements]
    gained = np.cumsum(
        [0] + [(r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]) for r in replacements]
    )
    mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
    starts_, ends_ = offsets[:, 0], offsets[:, 1]
    for start, end in spans:
        start = start + int(gained[bisect.bisect_right(ends, start)])
        end = end + int(gained[bisect.bisect_right(ends, end - 1)])
        mask |= (starts_ < end) & (ends_ > start) & (ends_ > starts_)
    return mask


def pad_frame_counts(videos: list[np.ndarray], metadata: list[Any]) -> tuple[list[np.ndarray], list[Any]]:
    """Repeat each video's last frame until all have the batch's largest frame count."""
    longest = max(len(v) for v in videos)
    padded, metas = [], []
    for video, meta in zip(videos, metadata, strict=True):
        extra = longest - len(video)
        padded.append(np.concatenate([video, np.repeat(video[-1:], extra, axis=0)]) if extra else video)
        if extra and getattr(meta, "frames_indices", None) is not None:
            meta = copy.copy(meta)
            meta.frames_indices = list(meta.frames_indices) + [meta.frames_indices[-1]] * extra
        metas.append(meta)
    return padded, metas
