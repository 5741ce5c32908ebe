"""Named slow-fast adapters: `SlowFastAdapter` (one adapter's new modules) and `AdapterRegistry`, the part of
`SlowFastModel` that adds, loads, activates and deletes them and sets which parameters train (PEFT's rules).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import SlowFastConfig
from .core import lora, state, surface
from .core.hybrid import HybridLayerHooks, SlowBranch, compute_input
from .families import ModelFamily
from .io import save_and_load
from .io.files import LORA_SUBFOLDER

if TYPE_CHECKING:
    from peft import LoraConfig


class SlowFastAdapter(nn.Module):
    """The new modules of one adapter.

    slow_branches: hybrid layer index (str) -> `SlowBranch`.
    projectors: when `config.train_projector`, a trainable copy of each of the family's projector modules
    (`family.projector_modules`, same order), initialised from the base; the base's own projector is untouched.
    """

    def __init__(self, base: nn.Module, family: ModelFamily, config: SlowFastConfig) -> None:
        super().__init__()
        layers = family.decoder_layers(base)
        self.hybrid_layer_indices = config.resolve_hybrid_layers(len(layers))
        text = family.text_config(base)
        branches = {}
        for idx in self.hybrid_layer_indices:
            attn = surface.self_attention(layers[idx])
            k_proj, v_proj = (surface.attention_attribute(attn, name) for name in ("k_proj", "v_proj"))
            k_proj, v_proj = (getattr(m, "base_layer", m) for m in (k_proj, v_proj))  # under a LoRA layer
            branch = SlowBranch(
                hidden_size=text.hidden_size,
                num_heads=text.num_attention_heads,
                num_kv_heads=text.num_attention_heads // surface.attention_attribute(attn, "num_key_value_groups"),
                head_dim=surface.attention_attribute(attn, "head_dim"),
                gate=config.gate,
                device=k_proj.weight.device,
                dtype=k_proj.weight.dtype,
            )
            if config.kv_init == "from_llm":
                branch.init_kv_from(k_proj, v_proj)
            branches[str(idx)] = branch
        self.slow_branches = nn.ModuleDict(branches)
        self.projectors: nn.ModuleList | None = None
        if config.train_projector:
            if not family.projector_modules:
                raise ValueError(f"train_projector: the {family.name} family names no projector module.")
            copies = [copy.deepcopy(base.get_submodule(path)) for path in family.projector_modules]
            self.projectors = nn.ModuleList(copies).requires_grad_(True)

    def attach(self, layers: nn.ModuleList, family: ModelFamily, config: SlowFastConfig) -> list[HybridLayerHooks]:
        """Hooks attaching each slow branch to its decoder layer of `layers` (`hook.remove()` detaches it); the
        o_proj hook goes on `self_attn.o_proj` as it is now (the LoRA layer if there is one)."""
        return [
            HybridLayerHooks(
                owner=id(self),
                layer_idx=idx,
                decoder_layer=layers[idx],
                branch=self.slow_branches[str(idx)],
                query_rope=config.query_rope,
                query_states=family.query_states,
                rope=family.rope,
            )
            for idx in self.hybrid_layer_indices
        ]

    def state_dict_for_file(self, family: ModelFamily) -> dict[str, torch.Tensor]:
        """File keys: `slow_branches.<layer>.<param>` and `projector.<base module path>.<param>`."""
        tensors = {f"slow_branches.{k}": v for k, v in self.slow_branches.state_dict().items()}
        if self.projectors is not None:
            for path, module in zip(family.projector_modules, self.projectors, strict=True):
                tensors.update({f"projector.{path}.{k}": v for k, v in module.state_dict().items()})
        return tensors


class AdapterRegistry:
    """The adapters of a `SlowFastModel` (a mixin: the model supplies `base_model`, `family`, `_check_wrapped`
    and `_install_hooks`, which re-attaches every adapter's hooks after a change).

    `slowfast_adapters[name]` holds each adapter's new modules; the one named `active_adapter` ("default" at
    first) runs; `add_adapter`, `load_adapter`, `set_adapter`, `delete_adapter` manage them. `slow_branches`,
    `slowfast_config` and `hybrid_layer_indices` are the active adapter's. In-memory parameter names are
    `slowfast_adapters.<name>.slow_branches.<layer>.<param>`, `slowfast_adapters.<name>.projectors.<i>.<param>`,
    and PEFT's `...lora_A.<name>.weight` in the base.
    """

    def _init_registry(self, adapter_name: str) -> None:
        self.slowfast_adapters = nn.ModuleDict()
        self.slowfast_configs: dict[str, SlowFastConfig] = {}
        self.lora_configs: dict[str, LoraConfig] = {}  # adapters with LoRA only
        self._active_adapter = adapter_name
        self._trainable: dict[str, bool] = {}  # adapter -> trains while active

    @property
    def active_adapter(self) -> str:
        """The name of the adapter that runs (PEFT's `active_adapter`)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter]

    @property
    def slow_branches(self) -> nn.ModuleDict:
        """The active adapter's hybrid-layer branches: layer index (str) -> `SlowBranch`."""
        return self.slowfast_adapters[self._active_adapter].slow_branches

    @property
    def slowfast_config(self) -> SlowFastConfig:
        """The active adapter's `SlowFastConfig` (it also sets the fast-token pooling of each call)."""
        return self.slowfast_configs[self._active_adapter]

    @property
    def hybrid_layer_indices(self) -> list[int]:
        return self.slowfast_adapters[self._active_adapter].hybrid_layer_indices

    @property
    def projector_adapter(self) -> str | None:
        """The adapter whose projector copy encodes videos now (None: the base's own projector)."""
        config = self.slowfast_configs.get(self._active_adapter)
        return self._active_adapter if config is not None and config.train_projector else None

    def add_adapter(
        self, adapter_name: str, config: SlowFastConfig | None = None, *, lora_config: LoraConfig | None = None
    ) -> None:
        """Add a new, freshly initialised adapter (not activated: use `set_adapter`), trainable once active.

        LoRA comes from `config.lora_r` / `lora_*` or from `lora_config` (a `peft.LoraConfig`; its
        `target_modules` names are restricted to the language model's decoder layers, a regex is used as given).
        """
        self._check_wrapped()
        self._check_new_name(adapter_name)
        config = config if config is not None else SlowFastConfig()
        if not isinstance(config, SlowFastConfig):
            raise TypeError(f"config must be a SlowFastConfig, got {type(config).__name__}.")
        if config.slow_key_positions not in self.family.slow_key_positions:
            raise NotImplementedError(
                f"slow_key_positions={config.slow_key_positions!r} is not implemented for {self.family.name} (it "
                f"offers {list(self.family.slow_key_positions)})."
            )
        layers = self.family.decoder_layers(self.base_model)
        lora_config = lora.resolve_lora_config(config, lora_config, self.base_model, layers)
        adapter = SlowFastAdapter(self.base_model, self.family, config)
        self.slowfast_adapters[adapter_name] = adapter
        self.slowfast_configs[adapter_name] = config
        self._trainable[adapter_name] = True
        try:
            if lora_config is not None:
                self.lora_configs[adapter_name] = lora_config
                lora.inject(self.base_model, lora_config, adapter_name)
            self._install_hooks()
        except BaseException:
            self._drop_adapter(adapter_name)
            raise

    def load_adapter(
        self,
        path_or_hub_id: str | os.PathLike,
        adapter_name: str,
        *,
        revision: str | None = None,
        is_trainable: bool = False,
        token: str | None = None,
        subfolder: str | None = None,
        verify_checksums: bool = True,
    ) -> None:
        """Load a saved adapter (local folder or Hub repo) as `adapter_name`, beside the others (not activated).

        Refuses, with `AdapterError`, anything that does not match this base exactly; nothing changes then.
        `is_trainable=False` (PEFT's default) loads it frozen, for inference, in the base's dtype; True keeps saved
        fp32 weights in fp32 (see `from_pretrained`). `verify_checksums=False` skips the
        sha256 check of the files (for a folder edited on purpose).
        """
        self._check_wrapped()
        self._check_new_name(adapter_name)
        saved = save_and_load.read_for(
            self.base_model, path_or_hub_id, revision=revision, token=token, subfolder=subfolder
        )
        with save_and_load.must_fit(saved):
            self.add_adapter(adapter_name, saved.config, lora_config=save_and_load.explicit_lora(saved))
        try:
            save_and_load.load_tensors(
                self, adapter_name, saved, verify_checksums=verify_checksums, keep_precision=is_trainable
            )
        except BaseException:
            self._drop_adapter(adapter_name)
            raise
        self.set_adapter_trainable(adapter_name, is_trainable)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that runs (slow branches, projector and LoRA); model-wide, like PEFT."""
        self._check_wrapped()
        self._check_exists(adapter_name)
        self._active_adapter = adapter_name
        lora.activate(self.base_model, adapter_name)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that is not active (its modules, LoRA and hooks)."""
        self._check_wrapped()
        self._check_exists(adapter_name)
        if adapter_name == self._active_adapter:
            raise ValueError(f"{adapter_name!r} is the active adapter: `set_adapter` another one before deleting it.")
        self._drop_adapter(adapter_name)

    def set_adapter_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Whether `adapter_name`'s parameters train while it is active (loaded adapters start frozen)."""
        self._check_exists(adapter_name)
        self._trainable[adapter_name] = bool(trainable)
        self._refresh_trainable()

    def _check_exists(self, adapter_name: str) -> None:
        if adapter_name not in self.slowfast_adapters:
            raise ValueError(f"No adapter named {adapter_name!r}; loaded adapters: {list(self.slowfast_adapters)}.")

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\"):
            raise ValueError(f"Adapter names are non-empty and have no '.', '/' or '\\\\': got {adapter_name!r}.")
        if not adapter_name.isprintable():  # NUL, newlines, other control and invisible format characters
            raise ValueError(
                f"Adapter names have no control or invisible characters (NUL, newline, tab): got {adapter_name!r}; "
                "pick a printable name (it becomes a folder name when saved)."
            )
        if adapter_name == LORA_SUBFOLDER:
            raise ValueError(f"{LORA_SUBFOLDER!r} is reserved (the LoRA subfolder of a saved adapter): pick another.")
        if adapter_name in self.slowfast_adapters:
            raise ValueError(f"An adapter named {adapter_name!r} exists already: pick another name or delete it.")

    def _drop_adapter(self, adapter_name: str) -> None:
        lora.remove_adapter(self.base_model, adapter_name)
        self.lora_configs.pop(adapter_name, None)
        self.slowfast_configs.pop(adapter_name, None)
        self._trainable.pop(adapter_name, None)
        if adapter_name in self.slowfast_adapters:
            del self.slowfast_adapters[adapter_name]
        if self.slowfast_adapters:
            self._install_hooks()
        else:
            self._remove_hooks()

    def _refresh_trainable(self) -> None:
        """Only the active adapter trains (PEFT's rule), and only if it is trainable."""
        for name, adapter in self.slowfast_adapters.items():
            on = name == self._active_adapter and self._trainable.get(name, True)
            adapter.requires_grad_(on)
            for param in lora.adapter_parameters(self.base_model, name):
                param.requires_grad_(on)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's slow-fast parameters (active adapter by default), keyed as in adapter_model.safetensors:
        `slow_branches.<layer>.<name>` and, with a trained projector, `projector.<base module path>.<name>`.
        LoRA weights are in `lora_state_dict`."""
        return self.slowfast_adapters[adapter_name or self._active_adapter].state_dict_for_file(self.family)

    def lora_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's LoRA weights keyed as PEFT saves them (`base_model.model.<path>.lora_A.weight`); {} if none."""
        name = adapter_name or self._active_adapter
        return lora.state_dict(self.base_model, name) if name in self.lora_configs else {}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def projector_hooks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """`projector_hook` on each of the base's projector modules, when an adapter of `model` has projector copies."""
    if all(adapter.projectors is None for adapter in model.slowfast_adapters.values()):
        return []
    modules = [model.base_model.get_submodule(path) for path in model.family.projector_modules]
    return [module.register_forward_hook(projector_hook(model, module, i)) for i, module in enumerate(modules)]


def projector_hook(model: nn.Module, base_module: nn.Module, index: int):
    """Forward hook on the base's projector of a `SlowFastModel` `model`: outside `disable_adapter()`, the active
    adapter's copy answers.

    The copy may hold another dtype than the base (fp32 after training under mixed precision, on a bf16 base):
    its inputs are cast to the dtype it computes in (`hybrid.compute_input`) and its output to the base
    projector's output dtype, so the rest of the base sees what its own projector would give."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if module is not base_module or state.current_mode(id(model)) == "base":
            return None
        projectors = model.slowfast_adapters[model.active_adapter].projectors
        if projectors is None:
            return None
        copy_ = projectors[index]
        weight = next(copy_.parameters(), None)
        if weight is not None:
            args = tuple(compute_input(a, weight) if isinstance(a, torch.Tensor) else a for a in args)
        result = copy_(*args)
        if isinstance(result, torch.Tensor) and isinstance(output, torch.Tensor) and result.dtype != output.dtype:
            result = result.to(output.dtype)
        return result

    return hook
