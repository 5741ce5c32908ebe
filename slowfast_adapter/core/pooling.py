"""Fast tokens: temporal sampling, temporal average pooling and spatial average pooling of frame grids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from ..config import SlowFastConfig


@dataclass(frozen=True)
class FastPlan:
    """How one video of `num_frames` frames becomes fast frames.

    Keep every `sampling_stride`-th frame, then average `pooling_stride` consecutive kept frames, then
    average `spatial_stride` x `spatial_stride` cells of each frame's token grid.
    """

    num_frames: int
    sampling_stride: int
    pooling_stride: int
    spatial_stride: int

    @property
    def num_fast_frames(self) -> int:
        return self.num_frames // (self.sampling_stride * self.pooling_stride)

    def fast_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of a fast frame's token grid for a (height, width) input grid."""
        return -(-height // self.spatial_stride), -(-width // self.spatial_stride)

    def num_fast_tokens(self, height: int, width: int) -> int:
        fast_h, fast_w = self.fast_grid(height, width)
        return self.num_fast_frames * fast_h * fast_w


def plan_fast_frames(num_frames: int, config: SlowFastConfig, *, unit: str = "frames") -> FastPlan:
    """Choose the temporal strides for a video of `num_frames` frames (or temporal groups: `unit`).

    Videos with at most `config.min_fast_frames` frames are not reduced in time. Longer videos use the
    configured strides, lowered (pooling stride first, then sampling stride) only as far as needed to
    keep at least `min_fast_frames` fast frames. The frame count must be a multiple of the product of
    the strides in use: anything else would silently drop frames from the fast path.
    """
    if num_frames < 1:
        raise ValueError(f"A video needs at least one frame, got {num_frames} {unit}.")
    spatial = config.spatial_pooling_stride
    if num_frames <= config.min_fast_frames:
        return FastPlan(num_frames, 1, 1, spatial)
    sampling, pooling = config.temporal_sampling_stride, config.temporal_pooling_stride
    while num_frames / (sampling * pooling) < config.min_fast_frames:
        if pooling > 1:
            pooling -= 1
        else:
            sampling -= 1
    step = sampling * pooling
    if num_frames % step:
        lower, upper = (num_frames // step) * step, (num_frames // step + 1) * step
        raise ValueError(
            f"A video of {num_frames} {unit} does not fit the fast-token strides in use (temporal sampling "
            f"stride {sampling} x temporal pooling stride {pooling} = {step}, with min_fast_frames="
            f"{config.min_fast_frames}): sample a multiple of {step} {unit} (e.g. {lower} or {upper}), or change "
            f"temporal_sampling_stride / temporal_pooling_stride in SlowFastConfig."
        )
    return FastPlan(num_frames, sampling, pooling, spatial)


def pool_fast_frames(frames: torch.Tensor, plan: FastPlan) -> torch.Tensor:
    """Pool `frames` [videos, T, H, W, D] into fast frames [videos, T_fast, H_fast, W_fast, D]."""
    if frames.shape[1] != plan.num_frames:
        raise ValueError(f"plan is for {plan.num_frames} frames, got a tensor with {frames.shape[1]} frames.")
    kept = frames[:, :: plan.sampling_stride]
    if plan.pooling_stride > 1:
        kept = reduce(kept, "n (tf t) h w d -> n tf h w d", "mean", t=plan.pooling_stride)
    if plan.spatial_stride == 1:
        return kept
    num_videos, num_fast = kept.shape[:2]
    grid = rearrange(kept, "n t h w d -> (n t) d h w")
    stride = plan.spatial_stride
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride, ceil_mode=True)
    return rearrange(pooled, "(n t) d h w -> n t h w d", n=num_videos, t=num_fast)
