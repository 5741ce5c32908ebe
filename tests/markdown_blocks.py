"""Code blocks of Markdown files (README.md, docs/): found, classified, and run by tests/test_readme.py and
tests/test_docs.py.

A ```python or ```bash block is run by the tests unless the line right before its fence is the marker

    <!-- not run by the tests: REASON -->

with a reason (it needs a GPU, the Hub, the network, a long run...). Blocks without a language, or in `text`, `yaml`
or `json`, are displays (diagrams, folder listings, file excerpts) and are not run. Any other language is an error:
say whether it runs. The Python blocks of one file run in order in one namespace, so a later block may use an
earlier block's names; the Hub id `HUB_ID` is replaced by a tiny local model folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
RUNNABLE = {"python", "bash"}
DISPLAYS = {"", "text", "yaml", "json"}
MARKER = re.compile(r"<!-- not run by the tests: (?P<reason>.+?) -->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None  # the marker's reason, None when the block is run

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def code_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.fullmatch(previous)
        code = "\n".join(line[len(match["indent"]) :] for line in match["code"].split("\n"))
        blocks.append(Block(path, line, match["lang"], code, marker["reason"].strip() if marker else None))
    return blocks


def check_classified(blocks: list[Block]) -> None:
    """Every block is a display, or code that runs, or code marked with a reason."""
    for block in blocks:
        assert block.lang in RUNNABLE | DISPLAYS, f"{block}: say whether a {block.lang!r} block runs (see {__name__})"
        if block.skip_reason is not None:
            assert block.lang in RUNNABLE, f"{block}: a display block needs no 'not run' marker"
            assert len(block.skip_reason) > 10, f"{block}: give the reason it is not run"


def run_python_blocks(blocks: list[Block], model_dir: Path) -> dict:
    """Exec the file's runnable Python blocks in order in one namespace (in the current directory); returns it."""
    namespace: dict = {"__name__": "__markdown__"}
    for block in blocks:
        if block.lang != "python" or block.skip_reason is not None:
            continue
        code = block.code.replace(HUB_ID, str(model_dir))
        source = "\n" * (block.line) + code  # tracebacks point at the Markdown line
        exec(compile(source, str(block.path), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def run_bash_block(block: Block, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a bash block with this interpreter's scripts first on PATH and `recipes/` taken from the repository."""
    code = re.sub(r"(?<![\w/])recipes/", f"{ROOT}/recipes/", block.code)
    env = {**os.environ, "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
