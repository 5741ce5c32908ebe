"""Names inside an adapter folder, its error type, and atomic file writes (shared by adapter_io and hub)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
LORA_SUBFOLDER = "lora"  # where an adapter folder keeps its LoRA part, in PEFT's format
DEFAULT_ADAPTER = "default"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this base model, with the reason and the fix."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
