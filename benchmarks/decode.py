"""Benchmark 2: decode step time and host syncs, base vs slow-fast, eager and compiled, through `generate`.

Every variant is a greedy `generate` of `--tokens` tokens; a logits processor stamps the time after each model
forward, so each decode step is timed inside the production loop (`common.timed_generate`):
- base: the base model at `--base-frames` native frames (the LLM sequence of the slow-fast model's fast tokens);
- slow-fast: `--frames` frames, slow K/V projected once per call and cached (what `generate` runs);
- slow-fast, re-projected: every decode step projects all slow tokens again (the reference implementation's
  behaviour, `inspection.reprojecting_slow_kv`);
each with the dynamic cache (eager), and base and slow-fast also with the static cache, eager and compiled: the
step transformers compiles by itself on a GPU (`cache_implementation="static"`; on the CPU only with a
`CompileConfig` with `surface.compile_on_every_device`), fullgraph, inductor. Compiled tokens must equal eager's.
The base and the slow-fast model are two copies of the same random weights (wrapping one would change the hooks
the compiled base step guards on); the slow-fast gates are opened (alpha = 1) so the slow path moves the logits.
Variants are interleaved round by round; round 0 is warm-up (and compiles).
Every timed call is checked for its path outside the timed region (`check_path`): the base creates no slow context;
an eager slow-fast call reads the slow tokens in every hybrid layer at every step and projects the slow K/V once
(re-projected: at every step); a compiled call (whose steps keep no count) projects them once in its eager prefill,
and its logits equal eager's and differ from the fast-only model's (`check_compiled_reads_slow`).
Host syncs per decode step are counted after the timing (`host_syncs.HostSyncCounter`; under compile the
counter's mode recompiles the step, so it runs last).

    python benchmarks/decode.py             # 128 slow-fast frames vs 16 base frames
    python benchmarks/decode.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
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
    summary,
    timed_generate,
    video_inputs,
    write_results,
)
from prefill import slowfast_config  # noqa: E402
from transformers import CompileConfig  # noqa: E402

from slowfast_adapter import wrap  # noqa: E402
from slowfast_adapter.core import hybrid, inspection, surface  # noqa: E402
from slowfast_adapter.core.host_syncs import syncs_per_decode_step  # noqa: E402
from slowfast_adapter.tools import flops

VARIANTS = {  # name -> (label, model, generate keywords)
    "base": ("base, dynamic cache", "base", {}),
    "base_static": ("base, static cache", "base", {"cache_implementation": "static"}),
    "base_compiled": ("base, static cache, compiled", "base", {"cache_implementation": "static", "compiled": True}),
    "slowfast": ("slow-fast, dynamic cache (ours)", "slowfast", {}),
    "slowfast_static": ("slow-fast, static cache", "slowfast", {"cache_implementation": "static"}),
    "slowfast_compiled": (
        "slow-fast, static cache, compiled",
        "slowfast",
        {"cache_implementation": "static", "compiled": True},
    ),
    "reprojected": ("slow-fast, slow K/V re-projected every step (reference)", "reprojected", {}),
    "no_kernel": (
        "slow-fast, static cache, cross-attention kernel skipped (diagnostic: all but the kernel)",
        "slowfast",
        {"cache_implementation": "static", "skip_kernel": True},
    ),
}
BASELINE = {  # each slow-fast variant over the base with the same cache and compilation
    "slowfast": "base",
    "slowfast_static": "base_static",
    "slowfast_compiled": "base_compiled",
    "reprojected": "base",
    "no_kernel": "base_static",
}
RATIOS = {f"{a}_over_{b}": (a, b) for a, b in [*BASELINE.items(), ("base_compiled", "base")]}


def compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode="default")
    return surface.compile_on_every_device(config)  # transformers compiles by itself on CUDA only


def generate_kwargs(variant: dict, compiled: CompileConfig) -> dict:
    """A variant's `generate` keywords, with `compiled` as its compile config where the variant compiles."""
    kwargs = dict(variant)
    kwargs.pop("skip_kernel", None)
    if kwargs.pop("compiled", False):
        kwargs["compile_config"] = compiled
    return kwargs


@contextlib.contextmanager
def kernel_skipped(variant: dict):
    """For the diagnostic variant: the hybrid layers do all their work (query, RoPE, slow K/V lookup, gate, update)
    except the cross-attention kernel, whose output is replaced by zeros of its shape. What it leaves of the gap to
    the base is what the wrapper costs besides the kernel reading the slow K/V."""
    if not variant.get("skip_kernel"):
        yield
        return
    kernel, calls = hybrid.slow_cross_attention, []

    def skipped(query: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(query)

    hybrid.slow_cross_attention = skipped
    try:
        yield
    finally:
        hybrid.slow_cross_attention = kernel
    if not calls:
        raise RuntimeError("no_kernel: the hybrid layers never called hybrid.slow_cross_attention, so the kernel ran.")


def step_bytes(model, length: int, slow_tokens: int, hybrid_layers: list[int]) -> dict[str, int]:
    """Bytes one decode step must read (decode is memory-bound): the base's decoder and LM-head weights and its KV
    cache over `length` tokens; slow-fast adds the slow K/V of every hybrid layer, those layers' `q_proj` weights
    read again for the cross-attention query, and the gates."""
    language_model = surface.language_model(model)
    text = model.config.text_config
    element = next(model.parameters()).element_size()
    layers = surface.decoder_layers(model)
    weights = sum(p.numel() for p in layers.parameters()) + sum(p.numel() for p in language_model.norm.parameters())
    weights += model.lm_head.weight.numel()
    kv_row = 2 * text.num_key_value_heads * text.head_dim  # K and V of one token in one layer
    base = (weights + len(layers) * length * kv_row) * element
    q_proj = sum(surface.attention_attribute(surface.self_attention(layers[i]), "q_proj").weight.numel()
                 for i in hybrid_layers)  # fmt: skip
    gates = len(hybrid_layers) * (text.num_attention_heads * text.head_dim + 2)  # gate_proj weight, bias, alpha
    slow_kv = len(hybrid_layers) * slow_tokens * kv_row * element
    return {"base": base, "slow_kv": slow_kv, "slowfast": base + slow_kv + (q_proj + gates) * element}


def paired_ratios(times_by_round: dict[str, list[list[float]]], a: str, b: str) -> list[float]:
    """Per timed round, median step of `a` over median step of `b` (both ran in that round, side by side)."""
    return [
        statistics.median(x) / statistics.median(y) for x, y in zip(times_by_round[a], times_by_round[b], strict=True)
    ]


def check_path(name: str, which: str, contexts: list, *, tokens: int, layers: int) -> None:
    """Raise unless the call took the path `name` claims (see the module docstring)."""
    if which == "base":
        if contexts:
            raise RuntimeError(f"{name}: the base call created {len(contexts)} slow context(s).")
        return
    counted = contexts[0].counters.totals() if len(contexts) == 1 else None
    steps = 1 if VARIANTS[name][2].get("compiled") else tokens  # compiled decode steps keep no count
    projections = layers * steps if which == "reprojected" else layers
    expected = {"steps": steps, "slow_reads": layers * steps, "kv_projections": projections}
    if counted != expected:
        raise RuntimeError(f"{name}: the call counted {counted} ({len(contexts)} contexts), expected {expected}.")


def check_compiled_reads_slow(model, inputs: dict, compiled: CompileConfig, tokens: int) -> None:
    """The compiled step's logits equal eager's (rounding) and differ from the fast-only model's: it read the slow
    tokens at every step."""
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, cache_implementation="static")  # fmt: skip
    eager = model.generate(**inputs, **kwargs).logits
    with_compile = model.generate(**inputs, compile_config=compiled, **kwargs).logits
    with model.slow_path_disabled():
        fast_only = model.generate(**inputs, **kwargs).logits
    for step, (a, b, c) in enumerate(zip(eager, with_compile, fast_only, strict=True)):
        if not torch.allclose(a, b, rtol=0, atol=1e-3) or torch.allclose(a, c, rtol=0, atol=1e-3):
            raise RuntimeError(f"step {step}: compiled logits do not follow the slow path (or the slow path is idle).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128, help="slow-fast frames (default 128)")
    parser.add_argument("--base-frames", type=int, default=16, help="base frames = fast frames (default 16)")
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--tokens", type=int, default=9, help="generated tokens per call: tokens - 1 timed steps")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the first is warm-up and compiles)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="small model, 32 vs 4 frames, 3 rounds of 5 tokens")
    args = parser.parse_args()
    if args.quick:
        args.model, args.frames, args.base_frames, args.tokens, args.rounds = "quick", 32, 4, 5, 3
    torch.set_num_threads(args.threads)
    start = machine()
    base, processor = build_model(args.model)
    copy, _ = build_model(args.model)  # the same weights (same seed)
    config = slowfast_config(args.frames // args.base_frames, args.base_frames)
    model = wrap(copy, config)
    reprojected = wrap(build_model(args.model)[0], config)
    with torch.no_grad():  # open the gates: the slow path moves the logits (checked for the compiled step)
        for branch, twin in zip(model.slow_branches.values(), reprojected.slow_branches.values(), strict=True):
            branch.attn_gate.fill_(1.0)
            twin.load_state_dict(branch.state_dict())  # the same adapter: the same tokens
    layers_idx = model.hybrid_layer_indices
    layers = len(layers_idx)
    models = {"base": base, "slowfast": model, "reprojected": reprojected}

    def reprojecting(which: str):  # the reference's decode: slow K/V projected again at every step
        return inspection.reprojecting_slow_kv(reprojected) if which == "reprojected" else contextlib.nullcontext()

    inputs = {
        "base": video_inputs(processor, args.base_frames),
        "slowfast": video_inputs(processor, args.frames),
        "reprojected": video_inputs(processor, args.frames),
    }
    compiled = compile_config(args.backend)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    by_round: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    sequences: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for round_ in range(args.rounds):
            for name, (_, which, variant) in VARIANTS.items():
                with reprojecting(which), kernel_skipped(variant), inspection.recording() as contexts:
                    out, steps = timed_generate(
                        models[which], inputs[which], args.tokens, **generate_kwargs(variant, compiled)
                    )
                check_path(name, which, contexts, tokens=args.tokens, layers=layers)
                if len(steps) != args.tokens - 1:
                    raise RuntimeError(f"{name}: {len(steps)} timed steps for {args.tokens} tokens.")
                sequences.setdefault(name, out)
                if not torch.equal(out, sequences[name]):
                    raise RuntimeError(f"{name}: round {round_} generated other tokens than round 0.")
                if round_:
                    times[name] += steps
                    by_round[name].append(steps)
        for name, (_, which, variant) in VARIANTS.items():  # compiled and static tokens equal eager's
            if variant.get("skip_kernel"):
                continue
            if not torch.equal(sequences[name], sequences["base" if which == "base" else "slowfast"]):
                raise RuntimeError(f"{name} generated other tokens than the eager dynamic-cache run.")
        check_compiled_reads_slow(model, inputs["slowfast"], compiled, args.tokens)
        syncs = {}
        host_side = compile_config("eager")  # the host side only: Dynamo without inductor
        for name, (_, which, variant) in VARIANTS.items():
            if variant.get("skip_kernel"):
                continue
            with reprojecting(which):
                syncs[name] = syncs_per_decode_step(
                    models[which], inputs[which], tokens=10, **generate_kwargs(variant, host_side)
                )

    meta = wrap(flops.build_meta_model(base.config), config)
    fast = model.prepare_inputs(**inputs["slowfast"])
    native_length, length, slow = (
        inputs["base"]["input_ids"].shape[1],
        fast.input_ids.shape[1],
        int(fast.slow.mask.sum()),
    )
    queries = ~fast.visual_mask[0]
    counted = {
        "base": flops.count_language_model(meta, native_length).decode_step,
        "slowfast": flops.count_language_model(meta, length, query_mask=queries, slow_tokens=slow).decode_step,
        "reprojected": flops.count_language_model(
            meta, length, query_mask=queries, slow_tokens=slow, reproject_slow_kv=True
        ).decode_step,
    }
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {key: medians[a] / medians[b] for key, (a, b) in RATIOS.items()}
    per_round = {key: paired_ratios(by_round, a, b) for key, (a, b) in RATIOS.items()}
    bytes_read = step_bytes(base, native_length, 0, [])["base"], step_bytes(model, length, slow, list(layers_idx))
    kernel_s = medians["slowfast_static"] - medians["no_kernel"]  # what the cross-attention kernels take per step
    end = machine()
    steps_per_variant = len(times["base"])
    lines = [
        f"# Decode step: base at {args.base_frames} frames vs slow-fast at {args.frames} frames (CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Model: random LLaVA-OneVision layout, Qwen2-style decoder {MODELS[args.model]}, fp32, 196 video tokens "
        f"per frame, about 100 text tokens; hybrid layers {meta.hybrid_layer_indices}. LLM sequence: "
        f"{native_length:,} tokens (base) / {length:,} (slow-fast, + {slow:,} slow tokens). Each variant is a greedy "
        f"`generate` of {args.tokens} tokens, every decode step timed inside it; median of {steps_per_variant} "
        f"steps per variant ({args.rounds - 1} rounds after 1 warm-up round, variants interleaved). Compiled: "
        f"transformers' static-cache step, `torch.compile` fullgraph, backend `{args.backend}`; its tokens equal "
        "the eager run's (checked).",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; "
        f"load average {start['load_average_1_5_15'][0]:.1f} at start, {end['load_average_1_5_15'][0]:.1f} at "
        "the end.",
        "",
        "x base: the variant's median step over the base's with the same cache and compilation; per round: the same "
        "ratio within each timed round (both ran side by side), median (min-max) over the rounds.",
        "",
        "| decode step | GFLOP | median (ms) | min (ms) | x base | x base per round | host syncs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (label, which, _) in VARIANTS.items():
        reference = BASELINE.get(name, name)
        gflop = counted["base" if which == "base" else which] / 1e9
        paired = per_round.get(f"{name}_over_{reference}")
        spread = "-" if not paired else (
            f"{statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f})"
        )  # fmt: skip
        synced = format(syncs[name], "g") if name in syncs else "-"
        lines.append(
            f"| {label} | {gflop:.3f} | {medians[name] * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | "
            f"{medians[name] / medians[reference]:.3f} | {spread} | {synced} |"
        )
    base_bytes, extra = bytes_read
    floor = extra["slowfast"] / base_bytes
    kernel_rate, base_rate = extra["slow_kv"] / kernel_s / 1e9, base_bytes / medians["base_static"] / 1e9
    lines += [
        "",
        "Compiled base over eager base: " + f"{ratios['base_compiled_over_base']:.3f}.",
        "",
        f"Bytes a decode step must read (decode is memory-bound): base {base_bytes / 1e6:.0f} MB (decoder and LM-head "
        f"weights, KV cache); slow-fast {extra['slowfast'] / 1e6:.0f} MB, of which the slow K/V are "
        f"{extra['slow_kv'] / 1e6:.0f} MB: {floor:.3f}x the base's bytes, the floor of the time ratio at equal "
        f"bandwidth. The cross-attention kernels take {kernel_s * 1e3:.1f} ms of a static-cache step (slow-fast "
        f"minus its kernel-skipped diagnostic), reading the slow K/V at {kernel_rate:.1f} GB/s; the base step "
        f"reads its bytes at {base_rate:.1f} GB/s.",
    ]
    data = {
        "command": command_line(),
        "machine_start": start,
        "machine_end": end,
        "model": MODELS[args.model],
        "frames": args.frames,
        "base_frames": args.base_frames,
        "backend": args.backend,
        "sequence_length": {"base": native_length, "slowfast": length},
        "slow_tokens": slow,
        "flops": counted,
        "time": {name: summary(values) for name, values in times.items()},
        "ratios_of_medians": ratios,
        "ratios_per_round": per_round,
        "bytes_per_step": {"base": bytes_read[0], **{f"slowfast_{k}": v for k, v in bytes_read[1].items()}},
        "kernel_seconds_per_step": kernel_s,
        "host_syncs_per_step": syncs,
        "times_s": times,
    }
    write_results("decode" + ("_quick" if args.quick else ""), data, "\n".join(lines))


if __name__ == "__main__":
    main()
