""" "Where it looked" (frame_attention.py): per-frame cross-attention mass x |gate|, from the same kernel.

The trained-adapter check (the map peaks at the needle frame) runs on the needle demo: see test_demo.py (the
miniature run reports the fraction) and the walkthrough notebook, which trains the adapter and asserts it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from test_generation import perturb_branches

import slowfast_adapter as sfa
from slowfast_adapter.core import inspection
from slowfast_adapter.core.attention import chunked_eager_attention, slow_attention_mass
from slowfast_adapter.core.frame_attention import frame_index

SAMPLES = [("video", "What color is the star?"), ("Tell me", "video", "is it red or blue? Answer in one word please.")]
STEPS = 3


def _config(**overrides) -> sfa.SlowFastConfig:
    return sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, query_tokens="text", **overrides)


@pytest.fixture
def model(base):
    return sfa.wrap(base, _config())


def _generate(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("repeats", [1, 2])
def test_mass_per_group_is_the_softmax_summed_by_group(chunk_size, repeats):
    """Against an explicit per-sample, per-head softmax: GQA, repeated rows, padding, ungrouped keys (-1)."""
    torch.manual_seed(0)
    key = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    query = torch.randn(2 * repeats, 4, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    groups = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, -1], [2, 2, 1, 1, -1, -1, -1, -1, -1]])
    mass = slow_attention_mass(query, key, mask, groups, 3, scaling=8**-0.5, chunk_size=chunk_size)
    expected = torch.zeros(2 * repeats, 4, 5, 3, dtype=torch.float64)
    for b in range(2 * repeats):
        for h in range(4):
            sample, kv_head = b // repeats, h // 2
            weights = torch.softmax(query[b, h] @ key[sample, kv_head][mask[sample]].T * 8**-0.5, -1)  # [5, S_b]
            for g in range(3):
                expected[b, h, :, g] = weights[:, groups[sample][mask[sample]] == g].sum(-1)
    torch.testing.assert_close(mass, expected, rtol=0, atol=1e-12)
    assert expected[0].sum(-1).lt(1 - 1e-3).all()  # row 0's last key is ungrouped: its weight is dropped


def test_grouping_keys_leaves_the_attention_output_unchanged():
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 1, 2, 30, 8)
    mask = torch.ones(1, 30, dtype=torch.bool)
    groups = (torch.arange(30)[None] // 10, 3)
    plain = chunked_eager_attention(query, key, value, mask, scaling=0.3, chunk_size=7)
    out, mass = chunked_eager_attention(query, key, value, mask, scaling=0.3, chunk_size=7, key_groups=groups)
    assert torch.equal(out, plain)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2, 30), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs a value, key_groups, or both"):
        chunked_eager_attention(query, key, None, mask, scaling=0.3)


# ------------------------------------------------------------------------------------------------- the model
@torch.no_grad()
def test_closed_gates_show_nothing_although_the_slow_tokens_were_read(model, processor):
    looked = sfa.where_it_looked(model, make_inputs(processor, SAMPLES), max_new_tokens=STEPS, do_sample=False)
    assert looked.queried[:, looked.prompt_length :].all()  # every decode step read the slow tokens ...
    assert looked.queried[:, : looked.prompt_length].any()
    assert looked.maps.abs().max() == 0  # ... but at init (alpha = 0) nothing reaches the model


@torch.no_grad()
def test_each_token_puts_its_gate_on_the_frames(model, processor):
    """A decode step's map sums over frames to |gate| of that token (the mass of all frames is 1), per layer."""
    perturb_branches(model)
    gates = {layer: [] for layer in model.hybrid_layer_indices}
    handles = [
        model.slow_branches[str(layer)].register_forward_hook(lambda m, a, out, layer=layer: gates[layer].append(out))
        for layer in model.hybrid_layer_indices
    ]
    inputs = make_inputs(processor, SAMPLES)
    looked = sfa.where_it_looked(model, inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    for handle in handles:
        handle.remove()
    assert looked.layers == model.hybrid_layer_indices
    assert looked.maps.shape == (len(looked.layers), 2, looked.prompt_length + STEPS - 1, looked.num_frames.max())
    for i, layer in enumerate(looked.layers):
        assert len(gates[layer]) == STEPS  # prefill + STEPS - 1 decode steps
        for step, gate in enumerate(gates[layer][1:]):  # [B, 1, 1]: one query token per row
            row_sums = looked.maps[i, :, looked.prompt_length + step].sum(-1)
            torch.testing.assert_close(row_sums, gate.abs().flatten(), rtol=1e-5, atol=1e-6)
    assert looked.maps[:, :, looked.prompt_length :].amin() >= 0
    per_frame = looked.per_frame(1)
    assert per_frame.shape == (int(looked.num_frames[1]),) and per_frame.sum() > 0


@torch.no_grad()
def test_recording_does_not_change_the_answer_and_costs_nothing_when_off(model, processor, monkeypatch):
    perturb_branches(model)
    inputs = make_inputs(processor, SAMPLES)
    with sfa.looking(model) as record:
        recorded = _generate(model, inputs)
    assert record.result().sequences is recorded
    calls = []
    monkeypatch.setattr("slowfast_adapter.core.frame_attention.slow_attention_mass", lambda *a, **k: calls.append(1))
    with inspection.recording() as contexts:
        plain = _generate(model, inputs)
    assert calls == [] and contexts[0].frame_attention is None and contexts[0].counters.slow_reads > 0
    assert torch.equal(recorded.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(recorded.logits, plain.logits, strict=True))
    with model.slow_path_disabled():
        fast_only = _generate(model, inputs)
    assert not all(torch.equal(a, b) for a, b in zip(fast_only.logits, plain.logits, strict=True))  # gates open


@torch.no_grad()
def test_generate_maps_equal_one_forward_over_the_whole_sequence(model, processor):
    perturb_branches(model)
    inputs = make_inputs(processor, SAMPLES)
    looked = sfa.where_it_looked(model, inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    sequences = looked.sequences[:, :-1]  # the last generated token is never run through the model
    new = sequences.shape[1] - inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": sequences}
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1)
    if "mm_token_type_ids" in inputs:  # Qwen families: generated tokens are text
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(2, new, dtype=torch.long)], 1)
    once = sfa.where_it_looked(model, full)
    assert once.maps.shape == looked.maps.shape and torch.equal(once.queried, looked.queried)
    assert looked.maps.abs().max() > 0.05
    torch.testing.assert_close(once.maps, looked.maps, rtol=1e-4, atol=1e-5)  # KV cache vs full forward rounding
    torch.testing.assert_close(once.answer_maps()[:, :, 0], looked.answer_maps()[:, :, -1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_batched_maps_equal_one_by_one(model, processor):
    perturb_branches(model)
    batch = sfa.where_it_looked(model, make_inputs(processor, SAMPLES), max_new_tokens=STEPS, do_sample=False)
    for row in range(2):
        alone = make_inputs(processor, [SAMPLES[row]], video_seeds=[row])
        single = sfa.where_it_looked(model, alone, max_new_tokens=STEPS, do_sample=False)
        torch.testing.assert_close(batch.answer_maps()[:, row], single.answer_maps()[:, 0], rtol=1e-4, atol=1e-5)
        prompt = single.prompt_length  # left padding: the row's prompt ends where the batch's does
        torch.testing.assert_close(
            batch.maps[:, row, batch.prompt_length - prompt :], single.maps[:, 0], rtol=1e-4, atol=1e-5
        )


@torch.no_grad()
def test_encoded_videos_give_the_same_maps_and_skip_the_prompt_prefix(model, processor):
    perturb_branches(model)
    inputs = make_inputs(processor, SAMPLES[:1])
    plain = sfa.where_it_looked(model, inputs, max_new_tokens=STEPS, do_sample=False)
    encoded = model.encode(**inputs)
    looked = sfa.where_it_looked(model, inputs, max_new_tokens=STEPS, do_sample=False, encoded=encoded)
    assert encoded.stats["hits"] > 0 and encoded.stats["prefix_hits"] == 0  # the prefix would hide prompt rows
    torch.testing.assert_close(looked.maps, plain.maps, rtol=1e-4, atol=1e-6)


def test_frames_are_numbered_per_row_across_videos_and_images_are_left_out(tiny_dirs, processor):
    from transformers import AutoModelForImageTextToText

    if processor.__class__.__name__ != "LlavaOnevisionProcessor":
        pytest.skip("one family is enough for the numbering")
    base = AutoModelForImageTextToText.from_pretrained(tiny_dirs("llava_onevision")).eval()
    model = sfa.wrap(base, _config(image_slow_tokens=True))
    samples = [("video", "image", "video", "Which?"), ("image", "Only an image.")]
    prepared = model.prepare_inputs(**make_inputs(processor, samples, frames=4))
    frame_of_token, num_frames = frame_index(prepared.slow)
    assert num_frames.tolist() == [8, 0]
    per_frame = prepared.slow.items[0].length // 4
    image = sum(item.length for item in prepared.slow.items if item.row == 0 and not item.units)
    row = frame_of_token[0][prepared.slow.mask[0]]  # a row's videos come first (in order), then its images
    assert row.tolist() == [f for f in range(8) for _ in range(per_frame)] + [-1] * image
    assert (frame_of_token[1] == -1).all()


@torch.no_grad()
def test_timestamps_label_the_frames(model, processor):
    inputs = make_inputs(processor, SAMPLES, frames=8)
    times = [[0.5 * i for i in range(8)], [10 + 0.25 * i for i in range(8)]]
    looked = sfa.where_it_looked(model, inputs, timestamps=times)
    step = 8 // int(looked.num_frames[0])  # Qwen-VL: a temporal group of 2 frames is labelled by its first frame
    assert looked.unit == ("frame" if step == 1 else "temporal group")
    assert looked.timestamps.tolist() == [t[::step] for t in times]
    with pytest.raises(ValueError, match="Video 1 has 3 timestamps"):
        sfa.where_it_looked(model, inputs, timestamps=[times[0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="timestamps has 1 entries but the inputs hold 2 videos"):
        sfa.where_it_looked(model, inputs, timestamps=times[:1])


@torch.no_grad()
def test_clear_errors(model, processor):
    with pytest.raises(ValueError, match="beam search reorders rows"):
        sfa.where_it_looked(model, make_inputs(processor, SAMPLES), max_new_tokens=2, num_beams=2)
    text_only = processor(text=["Hello there"], return_tensors="pt")
    with pytest.raises(RuntimeError, match="No slow-fast call ran"):
        sfa.where_it_looked(model, text_only, max_new_tokens=2)
    looked = sfa.where_it_looked(model, make_inputs(processor, SAMPLES))
    with pytest.raises(ValueError, match="is not a hybrid layer"):
        looked.per_frame(0, layer=1)
    with pytest.raises(ValueError, match="tokens must be"):
        looked.per_frame(0, tokens="question")
