"""Where it looked, split by the answer: why the needle map's peak rate stops short of 100%.

Loads finished demo runs (their pretrained base, adapter and test split) and reports, per answer colour, how often
the map of the token that predicts the answer peaks at the needle's frame (order task: at a square's frame), and
how concentrated the map is (the peak frame's share of the map's total: 1/32 is flat). Run:

    python benchmarks/looked_by_answer.py DEMO_DIR [DEMO_DIR ...] [--out benchmarks/results/looked_by_answer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.demo.experiment import NeedleTask


def targets(record: dict) -> list[int]:
    """The frames the answer is in: the needle's, or both squares'."""
    if "needle" in record:
        return [record["needle"]["frame"]]
    return [square["frame"] for square in record["squares"]]


@torch.no_grad()
def by_answer(demo_dir: Path, batch_size: int = 50) -> dict:
    processor = AutoProcessor.from_pretrained(demo_dir / "pretrained-base")
    base = AutoModelForImageTextToText.from_pretrained(demo_dir / "pretrained-base")
    model = sfa.SlowFastModel.from_pretrained(base, demo_dir / "adapter").eval()
    first = json.loads((demo_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    frames = first["needle"]["frames"] if "needle" in first else first["frames"]
    task = NeedleTask(demo_dir / "data", "test", frames, processor)
    hits: dict[str, list[bool]] = {}
    shares: dict[str, list[float]] = {}
    for start in range(0, len(task), batch_size):
        indices = list(range(start, min(len(task), start + batch_size)))
        looked = sfa.where_it_looked(model, task.prompt_batch(indices))
        for row, i in enumerate(indices):
            per_frame = looked.per_frame(row)
            answer = task.answers[i]
            hits.setdefault(answer, []).append(int(per_frame.argmax()) in targets(task.records[i]))
            shares.setdefault(answer, []).append(float(per_frame.max() / per_frame.sum().clamp_min(1e-12)))
    return {
        "dir": str(demo_dir),
        "slow_key_positions": model.slowfast_config.slow_key_positions,
        "peak_at_target": {a: sum(h) / len(h) for a, h in sorted(hits.items())},
        "median_peak_share": {a: statistics.median(s) for a, s in sorted(shares.items())},
        "videos": {a: len(h) for a, h in sorted(hits.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dirs", nargs="+")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "looked_by_answer"))
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = [by_answer(Path(d)) for d in args.demo_dirs]
    result = {"command": "python benchmarks/looked_by_answer.py " + " ".join(args.demo_dirs), "uptime": load,
              "runs": rows}  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{result['command']}` (uptime: {load})", "",
             "| run | slow_key_positions | answer | videos | map peaks at the answer's frame | median peak share |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        for answer, rate in row["peak_at_target"].items():
            share = row["median_peak_share"][answer]
            lines.append(f"| {Path(row['dir']).name} | {row['slow_key_positions']} | {answer} | "
                         f"{row['videos'][answer]} | {rate:.3f} | {share:.3f} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
