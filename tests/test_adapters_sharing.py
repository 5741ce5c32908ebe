"""Sharing adapters: several on one base, the Hub (no network: exact huggingface_hub calls), the model card,
`slowfast-adapter inspect`, a fresh process loading a folder, and no base weights on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_inputs
from safetensors import safe_open
from safetensors.torch import load_file
from test_adapters_lora import BASE, SAMPLES, fresh, hooks, lora_paths, perturb
from transformers import AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.cli import main as cli
from slowfast_adapter.families import family_by_name
from slowfast_adapter.io.adapter_io import CONFIG_NAME, README_NAME, WEIGHTS_NAME
from slowfast_adapter.io.hub import ADAPTER_FILES
from slowfast_adapter.io.model_card import MARKER

CONFIG_A = sfa.SlowFastConfig(**BASE, lora_r=4, train_projector=True)
CONFIG_B = sfa.SlowFastConfig(min_fast_frames=4, hybrid_layers=[0], gate="static_tanh")  # other layers and pooling


@pytest.fixture(scope="module")
def two_adapters(tiny_dir, tmp_path_factory):
    """Two adapter folders trained (perturbed) separately, and each one's logits on SAMPLES (built once: tests
    that change a folder work on a copy)."""
    tmp_path = tmp_path_factory.mktemp("two-adapters")
    inputs = make_inputs(AutoProcessor.from_pretrained(tiny_dir), SAMPLES)
    logits = {}
    for name, config, seed in (("a", CONFIG_A, 1), ("b", CONFIG_B, 2)):
        model = sfa.wrap(fresh(tiny_dir), config)
        perturb(model, seed=seed)
        with torch.no_grad():
            logits[name] = model(**inputs).logits
        model.save_pretrained(tmp_path / name)
    return tmp_path / "a", tmp_path / "b", inputs, logits


@torch.no_grad()
def test_two_adapters_on_one_base_switch_with_set_adapter(two_adapters, tiny_dir):
    folder_a, folder_b, inputs, logits = two_adapters
    base = fresh(tiny_dir)
    expected_base = base(**inputs).logits
    model = sfa.SlowFastModel.from_pretrained(base, folder_a)
    model.load_adapter(folder_b, adapter_name="b")
    assert model.active_adapter == "default" and list(model.slowfast_adapters) == ["default", "b"]
    assert torch.equal(model(**inputs).logits, logits["a"])
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.hybrid_layer_indices == [0]
    assert torch.equal(model(**inputs).logits, logits["b"])  # no LoRA, no projector, other layers and pooling
    model.set_adapter("default")
    assert torch.equal(model(**inputs).logits, logits["a"])
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, expected_base)
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match="exists already"):
        model.load_adapter(folder_b, adapter_name="b")
    with pytest.raises(ValueError, match="is the active adapter"):
        model.delete_adapter("default")
    model.set_adapter("b")
    model.delete_adapter("default")  # its LoRA layers go: b has none
    assert not lora_paths(base) and torch.equal(model(**inputs).logits, logits["b"])


def test_only_the_active_adapter_trains(tiny_dir):
    model = sfa.wrap(fresh(tiny_dir), CONFIG_A)
    model.add_adapter("b", CONFIG_B)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n and ".default." in n or n.startswith("slowfast_adapters.default.") for n in trainable
    )
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("slowfast_adapters.b.") for n in trainable)


@torch.no_grad()
def test_a_failed_load_adapter_changes_nothing(two_adapters, tiny_dir, tmp_path):
    folder_a, folder_b, inputs, logits = two_adapters
    folder_b = Path(shutil.copytree(folder_b, tmp_path / "b"))
    (folder_b / WEIGHTS_NAME).write_bytes(b"not safetensors")
    model = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), folder_a)
    before = hooks(model.base_model)
    with pytest.raises(sfa.AdapterError, match="not a readable safetensors file"):
        model.load_adapter(folder_b, adapter_name="b")
    shutil.copy(folder_a / "lora" / WEIGHTS_NAME, folder_b / WEIGHTS_NAME)  # readable, wrong tensors
    with pytest.raises(sfa.AdapterError, match="missing tensors"):
        model.load_adapter(folder_b, adapter_name="b")
    assert list(model.slowfast_adapters) == ["default"] and hooks(model.base_model) == before
    assert torch.equal(model(**inputs).logits, logits["a"])


def test_save_pretrained_lays_out_several_adapters_like_peft(two_adapters, tiny_dir, tmp_path):
    folder_a, folder_b, inputs, logits = two_adapters
    model = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), folder_a)
    model.load_adapter(folder_b, adapter_name="b")
    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / CONFIG_NAME).is_file() and (tmp_path / "both" / "b" / CONFIG_NAME).is_file()
    again = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), tmp_path / "both", subfolder="b")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits["b"])
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("lora")


def test_the_folder_holds_no_base_weights(two_adapters, tiny_dir):
    folder_a, *_ = two_adapters
    files = [p for p in folder_a.rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(folder_a)) for p in files) == sorted([*ADAPTER_FILES, README_NAME])
    base_bytes = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    adapter_bytes = sum(p.stat().st_size for p in files)
    assert adapter_bytes < base_bytes / 4
    base_keys = set(load_file(tiny_dir / "model.safetensors"))
    for path in (folder_a / WEIGHTS_NAME, folder_a / "lora" / WEIGHTS_NAME):
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            numel = sum(torch.Size(handle.get_slice(k).get_shape()).numel() for k in keys)
        # Every byte is explained by the adapter's own tensors (float32) plus a small header.
        assert path.stat().st_size <= 4 * numel + 16_384
        assert not set(keys) & base_keys
        assert all(k.startswith(("slow_branches.", "projector.", "base_model.model.")) for k in keys)
    meta = json.loads((folder_a / CONFIG_NAME).read_text())
    assert meta["num_parameters"]["projector"] > 0 and meta["num_parameters"]["lora"] > 0


def test_model_card_and_base_revision(base, tmp_path):
    base.config._name_or_path = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    base.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    model = sfa.wrap(base, CONFIG_A)
    model.save_pretrained(tmp_path)
    card = (tmp_path / README_NAME).read_text()
    front = card.split("---")[1]
    assert (
        "library_name: slowfast-adapter" in front and "base_model: llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in front
    )
    assert "- slowfast-adapter" in front and "- lora" in front
    trainable = model.get_nb_trainable_parameters()[0]
    assert f"**Trainable parameters:** {trainable:,d}" in card and "SlowFastModel.from_pretrained(base" in card
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["base_model"]["revision"] == base.config._commit_hash == meta["revision"]
    lora_meta = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert lora_meta["base_model_name_or_path"] == base.config._name_or_path
    assert lora_meta["revision"] == base.config._commit_hash
    # A card the user edited (generation marker removed) is never overwritten.
    (tmp_path / README_NAME).write_text(card.replace(MARKER, "My own notes."))
    model.save_pretrained(tmp_path)
    assert "My own notes." in (tmp_path / README_NAME).read_text()


def test_inspect_prints_a_readable_summary(two_adapters, capsys):
    folder_a, *_ = two_adapters
    meta = json.loads((folder_a / CONFIG_NAME).read_text())
    assert cli(["inspect", str(folder_a)]) == 0
    out = capsys.readouterr().out
    counts = meta["num_parameters"]
    assert f"parameters:   {sum(counts.values()):,d} " in out
    assert f"slow-fast {counts['slowfast']:,d}, projector {counts['projector']:,d}, LoRA {counts['lora']:,d}" in out
    base = meta["base_model"]
    assert f"base model:   {base['name_or_path']} ({base['architecture']})" in out
    projector = family_by_name(base["fingerprint"]["family"]).projector_modules[0]
    assert "LoRA:         lora/ (PEFT format): r=4" in out and f"projector:    {projector}" in out
    assert cli(["inspect", str(folder_a / "nothing")]) == 2  # user mistakes exit with status 2
    assert "is not a slowfast-adapter folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- Hub
@torch.no_grad()
def test_from_pretrained_downloads_only_adapter_files_from_the_hub(two_adapters, tiny_dir, tmp_path, monkeypatch):
    folder_a, _, inputs, logits = two_adapters
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        snapshot = tmp_path / "snapshot"
        shutil.copytree(folder_a, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), "someone/video-adapter", revision="v1", token="t")
    assert torch.equal(model(**inputs).logits, logits["a"])
    assert calls == [
        {
            "repo_id": "someone/video-adapter",
            "revision": "v1",
            "allow_patterns": list(ADAPTER_FILES),
            "token": "t",
            "library_name": "slowfast-adapter",
            "library_version": sfa.__version__,
        }
    ]


def test_hub_and_path_errors_are_clear(tiny_dir, tmp_path, monkeypatch):
    base = fresh(tiny_dir)
    # Offline (conftest sets HF_HUB_OFFLINE=1): the real snapshot_download fails, with a clear message.
    with pytest.raises(sfa.AdapterError, match="not a local folder, and downloading it from the Hub failed"):
        sfa.SlowFastModel.from_pretrained(base, "someone/not-cached")
    with pytest.raises(sfa.AdapterError, match="neither an existing folder nor a Hub repo id"):
        sfa.SlowFastModel.from_pretrained(base, str(tmp_path / "missing" / "deeper" / "folder"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(sfa.AdapterError, match="is a file"):
        sfa.SlowFastModel.from_pretrained(base, tmp_path / "file.txt")
    with pytest.raises(ValueError, match="applies to Hub repos"):
        sfa.SlowFastModel.from_pretrained(base, tmp_path, revision="main")
    assert all(p.requires_grad for p in base.parameters()) and not any(m._forward_pre_hooks for m in base.modules())


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tiny_dir, monkeypatch):
    model = sfa.wrap(fresh(tiny_dir), CONFIG_A)
    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            uploaded = None
            if name == "upload_folder":  # the temporary folder exists only during the call: look at it now
                folder = Path(kwargs["folder_path"])
                uploaded = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls.append((name, args, kwargs, uploaded, self.token))
            return f"{name}-result"

        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    result = model.push_to_hub("me/my-adapter", private=True, token="hf_x", revision="exp")
    assert result == "upload_folder-result"
    (create, c_args, c_kwargs, _, token), branch, (upload, _, u_kwargs, uploaded, _) = calls
    assert (create, c_args, c_kwargs, token) == (
        "create_repo", ("me/my-adapter",), {"private": True, "exist_ok": True, "repo_type": "model"}, "hf_x",
    )  # fmt: skip
    assert branch[0] == "create_branch" and branch[2] == {"branch": "exp", "exist_ok": True, "repo_type": "model"}
    assert upload == "upload_folder" and uploaded == sorted([*ADAPTER_FILES, README_NAME])
    assert {k: v for k, v in u_kwargs.items() if k != "folder_path"} == {
        "repo_id": "me/my-adapter", "repo_type": "model", "revision": "exp",
        "commit_message": "Upload slowfast-adapter adapter", "create_pr": False,
    }  # fmt: skip
    assert not Path(u_kwargs["folder_path"]).exists()  # the temporary folder is cleaned up


# -------------------------------------------------------------------------------------- fresh process
LOAD_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
import slowfast_adapter as sfa
from slowfast_adapter.tools.tiny import random_video

torch.set_num_threads(2)  # as in the test process (conftest), so the float reductions are the same
tiny_dir, adapter_dir, out = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(tiny_dir)
processor.tokenizer.padding_side = "left"
model = sfa.SlowFastModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir).eval(), adapter_dir)
conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is it?"}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(text=[prompt], videos=[random_video(8, seed=0)], return_tensors="pt")
with torch.no_grad():
    save_file({"logits": model(**inputs).logits.contiguous()}, out)
"""


@torch.no_grad()
def test_a_fresh_python_process_loads_the_folder(two_adapters, tiny_dir, processor, tmp_path):
    folder_a, *_ = two_adapters
    model = sfa.SlowFastModel.from_pretrained(fresh(tiny_dir), folder_a)
    expected = model(**make_inputs(processor, [SAMPLES[0]])).logits
    env = {**os.environ, "PYTHONPATH": str(Path(sfa.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LOAD_SCRIPT, str(tiny_dir), str(folder_a), str(tmp_path / "logits.safetensors")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], expected)
