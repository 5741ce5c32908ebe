"""Qwen2.5-VL: the Qwen2-VL layout plus absolute time in M-RoPE.

Temporal positions advance by `tokens_per_second * second_per_grid_ts` per temporal group. A fast
group spans `sampling_stride * pooling_stride` native groups, so its `second_per_grid_ts` is scaled by
that factor: fast group i sits at the time of the first native group it covers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.pooling import FastPlan
from .qwen2_vl import Qwen2VLFamily


class Qwen2_5_VLFamily(Qwen2VLFamily):  # noqa: N801 (mirrors the transformers class name)
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)

    def adjust_video_inputs(self, inputs: dict[str, Any], plans: list[FastPlan]) -> None:
        seconds = inputs.get("second_per_grid_ts")
        if seconds is None:
            return
        seconds = torch.as_tensor(seconds)
        span = torch.tensor([plan.sampling_stride * plan.pooling_stride for plan in plans], dtype=seconds.dtype)
        inputs["second_per_grid_ts"] = seconds * span.to(seconds.device)
