"""Hugging Face Hub: find an adapter folder (local, or downloaded with `snapshot_download`) and upload one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import CONFIG_NAME, LORA_SUBFOLDER, README_NAME, WEIGHTS_NAME, AdapterError
from .version import __version__

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
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {local} is a local folder: drop it.")
        return local / subfolder if subfolder else local
    if local.exists():
        raise AdapterError(f"{local} is a file; give the adapter folder (the one holding {CONFIG_NAME}).")
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
    return Path(snapshot) / prefix if prefix else Path(snapshot)


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
