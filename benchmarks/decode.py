"""Benchmark 2: decode step time, base vs slow-fast with cached slow K/V vs re-projecting every step.

One process, one model. After a prefill of each (untimed), single decode steps are timed:
- base: the unwrapped base model at `--base-frames` native frames (the same LLM sequence length as the
  slow-fast model's fast tokens);
- slow-fast, cached: `--frames` frames, slow K/V projected once per call (what `generate` runs);
- slow-fast, re-projected: the same with `SlowContext.reproject_slow_kv` (the reference implementation's
  behaviour: every decode step projects all slow tokens again).
Each step runs on a KV cache cropped back to the prompt, so every step sees the same cache length.
Variants are interleaved round by round, so machine-load drift hits all of them alike.

    python benchmarks/decode.py             # 128 slow-fast frames vs 16 base frames
    python benchmarks/decode.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, build_model, command_line, machine, summary, video_inputs, write_results  # noqa: E402
from prefill import slowfast_config  # noqa: E402

from slowfast_adapter import flops, state, surface, wrap  # noqa: E402


def timed_steps(base, cache, context, steps: int, *, layers: int) -> list[float]:
    """Seconds of `steps` single-token decode steps, each on the cache cropped back to its prompt length.

    With a slow context, every step must have read the slow tokens in all `layers` hybrid layers and, with
    `reproject_slow_kv`, projected the slow K/V again in each (checked outside the timed region: a step
    that took another path raises instead of being reported)."""
    token = torch.tensor([[0]])
    times = []
    cache_kwarg = surface.cache_kwarg(base)
    for _ in range(steps):
        before = dict(context.stats) if context is not None else None
        start = time.perf_counter()
        with state.activated(context):
            base(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
        times.append(time.perf_counter() - start)
        cache.crop(-1)  # drop the new token: every step sees the prompt-length cache
        if context is not None:
            reads = context.stats["slow_reads"] - before["slow_reads"]
            projections = context.stats["kv_projections"] - before["kv_projections"]
            expected = layers if context.reproject_slow_kv else 0
            if reads != layers or projections != expected:
                raise RuntimeError(
                    f"The timed step did not run the slow path it claims: {reads} slow reads and {projections} K/V "
                    f"projections in {layers} hybrid layers (expected {layers} and {expected})."
                )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128, help="slow-fast frames (default 128)")
    parser.add_argument("--base-frames", type=int, default=16, help="base frames = fast frames (default 16)")
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="small model, 32 vs 4 frames, 3 rounds of 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.model, args.frames, args.base_frames, args.steps, args.rounds = "quick", 32, 4, 4, 3
    torch.set_num_threads(args.threads)
    start = machine()
    base, processor = build_model(args.model)
    ratio = args.frames // args.base_frames
    config = slowfast_config(ratio, args.base_frames)
    model = wrap(base, config)
    family = model.family
    with torch.no_grad():
        native = family.prepare(base, slowfast_config(1, args.base_frames), video_inputs(processor, args.base_frames))
        fast = family.prepare(base, config, video_inputs(processor, args.frames))
        model.unwrap()
        base_cache = surface.output_cache(base(**native.model_inputs, use_cache=True, logits_to_keep=1))
        times: dict[str, list[float]] = {"base": [], "cached": [], "reprojected": []}
        slow_cache = None
        for round_ in range(args.rounds):
            base_times = timed_steps(base, base_cache, None, args.steps, layers=0)
            model = wrap(base, config)
            layers = len(model.hybrid_layer_indices)
            context = model._slow_context(fast)  # slow K/V projected once (untimed, part of the prefill)
            if slow_cache is None:
                with state.activated(context):
                    slow_cache = surface.output_cache(base(**fast.model_inputs, use_cache=True, logits_to_keep=1))
            cached_times = timed_steps(base, slow_cache, context, args.steps, layers=layers)
            context = model.slow_context(fast.slow, context.prompt_query_mask, reproject_slow_kv=True)
            reprojected_times = timed_steps(base, slow_cache, context, args.steps, layers=layers)
            model.unwrap()
            if round_:  # round 0 is warm-up
                times["base"] += base_times
                times["cached"] += cached_times
                times["reprojected"] += reprojected_times

    meta = wrap(flops.build_meta_model(base.config), config)
    length, slow = fast.input_ids.shape[1], int(fast.slow.mask.sum())
    queries = ~fast.visual_mask[0]
    counted = {
        "base": flops.count_language_model(meta, native.input_ids.shape[1]).decode_step,
        "cached": flops.count_language_model(meta, length, query_mask=queries, slow_tokens=slow).decode_step,
        "reprojected": flops.count_language_model(
            meta, length, query_mask=queries, slow_tokens=slow, reproject_slow_kv=True
        ).decode_step,
    }
    base_median = statistics.median(times["base"])
    end = machine()
    lines = [
        f"# Decode step: base at {args.base_frames} frames vs slow-fast at {args.frames} frames (CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Model: random LLaVA-OneVision layout, Qwen2-style decoder {MODELS[args.model]}, fp32, 196 video tokens "
        f"per frame, about 100 text tokens; hybrid layers {meta.hybrid_layer_indices}. LLM sequence: "
        f"{native.input_ids.shape[1]:,} tokens (base) / {length:,} (slow-fast, + {slow:,} slow tokens). Median of "
        f"{len(times['base'])} single-token steps per variant ({args.rounds - 1} rounds of {args.steps} after "
        "1 warm-up round, variants interleaved).",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; "
        f"load average {start['load_average_1_5_15'][0]:.1f} at start, {end['load_average_1_5_15'][0]:.1f} at "
        "the end (other jobs may have been running).",
        "",
        "| decode step | GFLOP | median (ms) | min (ms) | x base (median) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("base", "base"),
        ("cached", "slow-fast, slow K/V cached (ours)"),
        ("reprojected", "slow-fast, slow K/V re-projected every step (reference)"),
    ):
        median = statistics.median(times[name])
        lines.append(
            f"| {label} | {counted[name] / 1e9:.3f} | {median * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | "
            f"{median / base_median:.3f} |"
        )
    data = {
        "command": command_line(),
        "machine_start": start,
        "machine_end": end,
        "model": MODELS[args.model],
        "frames": args.frames,
        "base_frames": args.base_frames,
        "sequence_length": {"base": native.input_ids.shape[1], "slowfast": length},
        "slow_tokens": slow,
        "flops": counted,
        "time": {name: summary(values) for name, values in times.items()},
        "times_s": times,
    }
    write_results("decode" + ("_quick" if args.quick else ""), data, "\n".join(lines))


if __name__ == "__main__":
    main()
