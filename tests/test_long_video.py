"""Long videos in bounded memory: the vision tower runs `vision_chunk_frames` frames per call and the slow K/V
are projected `KV_CHUNK_TOKENS` tokens per call, with the same outputs as one call (float rounding only), on
every family. The slow path is made to matter first, so a misplaced chunk would change the logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs
from test_generation import perturb_branches

import slowfast_adapter as sfa
from slowfast_adapter.core import hybrid, inspection, surface

SAMPLES = [("video", "What color is the star?"), ("Tell me", "video", "is it red or blue?")]
FRAMES = 8
# The same frames through a different number of tower calls: float rounding of batched kernels only.
ATOL = 1e-5


def _logits(base, processor, chunk_frames: int):
    model = sfa.wrap(
        base, sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, vision_chunk_frames=chunk_frames)
    )
    perturb_branches(model)
    inputs = make_inputs(processor, SAMPLES, frames=FRAMES)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.unwrap()
    return logits


@torch.no_grad()
def test_vision_tower_in_chunks_equals_one_call(base, processor, monkeypatch):
    calls = []
    video_features = surface.video_features

    def counting(model, pixels, *args, **kwargs):
        calls.append(tuple(pixels.shape))
        return video_features(model, pixels, *args, **kwargs)

    monkeypatch.setattr(surface, "video_features", counting)
    whole = _logits(base, processor, chunk_frames=0)
    assert len(calls) == 1
    calls.clear()
    chunked = _logits(base, processor, chunk_frames=2)
    qwen = "Qwen" in type(base).__name__
    # LLaVA: both videos together, 2 frames per call; Qwen: video by video, one temporal group (2 frames) per call.
    assert len(calls) == (2 * FRAMES // 2 if qwen else FRAMES // 2), calls
    torch.testing.assert_close(chunked, whole, rtol=0, atol=ATOL)


def test_slow_kv_projected_in_chunks_equals_one_call(base, processor, monkeypatch):
    model = sfa.wrap(base, sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2))
    perturb_branches(model)
    inputs = make_inputs(processor, SAMPLES, frames=FRAMES)
    calls = []
    handles = [
        b.kv_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        for b in model.slow_branches.values()
    ]
    with torch.no_grad(), inspection.recording() as contexts:
        whole = model(**inputs).logits
    slow_tokens = int(contexts[0].slow.mask.sum())
    assert calls == [slow_tokens] * len(model.hybrid_layer_indices)
    calls.clear()
    monkeypatch.setattr(hybrid, "KV_CHUNK_TOKENS", 7)
    with torch.no_grad():
        chunked = model(**inputs).logits
    assert len(calls) == math.ceil(slow_tokens / 7) * len(model.hybrid_layer_indices)
    assert max(calls) == 7
    torch.testing.assert_close(chunked, whole, rtol=0, atol=ATOL)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_vision_chunk_frames_is_checked(value):
    with pytest.raises((TypeError, ValueError), match="vision_chunk_frames"):
        sfa.SlowFastConfig(vision_chunk_frames=value)
