"""Benchmark 1: LLM prefill time and peak memory, base at N frames vs slow-fast at 4N and 8N frames.

Each setting runs in a fresh process. The video features are computed before the timed call (the
vision tower's cost grows with the frames for every model and is counted exactly by `slowfast-adapter
flops`); the timed call is what the LLM side costs:
- base: the unwrapped base model's forward over its native video tokens (features precomputed);
- slow-fast: the slow K/V projection of every hybrid layer + the base forward over the fast tokens with
  the hybrid layers cross-attending to all slow tokens (what `SlowFastModel.forward` runs after the
  vision tower). Fast tokens: 4N frames -> N (pooling stride 4), 8N -> N (sampling 2, pooling 4), as
  in the paper's released configs.

    python benchmarks/prefill.py            # N = 8 frames, 196 video tokens per frame
    python benchmarks/prefill.py --quick    # small model, N = 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODELS,
    build_model,
    command_line,
    machine,
    peak_memory_mib,
    run_worker,
    summary,
    time_calls,
    video_inputs,
    write_results,
)


def slowfast_config(ratio: int, base_frames: int):
    from slowfast_adapter import SlowFastConfig

    if ratio == 1:  # no pooling at all: the fast tokens are the native tokens
        return SlowFastConfig(temporal_pooling_stride=1, min_fast_frames=base_frames)
    if ratio % 4:
        raise ValueError("ratios must be 1 or multiples of 4 (pooling stride 4, sampling stride ratio / 4)")
    return SlowFastConfig(temporal_sampling_stride=ratio // 4, temporal_pooling_stride=4, min_fast_frames=base_frames)


def prepare(setting: dict):
    """(base model, {ratio: prepared inputs}) with the video features computed (not timed)."""
    from slowfast_adapter import wrap

    torch.set_num_threads(setting["threads"])
    base, processor = build_model(setting["model"])
    model = wrap(base, slowfast_config(1, setting["base_frames"]))
    prepared = {}
    with torch.no_grad():
        for ratio in setting["ratios"]:
            inputs = video_inputs(processor, setting["base_frames"] * ratio)
            prepared[ratio] = model.family.prepare(base, slowfast_config(ratio, setting["base_frames"]), inputs)
    model.unwrap()
    return base, prepared


def prefill_call(base, prepared, ratio: int):
    """The timed call: base forward over the native tokens (ratio 1, no hooks attached at all), or the slow
    K/V projection + the forward with the hybrid layers active (slow-fast)."""
    from slowfast_adapter import SlowFastConfig, wrap
    from slowfast_adapter.core import state

    if ratio == 1:
        return lambda: base(**prepared.model_inputs, logits_to_keep=1)
    model = wrap(base, SlowFastConfig())  # hooks do not depend on the strides (those only shape `prepared`)

    layers = len(model.hybrid_layer_indices)

    def call():
        context = model.slow_context(prepared)
        with state.activated(context):
            output = base(**prepared.model_inputs, logits_to_keep=1)
        # What is timed must be the slow path: every hybrid layer projected its K/V once and read them.
        if (context.counters.kv_projections, context.counters.slow_reads) != (layers, layers):
            raise RuntimeError(
                f"The timed prefill did not run the slow path in all {layers} layers: {context.counters.totals()}"
            )
        return output

    call.unwrap = model.unwrap
    return call


def worker(setting: dict) -> dict:
    """measure == "time": all ratios in one process, interleaved round by round (load drift hits all alike);
    measure == "memory": the peak memory of one call of `setting["ratios"][0]` after a warm-up."""
    from slowfast_adapter import wrap
    from slowfast_adapter.tools import flops

    base, prepared = prepare(setting)
    with torch.no_grad():
        if setting["measure"] == "memory":
            (ratio,) = setting["ratios"]
            call = prefill_call(base, prepared[ratio], ratio)
            call()
            return {"ratio": ratio, "peak_memory_mib": peak_memory_mib(call)[0]}
        times = {ratio: [] for ratio in setting["ratios"]}
        for _ in range(setting["repeats"] + 2):  # the first 2 rounds are warm-up
            for ratio in setting["ratios"]:
                call = prefill_call(base, prepared[ratio], ratio)
                times[ratio] += time_calls(call, repeats=1, warmup=0)
                if ratio != 1:
                    call.unwrap()
    rows = []
    meta = wrap(flops.build_meta_model(base.config), slowfast_config(1, setting["base_frames"]))
    for ratio, inputs in prepared.items():
        length, slow = inputs.input_ids.shape[1], 0 if ratio == 1 else int(inputs.slow.mask.sum())
        query_mask = ~inputs.visual_mask[0] if slow else None
        counted = flops.count_language_model(meta, length, query_mask=query_mask, slow_tokens=slow)
        rows.append({
            "ratio": ratio,
            "frames": setting["base_frames"] * ratio,
            "sequence_length": length,
            "slow_tokens": slow,
            "time": summary(times[ratio][2:]),
            "flops": counted.prefill + counted.slow_kv_projection,
        })  # fmt: skip
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-frames", type=int, default=8, help="N: frames of the base model (default 8)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[4, 8], help="slow-fast frames = ratio * N")
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="small model, N = 4, 2 repeats")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.model, args.base_frames, args.repeats = "quick", 4, 2
    start = machine()
    setting = dict(model=args.model, base_frames=args.base_frames, repeats=args.repeats, threads=args.threads)
    ratios = [1, *args.ratios]
    rows = run_worker(Path(__file__), {**setting, "ratios": ratios})["rows"]
    for row in rows:
        row.update(run_worker(Path(__file__), {**setting, "ratios": [row["ratio"]]}, memory=True))
    base = rows[0]
    lines = [
        "# Prefill: base at N frames vs slow-fast at 4N and 8N frames (CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Model: random LLaVA-OneVision layout, Qwen2-style decoder {MODELS[args.model]}, fp32, 196 video tokens "
        "per frame, about 100 text tokens; hybrid layers every 8th from 0. Video features precomputed (not "
        "timed); the slow-fast time includes the slow K/V projection. Median of "
        f"{args.repeats} runs after 2 warm-ups; peak memory = peak RSS above the RSS before the call (separate "
        "process, see benchmarks/common.py).",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; "
        f"load average {start['load_average_1_5_15'][0]:.1f} at start (other jobs may have been running).",
        "",
        "| setting | frames | LLM tokens | slow tokens | FLOPs (T) | time (s) | x base | peak memory (MiB) | x base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = "base" if row["ratio"] == 1 else f"slow-fast {row['ratio']}N"
        t, m = row["time"]["median_s"], row["peak_memory_mib"]
        lines.append(
            f"| {label} | {row['frames']} | {row['sequence_length']:,} | {row['slow_tokens']:,} | "
            f"{row['flops'] / 1e12:.3f} | {t:.2f} | {t / base['time']['median_s']:.3f} | {m:.0f} | "
            f"{m / base['peak_memory_mib']:.3f} |"
        )
    end = machine()
    lines += ["", f"Load average at the end: {end['load_average_1_5_15'][0]:.1f}."]
    data = {"command": command_line(), "machine_start": start, "machine_end": end, "rows": rows}
    write_results("prefill" + ("_quick" if args.quick else ""), data, "\n".join(lines))


if __name__ == "__main__":
    main()
