"""One of two processes that save different adapters into the same folders (tests/test_adapter_folder_safety.py).

`work` runs in a spawned process: it writes `expected-<index>.safetensors` (its adapter's tensors), then for each
round waits for the other process at a barrier, saves into `round-<n>` and reads that folder back (`read_adapter`,
checksums verified): it must be exactly one of the two adapters. Problems go to `errors-<index>.txt`.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

import slowfast_adapter as sfa  # noqa: E402
from slowfast_adapter.io.adapter_io import read_adapter  # noqa: E402

CONFIGS = [
    sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[0], lora_r=2),
    sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[1]),
]


def work(base_dir: str, folder: str, index: int, rounds: int, barrier) -> None:
    work_dir, errors = Path(folder), []
    try:
        torch.set_num_threads(1)
        torch.manual_seed(10 + index)
        model = sfa.wrap(AutoModelForImageTextToText.from_pretrained(base_dir), CONFIGS[index])
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn_like(param))
        save_file(model.adapter_state_dict(), str(work_dir / f"expected-{index}.safetensors"))
        barrier.wait()
        candidates = [model.adapter_state_dict(), load_file(work_dir / f"expected-{1 - index}.safetensors")]
        for round_ in range(rounds):
            barrier.wait()
            round_dir = work_dir / f"round-{round_}"
            model.save_pretrained(round_dir)
            saved = read_adapter(round_dir)  # the loaders' reading step, without building modules (kept fast)
            saved.verify_checksums()
            loaded = saved.tensors
            if not any(
                loaded.keys() == c.keys() and all(torch.equal(loaded[k], v) for k, v in c.items()) for c in candidates
            ):
                errors.append(f"round {round_}: process {index} read a mix")
    except BaseException:  # noqa: BLE001 (reported to the test)
        errors.append(traceback.format_exc())
        barrier.abort()
    (work_dir / f"errors-{index}.txt").write_text("\n".join(errors))
