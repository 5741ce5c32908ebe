"""The wrapper's contract on a real (tiny, random) base model loaded with `from_pretrained`."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_inputs, open_gates
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.core import state

# 4 decoder layers -> hybrid layers 0 and 2; 8-frame videos -> 2 fast frames (LLaVA: 8 frames pooled by 4;
# Qwen: 4 temporal groups of 2 frames, pooled by 2).
CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2)
SAMPLES = [("video", "What color is the star?"), ("Tell me", "video", "is it red or blue?"), ("Just text here",)]


def _count_calls(module: torch.nn.Module, counter: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda mod, args, out: counter.append(args[0].shape))


def _real_logits(logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [row[m.bool()] for row, m in zip(logits, mask, strict=True)]


@torch.no_grad()
def test_zero_gate_equals_fast_only_and_the_branch_runs(base, processor):
    model = sfa.wrap(base, CONFIG)
    inputs = make_inputs(processor, SAMPLES)
    calls = []
    handle = _count_calls(model.slow_branches["0"].kv_proj, calls)
    logits = model(**inputs).logits
    handle.remove()
    assert len(calls) == 1, "the slow branch must run even while the gate is closed"
    with model.slow_path_disabled():
        fast_only = model(**inputs).logits
    # tanh(alpha=0) is exactly 0, so the update is exactly zero and the logits are bitwise equal.
    assert torch.equal(logits, fast_only)


@torch.no_grad()
def test_disable_adapter_is_the_base_model_bit_for_bit(base, processor):
    inputs = make_inputs(processor, SAMPLES)
    expected = base(**inputs).logits
    expected_tokens = base.generate(**inputs, max_new_tokens=4, do_sample=False)
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, expected)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected_tokens)
    assert model(**inputs).logits.shape[1] < expected.shape[1]  # outside the block: fast tokens again


def test_training_changes_only_adapter_parameters_and_lowers_the_loss(base, processor):
    model = sfa.wrap(base, CONFIG)
    inputs = make_inputs(processor, SAMPLES[:2])
    labels = inputs["input_ids"].clone()
    labels[(labels == base.config.video_token_id) | (inputs["attention_mask"] == 0)] = -100
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    # In memory the adapter's parameters carry its name (several adapters); adapter_state_dict has the file keys.
    prefix = "slowfast_adapters.default."
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        prefix + k for k in model.adapter_state_dict()
    }
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == key.startswith(prefix + "slow_branches."), key
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("samples", [SAMPLES[:1], SAMPLES], ids=["single", "batch-left-padded"])
@torch.no_grad()
def test_generate_equals_greedy_repeated_forward(base, processor, samples):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    inputs = make_inputs(processor, samples)
    steps = 6
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("mm_token_type_ids")  # Qwen families: per-token modality ids, 0 for text
    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(steps):
        extra = {} if types is None else {"mm_token_type_ids": types}
        logits = model(input_ids=ids, attention_mask=mask, **visual, **extra).logits
        # Same computation; cached decoding reduces over the keys in another order than one full forward
        # (measured max difference 1.2e-6 on logits of magnitude ~10 in float32).
        torch.testing.assert_close(out.logits[step], logits[:, -1], rtol=0, atol=1e-5)
        ids = torch.cat([ids, out.sequences[:, ids.shape[1], None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if types is not None:
            types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
        assert torch.equal(ids[:, -1], logits[:, -1].argmax(-1))
    assert torch.equal(out.sequences, ids)


@torch.no_grad()
def test_slow_kv_projected_once_and_read_by_every_generated_token(base, processor):
    model = sfa.wrap(base, CONFIG)
    inputs = make_inputs(processor, SAMPLES[:1])
    kv_calls, gate_calls = [], []
    handles = [_count_calls(b.kv_proj, kv_calls) for b in model.slow_branches.values()]
    handles += [_count_calls(b.gate_proj, gate_calls) for b in model.slow_branches.values()]
    model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    for handle in handles:
        handle.remove()
    layers = len(model.slow_branches)
    assert len(kv_calls) == layers  # once per prompt per hybrid layer, not per step
    assert len(gate_calls) == 7 * layers  # the prefill and each of the 6 decode steps read the slow tokens
    assert all(shape[1] == 1 for shape in gate_calls[layers:])  # decode steps: the one new token queries


@pytest.mark.parametrize("padding_side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_one_by_one(base, processor, padding_side):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    batch = make_inputs(processor, SAMPLES, padding_side=padding_side)
    batched = _real_logits(model(**batch).logits, model.prepare_inputs(**batch).model_inputs["attention_mask"])
    video = 0
    for i, sample in enumerate(SAMPLES):
        one = make_inputs(processor, [sample], seed=video)
        video += sample.count("video")
        single = model(**one).logits[0]
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_videos_in_one_sample_and_each_sample_sees_only_its_own(base, processor):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    samples = [("video", "and", "video", "same?"), ("video", "What is it?")]
    logits = model(**make_inputs(processor, samples, video_seeds=[0, 1, 2])).logits
    changed_other = model(**make_inputs(processor, samples, video_seeds=[0, 1, 7])).logits  # sample 1's video
    torch.testing.assert_close(changed_other[0], logits[0], rtol=0, atol=1e-6)
    assert (changed_other[1] - logits[1]).abs().max() > 1e-3
    changed_second = model(**make_inputs(processor, samples, video_seeds=[0, 7, 2])).logits  # sample 0's 2nd video
    assert (changed_second[0] - logits[0]).abs().max() > 1e-3


@torch.no_grad()
def test_text_only_prompt_equals_the_base_model(base, processor):
    inputs = make_inputs(processor, [("Just text here",), ("Another prompt without video",)])
    expected = base(**inputs).logits
    expected_tokens = base.generate(**inputs, max_new_tokens=5, do_sample=False)
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    assert torch.equal(model(**inputs).logits, expected)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected_tokens)


@torch.no_grad()
def test_kv_init_from_the_llm_puts_every_head_where_it_was(base):
    model = sfa.wrap(base, CONFIG)
    layers = base.model.language_model.layers
    hidden = torch.randn(2, 5, base.config.text_config.hidden_size)
    for idx in model.hybrid_layer_indices:
        attn = layers[idx].self_attn
        key, value = model.slow_branches[str(idx)].project_slow(hidden)  # [B, H_kv, S, hd]
        llm_key = attn.k_proj(hidden).view(2, 5, -1, attn.head_dim)  # the LLM's own head layout
        llm_value = attn.v_proj(hidden).view(2, 5, -1, attn.head_dim)
        assert key.shape[1] == llm_key.shape[2] == base.config.text_config.num_key_value_heads
        for head in range(key.shape[1]):
            torch.testing.assert_close(key[:, head], llm_key[:, :, head], rtol=0, atol=1e-6)
            torch.testing.assert_close(value[:, head], llm_value[:, :, head], rtol=0, atol=1e-6)
    random_init = sfa.wrap(model.unwrap(), sfa.SlowFastConfig(**{**CONFIG.to_dict(), "kv_init": "random"}))
    key, _ = random_init.slow_branches["0"].project_slow(hidden)
    assert (
        key[:, 0] - layers[0].self_attn.k_proj(hidden).view(2, 5, -1, layers[0].self_attn.head_dim)[:, :, 0]
    ).abs().max() > 1e-2


@torch.no_grad()
def test_unwrap_gives_back_the_base_model(base, processor):
    inputs = make_inputs(processor, SAMPLES)
    expected = base(**inputs).logits
    modules = dict(base.named_modules())
    state_dict = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {k: p.requires_grad for k, p in base.named_parameters()}
    model = sfa.wrap(base, CONFIG)
    assert not any(p.requires_grad for p in base.parameters())
    unwrapped = model.unwrap()
    assert unwrapped is base and dict(base.named_modules()) == modules
    after = base.state_dict()
    assert after.keys() == state_dict.keys() and all(torch.equal(after[k], v) for k, v in state_dict.items())
    assert {k: p.requires_grad for k, p in base.named_parameters()} == flags
    assert all(not m._forward_pre_hooks for m in base.modules())
    assert torch.equal(base(**inputs).logits, expected)
    with pytest.raises(RuntimeError, match="unwrapped"):
        model(**inputs)


@torch.no_grad()
def test_two_threads_never_see_each_others_video(base, processor):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    jobs = [make_inputs(processor, [("video", "What is it?")], seed=s) for s in (0, 1)]
    expected = [model(**job).logits for job in jobs]
    results, errors = {0: [], 1: []}, []

    def run(i):
        try:
            for _ in range(6):
                results[i].append(model(**jobs[i]).logits)
        except Exception as err:  # pragma: no cover - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        assert all(torch.equal(r, expected[i]) for r in results[i])


@torch.no_grad()
def test_another_models_active_call_is_ignored(tiny_dir, base, processor):
    model_a = sfa.wrap(base, CONFIG)
    model_b = sfa.wrap(AutoModelForImageTextToText.from_pretrained(tiny_dir).eval(), CONFIG)
    open_gates(model_a)
    open_gates(model_b)
    inputs = make_inputs(processor, SAMPLES[:1])
    prepared_b = model_b.prepare_inputs(**inputs)
    plain = model_b.base_model(**prepared_b.model_inputs).logits
    context_a = model_a.slow_context(model_a.prepare_inputs(**inputs))
    with state.activated(context_a):
        assert torch.equal(model_b.base_model(**prepared_b.model_inputs).logits, plain)
        assert not torch.equal(model_a.base_model(**model_a.prepare_inputs(**inputs).model_inputs).logits, plain)


@torch.no_grad()
def test_eager_and_sdpa_agree(base, processor, tiny_dir):
    eager_base = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    assert eager_base.config.text_config._attn_implementation == "eager"
    inputs = make_inputs(processor, SAMPLES)
    logits = []
    for model in (sfa.wrap(base, CONFIG), sfa.wrap(eager_base, CONFIG)):
        open_gates(model)
        mask = model.prepare_inputs(**inputs).model_inputs["attention_mask"]
        logits.append(torch.cat(_real_logits(model(**inputs).logits, mask)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image_slow_tokens", [True, False])
@torch.no_grad()
def test_images_and_videos_mix_in_one_batch(base, processor, image_slow_tokens):
    config = sfa.SlowFastConfig(**{**CONFIG.to_dict(), "image_slow_tokens": image_slow_tokens})
    model = sfa.wrap(base, config)
    open_gates(model)
    inputs = make_inputs(processor, [("image", "What is in the picture?"), ("video", "What is it?")])
    mask = model.prepare_inputs(**inputs).model_inputs["attention_mask"]
    logits = _real_logits(model(**inputs).logits, mask)
    with model.slow_path_disabled():
        fast_only = _real_logits(model(**inputs).logits, mask)
    assert (logits[1] - fast_only[1]).abs().max() > 1e-3
    image_changed = (logits[0] - fast_only[0]).abs().max() > 1e-3
    assert image_changed == image_slow_tokens
    # The image keeps its native tokens in the sequence: its sample has as many tokens as with the base.
    assert int(mask[0].sum()) == int(inputs["attention_mask"][0].sum())


@torch.no_grad()
def test_query_token_choices(base, processor):
    inputs = make_inputs(processor, [("Tell me", "video", "is it red or blue?")])
    results = {}
    for which in ("text", "text_after_first_video", "all"):
        model = sfa.wrap(base, sfa.SlowFastConfig(**{**CONFIG.to_dict(), "query_tokens": which}))
        open_gates(model)
        results[which] = model(**inputs).logits[0]
        with model.slow_path_disabled():
            fast_only = model(**inputs).logits[0]
        base = model.unwrap()
    ids = sfa.wrap(base, CONFIG).prepare_inputs(**inputs).input_ids[0]
    first_video = int((ids == base.config.video_token_id).nonzero()[0])
    before = slice(0, first_video)
    # Text before the video: queried in 'text' mode, left alone in 'text_after_first_video' mode.
    assert (results["text"][before] - fast_only[before]).abs().max() > 1e-3
    assert torch.equal(results["text_after_first_video"][before], fast_only[before])
    assert (results["all"] - results["text"]).abs().max() > 1e-3


def test_frame_counts_that_do_not_fit_give_a_clear_error(base, processor):
    model = sfa.wrap(base, CONFIG)
    inputs = make_inputs(processor, SAMPLES[:1], frames=10)
    with pytest.raises(ValueError, match=r"(10 frames|5 temporal groups) does not fit the fast-token strides"):
        model(**inputs)


def test_unsupported_model_family_lists_the_supported_ones():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(
        Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="Qwen2ForCausalLM is not a supported base model.*LlavaOnevision.*Qwen3VL"):
        sfa.wrap(llm)


@torch.no_grad()
def test_beam_search_runs_on_the_slow_path(base, processor):
    model = sfa.wrap(base, CONFIG)
    inputs = make_inputs(processor, SAMPLES[:2])
    out = model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    with model.slow_path_disabled():
        fast_only = model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(out, fast_only)  # closed gate: identical beams
    assert torch.equal(out[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    open_gates(model)
    assert model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False).shape[0] == 2


def test_gradient_checkpointing_gives_the_same_gradients(base, processor):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    inputs = make_inputs(processor, SAMPLES[:2])
    labels = inputs["input_ids"].clone()
    labels[(labels == base.config.video_token_id) | (inputs["attention_mask"] == 0)] = -100
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in base.model.language_model.layers)
        model(**inputs, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert all(g.abs().max() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@torch.no_grad()
def test_bfloat16_base(base, processor):
    model = sfa.wrap(base.to(torch.bfloat16), CONFIG)
    assert all(p.dtype == torch.bfloat16 for p in model.slow_branches.parameters())
    inputs = make_inputs(processor, SAMPLES)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    logits = model(**inputs).logits
    with model.slow_path_disabled():
        assert torch.equal(logits, model(**inputs).logits)
    open_gates(model)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_wrapping_a_wrapped_model_is_refused(base):
    model = sfa.wrap(base, CONFIG)
    with pytest.raises(TypeError, match="already a SlowFastModel"):
        sfa.wrap(model, CONFIG)
