"""A task that needs time: two coloured squares in two different frames; "Which color came first?".

The haystack is the needle task's (grey noise, drifting grey blocks). Two squares of two different `COLORS` appear,
each in one frame, at two different times and places; the answer is the colour of the earlier one. On the test
videos (`hidden_from_subsampling`) both squares sit in frames that the demo's fast tokens (every 4th frame) and the
base's 8-frame uniform subsampling both skip, so (a) and (b) never see a square: only what reads every frame can
answer, and only what knows when each frame happened can answer it right more than half the time.

Files and annotations as in `needle_data.py`, with `"squares": [first, second]` (each `{"frame", "y", "x",
"color"}`, in time order) instead of `"needle"`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tools.tiny import write_mp4
from .needle_data import COLORS, SPLIT_SEEDS, NeedleSpec, render

QUESTION = "Which color came first?"


def subsampled_frames(num_frames: int, count: int) -> set[int]:
    """The frames a uniform subsampling of `count` of `num_frames` frames reads (`read_video`'s rounding)."""
    return {int(i) for i in np.linspace(0, num_frames - 1, count).round().astype(int)}


def hidden_frames(num_frames: int, *, fast_stride: int, native_frames: int) -> list[int]:
    """Frames that neither the fast tokens' temporal sampling (every `fast_stride`-th frame from 0) nor a uniform
    subsampling to `native_frames` frames reads."""
    seen = set(range(0, num_frames, fast_stride)) | subsampled_frames(num_frames, native_frames)
    return [t for t in range(num_frames) if t not in seen]


@dataclass(frozen=True)
class OrderSpec:
    """One video: the needle task's haystack of `haystack` (a needle of size 0: nothing drawn), square `first` then
    square `second`, each (frame, y, x, color) with first[0] < second[0], of `square_size` px."""

    haystack: NeedleSpec
    first: tuple[int, int, int, str]
    second: tuple[int, int, int, str]
    square_size: int


def render_order(spec: OrderSpec) -> np.ndarray:
    """uint8 [T, size, size, 3]: the needle haystack with the two squares drawn in their frames."""
    video = render(spec.haystack)
    n = spec.square_size
    for frame, y, x, color in (spec.first, spec.second):
        video[frame, y : y + n, x : x + n] = COLORS[color]
    return video


def sample_order_specs(
    split: str, count: int, *, num_frames: int, size: int, needle_size: int, frames: list[int] | None = None
) -> list[OrderSpec]:
    """`count` videos for `split`, reproducible from the split's fixed seed (+7 so they differ from the needle
    task's). `frames`: the frames squares may take (default: all); the first colour cycles through `COLORS`."""
    rng = np.random.default_rng(SPLIT_SEEDS[split] + 7)
    names = list(COLORS)
    allowed = list(range(num_frames)) if frames is None else list(frames)
    specs = []
    for i in range(count):
        t1, t2 = sorted(int(t) for t in rng.choice(allowed, size=2, replace=False))
        first = names[i % len(names)]  # balanced answers
        second = names[(i % len(names) + int(rng.integers(1, len(names)))) % len(names)]
        places = rng.integers(0, size - needle_size + 1, size=4)
        haystack = NeedleSpec(num_frames, size, 0, 0, 0, first, 0, SPLIT_SEEDS[split] * 100_000 + 50_000 + i)
        squares = (t1, int(places[0]), int(places[1]), first), (t2, int(places[2]), int(places[3]), second)
        specs.append(OrderSpec(haystack, *squares, needle_size))
    return specs


def write_order_split(
    root: str | Path,
    split: str,
    count: int,
    *,
    num_frames: int,
    size: int = 32,
    needle_size: int = 16,
    frames: list[int] | None = None,
) -> Path:
    """Write `count` mp4 videos and `root/<split>.jsonl`; returns the annotation file."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    records = []
    specs = sample_order_specs(split, count, num_frames=num_frames, size=size, needle_size=needle_size, frames=frames)
    for i, spec in enumerate(specs):
        relative = f"{split}/{split}_{i:05d}.mp4"
        write_mp4(root / relative, render_order(spec))
        squares = [dict(zip(("frame", "y", "x", "color"), square, strict=True)) for square in (spec.first, spec.second)]
        records.append(
            {
                "id": f"{split}_{i:05d}",
                "video": relative,
                "conversations": [
                    {"from": "human", "value": f"<video>\n{QUESTION}"},
                    {"from": "gpt", "value": spec.first[3]},
                ],
                "squares": squares,
                "frames": num_frames,
            }
        )
    path = root / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path
