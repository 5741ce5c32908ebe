"""Adapter folders: written atomically, loaded strictly.

One adapter folder holds
- `adapter_config.json`: format version, library version, the `SlowFastConfig`, the base model's identity
  (architecture, name, revision, a fingerprint of the shapes the adapter depends on) and what else is inside;
- `adapter_model.safetensors`: the new parameters only (`slow_branches.<layer>.<param>`, and
  `projector.<base module path>.<param>` when the projector was trained), never base weights, in the dtype they had
  in memory: fp32 after training under mixed precision (the Trainer's fp32 master weights; PEFT saves its adapters
  in fp32 too), the base's dtype for an adapter never trained so. Loading casts them to the adapter modules'
  dtype, the base's (fp32 kept for `is_trainable=True`);
- `lora/` (only with LoRA): PEFT's own `adapter_config.json` + `adapter_model.safetensors`;
- `README.md`: a model card.
Every file is written to a temporary name beside its target and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import SlowFastConfig
from ..families import family_for
from ..version import __version__
from . import model_card
from .files import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    LORA_SUBFOLDER,
    README_NAME,
    STAGING_PREFIX,
    WEIGHTS_NAME,
    AdapterError,
    atomic_write,
    atomic_write_text,
    file_mode,
    folder_lock,
    inside,
    process_alive,
    remove_stale_temporaries,
    sha256,
    temporary_dir,
    temporary_writer,
)

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["CONFIG_NAME", "DEFAULT_ADAPTER", "README_NAME", "WEIGHTS_NAME", "AdapterError", "SavedAdapter"]

FORMAT_VERSION = 2  # 2: optional lora/ subfolder and projector tensors; 1 (read too): slow branches only
READABLE_FORMAT_VERSIONS = (1, 2)
_COMMIT_NAME = "COMMITTED.json"
CHECKSUMMED = (WEIGHTS_NAME, f"{LORA_SUBFOLDER}/{WEIGHTS_NAME}", f"{LORA_SUBFOLDER}/{CONFIG_NAME}")
ADAPTER_FILES = (CONFIG_NAME, *CHECKSUMMED)
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def base_identity(model: nn.Module, projector_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Who the base is (architecture, name, Hub revision if known) and the shapes an adapter depends on."""
    config = model.config
    identity = {
        "architecture": type(model).__name__,
        "name_or_path": model_card.base_name(getattr(config, "_name_or_path", "") or ""),
        "revision": getattr(config, "_commit_hash", None),
        "fingerprint": family_for(model).base_shapes(model),
    }
    if projector_paths:  # a trained projector replaces the base's: its input and output widths must match
        shapes: dict[str, list[int] | None] = {}
        for path in projector_paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                shapes[path] = None  # this base has no such module
                continue
            # DeepSpeed ZeRO-3 partitions frozen weights too: `ds_shape` is the whole shape (a DTensor's `shape` is)
            shapes.update(
                {f"{path}.{name}": list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
            )
        identity["projector_shapes"] = shapes
    return identity


# ----------------------------------------------------------------------------------------------- save
@dataclass
class SavedLora:
    """The LoRA part of an adapter: PEFT's config, its tensors (PEFT keys) and the base model's class."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    base_class: type


@dataclass
class AdapterContents:
    """What one adapter folder holds, before it is written.

    tensors: `slow_branches.<layer>.<param>` (+ `projector.<path>.<param>`); identity: `base_identity(base)`.
    """

    tensors: dict[str, torch.Tensor]
    identity: dict[str, Any]
    config: SlowFastConfig
    hybrid_layers: list[int]
    projector_modules: list[str] | None
    lora: SavedLora | None


def write_adapter(directory: str | os.PathLike, contents: AdapterContents) -> None:
    """Write one adapter folder (see the module docstring), atomically as a whole.

    All files are written into a staging folder inside `directory`; a commit file written last inside it is the
    commit point; then the files are moved into place (`_roll_forward`). A save killed before the commit point
    leaves the old adapter; one killed after it is completed by the next reader or writer (`recover`). Either
    way the folder loads as the old adapter or the new one, never a mix. The folder's lock (`folder_lock`) is held
    from the first file of the staging folder to the last rename, so saves and loads of one folder (threads or
    processes) never interleave.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with folder_lock(directory):
        for name in (*ADAPTER_FILES, README_NAME):  # a link to elsewhere (e.g. `lora/`) is refused before writing
            inside(directory, name, what="the adapter file", where=directory, follow=False)
        _recover(directory)
        for folder in (directory, directory / LORA_SUBFOLDER):
            remove_stale_temporaries(folder)  # what killed saves left behind
        readme = directory / README_NAME
        write_card = not readme.is_file() or model_card.is_generated(readme.read_text(errors="replace"))  # a user's?
        prefix = f"{STAGING_PREFIX}t{threading.get_ident()}.{os.getpid()}."
        staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=directory))
        try:
            _write_files(staging, contents, write_card=write_card)
            files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            remove = [name for name in (f"{LORA_SUBFOLDER}/{CONFIG_NAME}", f"{LORA_SUBFOLDER}/{WEIGHTS_NAME}")
                      if name not in files]  # fmt: skip
            atomic_write_text(staging / _COMMIT_NAME, json.dumps({"files": files, "remove": remove}))  # commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _roll_forward(directory, staging, _manifest(directory, staging))


def recover(directory: str | os.PathLike) -> None:
    """Finish or undo saves into `directory` that were killed (staging folders whose writer no longer runs), under
    the folder's lock. A staging folder that names anything outside `directory` is refused before any file is
    touched."""
    directory = Path(directory)
    if directory.is_dir() and _staging_folders(directory):
        with folder_lock(directory):
            _recover(directory)


def _staging_folders(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{STAGING_PREFIX}*.tmp")) if directory.is_dir() else []


def _writer_gone(directory: Path) -> bool:
    """Whether `directory` holds a staging folder whose writer no longer runs (a save to complete or undo)."""
    return any(not _writer_running(staging) for staging in _staging_folders(directory))


def _writer_running(staging: Path) -> bool:
    """Whether the save that owns `staging` still runs: another live process, or a live thread of this one."""
    pid = temporary_writer(staging)
    if pid is None:
        return False
    if pid != os.getpid():
        return process_alive(pid)
    thread = staging.name[len(STAGING_PREFIX) :].split(".", 1)[0]  # `t<thread id>` (absent in older names)
    live = {f"t{t.ident}" for t in threading.enumerate() if t is not threading.current_thread()}
    return thread in live


def _pending(directory: Path) -> list[tuple[Path, dict[str, list[str]] | None]]:
    """Staging folders of saves whose writer is gone, each with its validated manifest (None: not committed).

    Raises AdapterError, touching nothing, if one is not a real folder or its manifest names anything outside
    `directory`."""
    pending = []
    for staging in _staging_folders(directory):
        if _writer_running(staging):
            continue  # saving right now (only a writer that does not take the lock: an older version)
        if staging.is_symlink() or not staging.is_dir():
            raise AdapterError(
                f"{staging} (an interrupted save's staging folder) is not a plain folder; refused, nothing was "
                "touched. Remove it, then load or save the adapter again."
            )
        commit = staging / _COMMIT_NAME
        pending.append((staging, _manifest(directory, staging) if commit.is_file() or commit.is_symlink() else None))
    return pending


def _manifest(directory: Path, staging: Path) -> dict[str, list[str]]:
    """A staging folder's commit file, every name checked to stay inside the staging folder and `directory`."""
    commit = inside(staging, _COMMIT_NAME, what="the commit file", where=staging, root=directory)
    try:
        manifest = json.loads(commit.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{commit} is not a readable commit file ({err}); refused, nothing was touched.") from err
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k), list) for k in ("files", "remove")):
        raise AdapterError(f"{commit} has no 'files' and 'remove' lists; refused, nothing was touched.")
    for name in manifest["files"]:
        inside(staging, name, what="'files' entry", where=commit, follow=False)
        inside(directory, name, what="'files' entry", where=commit, follow=False)
    for name in manifest["remove"]:
        inside(directory, name, what="'remove' entry", where=commit, follow=False)
    return {"files": list(manifest["files"]), "remove": list(manifest["remove"])}


def _recover(directory: Path) -> None:
    """`recover` with the folder's lock held: every pending save is validated first, then completed or dropped."""
    pending = _pending(directory)
    for staging, manifest in pending:
        try:
            if manifest is not None:
                _roll_forward(directory, staging, manifest)  # committed: complete it
            else:
                shutil.rmtree(staging)  # not committed: the old adapter stays
        except PermissionError as err:
            raise AdapterError(
                f"{directory} holds an interrupted save ({staging.name}) that cannot be completed here ({err}); "
                "make the folder writable once, or save the adapter again."
            ) from err


def _roll_forward(directory: Path, staging: Path, manifest: dict[str, list[str]]) -> None:
    """Move a committed staging folder's files into place (config last), drop the files it removes.

    `manifest` comes from `_manifest` (every name checked to stay inside)."""
    names = sorted(manifest["files"], key=lambda name: name == CONFIG_NAME)
    for name in names:
        source = staging / name
        if source.is_file() and not source.is_symlink():  # a previous roll-forward may have moved it already
            target = inside(directory, name, what="'files' entry", where=staging / _COMMIT_NAME, follow=False)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    for name in manifest["remove"]:
        inside(directory, name, what="'remove' entry", where=staging / _COMMIT_NAME, follow=False).unlink(
            missing_ok=True
        )
    lora_dir = directory / LORA_SUBFOLDER
    if lora_dir.is_dir() and not lora_dir.is_symlink() and not any(lora_dir.iterdir()):
        lora_dir.rmdir()
    shutil.rmtree(staging)


def _write_files(directory: Path, contents: AdapterContents, *, write_card: bool) -> None:
    """Every file of one adapter into an empty `directory` (the staging folder)."""
    identity, lora = contents.identity, contents.lora
    tensors = {k: v.detach().contiguous().cpu() for k, v in contents.tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    counts = {"slowfast": sum(v.numel() for k, v in tensors.items() if k.startswith("slow_branches."))}
    counts["projector"] = sum(v.numel() for k, v in tensors.items() if k.startswith("projector."))
    lora_dir = directory / LORA_SUBFOLDER
    if lora is not None:
        lora_tensors = {k: v.detach().contiguous().cpu() for k, v in lora.tensors.items()}
        counts["lora"] = sum(v.numel() for v in lora_tensors.values())
        _save_lora(lora_dir, lora.config, lora_tensors, identity, lora.base_class)
    else:
        counts["lora"] = 0
    meta = {
        "format_version": FORMAT_VERSION,
        "library_name": "slowfast-adapter",
        "slowfast_adapter_version": __version__,
        "base_model_name_or_path": identity["name_or_path"],  # PEFT's names for the base, for Hub tooling
        "revision": identity["revision"],
        "base_model": identity,
        "hybrid_layers": contents.hybrid_layers,
        "slowfast_config": contents.config.to_dict(),
        "projector_modules": contents.projector_modules,
        "lora": LORA_SUBFOLDER if lora is not None else None,
        "num_parameters": counts,
        # sha256 of every file the loader reads besides this one: altered bytes are refused by name.
        "checksums": {name: sha256(directory / name) for name in CHECKSUMMED if (directory / name).is_file()},
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if write_card:
        atomic_write_text(directory / README_NAME, model_card.render(meta))


def _save_lora(
    directory: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], identity: dict, base_cls: type
) -> None:
    """PEFT's own files, as `PeftModel.save_pretrained` writes them (config through `LoraConfig.save_pretrained`)."""
    directory.mkdir(exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = copy.deepcopy(config)
    config.base_model_name_or_path = identity["name_or_path"] or None
    config.revision = identity["revision"]
    config.inference_mode = True
    auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    with temporary_dir(directory, "lora-config") as tmp:
        config.save_pretrained(tmp, auto_mapping_dict=auto_mapping)
        os.chmod(Path(tmp) / CONFIG_NAME, file_mode())
        os.replace(Path(tmp) / CONFIG_NAME, directory / CONFIG_NAME)


# ----------------------------------------------------------------------------------------------- load
@contextlib.contextmanager
def reading(directory: Path, *, recover: bool = True) -> Iterator[None]:
    """Hold `directory`'s lock while reading it: shared (readers run together, no save runs meanwhile), or
    exclusive when an interrupted save must be completed or undone first (`recover`; `inspect` passes False and
    changes nothing)."""
    if not directory.is_dir():
        yield
        return
    while True:
        exclusive = recover and _writer_gone(directory)
        with folder_lock(directory, shared=not exclusive):
            if exclusive:
                _recover(directory)
            elif recover and _writer_gone(directory):
                continue  # a save died between the look and the lock: complete it first
            yield
            return


def read_adapter_config(directory: str | os.PathLike, *, recover: bool = True) -> dict[str, Any]:
    """The folder's validated `adapter_config.json`. With `recover` (loads), an interrupted save is completed or
    undone first; without (`inspect`), nothing on disk changes."""
    directory = Path(directory)
    with reading(directory, recover=recover):
        if not recover:
            _pending(directory)  # refuses a staging folder that names anything outside, reading only
        return _read_config(directory)


def _read_config(directory: Path, root: Path | None = None) -> dict[str, Any]:
    """The validated config; every name it gives, and every adapter file, must resolve inside `root` (default:
    `directory`; a Hub snapshot's repo cache folder, where its files link to)."""
    path = inside(directory, CONFIG_NAME, what="the config", where=directory, root=root)
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: {directory} is not a slowfast-adapter folder.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt.") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_FORMAT_VERSIONS:
        hint = (
            "It is a PEFT adapter: load it with peft.PeftModel.from_pretrained."
            if isinstance(meta, dict) and "peft_type" in meta
            else "Install the slowfast-adapter version that wrote it "
            f"({meta.get('slowfast_adapter_version') if isinstance(meta, dict) else 'unknown'})."
        )
        raise AdapterError(
            f"{path} has adapter format version {version!r}; this slowfast-adapter {__version__} reads versions "
            f"{list(READABLE_FORMAT_VERSIONS)}. {hint}"
        )
    for key in ("slowfast_config", "base_model"):
        if key not in meta:
            raise AdapterError(f"{path} has no '{key}' entry; the adapter folder is corrupt.")
    checksums = meta.get("checksums") or {}
    if not isinstance(checksums, dict):
        raise AdapterError(f"{path}: 'checksums' must map file names to sha256 digests; the folder is corrupt.")
    for name in checksums:
        inside(directory, name, what="checksum entry", where=path, root=root)
    if meta.get("lora") not in (None, False, LORA_SUBFOLDER):
        raise AdapterError(f"{path}: 'lora' is {meta['lora']!r}; an adapter keeps its LoRA in {LORA_SUBFOLDER}/.")
    for name in ADAPTER_FILES:
        inside(directory, name, what="the adapter file", where=directory, root=root)  # no link leads out
    return meta


def check_base(base_model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    """Refuse an adapter saved for a base with other shapes."""
    expected = meta["base_model"]
    actual = base_identity(base_model, tuple(meta.get("projector_modules") or ()))
    diff = {
        k: (v, actual["fingerprint"].get(k))
        for k, v in (expected.get("fingerprint") or {}).items()
        if actual["fingerprint"].get(k) != v
    }
    if expected.get("fingerprint") != actual["fingerprint"] and not diff:
        diff = {"fingerprint": (expected.get("fingerprint"), actual["fingerprint"])}
    for name, shape in (expected.get("projector_shapes") or {}).items():
        if actual.get("projector_shapes", {}).get(name) != shape:
            diff[name] = (shape, actual.get("projector_shapes", {}).get(name))
    if diff:
        raise AdapterError(
            f"The adapter in {directory} was saved for another base model ({expected.get('architecture')} "
            f"'{expected.get('name_or_path')}'); this base is {actual['architecture']} "
            f"'{actual['name_or_path']}'. Differences (adapter, this base): {diff}. Load it onto the base it was "
            "trained for."
        )


@dataclass
class SavedAdapter:
    """A validated adapter folder, read into memory (nothing applied to any model yet)."""

    directory: Path
    meta: dict[str, Any]
    config: SlowFastConfig
    tensors: dict[str, torch.Tensor]
    lora_config: LoraConfig | None = None
    lora_tensors: dict[str, torch.Tensor] | None = None
    hashes: dict[str, str | None] | None = None
    """sha256 of the bytes read (under the folder's lock), for each name in the config's checksums."""
    root: Path | None = None
    """Where the folder's files must resolve (default: the folder; a Hub snapshot's repo cache folder)."""

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    @property
    def lora_path(self) -> Path:
        return self.directory / LORA_SUBFOLDER

    def verify_checksums(self) -> None:
        """Refuse files whose bytes differ from the sha256 recorded at save time (folders saved before
        checksums existed have none to check)."""
        for name, expected in (self.meta.get("checksums") or {}).items():
            path = inside(
                self.directory, name, what="checksum entry", where=self.directory / CONFIG_NAME, root=self.root
            )
            if self.hashes is not None and name in self.hashes:
                actual = self.hashes[name]
            else:
                actual = sha256(path) if path.is_file() else None
            if actual != expected:
                state = "is missing" if actual is None else "does not match the sha256 recorded in " + CONFIG_NAME
                raise AdapterError(
                    f"{path} {state}: the file was altered or belongs to another save. Save the adapter again, or "
                    "pass verify_checksums=False to load a folder you edited on purpose."
                )


def read_adapter(directory: str | os.PathLike, *, root: str | os.PathLike | None = None) -> SavedAdapter:
    """Read and validate an adapter folder: config, format version, LoRA part and tensors, all under the folder's
    lock (one save's files, never a mix of two); the checksummed files are hashed from the bytes read."""
    directory, root = Path(directory), Path(root) if root is not None else None
    with reading(directory):
        meta = _read_config(directory, root)
        try:
            config = SlowFastConfig.from_dict(meta["slowfast_config"])
        except (TypeError, ValueError) as err:
            raise AdapterError(f"{directory / CONFIG_NAME}: invalid slowfast_config: {err}") from err
        if bool(meta.get("projector_modules")) != config.train_projector:
            raise AdapterError(f"{directory / CONFIG_NAME}: projector_modules does not match train_projector; corrupt.")
        lora_config = _read_lora_config(directory, meta)
        hashes: dict[str, str | None] = {}
        tensors = _load_tensors(directory, hashes)
        lora_tensors = _load_tensors(directory / LORA_SUBFOLDER, hashes) if lora_config is not None else None
        for name in meta.get("checksums") or {}:
            if name not in hashes:
                path = directory / name
                hashes[name] = sha256(path) if path.is_file() else None
    return SavedAdapter(directory, meta, config, tensors, lora_config, lora_tensors, hashes, root)


def _read_lora_config(directory: Path, meta: dict[str, Any]) -> LoraConfig | None:
    lora_dir = directory / LORA_SUBFOLDER
    if not meta.get("lora"):
        if (lora_dir / CONFIG_NAME).exists() or (lora_dir / WEIGHTS_NAME).exists():
            raise AdapterError(
                f"{lora_dir} holds LoRA files but {directory / CONFIG_NAME} says the adapter has no LoRA; the folder "
                "mixes two saves. Save the adapter again into an empty folder."
            )
        return None
    if meta["lora"] != LORA_SUBFOLDER or not (lora_dir / CONFIG_NAME).is_file():
        raise AdapterError(
            f"{directory / CONFIG_NAME} says the adapter has LoRA, but {lora_dir / CONFIG_NAME} is missing."
        )
    from peft import LoraConfig, PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(lora_dir))
    except Exception as err:  # PEFT raises several types for a bad config
        raise AdapterError(f"{lora_dir / CONFIG_NAME} is not a readable PEFT config ({err}).") from err
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{lora_dir / CONFIG_NAME} is a {type(config).__name__}, not a LoraConfig.")
    return config


def check_keys_and_shapes(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{path} does not match its config: missing tensors {missing}, unexpected tensors {unexpected}. The "
            "folder is corrupt or was edited."
        )
    wrong = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in tensors.items()}
    wrong = {k: shapes for k, shapes in wrong.items() if shapes[0] != shapes[1]}
    if wrong:
        raise AdapterError(
            f"{path} has tensors of the wrong shape (file, expected): {wrong}. The folder is corrupt, or was saved "
            "for a base model with other layer sizes."
        )
    not_float = {
        k: str(v.dtype).removeprefix("torch.")
        for k, v in tensors.items()
        if expected[k].is_floating_point() and not v.is_floating_point()
    }
    if not_float:
        raise AdapterError(
            f"{path} holds non-float tensors where float weights belong: {not_float}. An adapter's weights are "
            "float (float64 is cast to the adapter's dtype); the folder is corrupt or was edited. Save it again."
        )


def copy_tensors(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `targets` by key (checked beforehand with `check_keys_and_shapes`)."""
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])


def _load_tensors(directory: Path, hashes: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """The tensors of `directory/adapter_model.safetensors`, and the sha256 of the bytes read into `hashes`."""
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
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt.") from err
    name = WEIGHTS_NAME if directory.name != LORA_SUBFOLDER else f"{LORA_SUBFOLDER}/{WEIGHTS_NAME}"
    hashes[name] = hashlib.sha256(data).hexdigest()
    return tensors


# -------------------------------------------------------------------------------------------- inspect
def tensor_counts(path: Path) -> dict[str, int]:
    """Parameter count per key prefix (`slow_branches`, `projector`, ...) from the safetensors header only."""
    counts: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for size in handle.get_slice(key).get_shape():
                    numel *= size
                group = key.split(".", 1)[0]
                counts[group] = counts.get(group, 0) + numel
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt.") from err
    return counts


def inspect_summary(directory: str | os.PathLike) -> str:
    """A readable summary of an adapter folder; parameter counts come from the safetensors headers (no load).

    Only reads: an interrupted save is reported (the next load or save completes or undoes it), not completed."""
    directory = Path(directory)
    with reading(directory, recover=False):
        pending = _pending(directory) if directory.is_dir() else []
        meta = _read_config(directory)
        weights = directory / WEIGHTS_NAME
        counts = tensor_counts(weights) if weights.is_file() else {}
        lora_dir = directory / LORA_SUBFOLDER
        lora_weights, lora_config = lora_dir / WEIGHTS_NAME, lora_dir / CONFIG_NAME
        lora_count = sum(tensor_counts(lora_weights).values()) if lora_weights.is_file() else 0
        lora_meta = json.loads(lora_config.read_text()) if meta.get("lora") and lora_config.is_file() else {}
    base = meta["base_model"]
    slowfast, projector = counts.pop("slow_branches", 0), counts.pop("projector", 0)
    lines = [
        f"adapter:      {directory}",
        f"format:       version {meta['format_version']}, written by slowfast-adapter "
        f"{meta.get('slowfast_adapter_version', '?')}",
        f"base model:   {base.get('name_or_path') or '?'} ({base.get('architecture', '?')})"
        + (f" @ {base['revision']}" if base.get("revision") else ""),
        f"base shapes:  {json.dumps(base.get('fingerprint'), sort_keys=True)}",
        f"parameters:   {slowfast + projector + lora_count + sum(counts.values()):,d} "
        f"(slow-fast {slowfast:,d}, projector {projector:,d}, LoRA {lora_count:,d})",
        f"hybrid layers: {meta.get('hybrid_layers')}",
    ]
    if meta.get("lora"):
        lora_line = ", ".join(f"{k}={lora_meta.get(k)}" for k in ("r", "lora_alpha", "lora_dropout", "target_modules"))
        lines.append(f"LoRA:         {LORA_SUBFOLDER}/ (PEFT format): {lora_line}")
    else:
        lines.append("LoRA:         none")
    lines.append(f"projector:    {', '.join(meta['projector_modules']) if meta.get('projector_modules') else 'base'}")
    if counts:
        lines.append(f"other tensors: {counts}")
    for staging, manifest in pending:
        state = "committed: the next load or save completes it" if manifest else "not committed: the next load or "
        state += "" if manifest else "save removes it"
        lines.append(f"interrupted save: {staging.name} ({state})")
    lines.append("config (fields that take effect):")
    effective = SlowFastConfig.from_dict(meta["slowfast_config"]).effective_dict()
    lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(effective.items())]
    return "\n".join(lines)
