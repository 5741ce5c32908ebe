"""Encode once, ask many: `encode` + `encoded=` gives the same answer, logit for logit, as encoding again, on
every family, and really skips the vision tower and the slow K/V projection. The slow path is made to matter
first (gates opened, K/V projection perturbed), so reusing stale or misplaced features would change the logits."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_inputs
from test_generation import perturb_branches

import slowfast_adapter as sfa
from slowfast_adapter.core import encoded as encoded_module
from slowfast_adapter.core import inspection, surface
from slowfast_adapter.core.encoded import fingerprint

SAMPLES = [("video", "What color is the star?"), ("Tell me", "video", "is it red or blue? Answer in one word please.")]
OTHER_QUESTIONS = [("video", "Where is the star?"), ("Describe", "video", "in three words.")]
STEPS = 4


@pytest.fixture
def model(base):
    model = sfa.wrap(base, sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, query_tokens="text"))
    perturb_branches(model)
    return model


@pytest.fixture
def counters(model, monkeypatch):
    """Calls of the vision tower (videos encoded) and of the hybrid layers' K/V projections."""
    counts = {"videos": 0, "kv_proj": 0}
    video_features = surface.video_features

    def counting(base, pixels, *args, **kwargs):
        counts["videos"] += 1
        return video_features(base, pixels, *args, **kwargs)

    monkeypatch.setattr(surface, "video_features", counting)
    handles = [
        branch.kv_proj.register_forward_hook(lambda *_: counts.__setitem__("kv_proj", counts["kv_proj"] + 1))
        for branch in model.slow_branches.values()
    ]
    yield counts
    for handle in handles:
        handle.remove()


def _generate(model, inputs, **kwargs):
    out = model.generate(
        **inputs, **kwargs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@torch.no_grad()
def test_generate_with_encoded_videos_equals_encoding_again(model, processor, counters):
    first = make_inputs(processor, SAMPLES)
    encoded = model.encode(**first)
    assert (counters["videos"], counters["kv_proj"]) == (1, len(model.hybrid_layer_indices))
    assert len(encoded) == 2 and encoded.nbytes > 0

    for samples in (SAMPLES, OTHER_QUESTIONS):  # the same videos, asked the same and then other questions
        inputs = make_inputs(processor, samples)
        counters.update(videos=0, kv_proj=0)
        sequences, logits = _generate(model, inputs, encoded=encoded)
        assert counters == {"videos": 0, "kv_proj": 0}, "the vision tower or the K/V projection ran again"
        expected_sequences, expected_logits = _generate(model, inputs)
        assert counters["videos"] == 1
        assert torch.equal(sequences, expected_sequences)
        assert torch.equal(logits, expected_logits)  # bit for bit: the same kernels on the same pixels
        with model.slow_path_disabled():  # the slow path matters here, so reuse was tested on it
            assert not torch.equal(_generate(model, inputs)[1], logits)
    assert encoded.stats == {"hits": 4, "misses": 2, "prefix_hits": 0}  # misses: `encode`; 2 prompts: no prefix


@torch.no_grad()
def test_forward_with_encoded_videos_equals_encoding_again(model, processor):
    inputs = make_inputs(processor, SAMPLES)
    encoded = model.encode(**inputs)
    assert torch.equal(model(**inputs, encoded=encoded).logits, model(**inputs).logits)


@torch.no_grad()
def test_a_batch_may_mix_cached_and_new_videos_and_repeat_one(model, processor, counters):
    cached = make_inputs(processor, SAMPLES[:1], video_seeds=[7])
    encoded = model.encode(**cached)
    mixed = make_inputs(processor, [SAMPLES[0], SAMPLES[1], OTHER_QUESTIONS[0]], video_seeds=[3, 7, 7])
    counters.update(videos=0)
    sequences, logits = _generate(model, mixed, encoded=encoded)
    assert counters["videos"] == 1 and encoded.stats == {"hits": 2, "misses": 2, "prefix_hits": 0}
    expected_sequences, expected_logits = _generate(model, mixed)
    assert torch.equal(sequences, expected_sequences)
    # The new video went through the tower alone instead of with the others: float rounding only.
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert len(encoded) == 1, "a call with `encoded=` reads the cache; only `encode` adds to it"


@torch.no_grad()
def test_pixels_are_hashed_once_per_tensor_and_again_after_a_change_in_place(model, processor, counters, monkeypatch):
    """Videos are matched by a digest of their pixels, remembered per pixel tensor: later calls with the same
    tensor do not hash it again, a change in place (its version counter) makes the video new (features of the
    changed pixels, not the remembered ones), and the memo goes with the tensor."""
    hashed = []
    monkeypatch.setattr(encoded_module, "fingerprint", lambda pixels: hashed.append(1) or fingerprint(pixels))
    inputs = make_inputs(processor, SAMPLES)
    encoded = model.encode(**inputs)
    assert len(hashed) == 2 and len(encoded.digests) == 2  # two videos, each hashed once
    before = model(**inputs, encoded=encoded).logits
    _generate(model, inputs, encoded=encoded)
    assert len(hashed) == 2, "the same pixel tensor was hashed again"

    pixels = next(value for key, value in inputs.items() if key.startswith("pixel_values"))
    pixels.mul_(0.5)  # in place: the remembered digests no longer describe these pixels
    counters.update(videos=0)
    after = model(**inputs, encoded=encoded).logits
    assert len(hashed) == 4 and counters["videos"] == 1, "changed pixels must be hashed and encoded again"
    assert torch.equal(after, model(**inputs).logits)
    assert not torch.equal(after, before)

    del inputs, pixels
    gc.collect()
    assert not encoded.digests, "the memo outlived its pixel tensor"


def test_training_after_encode_projects_the_slow_kv_again(model, processor, counters):
    inputs = make_inputs(processor, SAMPLES)
    encoded = model.encode(**inputs)
    with torch.no_grad():
        model.slow_branches[str(model.hybrid_layer_indices[0])].kv_proj.weight.mul_(1.5)  # an optimizer step
    counters.update(kv_proj=0)
    logits = model(**inputs, encoded=encoded).logits
    assert counters["kv_proj"] == 1, "only the changed layer's K/V are projected again"
    assert torch.equal(logits, model(**inputs).logits)


def test_encoded_belongs_to_one_model_and_projector(model, processor, base):
    inputs = make_inputs(processor, SAMPLES[:1])
    encoded = model.encode(**inputs)
    other = sfa.wrap(type(base)(base.config).eval(), sfa.SlowFastConfig(min_fast_frames=2))
    with pytest.raises(ValueError, match="another model"):
        other(**inputs, encoded=encoded)
    model.add_adapter("projector", sfa.SlowFastConfig(min_fast_frames=2, train_projector=True))
    model.set_adapter("projector")
    with pytest.raises(ValueError, match="encode the videos again"):
        model(**inputs, encoded=encoded)
    with model.disable_adapter():  # the base encodes its own native tokens: `encoded` is not read
        torch.testing.assert_close(model(**inputs, encoded=encoded).logits, base(**inputs).logits, rtol=0, atol=0)


@torch.no_grad()
def test_one_prompt_generate_continues_the_prompt_prefix_cache(model, processor):
    """`encode` of one prompt keeps the KV cache up to the video's last token; a later question about the same video
    prefills only its own tokens and gives the same answer. Training after `encode` retires the prefix."""
    encoded = model.encode(**make_inputs(processor, SAMPLES[:1]))
    assert len(encoded.prefixes) == 1
    videos_only = model.encode(**{k: v for k, v in make_inputs(processor, SAMPLES[:1]).items() if k != "input_ids"})
    assert not videos_only.prefixes and encoded.nbytes > videos_only.nbytes  # the prefix's KV cache is counted
    # Another video of the same length gives the same prompt tokens: its prefix must not answer for the first one.
    model.encode(into=encoded, **make_inputs(processor, SAMPLES[:1], video_seeds=[9]))
    assert len(encoded.prefixes) == 2
    inputs = make_inputs(processor, OTHER_QUESTIONS[:1])
    with inspection.recording() as contexts:
        sequences, logits = _generate(model, inputs, encoded=encoded)
    assert encoded.stats["prefix_hits"] == 1
    prefix = next(iter(encoded.prefixes))[0]  # the first video's prefix tokens (both videos' are the same)
    prompt_length = contexts[0].prompt_query_mask.shape[1]
    prefill_reads = [int(per_row) for step, _, per_row in contexts[0].counters.reads if step == 1]
    assert prefill_reads == [prompt_length - len(prefix)] * len(model.hybrid_layer_indices)  # only the question ran
    expected_sequences, expected_logits = _generate(model, inputs)
    assert torch.equal(sequences, expected_sequences)
    # The prefix's K/V came from a forward over its own tokens instead of the whole prompt: float rounding only.
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)
    with model.slow_path_disabled():  # not in another mode: the prefix holds the slow path's effect
        _generate(model, inputs, encoded=encoded)
    with torch.no_grad():
        model.slow_branches[str(model.hybrid_layer_indices[0])].attn_gate.add_(0.1)  # an optimizer step
    after_sequences, after_logits = _generate(model, inputs, encoded=encoded)
    assert encoded.stats["prefix_hits"] == 1, "a prefix computed with other parameters was used"
    assert torch.equal(after_logits, _generate(model, inputs)[1])


@torch.no_grad()
def test_a_prompt_prefix_answers_only_for_the_adapter_that_made_it(model, processor):
    """`set_adapter` changes which hybrid layers run without changing any parameter: a prefix encoded with one
    adapter must not be continued by another (it was: logits off by ~0.8 and other tokens on LLaVA-OV)."""
    model.add_adapter("other", sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, query_tokens="text"))
    model.set_adapter("other")
    perturb_branches(model, seed=5)
    model.set_adapter("default")
    encoded = model.encode(**make_inputs(processor, SAMPLES[:1]))
    inputs = make_inputs(processor, OTHER_QUESTIONS[:1])
    model.set_adapter("other")
    sequences, logits = _generate(model, inputs, encoded=encoded)
    assert encoded.stats["prefix_hits"] == 0
    expected_sequences, expected_logits = _generate(model, inputs)
    assert torch.equal(sequences, expected_sequences)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    model.set_adapter("default")  # back on the adapter that made it: the prefix is used again
    _generate(model, inputs, encoded=encoded)
    assert encoded.stats["prefix_hits"] == 1


@torch.no_grad()
def test_beam_search_from_an_encoding_with_a_prompt_prefix(model, processor):
    """The prefix's KV cache holds one row; beams expand the prompt into several. `generate(encoded=..., num_beams=2)`
    crashed on it (a size mismatch in the cache); it now prefills the whole prompt and equals encoding nothing."""
    encoded = model.encode(**make_inputs(processor, SAMPLES[:1]))
    assert len(encoded.prefixes) == 1
    inputs = make_inputs(processor, OTHER_QUESTIONS[:1])
    beams = model.generate(**inputs, encoded=encoded, max_new_tokens=STEPS, num_beams=2, do_sample=False)
    assert encoded.stats["prefix_hits"] == 0
    assert torch.equal(beams, model.generate(**inputs, max_new_tokens=STEPS, num_beams=2, do_sample=False))
    model.generate(**inputs, encoded=encoded, max_new_tokens=STEPS, do_sample=False)  # one row: the prefix is used
    assert encoded.stats["prefix_hits"] == 1
