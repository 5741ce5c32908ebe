import pytest
import torch

from slowfast_adapter import SlowFastConfig
from slowfast_adapter.core.pooling import plan_fast_frames, pool_fast_frames


@pytest.mark.parametrize(
    "frames, strides, expected",
    [
        (64, (1, 4), (1, 4, 16)),  # released 64-frame config
        (96, (1, 6), (1, 6, 16)),  # released 96-frame config
        (128, (2, 4), (2, 4, 16)),  # released 128-frame config
        (64, (2, 4), (2, 2, 16)),  # too few frames for the 128-frame strides: pooling is lowered first
        (32, (2, 4), (2, 1, 16)),
        (16, (2, 4), (1, 1, 16)),  # at most min_fast_frames: no temporal reduction
        (8, (1, 4), (1, 1, 8)),
    ],
)
def test_plan_keeps_min_fast_frames(frames, strides, expected):
    config = SlowFastConfig(temporal_sampling_stride=strides[0], temporal_pooling_stride=strides[1])
    plan = plan_fast_frames(frames, config)
    assert (plan.sampling_stride, plan.pooling_stride, plan.num_fast_frames) == expected


def test_frame_counts_that_do_not_fit_the_strides_are_refused():
    with pytest.raises(ValueError, match=r"66 frames does not fit .* multiple of 4 frames \(e.g. 64 or 68\)"):
        plan_fast_frames(66, SlowFastConfig())
    with pytest.raises(ValueError, match="at least one frame"):
        plan_fast_frames(0, SlowFastConfig())


def _reference_pool(frames, s, t, p):
    """Loop-by-loop reference: sample, average groups of t frames, average p x p windows (clipped at edges)."""
    videos, _, height, width, dim = frames.shape
    kept = [frames[:, i] for i in range(0, frames.shape[1], s)]
    groups = [torch.stack(kept[i : i + t]).mean(0) for i in range(0, len(kept), t)]
    out = frames.new_zeros(videos, len(groups), -(-height // p), -(-width // p), dim)
    for g, grid in enumerate(groups):
        for i in range(0, height, p):
            for j in range(0, width, p):
                out[:, g, i // p, j // p] = grid[:, i : i + p, j : j + p].mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("s, t, p, grid", [(1, 4, 1, (4, 4)), (2, 2, 2, (4, 4)), (1, 2, 2, (5, 3)), (4, 1, 3, (7, 7))])
def test_pooling_matches_a_loop_reference(s, t, p, grid):
    frames = torch.randn(2, 16, *grid, 8, dtype=torch.float64)
    config = SlowFastConfig(
        temporal_sampling_stride=s, temporal_pooling_stride=t, spatial_pooling_stride=p, min_fast_frames=2
    )
    plan = plan_fast_frames(16, config)
    pooled = pool_fast_frames(frames, plan)
    torch.testing.assert_close(pooled, _reference_pool(frames, s, t, p), rtol=0, atol=1e-12)
    assert plan.num_fast_tokens(*grid) == pooled[0].shape[0] * pooled[0].shape[1] * pooled[0].shape[2]
