"""Hugging Face Hub: find an adapter folder (local, or downloaded with `snapshot_download`) and upload one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..version import __version__
from .files import CONFIG_NAME, LORA_SUBFOLDER, README_NAME, WEIGHTS_NAME, AdapterError, inside, relative_name

# Only the files an adapter folder needs; pickles and anything else in the repo are never downloaded.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{LORA_SUBFOLDER}/{CONFIG_NAME}", f"{LORA_SUBFOLDER}/{WEIGHTS_NAME}")


def resolve_folder(
    path_or_hub_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    subfolder: str | None = None,
) -> Path:
    """The local adapter folder for `path_or_hub_id`: the folder itself, or a Hub snapshot of its adapter files."""
    return resolve_folder_and_root(path_or_hub_id, revision=revision, token=token, subfolder=subfolder)[0]


def resolve_folder_and_root(
    path_or_hub_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    subfolder: str | None = None,
) -> tuple[Path, Path]:
    """(the adapter folder, the folder its files must resolve into).

    `subfolder` must stay inside the folder or repo (relative, no `..`, no link leading out), else `AdapterError`.
    The root is the folder itself, except for a Hub snapshot, whose files are links into the repo's cache folder
    (`models--<org>--<name>/blobs`): that folder is the root then."""
    if subfolder is not None and not isinstance(subfolder, str):
        raise AdapterError(f"subfolder must be a relative folder name (str), got {type(subfolder).__name__}.")
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {local} is a local folder: drop it.")
        if not subfolder:
            return local, local
        folder = inside(local, subfolder.rstrip("/"), what="subfolder", where=local)
        return folder, folder
    if local.exists():
        raise AdapterError(f"{local} is a file; give the adapter folder (the one holding {CONFIG_NAME}).")
    if subfolder:
        relative_name(subfolder.rstrip("/"), what="subfolder", where=Path(str(path_or_hub_id)))
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(path_or_hub_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise AdapterError(f"{repo_id} is neither an existing folder nor a Hub repo id ({err}).") from err
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=[prefix + name for name in ADAPTER_FILES],
            token=token,
            library_name="slowfast-adapter",
            library_version=__version__,
        )
    except Exception as err:  # offline, missing repo or revision, no access, ...
        raise AdapterError(
            f"{repo_id} is not a local folder, and downloading it from the Hub failed "
            f"({type(err).__name__}: {err}). Check the path, the repo id, the revision and your token."
        ) from err
    snapshot = Path(snapshot)
    # the Hub cache: <repo folder>/snapshots/<commit>/<file> -> ../../blobs/<hash>
    root = snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot
    folder = inside(snapshot, prefix.rstrip("/"), what="subfolder", where=snapshot, root=root) if prefix else snapshot
    return folder, root


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload slowfast-adapter adapter",
    create_pr: bool = False,
) -> Any:
    """Create the model repo if needed and upload every file of `folder` in one commit."""
    from huggingface_hub import HfApi

    if not (Path(folder) / CONFIG_NAME).is_file() or not (Path(folder) / README_NAME).is_file():
        raise AdapterError(f"{folder} is not a saved adapter folder; nothing was uploaded.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )
