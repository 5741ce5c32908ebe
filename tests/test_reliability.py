"""Faults and misuse around adapter folders: file modes, stale temporaries, checksums, one wrapper per base."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_inputs, open_gates
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.io.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from slowfast_adapter.io.files import LORA_SUBFOLDER

CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2, lora_r=2)


@pytest.fixture
def saved(base, tmp_path):
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_saved_files_get_the_mode_a_plain_open_gives(saved):
    _, folder = saved
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.relative_to(folder).as_posix() for p in files} >= {
        CONFIG_NAME,
        WEIGHTS_NAME,
        f"{LORA_SUBFOLDER}/{CONFIG_NAME}",
    }
    umask = os.umask(0)
    os.umask(umask)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_a_later_save_removes_what_killed_saves_left_and_spares_live_writers(saved):
    model, folder = saved
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = [
        folder / f".{WEIGHTS_NAME}.{dead_pid}.abc123.tmp",
        folder / LORA_SUBFOLDER / f".{WEIGHTS_NAME}.{dead_pid}.x.tmp",
    ]
    stale_dir = folder / LORA_SUBFOLDER / f".lora-config.{dead_pid}.y.tmp"
    live = folder / f".{WEIGHTS_NAME}.{os.getppid()}.z.tmp"  # a live process (the test runner's parent)
    for path in (*stale, live):
        path.write_bytes(b"")
    stale_dir.mkdir()
    model.save_pretrained(folder)
    assert not any(p.exists() for p in (*stale, stale_dir))
    assert live.exists()
    assert not [p for p in folder.rglob("*.tmp") if p != live]


@torch.no_grad()
def test_altered_bytes_with_a_valid_header_are_refused_by_name(saved, tiny_dir, processor):
    model, folder = saved
    weights = folder / WEIGHTS_NAME
    original = weights.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF  # a tensor byte: the header and shapes stay valid
    weights.write_bytes(bytes(data))
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    with pytest.raises(sfa.AdapterError, match=rf"{WEIGHTS_NAME} does not match the sha256.*verify_checksums=False"):
        sfa.SlowFastModel.from_pretrained(fresh, folder)
    assert not any(m._forward_pre_hooks for m in fresh.modules())  # the base is left as it was
    loaded = sfa.SlowFastModel.from_pretrained(fresh, folder, verify_checksums=False)  # edited on purpose
    inputs = make_inputs(processor, [("video", "What is it?")])
    assert loaded(**inputs).logits.isfinite().any()
    weights.write_bytes(original)
    lora_weights = folder / LORA_SUBFOLDER / WEIGHTS_NAME
    data = bytearray(lora_weights.read_bytes())
    data[-3] ^= 0xFF
    lora_weights.write_bytes(bytes(data))
    with pytest.raises(sfa.AdapterError, match=rf"{LORA_SUBFOLDER}/{WEIGHTS_NAME} does not match"):
        loaded.load_adapter(folder, "again")


@torch.no_grad()
def test_wrapping_the_same_base_twice_is_refused_and_unwrap_allows_it_again(base, processor):
    inputs = make_inputs(processor, [("video", "What is it?")])
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    expected = model(**inputs).logits
    with pytest.raises(TypeError, match="already wrapped.*add_adapter.*load_adapter.*unwrap"):
        sfa.wrap(base, CONFIG)
    assert torch.equal(model(**inputs).logits, expected)  # the first wrapper is untouched
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, model.unwrap()(**inputs).logits)
    again = sfa.wrap(base, CONFIG)  # after unwrap, the base can be wrapped again
    assert again.base_model is base


def _state(folder) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(folder / WEIGHTS_NAME)
    lora_file = folder / LORA_SUBFOLDER / WEIGHTS_NAME
    return {**tensors, **({f"lora.{k}": v for k, v in load_file(lora_file).items()} if lora_file.exists() else {})}


@pytest.mark.parametrize("family", ["llava_onevision"], indirect=True)
def test_a_save_killed_at_any_rename_leaves_the_old_or_the_new_adapter(tiny_dir, tmp_path):
    """Re-save a different adapter (no LoRA instead of LoRA) into a folder, SIGKILL the writer at its k-th
    rename for every k: the folder then loads as exactly the old or exactly the new adapter, and no temporary
    file is left after the next load."""
    import multiprocessing
    import signal

    fresh = lambda: AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()  # noqa: E731
    old_model = sfa.wrap(fresh(), CONFIG)
    open_gates(old_model)
    new_model = sfa.wrap(fresh(), sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=1))
    reference = tmp_path / "reference"
    old_model.save_pretrained(reference / "old")
    new_model.save_pretrained(reference / "new")
    old, new = _state(reference / "old"), _state(reference / "new")

    def save_and_die(folder, kill_at: int) -> None:
        calls = [0]
        real_replace = os.replace

        def replace(src, dst):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

        os.replace = replace
        new_model.save_pretrained(folder)
        os._exit(0)

    outcomes = []
    context = multiprocessing.get_context("fork")
    for kill_at in range(1, 20):
        folder = tmp_path / f"kill-{kill_at}"
        old_model.save_pretrained(folder)
        child = context.Process(target=save_and_die, args=(folder, kill_at))
        child.start()
        child.join()
        loaded = sfa.SlowFastModel.from_pretrained(fresh(), folder)  # recovers, then verifies checksums
        state = _state(folder)
        same_as = [name for name, ref in (("old", old), ("new", new)) if state.keys() == ref.keys()
                   and all(torch.equal(state[k], ref[k]) for k in ref)]  # fmt: skip
        assert len(same_as) == 1, (kill_at, sorted(state))
        assert (loaded.slowfast_config.lora_r > 0) == (same_as == ["old"])
        assert not list(folder.rglob("*.tmp")), (kill_at, list(folder.rglob("*.tmp")))
        outcomes.append(same_as[0])
        if child.exitcode == 0:  # the save finished before its k-th rename: every later k does too
            break
    assert "old" in outcomes and outcomes[-1] == "new", outcomes
