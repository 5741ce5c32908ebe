"""LLM prefill FLOPs of one real forward call, counted with `torch.utils.flop_counter`."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..tools.flops import CPU_SDPA_FLOPS  # CPU SDPA has no formula in torch: without it attention counts 0

VISION_MODULES = ("vision_tower", "multi_modal_projector", "visual")


@torch.no_grad()
def prefill_flops(model, inputs: dict[str, Any]) -> dict[str, int]:
    """FLOPs of one prefill of `model` (a SlowFastModel, in whatever mode is active) on `inputs`.

    Returns {'total': LLM prefill (decoder layers over the prompt + the hybrid branch + last-token
    logits), 'vision': vision tower + projector}. Counted on a real CPU forward.
    """
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with counter:
        model(**inputs, logits_to_keep=1)
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    vision = 0
    for name, ops in per_module.items():
        parts = name.split(".")
        # count each vision module once: at the outermost name that ends with it
        if parts[-1] in VISION_MODULES and not any(p in VISION_MODULES for p in parts[:-1]):
            vision += sum(ops.values())
    return {"total": int(total - vision), "vision": int(vision)}
