"""The docs site builds with no warning (`mkdocs build --strict`), and every code block in docs/ runs or is marked as
not run here with the reason (see tests/markdown_blocks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_blocks import ROOT, check_classified, code_blocks, run_bash_block, run_python_blocks

DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))


def _page_param(page: Path):
    """Pages whose runnable blocks include shell commands (a training run) are slow."""
    slow = any(b.lang == "bash" and b.skip_reason is None for b in code_blocks(page))
    return pytest.param(page, id=str(page.relative_to(DOCS)), marks=[pytest.mark.slow] if slow else [])


def test_the_site_builds_without_warnings(tmp_path: Path):
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("slowfast_adapter.wrap", "slowfast_adapter.SlowFastModel", "slowfast_adapter.SlowFastConfig"):
        assert f'id="{name}"' in reference, name  # rendered from the docstrings


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, page


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_code_blocks_run_or_say_why_not(page: Path, tiny_dirs, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    check_classified(blocks)
    monkeypatch.chdir(tmp_path)
    run_python_blocks(blocks, tiny_dirs("llava_onevision"))
    for block in blocks:
        if block.lang == "bash" and block.skip_reason is None:
            run_bash_block(block, tmp_path)
