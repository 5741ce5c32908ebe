"""Ablations of SlowFastConfig's design choices on the needle-in-a-haystack task.

Reuses a finished `slowfast-adapter demo` run (its pretrained base and data), trains one adapter per
variant with the demo's schedule, and reports validation accuracy (what defaults are chosen on), test
accuracy and LLM prefill FLOPs. Run:

    python benchmarks/needle_ablations.py --demo-dir demo-output [--adapter-steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from slowfast_adapter.demo.experiment import DemoConfig, NeedleTask, accuracy, train_adapter
from slowfast_adapter.demo.flops import prefill_flops

VARIANTS = {
    "demo default": {},
    "query RoPE off": {"query_rope": False},
    "queries: all text": {"query_tokens": "text"},
    "queries: all tokens": {"query_tokens": "all"},
    "K/V init random": {"kv_init": "random"},
    "gate: static tanh(alpha)": {"gate": "static_tanh"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="demo-output", help="output_dir of a finished demo run")
    parser.add_argument("--adapter-steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "needle_ablations"))
    args = parser.parse_args()

    demo_dir = Path(args.demo_dir)
    summary = json.loads((demo_dir / "results.json").read_text())
    config = DemoConfig(**{**summary["config"], "output_dir": str(demo_dir)})
    if args.adapter_steps:
        config = dataclasses.replace(config, adapter_steps=args.adapter_steps)
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        slowfast = config.slowfast_config()
        slowfast = dataclasses.replace(slowfast, **VARIANTS[name])
        model, processor, val = train_adapter(config, demo_dir / "pretrained-base", slowfast, log=lambda *_: None)
        test = NeedleTask(demo_dir / "data", "test", config.high_frames, processor)
        row = {
            "variant": name,
            "changes": VARIANTS[name],
            "val_accuracy": val,
            "test_accuracy": accuracy(model, test),
            "llm_prefill_flops": prefill_flops(model, test.prompt_batch([0]))["total"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(f"{name:28s} val {val:.3f}  test {row['test_accuracy']:.3f}  "
              f"{row['llm_prefill_flops'] / 1e6:.2f} MFLOP  ({row['seconds']} s)")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/needle_ablations.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (("demo_dir", args.demo_dir), ("adapter_steps", args.adapter_steps))
        if v  # fmt: skip
    )
    result = {"command": command, "adapter_steps": config.adapter_steps, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{command}`", "", "| variant | val accuracy | test accuracy | LLM prefill MFLOP |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['variant']} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | "
              f"{r['llm_prefill_flops'] / 1e6:.2f} |" for r in rows]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
