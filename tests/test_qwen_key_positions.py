"""slow_key_positions="temporal" on the Qwen families: each slow key gets the M-RoPE position (temporal, height,
width) the family's own scheme gives a token of its temporal group, read from the fitted sequence's positions."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from test_generation import _full_forward_logits, perturb_branches
from test_pruning_and_time import keys_without_and_with_time, order_sensitivity
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.core import surface
from slowfast_adapter.core.hybrid import apply_rope

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FRAMES = 16  # 8 temporal groups of 2 frames; the tiny models' groups are 8 x 8 patches = 4 x 4 merged tokens
GROUP_TOKENS = 16


def load(tiny_dirs, family: str):
    folder = tiny_dirs(family)
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def with_time(inputs, family: str):
    """Qwen2.5-VL: a 2 fps video (1 s per temporal group: 2 temporal positions per group with tokens_per_second=2),
    instead of the processor's 24 fps default for frames given without metadata, whose temporal index rounds to
    the same value for every group (the base model's own scheme then has no time to give either)."""
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.ones_like(inputs["second_per_grid_ts"])
    return inputs


@pytest.mark.parametrize("family", QWEN)
def test_with_temporal_key_positions_the_slow_path_tells_the_order_of_skipped_groups(tiny_dirs, family):
    """Swapping two temporal groups that the fast tokens skip changes nothing with 'none' (the slow path reads a set)
    and changes the logits with 'temporal'."""
    base, processor = load(tiny_dirs, family)
    config = {"temporal_sampling_stride": 4, "temporal_pooling_stride": 1, "min_fast_frames": 2}
    inputs = with_time(make_inputs(processor, [("video", "Which color came first?")], frames=FRAMES), family)
    per_group = int(inputs["video_grid_thw"][0, 1:].prod())  # patches (rows of pixel_values_videos) per group
    groups = list(inputs["pixel_values_videos"].split(per_group))
    groups[1], groups[3] = groups[3], groups[1]  # both skipped by the fast tokens (groups 0 and 4 stay)
    swapped = {**inputs, "pixel_values_videos": torch.cat(groups)}
    differences = order_sensitivity(base, config, inputs, swapped)
    assert differences["none"] < 1e-5 < 1e-4 < differences["temporal"]  # float noise: ~1e-6


def test_qwen2_vl_key_positions_by_hand_under_left_padding(tiny_dirs):
    """8 groups, fast: 2 groups (sampling 2 x pooling 2 = window 4) of 2 x 2 tokens (spatial stride 2). Qwen2-VL's
    M-RoPE puts fast token (f, i, j) at (s + f, s + i, s + j), s the video's start (the real tokens before it);
    slow token (g, y, x) goes to (s + g / 4, s + y / 2, s + x / 2). The keys are rotated by those positions."""
    base, processor = load(tiny_dirs, "qwen2_vl")
    config = {"temporal_sampling_stride": 2, "temporal_pooling_stride": 2, "min_fast_frames": 2}
    config["spatial_pooling_stride"] = 2
    inputs = make_inputs(processor, [("video", "Which color came first in this one?"), ("video", "Hi")], frames=FRAMES)
    plain, rotated, prepared = keys_without_and_with_time(base, config, inputs)
    slow = prepared.slow
    video_id = base.config.video_token_id
    mask = prepared.model_inputs["attention_mask"]
    group, row_, col = torch.meshgrid(torch.arange(8.0), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    columns = []
    for row in range(2):
        column = int((prepared.input_ids[row] == video_id).nonzero()[0])
        columns.append(column)
        start = int(mask[row, :column].sum())
        expected = torch.stack([start + group / 4, start + row_ / 2, start + col / 2]).flatten(1)
        torch.testing.assert_close(slow.key_positions[:, row], expected)
    # the left-padded short prompt's video sits at another column but at the same positions as the long one's
    assert columns[0] != columns[1] and torch.equal(slow.key_positions[:, 0], slow.key_positions[:, 1])
    cos, sin = slow.key_rope
    rotary = base.model.language_model.rotary_emb
    torch.testing.assert_close((cos, sin), rotary(slow.tokens, slow.key_positions))  # M-RoPE sections, [B, S, hd]
    torch.testing.assert_close(rotated, apply_rope(plain, cos, sin))
    assert not torch.allclose(rotated, plain)


@pytest.mark.parametrize("family", QWEN)
def test_key_positions_of_a_batch_equal_one_by_one(tiny_dirs, family):
    """Left padding, two videos in one row and an image: each row's key positions do not depend on the batch; an
    image's keys sit at its own placeholders' positions."""
    base, processor = load(tiny_dirs, family)
    config = sfa.SlowFastConfig(
        temporal_sampling_stride=2, temporal_pooling_stride=2, min_fast_frames=2, slow_key_positions="temporal"
    )
    samples = [("video", "What happens later in this long clip?", "video", "And here?"), ("image", "video", "Hi")]
    seeds = [[0, 1], [2]]
    batch = with_time(make_inputs(processor, samples, frames=FRAMES, video_seeds=[0, 1, 2]), family)
    model = sfa.wrap(base, config)
    try:
        batched = model.prepare_inputs(**batch)
        singles = [
            model.prepare_inputs(**with_time(make_inputs(processor, [sample], frames=FRAMES, video_seeds=seed), family))
            for sample, seed in zip(samples, seeds, strict=True)
        ]
    finally:
        model.unwrap()
    for row, single in enumerate(singles):
        length = int(single.slow.mask.sum())
        assert int(batched.slow.mask[row].sum()) == length
        torch.testing.assert_close(batched.slow.key_positions[:, row, :length], single.slow.key_positions[:, 0])
        torch.testing.assert_close(batched.slow.key_rope[0][row, :length], single.slow.key_rope[0][0])
    # the image: its slow keys (after the row's videos') at its placeholders' M-RoPE positions, token for token
    image = singles[1]
    position_ids = surface.rope_index(base, image.model_inputs)  # [3, 1, L'], as the base model computes them
    image_positions = position_ids[:, 0, image.input_ids[0] == base.config.image_token_id].float()
    count = image_positions.shape[1]
    torch.testing.assert_close(image.slow.key_positions[:, 0, -count:], image_positions)
    video_times = image.slow.key_positions[0, 0, :-count]
    assert (video_times.diff() >= 0).all() and video_times[-1] > video_times[0]  # groups in time order


@torch.no_grad()
def test_qwen2_vl_generate_with_temporal_keys_equals_repeated_full_forwards(tiny_dirs):
    base, processor = load(tiny_dirs, "qwen2_vl")
    config = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, slow_key_positions="temporal")
    inputs = make_inputs(processor, [("video", "What is it?"), ("video", "Which color came first here?")], frames=8)
    model = sfa.wrap(base, config)
    try:
        perturb_branches(model)
        steps = 3
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        full = _full_forward_logits(model, inputs, out.sequences)
        with model.slow_path_disabled():
            fast_only = _full_forward_logits(model, inputs, out.sequences)
    finally:
        model.unwrap()
    for step in range(steps):
        torch.testing.assert_close(out.logits[step], full[step], rtol=0, atol=1e-5)
        assert (full[step] - fast_only[step]).abs().max() > 1e-2
