"""LoRA (real PEFT) and a trained projector: round trips, PEFT readability, hooks, base restored exactly."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import make_inputs, open_gates
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.config import LORA_DEFAULT_TARGETS
from slowfast_adapter.families import family_for
from slowfast_adapter.io.adapter_io import CONFIG_NAME, WEIGHTS_NAME

BASE = dict(min_fast_frames=2, hybrid_layers=[1, 3])
VARIANTS = {
    "slowfast": sfa.SlowFastConfig(**BASE),
    "lora": sfa.SlowFastConfig(**BASE, lora_r=4, lora_alpha=8),
    "lora+projector": sfa.SlowFastConfig(**BASE, lora_r=4, train_projector=True),
    "projector": sfa.SlowFastConfig(**BASE, train_projector=True),
}
SAMPLES = [("video", "What is it?"), ("Hi", "video", "again")]


def perturb(model, seed: int = 0) -> None:
    """Make every trainable parameter (gates, LoRA B included) clearly non-trivial."""
    open_gates(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def fresh(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


def hooks(model) -> dict[str, tuple]:
    """How many forward hooks and pre-hooks each module has (transformers installs some on the first call)."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def lora_paths(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_round_trip_is_exact(base, tiny_dir, processor, tmp_path, variant):
    config = VARIANTS[variant]
    model = sfa.wrap(base, config)
    perturb(model)
    inputs = make_inputs(processor, SAMPLES)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "lora").is_dir() == bool(config.lora_r)
    loaded = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), tmp_path)
    assert loaded.slowfast_config == config
    assert torch.equal(loaded(**inputs).logits, expected)
    pairs = [
        (model.adapter_state_dict(), loaded.adapter_state_dict()),
        (model.lora_state_dict(), loaded.lora_state_dict()),
    ]
    for mine, theirs in pairs:
        assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert any(k.startswith("projector.") for k in loaded.adapter_state_dict()) == config.train_projector
    # PEFT's rule: a loaded adapter is frozen unless is_trainable=True.
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_default_lora_targets_only_the_language_model(base):
    model = sfa.wrap(base, VARIANTS["lora"])
    paths = lora_paths(base)
    assert paths and all(p.startswith("model.language_model.layers.") for p in paths)
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(LORA_DEFAULT_TARGETS)
    assert len(paths) == len(LORA_DEFAULT_TARGETS) * base.config.text_config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("slowfast_adapters.default.slow_branches.") for n in trainable)
    assert any("lora_" in n for n in trainable)


def test_a_peft_lora_config_is_restricted_to_the_language_model_unless_a_regex(base, family):
    # SigLIP has q_proj too: names are looked up only inside the decoder layers.
    sfa.wrap(base, sfa.SlowFastConfig(**BASE), lora_config=LoraConfig(r=2, target_modules=["q_proj"])).unwrap()
    model = sfa.wrap(base, sfa.SlowFastConfig(**BASE), lora_config=LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora_paths(base) == [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(4)]
    base = model.unwrap()
    if family == "llava_onevision":  # a regex is used as given, even outside the language model
        model = sfa.wrap(base, lora_config=LoraConfig(r=2, target_modules=r"model\.vision_tower.*\.q_proj"))
        assert lora_paths(base) == [f"model.vision_tower.encoder.layers.{i}.self_attn.q_proj" for i in range(2)]
        base = model.unwrap()
    with pytest.raises(ValueError, match="not both"):
        sfa.wrap(base, sfa.SlowFastConfig(lora_r=2), lora_config=LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"\['qkv'\] do not exist"):
        sfa.wrap(base, sfa.SlowFastConfig(lora_r=2, lora_target_modules=["qkv"]))
    assert not lora_paths(base) and all(not m._forward_pre_hooks for m in base.modules())


@torch.no_grad()
def test_lora_part_is_readable_by_peft_itself(base, tiny_dir, tmp_path):
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    perturb(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(fresh(tiny_dir), tmp_path / "lora")
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    expected = model.lora_state_dict()  # PEFT's file keys: base_model.model.<path>.lora_A.weight
    assert len(loaded) == len(expected) > 0
    for key, value in expected.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


@torch.no_grad()
def test_the_slow_update_passes_through_the_lora_o_proj(base, processor):
    model = sfa.wrap(base, VARIANTS["lora"])
    perturb(model)
    o_proj = base.model.language_model.layers[1].self_attn.o_proj
    assert isinstance(o_proj, LoraLayer) and o_proj._forward_pre_hooks and not o_proj.base_layer._forward_pre_hooks
    seen = {}
    handles = [
        o_proj.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("base", a[0])),
        o_proj.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.__setitem__("lora", a[0])),
    ]
    inputs = make_inputs(processor, SAMPLES[:1])
    model(**inputs)
    with_slow = dict(seen)
    with model.slow_path_disabled():
        model(**inputs)
    for handle in handles:
        handle.remove()
    # The LoRA branch and the base branch of o_proj both get the gated slow update (added before o_proj).
    assert torch.equal(with_slow["base"], with_slow["lora"])
    assert (with_slow["lora"] - seen["lora"]).abs().max() > 1e-3


def _projector(base):
    return base.get_submodule(family_for(base).projector_modules[0])


@torch.no_grad()
def test_disable_adapter_is_the_base_bit_for_bit_and_fast_only_keeps_lora(base, processor):
    inputs = make_inputs(processor, SAMPLES[:1])
    expected = base(**inputs).logits
    expected_tokens = base.generate(**inputs, max_new_tokens=3, do_sample=False)
    base_projector = {k: v.clone() for k, v in _projector(base).state_dict().items()}
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    perturb(model)
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, expected)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected_tokens)
    projector = _projector(base).state_dict()
    assert all(torch.equal(projector[k], v) for k, v in base_projector.items())  # the base's never changes
    with model.slow_path_disabled():
        fast_only = model(**inputs).logits
        for layer in lora_paths(base):
            base.get_submodule(layer).lora_B["default"].weight.zero_()
        assert not torch.equal(model(**inputs).logits, fast_only)  # LoRA was on in fast-only mode


@torch.no_grad()
def test_unwrap_gives_back_the_exact_base_after_lora_and_projector(base, processor):
    inputs = make_inputs(processor, SAMPLES)
    expected = base(**inputs).logits
    modules, hooks_before = dict(base.named_modules()), hooks(base)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    perturb(model)
    assert model.unwrap() is base
    assert dict(base.named_modules()) == modules and not hasattr(base, "peft_config")
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in base.parameters())
    assert hooks(base) == hooks_before
    assert torch.equal(base(**inputs).logits, expected)


def test_training_moves_branches_lora_and_projector_only(base, processor):
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    open_gates(model)
    inputs = make_inputs(processor, SAMPLES[:1])
    labels = inputs["input_ids"].clone()
    labels[(labels == base.config.video_token_id) | (inputs["attention_mask"] == 0)] = -100
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # LoRA B starts at zero: A moves from the second step on
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    for group in ("lora_A", "lora_B", ".slow_branches.", ".projectors."):
        assert any(group in name for name in changed), group


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "lora" / CONFIG_NAME).unlink(), "says the adapter has LoRA, but"),
        (lambda f: (f / "lora" / WEIGHTS_NAME).rename(f / "lora" / "adapter_model.bin"), "pickle files"),
        (lambda f: _edit_lora(f, lambda t: t.pop(sorted(t)[0])), "missing tensors"),
        (lambda f: _edit_lora(f, lambda t: t.update(extra=torch.zeros(1))), r"unexpected tensors \['extra'\]"),
        (lambda f: _edit_lora(f, lambda t: t.update({k: torch.zeros(3, 3) for k in sorted(t)[:1]})), "wrong shape"),
        (lambda f: _edit_meta(f, lambda m: m.update(lora=None)), "holds LoRA files but"),
        (
            lambda f: _edit_meta(f, lambda m: m["base_model"]["projector_shapes"].update({"x.weight": [1]})),
            "saved for another base model",
        ),
        (lambda f: _edit_meta(f, lambda m: m.update(projector_modules=None)), "projector_modules does not match"),
        (lambda f: _edit_weights(f, lambda t: [t.pop(k) for k in list(t) if "projector" in k]), "missing tensors"),
    ],
    ids=[
        "no-lora-config",
        "lora-pickle",
        "lora-missing",
        "lora-extra",
        "lora-shape",
        "stray-lora",
        "projector-base",
        "projector-flag",
        "projector-missing",
    ],  # fmt: skip
)
def test_bad_lora_or_projector_files_get_clear_errors(base, tiny_dir, tmp_path, corrupt, message):
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    model.save_pretrained(tmp_path)
    corrupt(tmp_path)
    other = fresh(tiny_dir)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    modules, hooks_before = dict(other.named_modules()), hooks(other)
    with pytest.raises(sfa.AdapterError, match=message):
        sfa.SlowFastModel.from_pretrained(other, tmp_path)
    assert dict(other.named_modules()) == modules and not hasattr(other, "peft_config")
    assert hooks(other) == hooks_before
    assert all(p.requires_grad for p in other.parameters())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def _edit_lora(folder, change):
    tensors = load_file(folder / "lora" / WEIGHTS_NAME)
    change(tensors)
    from safetensors.torch import save_file

    save_file(tensors, folder / "lora" / WEIGHTS_NAME)


def _edit_weights(folder, change):
    from safetensors.torch import save_file

    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def _edit_meta(folder, change):
    meta = json.loads((folder / CONFIG_NAME).read_text())
    change(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_resaving_without_lora_removes_the_stale_lora_files(base, tiny_dir, tmp_path):
    model = sfa.wrap(base, VARIANTS["lora"])
    model.save_pretrained(tmp_path)
    plain = sfa.wrap(model.unwrap(), VARIANTS["slowfast"])
    plain.save_pretrained(tmp_path)
    assert not (tmp_path / "lora").exists()
    assert not lora_paths(sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), tmp_path).base_model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_r": -1}, "lora_r must be >= 0"),
        ({"lora_r": 4, "lora_alpha": 0}, "lora_alpha must be a positive number"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_target_modules": ["q_proj"]}, "lora_r is 0"),
        ({"lora_r": 4, "lora_target_modules": []}, "non-empty list"),
        ({"train_projector": 1}, "train_projector must be True or False"),
    ],
)
def test_invalid_lora_and_projector_settings_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sfa.SlowFastConfig(**kwargs)


@torch.no_grad()
def test_disable_adapter_with_lora_is_per_thread(base, processor):
    model = sfa.wrap(base, VARIANTS["lora+projector"])
    perturb(model)
    inputs = make_inputs(processor, SAMPLES[:1])
    with model.disable_adapter():
        expected = {"base": model(**inputs).logits}
    expected["adapter"] = model(**inputs).logits
    results, errors = {"base": [], "adapter": []}, []

    def run(mode):
        try:
            for _ in range(4):
                if mode == "base":
                    with model.disable_adapter():
                        results[mode].append(model(**inputs).logits)
                else:
                    results[mode].append(model(**inputs).logits)
        except Exception as err:  # pragma: no cover - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(mode,)) for mode in ("base", "adapter")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for mode, logits in results.items():
        assert len(logits) == 4 and all(torch.equal(x, expected[mode]) for x in logits), mode


def test_gradient_checkpointing_gives_the_same_lora_gradients(base, processor):
    model = sfa.wrap(base, VARIANTS["lora"])
    perturb(model)
    inputs = make_inputs(processor, SAMPLES[:1])
    labels = inputs["input_ids"].clone()
    labels[labels == base.config.video_token_id] = -100
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert any("lora_A" in n and g.abs().max() > 0 for n, g in grads[0].items())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
