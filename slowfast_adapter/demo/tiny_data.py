"""A tiny offline training set for `recipes/tiny_cpu.yaml`: a tiny base model, mp4 videos and a JSONL file.

    python -m slowfast_adapter.demo.tiny_data tiny-data [--family llava_onevision] [--videos 8]

writes `tiny-data/base/` (model + processor), `tiny-data/videos/*.mp4` (a coloured square moving over
noise; videos have different lengths) and `tiny-data/train.jsonl` in the LLaVA-Video-178K format
(question about the square's colour, answer "It is <colour>."; every third record has a second turn).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..tools.tiny import save_tiny, write_mp4
from .needle_data import COLORS
from .quickstart import square_video


def write_tiny_training_data(
    directory: str | os.PathLike,
    *,
    family: str = "llava_onevision",
    num_videos: int = 8,
    frame_size: int = 32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the tiny base, videos and `train.jsonl`; returns their paths ('base', 'videos', 'train_file')."""
    directory = Path(directory)
    base = save_tiny(family, directory / "base", image_size=frame_size, seed=seed)
    videos = directory / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    records = []
    for i in range(num_videos):
        color = names[i % len(names)]
        frames = square_video(COLORS[color], num_frames=12 + 4 * (i % 3), size=frame_size, seed=seed + i)
        write_mp4(videos / f"clip{i:03d}.mp4", frames)
        turns = [
            {"from": "human", "value": "<video>\nWhat color is the square?"},
            {"from": "gpt", "value": f"It is {color}."},
        ]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "Is it moving?"}, {"from": "gpt", "value": "Yes."}]
        records.append({"id": f"clip{i:03d}", "video": f"videos/clip{i:03d}.mp4", "conversations": turns})
    train_file = directory / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"base": base, "videos": videos, "train_file": train_file}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--family", default="llava_onevision")
    parser.add_argument("--videos", type=int, default=8)
    args = parser.parse_args(argv)
    paths = write_tiny_training_data(args.directory, family=args.family, num_videos=args.videos)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
