"""Host syncs of prefill and of each decode step, base vs slow-fast, every family (tiny random models).

A host sync (`Tensor.item`, `tolist`, `bool(tensor)`, `nonzero`, boolean-mask indexing, ...) drains a GPU's launch
queue; `slowfast_adapter.core.host_syncs.HostSyncCounter` counts them (on the CPU the same calls are made). Inputs: the
stock processor's output for a left-padded batch of two prompts with one 8-frame video each; the wrapped model has
2 hybrid layers. Prefill: greedy `generate` of 1 token (prefill, video encoding and fitting included, plus that
token's stopping check). Decode: (syncs of 10 tokens - syncs of 2) / 8, dynamic and static cache.

    python benchmarks/host_syncs.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, write_results  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from slowfast_adapter import SlowFastConfig, wrap  # noqa: E402
from slowfast_adapter.core.host_syncs import HostSyncCounter, syncs_per_decode_step  # noqa: E402
from slowfast_adapter.tools.tiny import TINY_BUILDERS, random_video, save_tiny  # noqa: E402

PROMPTS = ["What color is the star?", "Tell me: is it red or blue? Answer in one word please."]


def batch(processor) -> dict[str, torch.Tensor]:
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
        )
        for prompt in PROMPTS
    ]
    videos = [random_video(8, seed=i) for i in range(len(texts))]
    return dict(processor(text=texts, videos=videos, return_tensors="pt", padding=True))


def prefill_syncs(model, inputs) -> tuple[int, dict[str, int]]:
    with HostSyncCounter() as syncs:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return syncs.count, syncs.sites()


def main() -> None:
    start = machine()
    rows = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for family in TINY_BUILDERS:
            folder = save_tiny(family, Path(tmp) / family)
            base = AutoModelForImageTextToText.from_pretrained(folder).eval()
            inputs = batch(AutoProcessor.from_pretrained(folder))
            row = {"base_prefill": prefill_syncs(base, inputs)[0]}
            for cache in ("dynamic", "static"):
                row[f"base_decode_{cache}"] = syncs_per_decode_step(base, inputs, tokens=10, cache_implementation=cache)
            model = wrap(base, SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2))
            row["slowfast_prefill"], sites = prefill_syncs(model, inputs)
            row["slowfast_prefill_library_sites"] = {
                site.split("slowfast_adapter/")[-1]: n for site, n in sites.items() if "slowfast_adapter/" in site
            }
            for cache in ("dynamic", "static"):
                row[f"slowfast_decode_{cache}"] = syncs_per_decode_step(
                    model, inputs, tokens=10, cache_implementation=cache
                )
            model.unwrap()
            rows[family] = row
    lines = [
        "# Host syncs: prefill and decode step, base vs slow-fast (tiny models, CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        "Two left-padded prompts with one 8-frame video each; 2 hybrid layers. Prefill = `generate` of 1 token "
        "(video encoding, fitting and the LLM prefill, plus one stopping check); decode = syncs per generated token.",
        "",
        "| family | prefill: base | prefill: slow-fast | decode (dynamic cache): base / slow-fast | "
        "decode (static cache): base / slow-fast |",
        "|---|---|---|---|---|",
    ]
    for family, row in rows.items():
        lines.append(
            f"| {family} | {row['base_prefill']} | {row['slowfast_prefill']} | "
            f"{row['base_decode_dynamic']:g} / {row['slowfast_decode_dynamic']:g} | "
            f"{row['base_decode_static']:g} / {row['slowfast_decode_static']:g} |"
        )
    lines += ["", "Where the library's prefill syncs are (file:line function -> count):", ""]
    for family, row in rows.items():
        sites = ", ".join(f"`{site}` {n}" for site, n in row["slowfast_prefill_library_sites"].items())
        lines.append(f"- {family}: {sites}")
    data = {"command": command_line(), "machine": start, "rows": rows}
    write_results("host_syncs", data, "\n".join(lines))


if __name__ == "__main__":
    main()
