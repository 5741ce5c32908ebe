"""One of two processes that save different adapters into the same folders (tests/test_adapter_folder_safety.py).

argv: base folder, work folder, index (0 or 1), rounds, go file. Writes `expected-<index>.safetensors` (its
adapter's tensors) and `ready-<index>`, waits for the go file, then for each round saves into `round-<n>` and reads
that folder back (`read_adapter`, checksums verified): it must be exactly one of the two adapters. Exit status 1
with a message otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.adapter_io import read_adapter

CONFIGS = [
    sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[0], lora_r=2),
    sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[1]),
]


def main() -> int:
    base_dir, work, index, rounds, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.manual_seed(10 + index)
    model = sfa.wrap(AutoModelForImageTextToText.from_pretrained(base_dir), CONFIGS[index])
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param))
    save_file(model.adapter_state_dict(), str(work / f"expected-{index}.safetensors"))
    (work / f"ready-{index}").write_text("")
    while not Path(go).exists():
        time.sleep(0.01)
    other = work / f"expected-{1 - index}.safetensors"
    candidates = [model.adapter_state_dict(), load_file(other)]
    for round_ in range(rounds):
        folder = work / f"round-{round_}"
        model.save_pretrained(folder)
        saved = read_adapter(folder)  # the loaders' reading step, without building modules (kept fast)
        saved.verify_checksums()
        loaded = saved.tensors
        if not any(
            loaded.keys() == c.keys() and all(torch.equal(loaded[k], v) for k, v in c.items()) for c in candidates
        ):
            print(f"round {round_}: process {index} loaded a mix", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
