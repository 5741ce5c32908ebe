"""Benchmark: several questions about one video, with and without reusing its encoded features.

Time: on the CPU benchmark model, the time to the first answer token of questions 1..K about one video
(`generate(max_new_tokens=1)`), each with a different question text:
- without reuse: every question encodes the video again (vision tower, projector, slow K/V);
- with reuse: question 1 is `encode` + `generate(encoded=...)`, questions 2..K are `generate(encoded=...)`; every
  question starts from the prompt-prefix KV cache (system prompt, user turn, video) and prefills only its text.
Rounds interleave the two settings, so machine-load drift hits both alike. Every timed call is checked
outside the timed region: the reuse calls must have taken every video from the cache and projected no slow
K/V; the calls without reuse must have projected them (a call that took another path raises).

FLOPs: for the shipped 7B configs, question 1 vs question k of the same video from the exact meta-device
counts (`slowfast_adapter.tools.flops`): with reuse, question k skips the vision tower and the slow K/V projection and
prefills only its own text after the cached prefix (shown also with the features reused but not the prefix).

    python benchmarks/questions.py            # 64 frames, 8 questions
    python benchmarks/questions.py --quick
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

from common import MODELS, build_model, command_line, machine, video_inputs, write_results  # noqa: E402

from slowfast_adapter import SlowFastConfig, wrap  # noqa: E402
from slowfast_adapter.core import inspection
from slowfast_adapter.tools import flops

QUESTIONS = [
    "What is happening in this video?",
    "Which colours appear, and in which order?",
    "How many distinct shapes can you see?",
    "Describe the motion of the brightest object.",
    "Is there anything unusual near the end?",
    "Summarise the video in one sentence.",
    "What changes between the first and the last frame?",
    "Where is the camera pointing at the start?",
]
SHIPPED = ("llava-video-7b-qwen2", "qwen2-vl-7b-instruct")


def flop_rows(frames: int, text_tokens: int = 100) -> list[dict]:
    """Question 1 vs question k (k > 1) of one video, in FLOPs, for each shipped 7B config: with reuse, question k
    skips the vision tower and the slow K/V projection and, from the prompt-prefix cache, prefills only its text."""
    from slowfast_adapter import SlowFastConfig, SlowFastModel
    from slowfast_adapter.core.state import prompt_query_mask

    rows = []
    for name in SHIPPED:
        config = flops.load_config(name)
        column = flops.flops_report(config, [frames], name=name, text_tokens=text_tokens).columns[1]  # slow-fast
        first = column.prefill_total
        features_only = column.llm_with_hybrid - column.hybrid_kv_projection
        slowfast = SlowFastConfig()
        model = SlowFastModel(flops.build_meta_model(config), slowfast)
        tokens = flops.video_tokens(model.base_model, frames, slowfast)
        prefix = tokens.visual_tokens + tokens.structure_tokens  # the video first, then the question
        visual = torch.zeros(1, prefix + text_tokens, dtype=torch.bool)
        visual[0, : tokens.visual_tokens] = True
        queries = prompt_query_mask(visual, slowfast.query_tokens)[0]
        with_prefix = flops.count_language_model(
            model, prefix + text_tokens, query_mask=queries, slow_tokens=tokens.slow_tokens, cached_prefix=prefix
        ).prefill
        rows.append({"model": name, "frames": frames, "question_1": first, "question_k_features": features_only,
                     "question_k_reuse": with_prefix, "ratio_features": features_only / first,
                     "ratio_reuse": with_prefix / first})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--quick", action="store_true", help="small model, 16 frames, 3 questions, 2 rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.frames, args.questions, args.rounds = 16, 3, 2
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "default"
    start = machine()

    base, processor = build_model(size)
    model = wrap(base, SlowFastConfig(temporal_sampling_stride=2, temporal_pooling_stride=4, min_fast_frames=8,
                                      hybrid_layer_interval=4))  # fmt: skip
    layers = len(model.hybrid_layer_indices)
    inputs = [video_inputs(processor, args.frames, text=q) for q in QUESTIONS[: args.questions]]

    def ask(k: int, encoded) -> float:
        with inspection.recording() as contexts:
            begin = time.perf_counter()
            model.generate(**inputs[k], encoded=encoded, max_new_tokens=1, do_sample=False)
            seconds = time.perf_counter() - begin
        projected = contexts[0].counters.kv_projections
        if projected != (0 if encoded is not None else layers):
            raise RuntimeError(
                f"question {k + 1}: {projected} slow K/V projections; the timed path is not the claimed one"
            )
        return seconds

    def session(reuse: bool) -> list[float]:
        """Seconds to the first answer token of each question, in order."""
        if not reuse:
            return [ask(k, None) for k in range(args.questions)]
        begin = time.perf_counter()
        encoded = model.encode(**inputs[0])
        encode_seconds = time.perf_counter() - begin
        times = [encode_seconds + ask(0, encoded)] + [ask(k, encoded) for k in range(1, args.questions)]
        if encoded.stats != {"hits": args.questions, "misses": 1, "prefix_hits": args.questions}:
            raise RuntimeError(f"the reuse session did not reuse the video every time: {encoded.stats}")
        return times

    runs: dict[str, list[list[float]]] = {"no_reuse": [], "reuse": []}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            for name in runs:
                times = session(name == "reuse")
                if round_:  # round 0 warms up
                    runs[name].append(times)
    end = machine()

    median = {
        name: [statistics.median(r[k] for r in rounds) for k in range(args.questions)] for name, rounds in runs.items()
    }
    first = median["no_reuse"][0]
    rows = flop_rows(args.frames)
    lines = [
        "# Several questions about one video: reuse of the encoded video",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Time to the first answer token on the CPU benchmark model (random LLaVA-OneVision layout, decoder "
        f"{MODELS[size]}, fp32, 196 video tokens per frame), one video of {args.frames} frames, {args.questions} "
        f"different questions; median of {args.rounds} rounds (after 1 warm-up round, settings interleaved). "
        "With reuse, question 1 includes `encode`.",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; load "
        f"average {start['load_average_1_5_15'][0]:.1f} at start, {end['load_average_1_5_15'][0]:.1f} at the end.",
        "",
        "| question | no reuse (s) | reuse (s) | reuse, x question 1 without reuse |",
        "|---|---|---|---|",
    ]
    for k in range(args.questions):
        no, yes = median["no_reuse"][k], median["reuse"][k]
        lines.append(f"| {k + 1} | {no:.3f} | {yes:.3f} | {yes / first:.3f} |")
    later = statistics.mean(median["reuse"][1:]) if args.questions > 1 else float("nan")
    lines += [
        "",
        f"Questions 2..{args.questions} with reuse: {later / first:.3f} x question 1's time to the first token.",
        "",
        f"FLOPs of one prefill (question 1 vs question k of the same video, {args.frames} frames, 100 text tokens, "
        "exact counts on the meta device).",
        "",
        "| config | question 1 [TFLOP] | question k, features reused [TFLOP] | question k, features + prefix "
        "reused [TFLOP] | ratio (features / + prefix) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['question_1'] / 1e12:.2f} | {r['question_k_features'] / 1e12:.2f} | "
              f"{r['question_k_reuse'] / 1e12:.3f} | {r['ratio_features']:.3f} / {r['ratio_reuse']:.4f} |"
              for r in rows]  # fmt: skip
    data = {
        "command": command_line(),
        "machine_start": start,
        "machine_end": end,
        "model": MODELS[size],
        "frames": args.frames,
        "questions": QUESTIONS[: args.questions],
        "median_s": median,
        "runs_s": runs,
        "later_questions_over_first": later / first,
        "flops": rows,
    }
    write_results("questions" + ("_quick" if args.quick else ""), data, "\n".join(lines))


if __name__ == "__main__":
    main()
