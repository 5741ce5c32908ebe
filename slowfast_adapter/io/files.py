"""Names inside an adapter folder, its error type, atomic file writes and the folder lock (shared by adapter_io
and hub).

Temporary files carry the writer's process id (`.<name>.<pid>.<random>.tmp`), so a later save can remove
what a killed one left behind without touching another live writer's files.

Every name an adapter folder's own files give (a recovery manifest's lists, checksum keys, the LoRA subfolder, a
`subfolder=` argument) goes through `inside`: relative, no `..`, and resolving (symlinks followed) inside the
folder, or an `AdapterError` before any file is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
LORA_SUBFOLDER = "lora"  # where an adapter folder keeps its LoRA part, in PEFT's format
DEFAULT_ADAPTER = "default"
STAGING_PREFIX = ".save."  # a whole-folder save in progress: `.save.<pid>.<random>.tmp/` inside the folder


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this base model, with the reason and the fix."""


def relative_name(name: object, *, what: str, where: Path) -> PurePosixPath:
    """`name` as a plain relative path (`a/b`): a string, not empty, not absolute, no `..`, no NUL or backslash.

    what/where: for the error message (which entry, in which file or folder)."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise AdapterError(f"{where}: {what} {name!r} is not a file name inside the adapter folder; refused.")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("~"):
        raise AdapterError(
            f"{where}: {what} {name!r} points outside the adapter folder (absolute or '..'); refused, nothing was "
            "touched. The folder was edited or comes from an untrusted source: save the adapter again."
        )
    return path


def inside(
    directory: Path, name: object, *, what: str, where: Path, root: Path | None = None, follow: bool = True
) -> Path:
    """`directory / name`, checked to stay inside `root` (default `directory`) once symlinks are resolved.

    follow: resolve the last component too (a file that is read); False for a name that is replaced or removed
    (a link there is replaced, not followed), where only its parent folder must resolve inside."""
    path = directory / relative_name(name, what=what, where=where)
    root = (root or directory).resolve()
    resolved = path.resolve() if follow else path.parent.resolve() / path.name
    if resolved != root and root not in resolved.parents:
        raise AdapterError(
            f"{where}: {what} {name!r} resolves to {resolved}, outside {root} (a symbolic link leads out); refused, "
            "nothing was touched. Replace the link with the file itself."
        )
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file under the current umask (mkstemp's is 0600)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def temporary_dir(parent: Path, name: str) -> tempfile.TemporaryDirectory:
    """A temporary folder in `parent` named like the temporary files (so stale ones get cleaned)."""
    return tempfile.TemporaryDirectory(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def temporary_writer(path: Path) -> int | None:
    """The process id in a temporary's name (`.<name>.<pid>.<random>.tmp`), or None if it has none."""
    parts = path.name.split(".")  # ['', name..., pid, random, 'tmp']
    pid = parts[-3] if len(parts) >= 5 else ""
    return int(pid) if pid.isdigit() else None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove temporary files and folders in `directory` left by writers that no longer run; returns them."""
    removed = []
    for path in directory.glob(".*.tmp") if directory.is_dir() else ():
        if path.name.startswith(STAGING_PREFIX):  # a whole-folder save: `adapter_io.recover` decides what to do
            continue
        pid = temporary_writer(path)
        if pid is not None and pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- lock
try:
    import fcntl
except ImportError:  # Windows: no flock; a lock per folder within this process only
    fcntl = None  # type: ignore[assignment]
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def folder_lock(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an OS lock on `directory` (`flock` on the folder itself: no lock file inside, works in read-only
    folders) while saving (exclusive) or loading (`shared`). Each call opens the folder anew, so the lock also
    excludes other threads of this process. Where `flock` does not exist, a lock per folder in this process."""
    if fcntl is None:
        with _PROCESS_LOCKS_GUARD:
            lock = _PROCESS_LOCKS.setdefault(str(directory.resolve()), threading.Lock())
        with lock:
            yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
