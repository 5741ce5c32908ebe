"""The pruning baselines (EVS, VidCom2-style), the order task's data, and the slow keys' temporal positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_inputs, open_gates
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.core.hybrid import apply_rope
from slowfast_adapter.core.pruning import evs_keep_mask, frame_budgets, keep_tokens, vidcom2_keep_mask
from slowfast_adapter.demo.flops import prefill_flops
from slowfast_adapter.demo.needle_data import COLORS
from slowfast_adapter.demo.order_data import hidden_frames, render_order, sample_order_specs
from slowfast_adapter.demo.pruning import pruned_inputs


def static_frames(num_frames: int = 6, tokens: int = 4, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """[T, N, D]: the same frame repeated (every token unchanged from the previous frame)."""
    frame = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))
    return frame.expand(num_frames, tokens, dim).clone()


def test_evs_keeps_exactly_the_budget_first_frame_then_the_most_changed_tokens():
    frames = static_frames()
    frames[2, 1] = -frames[2, 1]  # changes completely (cosine -1), and changes back in frame 3
    frames[4, 3] += 0.3 * frames[4, 3].norm()  # a smaller change, also undone in frame 5
    keep = evs_keep_mask(frames, 4 + 4)
    assert keep.sum() == 8 and keep[0].all()  # the first frame whole
    assert keep[2, 1] and keep[3, 1]  # the flip and its undoing change most
    assert keep[4, 3] and keep[5, 3]
    assert evs_keep_mask(frames, 2).sum() == 2 and evs_keep_mask(frames, 2)[0, :2].all()  # budget below one frame
    kept = keep_tokens(frames, keep)
    assert torch.equal(kept[4], frames[2, 1]) and kept.shape == (8, 8)  # in frame order
    with pytest.raises(ValueError, match="budget"):
        evs_keep_mask(frames, 25)


def test_vidcom2_gives_distinct_frames_more_tokens_and_keeps_each_frames_most_distinct_tokens():
    frames = static_frames(num_frames=8)
    frames[5] = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))  # one frame unlike the others
    frames[2, 0] = -frames[2, 0]  # one token unlike its frame and the video
    counts = frame_budgets(frames, 6)
    assert counts.sum() == 6 and counts.max() <= 4 and int(counts.argmax()) == 5
    keep = vidcom2_keep_mask(frames, 6)
    assert keep.sum() == 6 and keep.sum(1).tolist() == counts.tolist()
    for budget in (1, 9, 31, 32):
        assert vidcom2_keep_mask(frames, budget).sum() == budget
    keep = vidcom2_keep_mask(frames, 10)
    if keep[2].any():
        assert keep[2, 0]


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    folder = tiny_dirs("llava_onevision")
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_pruned_inputs_hold_the_budget_and_at_full_budget_equal_the_base(llava):
    base, processor = llava
    model = sfa.wrap(base, sfa.SlowFastConfig(min_fast_frames=2))
    try:
        inputs = make_inputs(processor, [("video", "What is it?"), ("video", "Which color came first here?")])
        single = make_inputs(processor, [("video", "What is it?")])
        video_id = base.config.video_token_id
        native = int((inputs["input_ids"][0] == video_id).sum())
        flops = {}
        for budget in (5, 9, native):
            pruned = pruned_inputs(model, inputs, "evs", budget)
            ids = pruned.model_inputs["input_ids"]
            assert ((ids == video_id).sum(-1) == budget).all() and (pruned.keep.sum((1, 2)) == budget - 1).all()
            with model.disable_adapter():
                flops[budget] = prefill_flops(model, pruned_inputs(model, single, "evs", budget).model_inputs)
        with model.disable_adapter(), torch.no_grad():
            full = model(**pruned_inputs(model, inputs, "vidcom2", native).model_inputs).logits
            reference = model(**inputs).logits
            native_flops = prefill_flops(model, single)
        torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
        assert flops[5]["total"] < flops[9]["total"] < flops[native]["total"] == native_flops["total"]
        assert flops[native]["vision"] == 0 < native_flops["vision"]  # pruning reads precomputed features
    finally:
        model.unwrap()


def test_order_videos_hide_both_squares_from_the_fast_tokens_and_the_base_subsampling():
    hidden = hidden_frames(32, fast_stride=4, native_frames=8)
    assert not set(hidden) & ({0, 4, 9, 13, 18, 22, 27, 31} | set(range(0, 32, 4)))
    specs = sample_order_specs("test", 12, num_frames=32, size=32, needle_size=16, frames=hidden)
    assert [s.first[3] for s in specs[:4]] == list(COLORS)  # balanced answers
    for spec in specs:
        frames = render_order(spec).astype(int)
        chroma = np.abs(frames - frames.mean(-1, keepdims=True)).sum(-1).reshape(32, -1).max(-1)
        assert np.nonzero(chroma)[0].tolist() == [spec.first[0], spec.second[0]]
        assert spec.first[0] < spec.second[0] and spec.first[3] != spec.second[3]


def keys_without_and_with_time(base, config: dict, inputs) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The first hybrid layer's slow keys [B, H_kv, S, hd] of a call on `inputs` with slow_key_positions "none", then
    "temporal" (each a wrap of `base`, unwrapped after), and the "temporal" call's prepared inputs."""
    keys = []
    for positions in ("none", "temporal"):
        model = sfa.wrap(base, sfa.SlowFastConfig(**config, slow_key_positions=positions))
        try:
            prepared = model.prepare_inputs(**inputs)
            keys.append(model.slow_context(prepared).slow_kv[model.hybrid_layer_indices[0]][0])
        finally:
            model.unwrap()
    return *keys, prepared


def test_temporal_key_positions_rotate_each_frames_keys_by_its_time_in_the_fast_span(llava):
    base, processor = llava
    frames, config = 8, {"temporal_sampling_stride": 2, "temporal_pooling_stride": 2, "min_fast_frames": 2}
    inputs = make_inputs(processor, [("video", "Which color came first?"), ("video", "Hi")], frames=frames)
    plain, rotated, prepared = keys_without_and_with_time(base, config, inputs)
    slow = prepared.slow
    video_id = base.config.video_token_id
    per_frame = slow.tokens.shape[1] // frames
    span = int((prepared.input_ids[0] == video_id).sum()) - 1  # fast grid tokens, without the newline
    positions = prepared.model_inputs["position_ids"]
    for row in range(2):
        start = positions[row][prepared.input_ids[row] == video_id][0].item()
        expected = start + torch.arange(frames).repeat_interleave(per_frame) * span / frames
        torch.testing.assert_close(slow.key_positions[row], expected)
    # the left-padded short prompt's video sits at another column but at the same position as the long one's
    columns = [int((prepared.input_ids[row] == video_id).nonzero()[0]) for row in range(2)]
    assert columns[0] != columns[1] and torch.equal(slow.key_positions[0], slow.key_positions[1])
    cos, sin = slow.key_rope
    torch.testing.assert_close(rotated, apply_rope(plain, cos, sin))
    assert not torch.allclose(rotated, plain)


def order_sensitivity(base, config: dict, inputs, swapped) -> dict[str, float]:
    """For slow_key_positions 'none' and 'temporal' (gates opened): the largest change of the last logits when the
    video's frames are `swapped` in ways the fast tokens do not see (checked: fast-only logits equal, and the slow
    path changes the logits)."""
    differences = {}
    for positions in ("none", "temporal"):
        model = sfa.wrap(base, sfa.SlowFastConfig(**config, slow_key_positions=positions))
        try:
            open_gates(model)
            with torch.no_grad():
                logits = [model(**batch).logits[:, -1] for batch in (inputs, swapped)]
                with model.slow_path_disabled():
                    fast = [model(**batch).logits[:, -1] for batch in (inputs, swapped)]
        finally:
            model.unwrap()
        torch.testing.assert_close(fast[0], fast[1])  # the fast tokens are the same
        assert not torch.allclose(logits[0], fast[0], atol=1e-3)  # the slow path acts
        differences[positions] = (logits[0] - logits[1]).abs().max().item()
    return differences


def test_without_key_positions_the_slow_path_cannot_tell_frame_order(llava):
    """Swapping two frames that the fast tokens skip changes nothing with slow_key_positions='none' (the slow path is
    a set of frames) and changes the answer's logits with 'temporal'."""
    base, processor = llava
    config = {"temporal_sampling_stride": 4, "temporal_pooling_stride": 1, "min_fast_frames": 2}
    inputs = make_inputs(processor, [("video", "Which color came first?")], frames=8)
    swapped = dict(inputs)
    order = [0, 3, 2, 1, 4, 5, 6, 7]  # frames 1 and 3: both skipped by the fast tokens (stride 4)
    swapped["pixel_values_videos"] = inputs["pixel_values_videos"][:, order]
    differences = order_sensitivity(base, config, inputs, swapped)
    assert differences["none"] < 1e-5 < 1e-3 < differences["temporal"]


def test_temporal_key_positions_are_refused_where_not_implemented(tiny_dirs, monkeypatch):
    """Every family implements 'temporal' now; a family that declares only 'none' is refused at `wrap`."""
    from slowfast_adapter.families.qwen2_vl import Qwen2VLFamily

    monkeypatch.setattr(Qwen2VLFamily, "slow_key_positions", ("none",))
    base = AutoModelForImageTextToText.from_pretrained(tiny_dirs("qwen2_vl"))
    with pytest.raises(NotImplementedError, match="slow_key_positions"):
        sfa.wrap(base, sfa.SlowFastConfig(slow_key_positions="temporal"))
    assert sfa.SlowFastConfig.from_dict({}).slow_key_positions == "none"  # saved adapters load unchanged
