"""Rows (a)-(f) of the demo on both tasks, 3 seeds each, and slow-fast with and without temporal slow-key positions.

For each task ("needle": what; "order": when) and seed, runs the whole demo (`slowfast_adapter.demo.experiment.run`:
data, pretrained base, adapter, rows (a)-(f)) with `slow_key_positions` = the first of `--key-positions`, then trains
one more adapter per further value on the same pretrained base and measures its (c) row. Writes every run's summary
as it goes, then the spread over seeds (mean, min, max) as JSON, Markdown and a plot. Run:

    python benchmarks/slowfast_evidence.py --work-dir /tmp/evidence [--seeds 0 1 2] [--tasks needle order]

`--collect` writes the results from the runs already finished in `--work-dir` (their `evidence.json`), running nothing;
without it, runs already finished there are reused and the others run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import time
from pathlib import Path

from slowfast_adapter.demo.experiment import (
    DemoConfig,
    NeedleTask,
    accuracy,
    frame_ranks,
    looked_rates,
    run,
    train_adapter,
)
from slowfast_adapter.demo.flops import prefill_flops

RESULTS = Path(__file__).parent / "results" / "slowfast_evidence"


def variant_row(config: DemoConfig, positions: str) -> dict:
    """Train the adapter with `slow_key_positions=positions` on the run's pretrained base; its (c) row."""
    start = time.perf_counter()
    out = Path(config.output_dir)
    slowfast = dataclasses.replace(config.slowfast_config(), slow_key_positions=positions)
    model, processor, val = train_adapter(config, out / "pretrained-base", slowfast, log=lambda *_: None)
    test = NeedleTask(out / "data", "test", config.high_frames, processor)
    return {
        "setting": f"(c) slow-fast adapter, slow_key_positions={positions}",
        "frames": config.high_frames,
        "accuracy": accuracy(model, test),
        "val_accuracy": val,
        "llm_prefill_flops": prefill_flops(model, test.prompt_batch([0]))["total"],
        "looked": looked_rates(test.records, frame_ranks(model, test)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def spread(runs: list[dict]) -> list[dict]:
    """One row per setting over the runs (seeds): accuracy mean/min/max, FLOPs, video tokens, looked rates."""
    settings: dict[str, list[dict]] = {}
    for summary in runs:
        for row in summary["results"]:
            settings.setdefault(row["setting"], []).append(row)
    rows = []
    for setting, found in settings.items():
        accs = [r["accuracy"] for r in found]
        row = {
            "setting": setting,
            "seeds": len(found),
            "accuracy": accs,
            "mean": statistics.fmean(accs),
            "min": min(accs),
            "max": max(accs),
            "llm_prefill_flops": sorted({r["llm_prefill_flops"] for r in found}),
            "video_tokens": sorted({r["video_tokens"] for r in found if "video_tokens" in r}),
        }
        if all("looked" in r for r in found):
            row["looked"] = {k: [r["looked"][k] for r in found] for k in found[0]["looked"]}
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`; load average before / after: {result['load']}.", ""]
    for task, block in result["tasks"].items():
        lines += [f"### {task} ({block['seeds']} seeds; run seconds {block['seconds']})", ""]
        lines += ["| setting | video tokens in the LLM | accuracy mean | min - max | LLM prefill MFLOP |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in block["rows"]:
            flops = ", ".join(f"{f / 1e6:.2f}" for f in row["llm_prefill_flops"])
            tokens = ", ".join(str(t) for t in row["video_tokens"]) or "17"
            tokens += " + slow" if "slow-fast" in row["setting"] else ""
            lines.append(f"| {row['setting']} | {tokens} | {row['mean']:.3f} | {row['min']:.3f} - {row['max']:.3f} "
                         f"| {flops} |")  # fmt: skip
        lines.append("")
        for row in block["rows"]:
            for name, values in row.get("looked", {}).items():
                lines.append(f"- where it looked, {row['setting']}: {name} " + ", ".join(f"{v:.3f}" for v in values))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), dpi=120, squeeze=False)
    markers = "osD^vPX*"
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, row in enumerate(result["tasks"][task]["rows"]):
            x = row["llm_prefill_flops"][0] / 1e6
            ax.errorbar(x, row["mean"], yerr=[[row["mean"] - row["min"]], [row["max"] - row["mean"]]],
                        fmt=markers[i % len(markers)], capsize=3, label=row["setting"])  # fmt: skip
        ax.axhline(0.25, color="grey", linestyle="--", linewidth=1)
        ax.set_title(task)
        ax.set_xlabel("LLM prefill MFLOP per video")
        ax.set_ylabel("test accuracy (mean, min-max over seeds)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="a new folder for the runs (data, bases, adapters)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["needle", "order"])
    parser.add_argument("--key-positions", nargs="+", default=["temporal", "none"],
                        help="slow_key_positions of the demo run, then of the extra adapters")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--collect", action="store_true", help="only collect the finished runs of --work-dir")
    args = parser.parse_args()
    work = Path(args.work_dir)
    command = "python benchmarks/slowfast_evidence.py --work-dir WORK --seeds " + " ".join(map(str, args.seeds))
    command += " --collect" if args.collect else ""
    command += " --tasks " + " ".join(args.tasks) + " --key-positions " + " ".join(args.key_positions)
    load_before = load()
    result = {"command": command, "tasks": {}}
    for task in args.tasks:
        runs, seconds = [], []
        for seed in args.seeds:
            finished = work / f"{task}-s{seed}" / "evidence.json"
            if args.collect or finished.exists():  # a run finished earlier (an interrupted benchmark resumes)
                if finished.exists():
                    runs.append(json.loads(finished.read_text()))
                    seconds.append(runs[-1]["seconds"])
                continue
            config = DemoConfig(output_dir=str(work / f"{task}-s{seed}"), task=task, seed=seed)
            config.slowfast = {**config.slowfast, "slow_key_positions": args.key_positions[0]}
            start = time.perf_counter()
            prefix = f"  {task} s{seed} "
            summary = run(config, log=lambda line, prefix=prefix: print(prefix + line, flush=True))
            seconds.append(round(time.perf_counter() - start, 1))
            summary["results"][2]["setting"] += f", slow_key_positions={args.key_positions[0]}"
            for positions in args.key_positions[1:]:
                summary["results"].append(variant_row(config, positions))
            (work / f"{task}-s{seed}" / "evidence.json").write_text(json.dumps(summary, indent=2) + "\n")
            runs.append(summary)
            accs = ", ".join(f"{r['setting'][:3]} {r['accuracy']:.3f}" for r in summary["results"])
            print(f"{task} seed {seed} ({seconds[-1]} s demo): {accs}", flush=True)
        if not runs:
            continue
        result["tasks"][task] = {"seeds": len(runs), "seconds": seconds, "rows": spread(runs), "runs": runs}
    result["load"] = f"{load_before} / {load()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
