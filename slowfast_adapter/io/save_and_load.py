"""Save, load and push a `SlowFastModel`'s adapters (the folder format itself is `adapter_io.py`).

Functions of a wrapped model, as PEFT's `save_and_load`: the wrapper's `save_pretrained`, `push_to_hub`,
`from_pretrained` and `load_adapter` are thin calls of these.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from ..core import lora
from . import adapter_io, hub
from .files import DEFAULT_ADAPTER, AdapterError

if TYPE_CHECKING:
    from peft import LoraConfig

Wrapped = TypeVar("Wrapped")


def save_adapters(model: nn.Module, save_directory: str | os.PathLike, selected_adapters: list[str] | None) -> None:
    """`SlowFastModel.save_pretrained`: each adapter of `model` (a `SlowFastModel`) to its folder."""
    names = list(model.slowfast_adapters) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.slowfast_adapters]
    if unknown or not names:
        loaded = list(model.slowfast_adapters)
        raise ValueError(f"Cannot save adapters {unknown or names}: loaded adapters are {loaded}.")
    for name in names:
        folder = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
        adapter = model.slowfast_adapters[name]
        projectors = list(model.family.projector_modules) if adapter.projectors is not None else None
        saved_lora = None
        if name in model.lora_configs:
            lora_tensors = model.lora_state_dict(name)
            saved_lora = adapter_io.SavedLora(model.lora_configs[name], lora_tensors, type(model.base_model))
        contents = adapter_io.AdapterContents(
            tensors=model.adapter_state_dict(name),
            identity=adapter_io.base_identity(model.base_model, tuple(projectors or ())),
            config=model.slowfast_configs[name],
            hybrid_layers=adapter.hybrid_layer_indices,
            projector_modules=projectors,
            lora=saved_lora,
        )
        adapter_io.write_adapter(folder, contents)


def push_adapters(model: nn.Module, repo_id: str, selected_adapters: list[str] | None, **hub_kwargs: Any) -> Any:
    """`SlowFastModel.push_to_hub`: save to a temporary folder and upload it (`hub_kwargs` for `hub.push_folder`)."""
    with tempfile.TemporaryDirectory(prefix="slowfast-adapter-push-") as tmp:
        model.save_pretrained(tmp, selected_adapters)
        return hub.push_folder(tmp, repo_id, **hub_kwargs)


def read_for(base_model: nn.Module, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> adapter_io.SavedAdapter:
    """Read a saved adapter (local folder or Hub repo; `hub_kwargs` for `hub.resolve_folder`) and check it fits
    `base_model`; nothing changes yet."""
    directory, root = hub.resolve_folder_and_root(path_or_hub_id, **hub_kwargs)
    saved = adapter_io.read_adapter(directory, root=root)
    adapter_io.check_base(base_model, saved.meta, directory)
    return saved


@contextmanager
def must_fit(saved: adapter_io.SavedAdapter) -> Iterator[None]:
    """While adding a saved adapter's modules, a `ValueError` (e.g. LoRA targets this base lacks) is an AdapterError."""
    try:
        yield
    except ValueError as err:
        raise AdapterError(f"The adapter in {saved.directory} does not fit this base model: {err}") from err


def explicit_lora(saved: adapter_io.SavedAdapter) -> LoraConfig | None:
    """The saved `LoraConfig` when it was given explicitly at wrap time; with `lora_r` > 0 the config's own
    `lora_*` fields rebuild it (and `load_tensors` checks that they rebuilt the saved one)."""
    return saved.lora_config if not saved.config.lora_r else None


def load_tensors(
    model: nn.Module, adapter_name: str, saved: adapter_io.SavedAdapter, *, verify_checksums: bool, keep_precision: bool
) -> None:
    """Copy a saved adapter's tensors into the (new) adapter `adapter_name` of `model`, checking keys and shapes,
    then (with `verify_checksums`) the files' sha256 against those recorded at save time.

    The adapter's modules have the base's dtype (`wrap`), and the saved tensors are cast to it: an fp32 adapter
    (trained under mixed precision) runs in bf16 on a bf16 base. With `keep_precision` (loading to train on)
    the slow branches and projector copy are first made fp32 where the file holds fp32 tensors, so training
    continues from the saved weights exactly rather than from their bf16 rounding (LoRA is loaded by PEFT, in
    its layers' dtype)."""
    if saved.lora_config is not None:  # LoRA rebuilt from the config's lora_* fields must be the saved one
        built = model.lora_configs.get(adapter_name)
        fields = ("r", "lora_alpha", "lora_dropout", "target_modules")
        if built is None or any(getattr(built, f) != getattr(saved.lora_config, f) for f in fields):
            raise AdapterError(
                f"{saved.lora_path / adapter_io.CONFIG_NAME} does not match the LoRA that "
                f"{saved.directory / adapter_io.CONFIG_NAME}'s slowfast_config gives on this base; the folder "
                "mixes two saves or was edited."
            )
    adapter_io.check_keys_and_shapes(model.adapter_state_dict(adapter_name), saved.tensors, saved.weights_path)
    if saved.lora_tensors is not None:
        adapter_io.check_keys_and_shapes(model.lora_state_dict(adapter_name), saved.lora_tensors, saved.lora_path)
    if verify_checksums:
        saved.verify_checksums()
    if keep_precision and any(t.dtype == torch.float32 for t in saved.tensors.values()):
        for param in model.slowfast_adapters[adapter_name].parameters():
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.to(torch.float32)
    adapter_io.copy_tensors(model.adapter_state_dict(adapter_name), saved.tensors)
    if saved.lora_tensors is not None:
        lora.load_state_dict(model.base_model, saved.lora_tensors, adapter_name)
        loaded = model.lora_state_dict(adapter_name)
        if not all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in saved.lora_tensors.items()):
            raise AdapterError(f"PEFT did not load every LoRA tensor of {saved.lora_path} exactly.")


class PretrainedIO:
    """`save_pretrained`, `from_pretrained` and `push_to_hub` of `SlowFastModel` (a mixin; `load_adapter` is in
    `adapters.AdapterRegistry`)."""

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write the adapters (all by default) to `save_directory`, as PEFT lays them out: "default" at the top,
        any other adapter in `save_directory/<name>/`. Each folder gets adapter_config.json,
        adapter_model.safetensors (new parameters only, in their dtype in memory: fp32 after training under mixed
        precision, as PEFT saves its adapters), `lora/` (PEFT's format) if it has LoRA, and README.md."""
        self._check_wrapped()
        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls: type[Wrapped],
        base_model: nn.Module,
        path_or_hub_id: str | os.PathLike,
        revision: str | None = None,
        *,
        adapter_name: str = "default",
        is_trainable: bool = False,
        token: str | None = None,
        subfolder: str | None = None,
        verify_checksums: bool = True,
    ) -> Wrapped:
        """Wrap `base_model` with a saved adapter, from a local folder or a Hub repo id (`revision`: Hub only).

        Refuses mismatches with `AdapterError` and leaves `base_model` untouched then. Like PEFT,
        `is_trainable=False` loads the adapter frozen (inference); pass True to keep training it. The adapter takes
        the base's dtype (a saved fp32 adapter runs in bf16 on a bf16 base), except with `is_trainable=True`, which
        keeps saved fp32 weights in fp32 (the slow branches and projector copy).
        """
        if isinstance(base_model, cls):
            raise TypeError("The model is already a SlowFastModel; pass its base (`model.unwrap()`) instead.")
        saved = read_for(base_model, path_or_hub_id, revision=revision, token=token, subfolder=subfolder)
        with must_fit(saved):
            model = cls(base_model, saved.config, lora_config=explicit_lora(saved), adapter_name=adapter_name)
        try:
            load_tensors(model, adapter_name, saved, verify_checksums=verify_checksums, keep_precision=is_trainable)
        except BaseException:
            model.unwrap()
            raise
        model.set_adapter_trainable(adapter_name, is_trainable)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload slowfast-adapter adapter",
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Save the adapters to a temporary folder and upload it to the Hub repo `repo_id` (created if needed).

        Returns huggingface_hub's `CommitInfo`.
        """
        return push_adapters(
            self, repo_id, selected_adapters, private=private, token=token, revision=revision,
            commit_message=commit_message, create_pr=create_pr,
        )  # fmt: skip
