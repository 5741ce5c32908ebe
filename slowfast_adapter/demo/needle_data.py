"""A video needle-in-a-haystack: many grey frames, one frame with a small coloured square.

The haystack is grey noise with grey shapes drifting across it; the needle is a small square of one of
`COLORS`, shown in a single frame at a random time and place. The question asks for its colour. Pooled
fast tokens lose it (temporal sampling skips the frame, temporal and spatial pooling dilute it into
grey), while the slow tokens of every frame keep it.

Files are real mp4 videos (PyAV, H.264) with annotations in the LLaVA-Video conversation format:
`{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", ...}],
"needle": {...}}` in one JSONL file per split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tools.tiny import write_mp4

COLORS = {"red": (235, 30, 30), "green": (30, 210, 50), "blue": (30, 70, 240), "yellow": (240, 225, 30)}
QUESTION = "What color is the square?"
SPLIT_SEEDS = {"pretrain": 1000, "train": 2000, "val": 3000, "test": 4000}


@dataclass(frozen=True)
class NeedleSpec:
    """One video: `num_frames` frames of `size` px, the needle in frame `frame` at (`y`, `x`)."""

    num_frames: int
    size: int
    frame: int
    y: int
    x: int
    color: str
    needle_size: int
    seed: int


def render(spec: NeedleSpec) -> np.ndarray:
    """uint8 [T, size, size, 3]: grey noise, two drifting grey blocks, one coloured square in one frame."""
    rng = np.random.default_rng(spec.seed)
    size, frames = spec.size, spec.num_frames
    grey = rng.integers(95, 160, size=(frames, size, size, 1), dtype=np.int16)
    video = np.repeat(grey, 3, axis=-1)
    for _ in range(2):  # distractors: grey blocks moving in straight lines, bouncing off the borders
        side = int(rng.integers(4, 9))
        pos, vel = rng.uniform(0, size - side, 2), rng.uniform(-2.0, 2.0, 2)
        shade = int(rng.integers(40, 220))
        for t in range(frames):
            y, x = (np.abs((pos + vel * t) % (2 * (size - side)) - (size - side))).astype(int)
            video[t, y : y + side, x : x + side] = shade
    n = spec.needle_size
    video[spec.frame, spec.y : spec.y + n, spec.x : spec.x + n] = COLORS[spec.color]
    return video.astype(np.uint8)


def sample_specs(split: str, count: int, *, num_frames: int, size: int, needle_size: int) -> list[NeedleSpec]:
    """`count` needle videos for `split`, reproducible from the split's fixed seed."""
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    names = list(COLORS)
    specs = []
    for i in range(count):
        y, x = rng.integers(0, size - needle_size + 1, size=2)
        specs.append(
            NeedleSpec(
                num_frames=num_frames,
                size=size,
                frame=int(rng.integers(0, num_frames)),
                y=int(y),
                x=int(x),
                color=names[i % len(names)],  # balanced classes
                needle_size=needle_size,
                seed=SPLIT_SEEDS[split] * 100_000 + i,
            )
        )
    return specs


def write_split(
    root: str | Path, split: str, count: int, *, num_frames: int, size: int = 32, needle_size: int = 6
) -> Path:
    """Write `count` mp4 videos and `root/<split>.jsonl`; returns the annotation file."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i, spec in enumerate(sample_specs(split, count, num_frames=num_frames, size=size, needle_size=needle_size)):
        relative = f"{split}/{split}_{i:05d}.mp4"
        write_mp4(root / relative, render(spec))
        records.append(
            {
                "id": f"{split}_{i:05d}",
                "video": relative,
                "conversations": [
                    {"from": "human", "value": f"<video>\n{QUESTION}"},
                    {"from": "gpt", "value": spec.color},
                ],
                "needle": {"frame": spec.frame, "y": spec.y, "x": spec.x, "color": spec.color, "frames": num_frames},
            }
        )
    path = root / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def read_split(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
