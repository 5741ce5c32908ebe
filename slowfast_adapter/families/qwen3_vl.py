"""Qwen3-VL: the Qwen-VL layout with per-group timestamps and deepstack features.

The processor writes each temporal group of a video as `<t seconds><|vision_start|>pads<|vision_end|>`.
A fast group that pools native groups g .. g+k-1 keeps the segment of group g (its timestamp is the
start of the window) with the fast token count, and the segments of groups g+1 .. g+k-1 are removed,
timestamp text included. Deepstack features are pooled exactly like the main features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import surface
from ..core.pooling import FastPlan
from ..core.types import VideoFeatures
from .qwen2_vl import Qwen2VLFamily, pool_videos


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    # The main merger; the deepstack mergers (a ModuleList feeding the first LLM layers) stay frozen.
    projector_modules = ("model.visual.merger",)

    def text_tokens_per_group(self, timestamp_tokens: int) -> int:
        """`<t seconds>` (`timestamp_tokens` long), `<|vision_start|>` and `<|vision_end|>` per group."""
        return timestamp_tokens + 2

    def extra_video_features(self, output: Any) -> list[tuple[torch.Tensor, ...]]:
        return list(surface.deepstack_features(output))

    def video_output(self, videos: list[VideoFeatures]) -> Any:
        output = super().video_output(videos)
        layers = range(len(videos[0].extra))
        output.deepstack_features = [tuple(video.extra[layer] for video in videos) for layer in layers]
        return output

    def pool_extra_video_features(self, output: Any, grids: torch.Tensor, plans: list[FastPlan], merge: int) -> None:
        deepstack = surface.deepstack_features(output)
        output.deepstack_features = [pool_videos(layer, grids, plans, merge) for layer in deepstack]

    def video_keep_mask(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        grids: torch.Tensor,
        fast_grids: list[list[int]],
        plans: list[FastPlan],
    ) -> torch.Tensor:
        """Keep the first group segment of each fast window, shortened to the fast token count."""
        merge = model.config.vision_config.spatial_merge_size
        video_id = model.config.video_token_id
        start_id, end_id = model.config.vision_start_token_id, model.config.vision_end_token_id
        # Read to the host once (two syncs), not per temporal group: [n] (row, column) row-major, one run per group
        positions = (input_ids == video_id).nonzero().tolist()
        ids = input_ids.tolist()
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        drop_from, drop_to, cursor = [], [], 0  # token spans [from, to) to drop, per row
        for (groups, height, width), (_, fast_h, fast_w), plan in zip(grids.tolist(), fast_grids, plans, strict=True):
            per_group, fast_per_group = height * width // merge**2, fast_h * fast_w // merge**2
            window = plan.sampling_stride * plan.pooling_stride
            for group in range(groups):
                first = positions[cursor + group * per_group]  # (row, column) of the group's first pad
                last = positions[cursor + (group + 1) * per_group - 1]
                row = first[0]
                if ids[row][first[1] - 1] != start_id or ids[row][last[1] + 1] != end_id:
                    raise ValueError(
                        "Qwen3-VL video tokens are not laid out as `<t seconds><|vision_start|>pads<|vision_end|>` "
                        "per temporal group: build the inputs with the base model's own processor."
                    )
                if group % window == 0:  # kept segment: only its first fast_per_group pads stay
                    drop_from.append((row, first[1] + fast_per_group))
                    drop_to.append(last[1] + 1)
                else:  # whole segment: timestamp text, vision_start, pads, vision_end
                    previous_end = positions[cursor + group * per_group - 1]  # last pad of the group before
                    drop_from.append((row, previous_end[1] + 2))
                    drop_to.append(last[1] + 2)
            cursor += groups * per_group
        if cursor != len(positions):  # pragma: no cover - the placeholder count check catches it first
            raise ValueError(
                f"The text holds {len(positions)} video placeholder tokens but video_grid_thw needs {cursor}: "
                "build the inputs with the base model's own processor from the same text and videos."
            )
        for (row, start), stop in zip(drop_from, drop_to, strict=True):
            keep[row, start:stop] = False
        return keep
