"""The README's code blocks run as written (a tiny local model folder stands in for the Hub id), or are marked as not
run here with the reason (see tests/markdown_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from markdown_blocks import HUB_ID, ROOT, check_classified, code_blocks, run_bash_block, run_python_blocks

README = ROOT / "README.md"


def test_every_block_runs_or_says_why_not():
    blocks = code_blocks(README)
    check_classified(blocks)
    python = [b for b in blocks if b.lang == "python" and b.skip_reason is None]
    assert len(python) == 2 and f'model_id = "{HUB_ID}"' in python[0].code  # wrap + generate, save + load
    assert any(b.lang == "bash" and b.skip_reason is None for b in blocks)  # training
    assert "python -m pytest\n" in [b.code for b in blocks]  # the test command .ci/run runs
    assert len(README.read_text().splitlines()) <= 150


def test_the_python_blocks_run(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks(code_blocks(README), tiny_dirs("llava_onevision"))
    model, inputs = namespace["model"], namespace["inputs"]
    out = capsys.readouterr().out
    assert "trainable params" in out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    # the reloaded adapter is the saved one, frozen (PEFT's default), on the same base
    assert model.active_adapter == "default" and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(**inputs).logits.shape[0] == 1


@pytest.mark.slow
def test_the_training_block_runs(tmp_path: Path):
    (block,) = [b for b in code_blocks(README) if b.lang == "bash" and b.skip_reason is None]
    assert "slowfast-adapter train" in block.code
    run_bash_block(block, tmp_path)
    assert (tmp_path / "tiny-output" / "adapter" / "adapter_model.safetensors").is_file()
