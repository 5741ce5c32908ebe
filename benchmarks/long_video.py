"""Benchmark: peak memory and time of one whole `generate` vs frames (64 to 1,536), slow-fast vs the base.

Each point runs in a fresh process (`common.run_worker(..., memory=True)`): the processor output is built
first, then the peak resident memory above that of one `generate` (prefill + `--new-tokens` tokens, greedy)
is measured, together with its wall time. Slow-fast keeps 16 fast frames in the LLM sequence (pooling stride
4, sampling stride frames / 64, as the released configs scale), so what grows with the video is what must be
kept: the slow tokens and each hybrid layer's slow K/V. The vision tower runs `vision_chunk_frames` frames per
call and the K/V projection `KV_CHUNK_TOKENS` tokens per call. The base reads every native token; it stops
once its estimated time for the next point exceeds `--base-budget-s` (its prefill is quadratic in frames).

Each slow-fast point checks that the path it measures ran: every generated token read the slow tokens and
each hybrid layer projected its K/V once. Times are from the memory-measuring processes (glibc set to return
freed blocks at once, which slows large allocations), so compare them with each other, not with prefill.py.

    python benchmarks/long_video.py                  # 64 .. 1,536 frames
    python benchmarks/long_video.py --frames 64 128  # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODELS,
    RESULTS,
    build_model,
    command_line,
    machine,
    peak_memory_mib,
    run_worker,
    video_inputs,
    write_results,
)

FAST_FRAMES = 16
BYTES_PER_MIB = 2**20


def slowfast_config(frames: int):
    from slowfast_adapter import SlowFastConfig

    return SlowFastConfig(
        temporal_sampling_stride=max(1, frames // (4 * FAST_FRAMES)),
        temporal_pooling_stride=4,
        min_fast_frames=FAST_FRAMES,
        hybrid_layer_interval=4,
    )


def worker(setting: dict) -> dict:
    """One `generate` of `setting["variant"]` ("base" or "slowfast") at `setting["frames"]` frames."""
    from slowfast_adapter import wrap
    from slowfast_adapter.core import inspection

    torch.set_num_threads(setting["threads"])
    frames, new_tokens = setting["frames"], setting["new_tokens"]
    base, processor = build_model(setting["model"])
    inputs = video_inputs(processor, frames)
    model = wrap(base, slowfast_config(frames)) if setting["variant"] == "slowfast" else base
    generate = lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)  # noqa: E731
    with torch.no_grad(), inspection.recording() as contexts:
        start = time.perf_counter()
        peak, _ = peak_memory_mib(generate)
        seconds = time.perf_counter() - start
    result = {"variant": setting["variant"], "frames": frames, "peak_mib": peak, "seconds": seconds,
              "pixels_mib": inputs["pixel_values_videos"].nbytes / BYTES_PER_MIB}  # fmt: skip
    if setting["variant"] == "slowfast":
        (context,) = contexts
        layers = model.hybrid_layer_indices
        decode_reads = [per_row.tolist() for step, _, per_row in context.counters.reads if step > 1]
        if context.counters.kv_projections != len(layers) or decode_reads != [[1]] * (len(layers) * (new_tokens - 1)):
            raise RuntimeError(f"the measured generate did not run the slow path: {context.counters.totals()}")
        slow, hidden = context.slow.tokens.shape[1], context.slow.tokens.shape[2]
        kv_width = model.slow_branches[str(layers[0])].kv_proj.out_features
        result.update(
            slow_tokens=slow,
            sequence_length=int(context.prompt_query_mask.shape[1]),
            kept_mib=(slow * hidden + len(layers) * slow * kv_width) * 4 / BYTES_PER_MIB,  # fp32 slow tokens + K/V
        )
    elif contexts:
        raise RuntimeError("the base generate ran a slow context")
    else:
        result["sequence_length"] = int(inputs["input_ids"].shape[1])
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant, label in (("slowfast", "slow-fast (16 fast frames)"), ("base", "base, all native tokens")):
        points = [(r["frames"], r["peak_mib"]) for r in rows if r["variant"] == variant]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    kept = [(r["frames"], r["kept_mib"]) for r in rows if r["variant"] == "slowfast"]
    ax.plot(*zip(*kept, strict=True), linestyle="--", color="grey", label="slow tokens + slow K/V (must be kept)")
    ax.set_xlabel("frames")
    ax.set_ylabel("peak memory of one generate (MiB)")
    ax.set_title("Memory vs video length (CPU benchmark model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 1536])
    parser.add_argument("--model", default="quick", choices=list(MODELS))
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--base-budget-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = machine()
    setting = {"model": args.model, "new_tokens": args.new_tokens, "threads": args.threads}
    rows, base_stopped = [], None
    for frames in args.frames:
        rows.append(run_worker(Path(__file__), {**setting, "variant": "slowfast", "frames": frames}, memory=True))
        print(rows[-1], flush=True)
        previous = [r for r in rows if r["variant"] == "base"]
        if base_stopped is None and previous:
            estimate = previous[-1]["seconds"] * (frames / previous[-1]["frames"]) ** 2
            if estimate > args.base_budget_s:
                base_stopped = f"{frames} frames (estimated {estimate:.0f} s > budget {args.base_budget_s:.0f} s)"
        if base_stopped is None:
            rows.append(run_worker(Path(__file__), {**setting, "variant": "base", "frames": frames}, memory=True))
            print(rows[-1], flush=True)
    end = machine()
    slowfast = [r for r in rows if r["variant"] == "slowfast"]
    lines = [
        "# Long videos: peak memory and time of one whole `generate`",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Model: the CPU benchmark model `{args.model}` {MODELS[args.model]} (random LLaVA-OneVision layout, fp32, "
        f"196 native video tokens per frame), one video + about 100 text tokens, {args.new_tokens} new tokens. "
        f"Slow-fast: {FAST_FRAMES} fast frames in the sequence at every length, vision tower "
        "`vision_chunk_frames=32` frames per call. Peak resident memory above the process's memory before "
        "the call (weights and processor output excluded).",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; load "
        f"average {start['load_average_1_5_15'][0]:.1f} at start, {end['load_average_1_5_15'][0]:.1f} at the end.",
        "",
        "| frames | slow-fast peak (MiB) | of which must be kept (MiB) | slow-fast time (s) | base peak (MiB) | "
        "base time (s) | LLM tokens (slow-fast / base) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in slowfast:
        base = next((r for r in rows if r["variant"] == "base" and r["frames"] == row["frames"]), None)
        base_cells = f"{base['peak_mib']:.0f} | {base['seconds']:.1f}" if base else "- | -"
        base_length = f"{base['sequence_length']:,}" if base else "-"
        lines.append(
            f"| {row['frames']:,} | {row['peak_mib']:.0f} | {row['kept_mib']:.0f} | {row['seconds']:.1f} | "
            f"{base_cells} | {row['sequence_length']:,} / {base_length} |"
        )
    lines += ["", f"The base stopped at {base_stopped}." if base_stopped else "The base ran at every length."]
    data = {"command": command_line(), "machine_start": start, "machine_end": end, "model": MODELS[args.model],
            "rows": rows, "base_stopped_at": base_stopped}  # fmt: skip
    write_results("long_video", data, "\n".join(lines))
    plot(rows, RESULTS / "long_video.png")


if __name__ == "__main__":
    main()
