"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, written atomically, loaded strictly."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import SlowFastConfig
from .families import family_for

if TYPE_CHECKING:
    from .model import SlowFastModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this base model, with the reason and the fix."""


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def base_identity(model: nn.Module) -> dict[str, Any]:
    family = family_for(model)
    return {
        "architecture": type(model).__name__,
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "fingerprint": family.fingerprint(model),
    }


def save_adapter(model: SlowFastModel, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "slowfast_adapter_version": __version__,
        "hybrid_layers": model.hybrid_layer_indices,
        "base_model": base_identity(model.base_model),
        "slowfast_config": model.slowfast_config.to_dict(),
    }
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: {directory} is not a slowfast-adapter folder.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt.") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"{path} has adapter format version {version!r}; this slowfast-adapter {__version__} reads version "
            f"{FORMAT_VERSION}. Install the slowfast-adapter version that wrote it "
            f"({meta.get('slowfast_adapter_version') if isinstance(meta, dict) else 'unknown'})."
        )
    for key in ("slowfast_config", "base_model"):
        if key not in meta:
            raise AdapterError(f"{path} has no '{key}' entry; the adapter folder is corrupt.")
    return meta


def load_adapter(base_model: nn.Module, directory: str | os.PathLike) -> SlowFastModel:
    from .model import SlowFastModel

    directory = Path(directory)
    meta = read_adapter_config(directory)
    expected = meta["base_model"]
    actual = base_identity(base_model)
    if expected.get("fingerprint") != actual["fingerprint"]:
        diff = {
            k: (v, actual["fingerprint"].get(k))
            for k, v in (expected.get("fingerprint") or {}).items()
            if actual["fingerprint"].get(k) != v
        }
        raise AdapterError(
            f"The adapter in {directory} was saved for another base model ({expected.get('architecture')} "
            f"'{expected.get('name_or_path')}'); this base is {actual['architecture']} "
            f"'{actual['name_or_path']}'. Differences (adapter, this base): {diff}. Load it onto the base it was "
            "trained for."
        )
    try:
        config = SlowFastConfig.from_dict(meta["slowfast_config"])
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{directory / CONFIG_NAME}: invalid slowfast_config: {err}") from err
    tensors = _load_tensors(directory)
    model = SlowFastModel(base_model, config)
    expected_state = model.adapter_state_dict()
    missing = sorted(set(expected_state) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_state))
    if missing or unexpected:
        model.unwrap()
        raise AdapterError(
            f"{directory / WEIGHTS_NAME} does not match its config: missing tensors {missing}, unexpected "
            f"tensors {unexpected}. The folder is corrupt or was edited."
        )
    wrong = {k: (tuple(v.shape), tuple(expected_state[k].shape)) for k, v in tensors.items()}
    wrong = {k: shapes for k, shapes in wrong.items() if shapes[0] != shapes[1]}
    if wrong:
        model.unwrap()
        raise AdapterError(f"{directory / WEIGHTS_NAME} has tensors of the wrong shape (file, expected): {wrong}.")
    with torch.no_grad():
        for key, target in expected_state.items():
            target.copy_(tensors[key])
    return model


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = [name for name in _PICKLE_NAMES if (directory / name).exists()]
        if pickles:
            raise AdapterError(
                f"{directory} holds {pickles} but no {WEIGHTS_NAME}: pickle files can run arbitrary code and "
                "are never loaded. Convert them to safetensors with a trusted tool first."
            )
        raise AdapterError(f"{path} does not exist: the adapter folder is incomplete.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt.") from err
