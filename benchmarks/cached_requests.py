"""Benchmark: the engine's worker time for requests about videos already in its encode cache.

The encode cache matches a video by a digest of its pixel tensor (SHA-256; `core.encoded.fingerprint`). The engine
hashes a cached video's pixels while the request is prepared, in the caller's thread, and a collated batch takes its
rows' digests, so the worker thread, which holds the model, hashes nothing. This measures what that saves: requests
about cached videos are prepared (media read, processor, digests), then run by `Engine.run_batch` in this thread,
timed; one request alone and batches of 4, greedy, `--tokens` tokens. Two settings, interleaved round by round:
- `as shipped`: the digests are known when the worker starts;
- `worker hashes`: every digest the preparation remembered is dropped first, so the worker hashes each request's
  videos itself, once per request (a batch still takes its rows' digests).
Every run is checked to have hit the cache, to have hashed in the worker what its setting says (nothing as shipped,
each request's video when the worker hashes), and to give the same answers in both settings.

The model is a tiny random LLaVA-OneVision (1 layer) at the real frame size (384 px, 64 frames: 113 MB of fp32
pixels per video), so the time is the engine's own work around the LLM, not the LLM's.

    python benchmarks/cached_requests.py
    python benchmarks/cached_requests.py --frames 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, write_results  # noqa: E402

import slowfast_adapter as sfa  # noqa: E402
from slowfast_adapter.core import encoded  # noqa: E402
from slowfast_adapter.inference.chat import SamplingParams  # noqa: E402
from slowfast_adapter.inference.engine import ChatJob, Engine, EngineSettings  # noqa: E402
from slowfast_adapter.tools.tiny import build_tiny_llava_onevision, random_video, write_mp4  # noqa: E402

SETTINGS = {"shipped": "as shipped", "worker_hashes": "worker hashes"}


def build_engine(folder: Path, frames: int, size: int, videos: int) -> Engine:
    base, processor = build_tiny_llava_onevision(num_layers=1, image_size=size, patch_size=14)
    base.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    config = sfa.SlowFastConfig(min_fast_frames=4, temporal_sampling_stride=4, temporal_pooling_stride=4)
    sfa.wrap(base, config).save_pretrained(folder / "adapter")
    (folder / "videos").mkdir()
    for i in range(videos):
        write_mp4(folder / "videos" / f"{i}.mp4", random_video(frames, size=size, seed=i))
    return Engine.load(str(folder / "base"), {"a": folder / "adapter"}, media_roots=[str(folder / "videos")],
                       settings=EngineSettings(num_frames=frames, max_batch_size=8))  # fmt: skip


def chat(video: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{video}.mp4"}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


def run(engine: Engine, rows: int, videos: int, tokens: int, setting: str) -> tuple[float, float, list[str]]:
    """(prepare time, worker time, answers) of `rows` requests about cached videos run as one batch."""
    start = time.perf_counter()
    jobs = [engine.prepare(ChatJob("a", chat(i % videos, f"Question {i}: what happens?"), SamplingParams(
        max_tokens=tokens))) for i in range(rows)]  # fmt: skip
    prepared = time.perf_counter() - start
    if setting == "worker_hashes":
        for job in jobs:
            engine.cache.peek(job.cache_key).encoded.digests.clear()
    batches, hashed, fingerprint = engine.counters["batches"], [], encoded.fingerprint
    encoded.fingerprint = lambda pixels: hashed.append(1) or fingerprint(pixels)  # counts the worker's hashing
    try:
        start = time.perf_counter()
        engine.run_batch(jobs)
        worker = time.perf_counter() - start
    finally:
        encoded.fingerprint = fingerprint
    expected = rows if setting == "worker_hashes" else 0  # one video per request
    assert len(hashed) == expected, f"{setting}: the worker hashed {len(hashed)} videos, not {expected}"
    assert engine.counters["batches"] == batches + 1, "the requests did not run as one batch"
    assert all(job.result is not None and job.result.cache_hit for job in jobs), "a request missed the cache"
    return prepared, worker, [job.result.text for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=384, help="frame size in pixels")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="requests per batch")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="cached_requests")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_machine = machine()
    videos = 2
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(Path(tmp), args.frames, args.size, videos)
        try:
            for video in range(videos):  # encode and cache every video
                engine.chat(chat(video, "Warm-up."), sampling=SamplingParams(max_tokens=1))
            cells: dict[int, dict[str, dict[str, list[float]]]] = {}
            for rows in args.rows:
                times = {s: {"prepare_s": [], "worker_s": []} for s in SETTINGS}
                answers: dict[str, list[str]] = {}
                for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                    for setting in SETTINGS:
                        prepared, worker, texts = run(engine, rows, videos, args.tokens, setting)
                        times[setting]["prepare_s"].append(prepared)
                        times[setting]["worker_s"].append(worker)
                        assert answers.setdefault(setting, texts) == texts
                assert answers["shipped"] == answers["worker_hashes"], "the settings answered differently"
                cells[rows] = {s: {k: v[1:] for k, v in t.items()} for s, t in times.items()}
        finally:
            engine.close()
    pixels_mb = args.frames * 3 * args.size**2 * 4 / 1e6
    data = {"command": command_line(), "machine_start": start_machine, "machine_end": machine(),
            "frames": args.frames, "size": args.size, "pixel_mb_per_video": pixels_mb, "tokens": args.tokens,
            "rounds": args.rounds, "cells": {str(rows): cell for rows, cell in cells.items()}}  # fmt: skip
    median = statistics.median
    lines = [
        "# Requests about cached videos: the engine's worker time",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Tiny random LLaVA-OneVision (1 layer), {args.frames} frames of {args.size} px ({pixels_mb:.0f} MB of fp32 "
        f"pixels per video), {args.tokens}-token greedy answers; median of {args.rounds} rounds after a warm-up "
        "round, the settings interleaved. Worker: `Engine.run_batch` (holds the model); prepare: media, processor "
        "and digests, in the caller's thread (concurrent requests prepare in parallel with the worker).",
        "",
        f"Machine: {start_machine['cpu']}, {start_machine['cores']} cores, torch {start_machine['torch']} with "
        f"{args.threads} threads; load average {start_machine['load_average_1_5_15'][0]:.2f} at the start, "
        f"{data['machine_end']['load_average_1_5_15'][0]:.2f} at the end.",
        "",
        "| requests in the batch | worker, as shipped (ms) | worker, worker hashes (ms) | ratio "
        "| prepare per request (ms) |",
        "|---|---|---|---|---|",
    ]
    for rows, cell in cells.items():
        shipped, hashing = median(cell["shipped"]["worker_s"]), median(cell["worker_hashes"]["worker_s"])
        prepare = median(cell["shipped"]["prepare_s"]) / rows
        lines.append(f"| {rows} | {shipped * 1e3:.0f} | {hashing * 1e3:.0f} | {shipped / hashing:.2f} | "
                     f"{prepare * 1e3:.0f} |")  # fmt: skip
    write_results(args.name, data, "\n".join(lines))


if __name__ == "__main__":
    main()
