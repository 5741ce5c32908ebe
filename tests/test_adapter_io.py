"""Adapter files: exact round trip, only new parameters on disk, clear errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, open_gates
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.io.adapter_io import CONFIG_NAME, README_NAME, WEIGHTS_NAME
from slowfast_adapter.tools.tiny import TINY_BUILDERS

CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[1, 3], gate="dynamic_tanh", query_tokens="all")


@pytest.fixture
def saved(base, tmp_path):
    model = sfa.wrap(base, CONFIG)
    open_gates(model, seed=3)
    with torch.no_grad():
        for branch in model.slow_branches.values():
            branch.kv_proj.weight.add_(0.01 * torch.randn_like(branch.kv_proj.weight))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


@torch.no_grad()
def test_save_then_load_into_a_fresh_base_is_exact(saved, tiny_dir, processor):
    model, folder = saved
    inputs = make_inputs(processor, [("video", "What is it?"), ("Hi", "video", "again")])
    expected = model(**inputs).logits
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    loaded = sfa.SlowFastModel.from_pretrained(fresh, folder)
    assert loaded.slowfast_config == CONFIG
    assert torch.equal(loaded(**inputs).logits, expected)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value)


def test_the_folder_holds_only_the_new_parameters(saved, tiny_dir):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [README_NAME, CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(folder / WEIGHTS_NAME)
    assert tensors.keys() == model.adapter_state_dict().keys()
    assert all(k.startswith("slow_branches.") for k in tensors)
    adapter_bytes = (folder / WEIGHTS_NAME).stat().st_size
    base_bytes = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    assert adapter_bytes < base_bytes / 5
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["base_model"]["architecture"] == type(model.base_model).__name__
    assert meta["base_model"]["name_or_path"] == str(tiny_dir)
    assert meta["hybrid_layers"] == [1, 3]


def _edit_json(folder, change):
    meta = json.loads((folder / CONFIG_NAME).read_text())
    change(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def _edit_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


CORRUPTIONS = {
    "no-config": (lambda f: (f / CONFIG_NAME).unlink(), "adapter_config.json does not exist"),
    "bad-json": (lambda f: (f / CONFIG_NAME).write_text("{not json"), "is not valid JSON"),
    "future-format": (lambda f: _edit_json(f, lambda m: m.update(format_version=99)), "format version 99"),
    "unknown-field": (
        lambda f: _edit_json(f, lambda m: m["slowfast_config"].update(new_knob=1)),
        "incompatible version",
    ),
    "no-weights": (lambda f: (f / WEIGHTS_NAME).unlink(), "adapter_model.safetensors does not exist"),
    "pickle-only": (
        lambda f: (f / WEIGHTS_NAME).rename(f / "adapter_model.bin"),
        "pickle files can run arbitrary code",
    ),
    "truncated": (
        lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:100]),
        "not a readable safetensors file",
    ),
    "missing-tensor": (
        lambda f: _edit_tensors(f, lambda t: t.pop("slow_branches.1.attn_gate")),
        r"missing tensors \['slow_branches.1.attn_gate'\]",
    ),
    "extra-tensor": (
        lambda f: _edit_tensors(f, lambda t: t.update({"slow_branches.9.attn_gate": torch.zeros(1)})),
        r"unexpected tensors \['slow_branches.9.attn_gate'\]",
    ),
    "wrong-shape": (
        lambda f: _edit_tensors(f, lambda t: t.update({"slow_branches.1.attn_gate": torch.zeros(2)})),
        "wrong shape",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_bad_adapter_folder_gets_a_clear_error(saved, tiny_dir, name):
    _, folder = saved
    corrupt, message = CORRUPTIONS[name]
    corrupt(folder)
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(sfa.AdapterError, match=message):
        sfa.SlowFastModel.from_pretrained(fresh, folder)
    # The base model is left as it was: no hooks, original grad flags, same weights.
    assert all(not m._forward_pre_hooks for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_an_adapter_for_another_base_is_refused(saved, family):
    _, folder = saved
    other, _ = TINY_BUILDERS[family](hidden_size=32)
    with pytest.raises(sfa.AdapterError, match=r"saved for another base model.*hidden_size"):
        sfa.SlowFastModel.from_pretrained(other, folder)


def test_saving_twice_replaces_files_atomically(saved):
    model, folder = saved
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [README_NAME, CONFIG_NAME, WEIGHTS_NAME]  # no temp leftovers


@torch.no_grad()
def test_an_adapter_in_format_1_still_loads(saved, tiny_dir, processor):
    """Folders written before LoRA/projector support (format 1: no lora, projector or count entries) load."""
    model, folder = saved
    meta = json.loads((folder / CONFIG_NAME).read_text())
    v1 = {k: meta[k] for k in ("slowfast_adapter_version", "hybrid_layers", "slowfast_config")}
    v1["format_version"] = 1
    v1["base_model"] = {k: meta["base_model"][k] for k in ("architecture", "name_or_path", "fingerprint")}
    for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "train_projector"):
        v1["slowfast_config"].pop(name)
    (folder / CONFIG_NAME).write_text(json.dumps(v1))
    (folder / README_NAME).unlink()
    inputs = make_inputs(processor, [("video", "What is it?")])
    loaded = sfa.SlowFastModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), folder)
    assert torch.equal(loaded.eval()(**inputs).logits, model(**inputs).logits)
