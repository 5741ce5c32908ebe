"""Adapter folders from strangers: nothing a folder's files name may reach outside it; concurrent saves; odd tensors.

Every escape is tried through the front doors (`from_pretrained`, `load_adapter`, `slowfast-adapter inspect`, a
later save): each must refuse with an `AdapterError` (exit 2 for the CLI) and leave every file as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.cli import main
from slowfast_adapter.io.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from slowfast_adapter.io.files import LORA_SUBFOLDER

FAMILY = "llava_onevision"
CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[0], lora_r=2)
OTHER = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[1])


@pytest.fixture(scope="module")
def base_dir(tiny_dirs):
    return tiny_dirs(FAMILY)


def fresh(base_dir):
    return AutoModelForImageTextToText.from_pretrained(base_dir)


def wrapped(base_dir, config=CONFIG, seed=0):
    model = sfa.wrap(fresh(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def folder(base_dir, tmp_path):
    path = tmp_path / "adapter"
    wrapped(base_dir).save_pretrained(path)
    return path


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file and link under `root` (bytes, or a link's target): to prove nothing changed."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "dir"
    return found


def staging(folder: Path, *, files: list[str], remove: list[str], pid: int) -> Path:
    """A leftover committed staging folder of a save killed by process `pid`."""
    path = folder / f".save.{pid}.abc123.tmp"
    path.mkdir()
    (path / "COMMITTED.json").write_text(json.dumps({"files": files, "remove": remove}))
    return path


@pytest.fixture(scope="module")
def dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)  # that process has exited


def load_from_pretrained(base_dir, folder, **kwargs):
    sfa.SlowFastModel.from_pretrained(fresh(base_dir), folder, **kwargs)


def load_adapter(base_dir, folder, **kwargs):
    wrapped(base_dir, OTHER).load_adapter(folder, "received", **kwargs)


def inspect(capsys, folder, *flags):
    capsys.readouterr()
    code = main(["inspect", str(folder), *flags])
    err = capsys.readouterr().err.strip()
    return code, err


# ------------------------------------------------------------------------------------------ recovery
def _escapes(tmp_path: Path, folder: Path):
    """name -> (files, remove) of a hostile commit file; the victim files they aim at exist outside `folder`."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / "payload.sh").write_text("echo hi")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CONFIG_NAME).write_text("keep me too")
    return {
        "remove ..": ([], ["../victim.txt"]),
        "remove absolute": ([], [str(victim)]),
        "files ..": (["../payload.sh"], []),
        "remove through a link": ([], ["link/adapter_config.json"]),
    }, outside


FRONT_DOORS = ["from_pretrained", "load_adapter", "inspect", "inspect --json", "save_pretrained"]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_a_hostile_recovery_file_touches_nothing(base_dir, tmp_path, folder, dead_pid, capsys, door):
    cases, outside = _escapes(tmp_path, folder)
    (folder / "link").symlink_to(outside, target_is_directory=True)
    for name, (files, remove) in cases.items():
        stage = staging(folder, files=files, remove=remove, pid=dead_pid)
        (stage / "adapter_model.safetensors").write_bytes(b"new")
        before = snapshot(tmp_path)
        if door.startswith("inspect"):
            code, err = inspect(capsys, folder, *door.split()[1:])
            assert code == 2 and len(err.splitlines()) == 1, (name, err)
            assert "outside" in err and "refused" in err, (name, err)
        else:
            with pytest.raises(sfa.AdapterError, match="outside"):
                if door == "from_pretrained":
                    load_from_pretrained(base_dir, folder)
                elif door == "load_adapter":
                    load_adapter(base_dir, folder)
                else:
                    wrapped(base_dir).save_pretrained(folder)
        assert snapshot(tmp_path) == before, name  # the victim, the payload, the folder: all as they were
        shutil.rmtree(stage)


def test_inspect_reports_an_interrupted_save_and_changes_nothing(base_dir, folder, dead_pid, capsys):
    stage = staging(folder, files=[WEIGHTS_NAME], remove=[f"{LORA_SUBFOLDER}/{WEIGHTS_NAME}"], pid=dead_pid)
    (stage / WEIGHTS_NAME).write_bytes(b"new")
    before = snapshot(folder)
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    assert "interrupted save: .save." in capsys.readouterr().out
    assert main(["inspect", "--json", str(folder)]) == 0
    assert snapshot(folder) == before
    with pytest.raises(sfa.AdapterError, match="not a readable safetensors file"):  # a load completes it first
        load_from_pretrained(base_dir, folder, verify_checksums=False)
    assert not list(folder.glob(".save.*")) and (folder / WEIGHTS_NAME).read_bytes() == b"new"


# ------------------------------------------------------------------------------------------ config names
def test_checksum_keys_outside_the_folder_are_refused(base_dir, tmp_path, folder, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("guess me")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["checksums"]["../secret.txt"] = "0" * 64
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    for load in (load_from_pretrained, load_adapter):
        with pytest.raises(sfa.AdapterError, match=r"checksum entry '\.\./secret\.txt' points outside"):
            load(base_dir, folder)
    code, err = inspect(capsys, folder)
    assert code == 2 and "points outside" in err


@pytest.mark.parametrize("name", [WEIGHTS_NAME, LORA_SUBFOLDER])
def test_a_link_leading_out_of_the_folder_is_refused(base_dir, tmp_path, folder, capsys, name):
    elsewhere = tmp_path / "elsewhere"
    (folder / name).rename(elsewhere)
    (folder / name).symlink_to(elsewhere)
    for load in (load_from_pretrained, load_adapter):
        with pytest.raises(sfa.AdapterError, match="outside .*symbolic link leads out"):
            load(base_dir, folder, verify_checksums=False)
    code, err = inspect(capsys, folder)
    assert code == 2 and "symbolic link leads out" in err
    outside_before = snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
    if name == LORA_SUBFOLDER:  # a save would write through the link into the outside folder
        before = snapshot(tmp_path)
        with pytest.raises(sfa.AdapterError, match="symbolic link leads out"):
            wrapped(base_dir).save_pretrained(folder)
        assert snapshot(tmp_path) == before
    else:  # a save replaces the link itself with the file; the outside file stays as it was
        wrapped(base_dir).save_pretrained(folder)
        assert not (folder / name).is_symlink()
        assert elsewhere.read_bytes() == outside_before
        load_from_pretrained(base_dir, folder)


def test_a_link_that_stays_inside_loads(base_dir, folder):
    (folder / WEIGHTS_NAME).rename(folder / "real.safetensors")
    (folder / WEIGHTS_NAME).symlink_to("real.safetensors")
    load_from_pretrained(base_dir, folder)


@pytest.mark.parametrize("load", [load_from_pretrained, load_adapter])
def test_subfolder_must_stay_inside(base_dir, tmp_path, folder, load):
    other = tmp_path / "other"
    wrapped(base_dir, seed=5).save_pretrained(other)
    (folder / "inner").symlink_to(other, target_is_directory=True)
    for subfolder in ("../other", str(other), "inner", "inner/../../other"):
        with pytest.raises(sfa.AdapterError, match="subfolder"):
            load(base_dir, folder, subfolder=subfolder)
    load(base_dir, tmp_path, subfolder="other")  # a real subfolder loads


# ------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_float_tensors_are_refused(base_dir, folder, dtype):
    tensors = load_file(folder / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, folder / WEIGHTS_NAME)
    for load in (load_from_pretrained, load_adapter):
        with pytest.raises(sfa.AdapterError, match=rf"non-float tensors.*{key}.*{str(dtype).split('.')[-1]}"):
            load(base_dir, folder, verify_checksums=False)


def test_float64_tensors_are_cast(base_dir, folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    save_file({k: v.double() for k, v in tensors.items()}, folder / WEIGHTS_NAME)
    model = sfa.SlowFastModel.from_pretrained(fresh(base_dir), folder, verify_checksums=False)
    loaded = model.adapter_state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in tensors.items())


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["a\0b", "line\nbreak", "tab\there", "bell\a", "zero\u200bwidth"])
def test_adapter_names_with_control_characters_are_refused_before_writing(base_dir, tmp_path, folder, name):
    model = wrapped(base_dir)
    with pytest.raises(ValueError, match="control or invisible"):
        model.add_adapter(name, OTHER)
    with pytest.raises(ValueError, match="control or invisible"):
        model.load_adapter(folder, name)
    with pytest.raises(ValueError, match="control or invisible"):
        sfa.SlowFastModel.from_pretrained(fresh(base_dir), folder, adapter_name=name)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    model.save_pretrained(out)  # the refused names never got in: the save writes the one adapter it has
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [LORA_SUBFOLDER]
    assert {k for k in snapshot(tmp_path) if not k.startswith("out")} == set(before)


# ------------------------------------------------------------------------------------------ concurrency
def _matches(loaded: dict[str, torch.Tensor], candidates: list[dict[str, torch.Tensor]]) -> bool:
    return any(
        loaded.keys() == c.keys() and all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in c.items())
        for c in candidates
    )


def test_two_threads_saving_into_one_folder(base_dir, tmp_path):
    """2 threads x 30 rounds: both save into one folder at once, then each loads it: always one of the two."""
    models = [wrapped(base_dir, CONFIG, seed=1), wrapped(base_dir, OTHER, seed=2)]
    expected = [m.adapter_state_dict() for m in models]
    readers = [wrapped(base_dir, OTHER, seed=3), wrapped(base_dir, OTHER, seed=4)]
    barrier, errors = threading.Barrier(2), []

    def work(index: int) -> None:
        try:
            for round_ in range(30):
                folder = tmp_path / f"round-{round_}"
                barrier.wait()
                models[index].save_pretrained(folder)
                readers[index].load_adapter(folder, "check")
                if not _matches(readers[index].adapter_state_dict("check"), expected):
                    errors.append(f"round {round_}: thread {index} loaded a mix")
                readers[index].delete_adapter("check")
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(f"thread {index}: {type(err).__name__}: {err}")
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for round_ in range(30):
        folder = tmp_path / f"round-{round_}"
        assert not list(folder.glob(".*.tmp")), round_
        readers[0].load_adapter(folder, "final")
        assert _matches(readers[0].adapter_state_dict("final"), expected), round_
        readers[0].delete_adapter("final")


@pytest.mark.slow
def test_two_processes_saving_into_one_folder(base_dir, tmp_path):
    """2 processes x 100 rounds: both save into one folder per round at once (a barrier), each reads it back after
    its save; every folder, at every read and at the end, is exactly one of the two adapters."""
    import multiprocessing

    from concurrent_save_worker import work

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    procs = [context.Process(target=work, args=(str(base_dir), str(tmp_path), i, 100, barrier)) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    errors = [(tmp_path / f"errors-{index}.txt").read_text() for index in range(2)]
    assert errors == ["", ""], "\n".join(e[-1500:] for e in errors if "BrokenBarrierError" not in e) or errors
    expected = [load_file(tmp_path / f"expected-{i}.safetensors") for i in range(2)]
    for round_ in range(100):
        saved = read_adapter(tmp_path / f"round-{round_}")  # what every load reads (kept fast: no modules)
        saved.verify_checksums()
        assert _matches(saved.tensors, expected), round_
    reader = wrapped(base_dir, OTHER, seed=9)
    for round_ in (0, 99):
        reader.load_adapter(tmp_path / f"round-{round_}", f"final-{round_}")
        assert _matches(reader.adapter_state_dict(f"final-{round_}"), expected), round_
