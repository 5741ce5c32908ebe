"""Per-family checks: no-op pooling reproduces the base; pooled videos get the positions of a pooled-grid video."""

from __future__ import annotations

import pytest
import torch
from conftest import conversation, make_inputs
from transformers.video_utils import VideoMetadata

import slowfast_adapter as sfa
from slowfast_adapter.tools.tiny import random_video


def _real_tokens(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]


@torch.no_grad()
def test_all_strides_one_reproduces_the_base_model(base, processor):
    config = sfa.SlowFastConfig(temporal_pooling_stride=1, min_fast_frames=1, hybrid_layer_interval=2)
    samples = [("video", "What is it?"), ("Tell me", "video", "is it red or blue? Say it now.")]
    inputs = make_inputs(processor, samples, padding_side="right")
    expected = base(**inputs).logits
    expected_tokens = base.generate(**make_inputs(processor, samples[:1]), max_new_tokens=4, do_sample=False)
    model = sfa.wrap(base, config)
    prepared = model.prepare_inputs(**inputs)
    assert torch.equal(prepared.input_ids, inputs["input_ids"])  # nothing pooled, nothing dropped
    mask = inputs["attention_mask"]
    # Exactly the base model: same features, same positions, and a closed gate adds exact zeros.
    assert torch.equal(_real_tokens(model(**inputs).logits, mask), _real_tokens(expected, mask))
    tokens = model.generate(**make_inputs(processor, samples[:1]), max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


def _pooled_reference_inputs(processor, family: str):
    """Processor output for the video the fast tokens describe: 16 frames pooled by 4 in time, 2 in space.

    The reference video has the pooled grid natively: Qwen 4 frames of 16 px (2 temporal groups of 2x2
    merged tokens), sampled at a quarter of the frame rate (Qwen2.5-VL's absolute time), with the frame
    indices of the first native group of each fast window (Qwen3-VL's timestamps).
    """
    text = processor.apply_chat_template(conversation("video", "What is it?"), add_generation_prompt=True)
    small = random_video(4, size=16)
    if family == "qwen3_vl":  # its pixel bounds count t * h * w
        size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 16 * 16}
        metadata = VideoMetadata(total_num_frames=16, fps=24, frames_indices=[0, 1, 8, 9])
    else:
        size = {"shortest_edge": 16 * 16, "longest_edge": 16 * 16}
        metadata = VideoMetadata(total_num_frames=16, fps=24, frames_indices=[0, 4, 8, 12])
    return processor(text=[text], videos=[small], return_tensors="pt", size=size, video_metadata=[metadata])


def _positions_seen(model, run) -> list[torch.Tensor]:
    """The position_ids the language model receives during `run()` (one entry per call)."""
    seen = []
    language_model = model.model.language_model
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def test_pooled_video_gets_the_positions_of_a_pooled_grid_video(base, processor, family):
    if family == "llava_onevision":
        pytest.skip("1-D positions: covered by the generic contract suite")
    config = sfa.SlowFastConfig(
        temporal_pooling_stride=4, spatial_pooling_stride=2, min_fast_frames=2, hybrid_layer_interval=2
    )
    video = make_inputs(processor, [("video", "What is it?")], frames=16)
    reference = _pooled_reference_inputs(processor, family)
    base_positions = _positions_seen(base, lambda: base(**reference))[0]
    base_generate_positions = _positions_seen(base, lambda: base.generate(**reference, max_new_tokens=3))

    model = sfa.wrap(base, config)
    prepared = model.prepare_inputs(**video)
    inputs = prepared.model_inputs
    assert torch.equal(prepared.input_ids, reference["input_ids"])  # incl. Qwen3-VL timestamp text
    assert torch.equal(inputs["mm_token_type_ids"], reference["mm_token_type_ids"])
    assert torch.equal(inputs["video_grid_thw"], reference["video_grid_thw"])
    if family == "qwen2_5_vl":
        torch.testing.assert_close(inputs["second_per_grid_ts"], torch.as_tensor(reference["second_per_grid_ts"]))
    assert torch.equal(_positions_seen(base, lambda: model(**video))[0], base_positions)
    generate_positions = _positions_seen(base, lambda: model.generate(**video, max_new_tokens=3))
    assert len(generate_positions) == len(base_generate_positions) == 3
    for ours, theirs in zip(generate_positions, base_generate_positions, strict=True):
        assert torch.equal(ours, theirs)
    # Deepstack (Qwen3-VL) features were pooled to the fast count, or the base forward would have refused them.
    if family == "qwen3_vl":
        deepstack = inputs["mm_encoder_outputs"]["video"].deepstack_features
        assert all(layer[0].shape[0] == 8 for layer in deepstack)


def test_llava_fast_tokens_match_a_video_of_the_fast_frame_count(base, processor, family):
    if family != "llava_onevision":
        pytest.skip("LLaVA-OneVision layout")
    config = sfa.SlowFastConfig(temporal_pooling_stride=4, min_fast_frames=2)
    model = sfa.wrap(base, config)
    prepared = model.prepare_inputs(**make_inputs(processor, [("video", "What is it?")], frames=8))
    assert torch.equal(prepared.input_ids, make_inputs(processor, [("video", "What is it?")], frames=2)["input_ids"])
