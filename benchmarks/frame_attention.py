"""What "where it looked" costs: `generate` with and without `sfa.looking(model)`, side by side.

One process, one model (the CPU benchmark model, hybrid layers every 4th layer, gates opened so the maps are not
zero). For each frame count, one video and a ~100-token question; `generate` of `--new-tokens` tokens is timed
with and without recording, interleaved round by round (machine-load drift hits both alike). Every timed call is
checked outside the timed region: with recording, every hybrid layer recorded the last decode step and the map is
non-zero; without, the call's slow context had no recorder and the slow path still ran. The answers must be the
same tokens.

    python benchmarks/frame_attention.py            # 64 and 256 frames
    python benchmarks/frame_attention.py --quick
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

from common import build_model, command_line, machine, summary, video_inputs, write_results  # noqa: E402

from slowfast_adapter import SlowFastConfig, looking, wrap  # noqa: E402
from slowfast_adapter.core import inspection


def open_gates(model) -> None:
    """Clearly non-zero gates: at init (alpha = 0) every map is zero, which would prove nothing."""
    with torch.no_grad():
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(1.0)


def timed_generate(model, inputs, *, record: bool, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy `generate`, and its tokens; raises if the claimed path did not run."""
    layers = model.hybrid_layer_indices
    with inspection.recording() as contexts, torch.no_grad():
        if record:
            with looking(model) as recording:
                begin = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                seconds = time.perf_counter() - begin
            looked = recording.result()
            last = looked.prompt_length + new_tokens - 2  # the last decode step's row
            if not (looked.queried[:, last].all() and looked.maps[:, :, last].sum(-1).gt(0).all()):
                raise RuntimeError("recording did not cover every hybrid layer at the last decode step")
            if looked.layers != layers:
                raise RuntimeError(f"recorded layers {looked.layers}, expected {layers}")
        else:
            begin = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            seconds = time.perf_counter() - begin
    (context,) = contexts
    if (context.frame_attention is not None) != record or context.counters.slow_reads < len(layers) * new_tokens:
        raise RuntimeError("the timed call did not take the claimed path")
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--quick", action="store_true", help="small model, 16 frames, 2 rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.frames, args.rounds = [16], 2
    torch.set_num_threads(args.threads)
    start = machine()
    base, processor = build_model("quick" if args.quick else "default")
    model = wrap(base, SlowFastConfig(temporal_sampling_stride=2, temporal_pooling_stride=4, min_fast_frames=8,
                                      hybrid_layer_interval=4))  # fmt: skip
    open_gates(model)

    rows = []
    for frames in args.frames:
        inputs = video_inputs(processor, frames)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(args.rounds + 1):
            answers = {}
            for name in times:
                seconds, answers[name] = timed_generate(model, inputs, record=name == "on", new_tokens=args.new_tokens)
                if round_:  # round 0 warms up
                    times[name].append(seconds)
            if not torch.equal(answers["on"], answers["off"]):
                raise RuntimeError("recording changed the answer")
        ratio = statistics.median(times["on"]) / statistics.median(times["off"])
        rows.append({"frames": frames, "off": summary(times["off"]), "on": summary(times["on"]), "ratio": ratio})
    end = machine()

    lines = [
        "# Where it looked: the cost of recording",
        "",
        f"Command: `{command_line()}`; {start['cpu']}, {start['torch_threads']} threads, torch {start['torch']}; "
        f"load average {start['load_average_1_5_15'][0]:.2f} before, {end['load_average_1_5_15'][0]:.2f} after.",
        "",
        f"Greedy `generate` of {args.new_tokens} tokens, one video, ~100-token question, "
        f"{len(model.hybrid_layer_indices)} hybrid layers; median of {args.rounds} interleaved rounds. Every timed "
        "call was checked (recording covered every hybrid layer; off: no recorder, slow path ran); same tokens.",
        "",
        "| frames | off (s) | `looking` on (s) | on / off |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['frames']} | {row['off']['median_s']:.2f} | {row['on']['median_s']:.2f} | {row['ratio']:.2f}x |"
        )
    name = "frame_attention_quick" if args.quick else "frame_attention"
    data = {"command": command_line(), "machine_before": start, "machine_after": end, "rows": rows}
    write_results(name, data, "\n".join(lines))


if __name__ == "__main__":
    main()
