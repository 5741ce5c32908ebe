"""Every command checks its inputs before writing anything: one line on stderr, exit status 2, nothing on disk changed.
Plus training data checked before step 1 and a finished `train` run that stays finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slowfast_adapter.cli import main
from slowfast_adapter.demo.tiny_data import write_tiny_training_data

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/tiny_cpu.yaml"


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(capsys, tmp_path: Path, argv: list[str], *expected: str) -> str:
    """`argv` exits 2 with one line naming `expected`, and nothing under `tmp_path` (the working folder) changed."""
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert tree(tmp_path) == before, argv
    return err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["adapter_steps=abc"], ["adapter_steps must be int", "'abc'"]),
        (["adapter_steps=0"], ["adapter_steps must be >= 1"]),
        (["adapter_lr=-1"], ["adapter_lr must be > 0"]),
        (["num_test=2.5"], ["num_test must be int"]),
        (["slowfast={bogus: 1}"], ["slowfast", "bogus"]),
        (["output_dir=[1]"], ["output_dir must be str"]),
    ],
)
def test_demo_wrong_values(capsys, workdir, overrides, expected):
    refused(capsys, workdir, ["demo", *overrides], *expected)
    assert not (workdir / "demo-output").exists()


def test_demo_never_replaces_a_previous_run(capsys, workdir):
    for name in ("pretrained-base", "adapter"):
        (workdir / "demo-output" / name).mkdir(parents=True)
        (workdir / "demo-output" / name / "config.json").write_text("{}")
    refused(capsys, workdir, ["demo", "adapter_steps=3"], "previous demo run", "output_dir=")
    (workdir / "a-file").write_text("")
    refused(capsys, workdir, ["demo", "output_dir=a-file"], "a-file")


def test_quickstart_wrong_values(capsys, workdir):
    recipe = workdir / "q.yaml"
    recipe.write_text("steps: abc\n")
    refused(capsys, workdir, ["quickstart", "--recipe", str(recipe)], "steps must be int", "'abc'")
    refused(capsys, workdir, ["quickstart", "--steps", "0"], "steps must be >= 1")
    refused(capsys, workdir, ["quickstart", "--num-frames", "-4"], "num_frames must be >= 1")
    recipe.write_text("slowfast: {min_fast_frame: 2}\n")
    refused(capsys, workdir, ["quickstart", "--recipe", str(recipe)], "slowfast", "min_fast_frame")
    refused(capsys, workdir, ["quickstart", "--recipe", str(workdir / "none.yaml")], "none.yaml", "does not exist")


def test_flops_wrong_inputs(capsys, workdir):
    (workdir / "empty").mkdir()
    (workdir / "bad.json").write_text("{nope")
    shipped = "qwen2-vl-7b-instruct"
    cases = [
        (["flops", str(workdir / "no/such/model")], "neither an existing folder"),
        (["flops", "not a repo id!"], "neither an existing folder"),
        (["flops", "someone/not-here"], "HF_HUB_OFFLINE"),
        (["flops", str(workdir / "empty")], "holds no config.json"),
        (["flops", shipped, "--frames", "0"], "--frames must be >= 1"),
        (["flops", shipped, "--text-tokens", "-1"], "--text-tokens must be >= 0"),
        (["flops", shipped, "--slowfast-config", str(workdir / "missing.json")], "does not exist"),
        (["flops", shipped, "--slowfast-config", str(workdir / "bad.json")], "not valid JSON"),
        (["flops", shipped, "--query-tokens", "bogus"], "bad SlowFastConfig"),
        (["flops", shipped, "--json", str(workdir / "no/dir/report.json")], "existing folder"),
    ]
    for argv, expected in cases:
        refused(capsys, workdir, argv, expected)


def test_inspect_wrong_inputs(capsys, workdir):
    (workdir / "file.txt").write_text("x")
    refused(capsys, workdir, ["inspect", str(workdir / "missing")], "does not exist")
    refused(capsys, workdir, ["inspect", str(workdir / "file.txt")], "does not exist")
    run = workdir / "run"  # a training run's output folder: the adapter is in adapter/
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    refused(capsys, workdir, ["inspect", str(run)], "training run's output folder", f"inspect {run / 'adapter'}")


# ------------------------------------------------------------------------------------------ training data
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_training_data(tmp_path_factory.mktemp("tiny-data"), num_videos=4)


def _with_missing_video(tiny_data, folder: Path) -> Path:
    records = [json.loads(line) for line in Path(tiny_data["train_file"]).read_text().splitlines()]
    records[1]["video"] = "videos/missing.mp4"
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _overrides(tiny_data, train_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_data['base']}",
        f"data.train_file={train_file}",
        f"data.media_root={Path(tiny_data['train_file']).parent}",
        f"train.output_dir={output_dir}",
        "train.gradient_accumulation_steps=1",
        "train.gradient_checkpointing=false",
        *extra,
    ]


def test_a_missing_video_is_found_before_training(capsys, workdir, tiny_data):
    train_file = _with_missing_video(tiny_data, workdir)
    argv = ["train", str(RECIPE), *_overrides(tiny_data, train_file, workdir / "out"), "data.skip_bad_videos=false"]
    refused(capsys, workdir, argv, "record 1 (id 'clip001')", "videos/missing.mp4", "does not exist")


def test_a_missing_video_is_skipped_with_a_warning_line(tmp_path, tiny_data):
    train_file = _with_missing_video(tiny_data, tmp_path)
    argv = [sys.executable, "-m", "slowfast_adapter.cli", "train", str(RECIPE)]
    argv += _overrides(tiny_data, train_file, tmp_path / "out", "train.max_steps=1", "data.skip_bad_videos=true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "videos/missing.mp4" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING") and "record 1 (id 'clip001')" in warnings[0]
    assert (tmp_path / "out" / "adapter").is_dir()


def test_a_finished_run_stays_finished_and_a_larger_max_steps_continues(capsys, tmp_path, tiny_data, request):
    request.getfixturevalue("fresh_accelerate_state")
    out = tmp_path / "out"
    args = ["train", str(RECIPE), *_overrides(tiny_data, Path(tiny_data["train_file"]), out)]
    args += ["train.save_steps=1", "train.lr_scheduler=constant", "train.warmup_steps=0"]
    assert main([*args, "train.max_steps=2"]) == 0
    before = tree(out)
    capsys.readouterr()
    assert main([*args, "train.max_steps=2"]) == 0
    assert "the run is complete" in capsys.readouterr().out
    assert tree(out) == before  # no step 3, no new checkpoint, the adapter unchanged
    assert main([*args, "train.max_steps=3"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 3
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
