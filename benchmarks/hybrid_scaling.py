"""Benchmarks 3 and 4: one hybrid layer's prefill time, peak memory and achieved FLOP/s vs slow frames.

The slow tokens are fed as precomputed features ([1, frames * tokens_per_frame, hidden], random). The
timed call is exactly what a hybrid layer adds to a prefill, through the real hook code
(`HybridLayerHooks`): the slow tokens through the layer's input norm and `kv_proj` (K/V projection),
then the 100 text queries through `q_proj` + RoPE, cross-attention over all slow tokens, and the gated
add before `o_proj`. Both kernels are measured: sdpa (torch's fused CPU kernel) and eager (our
chunked online softmax). Every (frames, kernel) pair runs in fresh processes: one for time (default
allocator), one for peak memory (see benchmarks/common.py).

Achieved FLOP/s (nanoGPT-style MFU, with the measured matmul rate as the peak): FLOPs of the call,
counted on the meta device through the same code, / median time / this machine's fp32 matmul FLOP/s
(best 2048^3 product, measured in the same process just before).

    python benchmarks/hybrid_scaling.py           # Qwen2-1.5B layer shapes, 64 tokens/frame, 64..1536 frames
    python benchmarks/hybrid_scaling.py --shape 7b
    python benchmarks/hybrid_scaling.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    command_line,
    machine,
    matmul_flops_per_second,
    peak_memory_mib,
    run_worker,
    summary,
    write_results,
)

SHAPES = {  # hidden, heads, KV heads, head dim of real decoders
    "1.5b": dict(hidden=1536, heads=12, kv_heads=2, head_dim=128),  # Qwen2-1.5B
    "7b": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128),  # Qwen2-7B
    "quick": dict(hidden=256, heads=4, kv_heads=2, head_dim=64),
}


def build_branch(shape: dict, implementation: str, slow_tokens: int, queries: int, device: str = "cpu"):
    """A hooked Qwen2 decoder layer and the call that runs its hybrid branch once (returns the 2 part times)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from slowfast_adapter.core import surface
    from slowfast_adapter.core.hybrid import HybridLayerHooks, SlowBranch
    from slowfast_adapter.core.state import SlowContext, activated
    from slowfast_adapter.core.types import SlowTokens

    config = Qwen2Config(
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=8,  # the MLP is not part of the branch
        num_hidden_layers=1,
    )
    surface.set_attention_implementation(config, implementation)
    torch.manual_seed(0)
    with torch.device(device):
        layer = Qwen2DecoderLayer(config, layer_idx=0).eval()
        branch = SlowBranch(
            hidden_size=shape["hidden"],
            num_heads=shape["heads"],
            num_kv_heads=shape["kv_heads"],
            head_dim=shape["head_dim"],
        )
        rotary = Qwen2RotaryEmbedding(config)
        hidden = torch.randn(1, queries, shape["hidden"])
        attn_out = torch.randn(1, queries, shape["heads"] * shape["head_dim"])
        slow = torch.randn(1, slow_tokens, shape["hidden"])
    cos, sin = rotary(hidden, torch.arange(queries)[None].to(device))
    hooks = HybridLayerHooks(owner=1, layer_idx=0, decoder_layer=layer, branch=branch, query_rope=True)
    slow_tokens_ = SlowTokens(slow, torch.ones(1, slow_tokens, dtype=torch.bool))
    attention_kwargs = {"hidden_states": hidden, "position_embeddings": (cos, sin)}

    def call() -> tuple[float, float]:
        context = SlowContext(owner=1, slow=slow_tokens_, prompt_query_mask=torch.ones(1, queries, dtype=torch.bool))
        context.begin_step(queries, None)  # what the language model's step hook announces in a real forward
        with activated(context):
            start = time.perf_counter()
            hooks.slow_kv(context)  # K/V projection of all slow tokens
            middle = time.perf_counter()
            hooks.before_attention(layer.self_attn, (), attention_kwargs)  # q_proj + RoPE + cross-attention
            updated = hooks.before_o_proj(layer.self_attn.o_proj, (attn_out,))  # gate + add
            end = time.perf_counter()
        if updated is None or context.counters.slow_reads != 1 or context.counters.kv_projections != 1:
            raise RuntimeError(f"The timed call did not run the hybrid branch: {context.counters.totals()}")
        return middle - start, end - middle

    return call


def worker(setting: dict) -> dict:
    from slowfast_adapter.tools import flops

    torch.set_num_threads(setting["threads"])
    shape, slow = SHAPES[setting["shape"]], setting["frames"] * setting["tokens_per_frame"]
    with torch.no_grad():
        call = build_branch(shape, setting["implementation"], slow, setting["queries"])
        call()  # warm-up
        if setting["measure"] == "memory":
            return {"peak_memory_mib": peak_memory_mib(call)[0]}
        peak = matmul_flops_per_second()
        parts = [call() for _ in range(setting["repeats"])]
        meta_call = build_branch(shape, setting["implementation"], slow, setting["queries"], device="meta")
        with flops._RealIndexMetaMode():
            total_flops = flops.count_flops(meta_call)[0]
    kv_flops = 2 * slow * shape["hidden"] * 2 * shape["kv_heads"] * shape["head_dim"]
    totals = [kv + rest for kv, rest in parts]
    median = summary(totals)["median_s"]
    return {
        "slow_tokens": slow,
        "time": summary(totals),
        "time_kv_projection": summary([kv for kv, _ in parts]),
        "time_queries": summary([rest for _, rest in parts]),
        "flops": total_flops,
        "flops_kv_projection": kv_flops,
        "matmul_flops_per_s": peak,
        "achieved_flops_per_s": total_flops / median,
        "fraction_of_matmul": total_flops / median / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 1536])
    parser.add_argument("--tokens-per-frame", type=int, default=64, help="slow tokens per frame (paper: 64)")
    parser.add_argument("--queries", type=int, default=100, help="text tokens that query the slow tokens")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--implementations", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="small shapes, 64..512 frames, 2 repeats")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.shape, args.frames, args.repeats = "quick", [64, 128, 256, 512], 2
    start = machine()
    rows = []
    for implementation in args.implementations:
        for frames in args.frames:
            setting = dict(
                frames=frames,
                tokens_per_frame=args.tokens_per_frame,
                queries=args.queries,
                shape=args.shape,
                implementation=implementation,
                repeats=args.repeats,
                threads=args.threads,
            )
            row = {**setting, **run_worker(Path(__file__), setting)}
            row.update(run_worker(Path(__file__), setting, memory=True))
            rows.append(row)
            print(
                f"{implementation} {frames} frames: {row['time']['median_s']:.3f} s, {row['peak_memory_mib']:.0f} MiB"
            )
    end = machine()
    lines = [
        "# Hybrid branch (one layer) vs slow frames: time, peak memory, achieved FLOP/s (CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Layer shapes: {SHAPES[args.shape]} ({args.shape}); {args.tokens_per_frame} slow tokens per frame fed as "
        f"precomputed features; {args.queries} text queries; fp32. Time: median of {args.repeats} calls after "
        "1 warm-up (K/V projection + queries part); memory: peak RSS above the RSS before the call, which holds "
        "the slow features already (separate process). 'matmul %' = achieved FLOP/s / this machine's measured "
        "2048^3 fp32 matmul FLOP/s in the same process.",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} with {args.threads} threads; "
        f"load average {start['load_average_1_5_15'][0]:.1f} at start, {end['load_average_1_5_15'][0]:.1f} at "
        "the end (other jobs may have been running).",
        "",
        "| kernel | frames | slow tokens | GFLOP | time (s) | K/V proj (s) | queries (s) | ms per 1k slow tokens "
        "| peak memory (MiB) | KiB per slow token | GFLOP/s | matmul GFLOP/s | matmul % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t, slow = row["time"]["median_s"], row["slow_tokens"]
        lines.append(
            f"| {row['implementation']} | {row['frames']} | {slow:,} | {row['flops'] / 1e9:.1f} | {t:.3f} | "
            f"{row['time_kv_projection']['median_s']:.3f} | {row['time_queries']['median_s']:.3f} | "
            f"{t / slow * 1e6:.2f} | {row['peak_memory_mib']:.0f} | {row['peak_memory_mib'] * 1024 / slow:.2f} | "
            f"{row['achieved_flops_per_s'] / 1e9:.1f} | {row['matmul_flops_per_s'] / 1e9:.1f} | "
            f"{100 * row['fraction_of_matmul']:.0f}% |"
        )
    data = {"command": command_line(), "machine_start": start, "machine_end": end, "rows": rows}
    write_results("hybrid_scaling" + ("_quick" if args.quick else ""), data, "\n".join(lines))


if __name__ == "__main__":
    main()
