"""User mistakes on the command line: one clear line on stderr naming what is wrong, exit status 2, no traceback."""

from __future__ import annotations

import os

import pytest

from slowfast_adapter.cli import main
from slowfast_adapter.io.files import WEIGHTS_NAME


@pytest.fixture
def recipe(tmp_path, tiny_dirs):
    """A valid tiny recipe on a real tiny base and a real (empty-but-present) train file."""
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{name_or_path: {tiny_dirs('llava_onevision')}}}\n"
        "slowfast: {min_fast_frames: 2}\n"
        "data: {train_file: train.jsonl, num_frames: 8}\n"
        f"train: {{output_dir: {tmp_path / 'out'}, max_steps: 1}}\n"
    )
    return path


def _fails(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()  # drop what fixtures printed (model-building progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.train_file=missing.jsonl", ["data.train_file", "missing.jsonl", "does not exist"]),
        ("data.train_file=", ["data.train_file", "got None"]),
        ("model.name_or_path=/no/such/folder", ["/no/such/folder", "neither an existing folder nor a Hub repo id"]),
        ("model.name_or_path=someone/not-here", ["someone/not-here", "HF_HUB_OFFLINE"]),
        ("train.max_steps=abc", ["train.max_steps", "'abc'"]),
        ("data.fps=abc", ["data.fps", "'abc'"]),
        ("slowfast.min_fast_frame=2", ["slowfast", "min_fast_frame", "min_fast_frames"]),
    ],
)
def test_train_recipe_mistakes(capsys, recipe, override, expected):
    _fails(capsys, ["train", str(recipe), override], *expected)


def test_train_recipe_file_missing_or_not_yaml(capsys, tmp_path):
    _fails(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    _fails(capsys, ["train", str(bad)], "bad.yaml", "not valid YAML")


def test_demo_and_quickstart_mistakes(capsys, tmp_path):
    _fails(capsys, ["demo", "--recipe", str(tmp_path / "demo.yaml")], "demo.yaml", "does not exist")
    _fails(capsys, ["demo", "adapter_step=3"], "adapter_step=3", "adapter_steps")
    typo = tmp_path / "typo.yaml"
    typo.write_text("adapter_step: 3\n")
    _fails(capsys, ["demo", "--recipe", str(typo)], "adapter_step", "adapter_steps")
    _fails(capsys, ["quickstart", "--recipe", str(typo)], "unknown keys ['adapter_step']")


def test_inspect_on_a_corrupt_folder(capsys, tmp_path, tiny_dirs):
    from transformers import AutoModelForImageTextToText

    import slowfast_adapter as sfa

    model = sfa.wrap(AutoModelForImageTextToText.from_pretrained(tiny_dirs("qwen2_vl")))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    _fails(capsys, ["inspect", str(tmp_path / "adapter")], WEIGHTS_NAME, "not a readable safetensors file")


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_by_default_verbose_brings_library_output_back(tiny_dirs, verbose):
    """`quiet()` (what every command runs first) hides transformers' bars and info; `--verbose` keeps them."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from slowfast_adapter.cli import quiet\n"
        f"quiet({verbose})\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"AutoModelForImageTextToText.from_pretrained({str(tiny_dirs('llava_onevision'))!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert ("Loading weights" in out.stderr) == verbose, out.stderr[-500:]
