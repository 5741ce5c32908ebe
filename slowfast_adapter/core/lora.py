"""Optional LoRA on the language model, done with real PEFT (`peft.functional`, PEFT's public integration API).

LoRA layers are injected into the base model in place (`inject_adapter_in_model`), one PEFT adapter per
slow-fast adapter name. By default they target only the language model's decoder layers, never the vision
tower. On disk the LoRA part is PEFT's own format (`adapter_config.json` + `adapter_model.safetensors` with
`base_model.model.`-prefixed keys, as `PeftModel.save_pretrained` writes), so `peft.PeftModel.from_pretrained`
can read it on its own.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import LORA_DEFAULT_TARGETS, SlowFastConfig

if TYPE_CHECKING:  # peft is imported only when LoRA is used (it takes seconds to import)
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

PEFT_KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model


def module_path(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `root`."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}.")


def resolve_lora_config(
    config: SlowFastConfig, lora_config: LoraConfig | None, base: nn.Module, layers: nn.ModuleList
) -> LoraConfig | None:
    """The `LoraConfig` to inject, with `target_modules` as a regex restricted to the decoder layers.

    LoRA comes from the `lora_*` fields of `config` or from `lora_config` (a user's `peft.LoraConfig`), not both.
    `target_modules` as a list of names (or "all-linear") is restricted to the language model's decoder
    layers; a regex string is used as given (full control, any module of the base). None = no LoRA.
    """
    if lora_config is None and not config.lora_r:
        return None
    from peft import LoraConfig

    if lora_config is not None and config.lora_r:
        raise ValueError("Give LoRA either through SlowFastConfig.lora_r/lora_* or as a peft.LoraConfig, not both.")
    if lora_config is None:
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or list(LORA_DEFAULT_TARGETS),
        )
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}.")
    lora_config = copy.deepcopy(lora_config)
    targets = lora_config.target_modules
    if targets is None:
        targets = list(LORA_DEFAULT_TARGETS)
    if not isinstance(targets, str) or targets == "all-linear":
        lora_config.target_modules = decoder_layer_regex(
            base, layers, [targets] if isinstance(targets, str) else targets
        )
    return lora_config


def decoder_layer_regex(base: nn.Module, layers: nn.ModuleList, names: list[str] | set[str]) -> str:
    """A PEFT `target_modules` regex (full match) for modules named `names` inside the decoder layers."""
    prefix = module_path(base, layers)
    names = sorted(names)
    if names == ["all-linear"]:
        names = sorted(
            {name.split(".", 1)[1] for name, m in layers.named_modules() if isinstance(m, nn.Linear) and "." in name}
        )
    existing = {name.split(".", 1)[1] for name, _ in layers.named_modules() if "." in name}
    found = [n for n in names if any(e == n or e.endswith("." + n) for e in existing)]
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} do not exist in the language model's decoder layers ({prefix}); "
            f"their linears are named e.g. {sorted({e.rsplit('.', 1)[-1] for e in existing})}."
        )
    return rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{'|'.join(re.escape(n) for n in names)})"


def inject(base: nn.Module, lora_config: LoraConfig, adapter_name: str) -> None:
    """Add LoRA adapter `adapter_name` to `base` in place (new LoRA layers, or a new adapter in existing ones)."""
    from peft.functional import inject_adapter_in_model

    with warnings.catch_warnings():
        # PEFT warns when a second adapter is added to a model that already has one; that is what we want here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(lora_config, base, adapter_name=adapter_name)


def lora_layers(base: nn.Module) -> list[LoraLayer]:
    """PEFT's LoRA layers in `base` (none can exist while PEFT's LoRA module was never imported)."""
    peft_lora = sys.modules.get("peft.tuners.lora")
    return [] if peft_lora is None else [m for m in base.modules() if isinstance(m, peft_lora.LoraLayer)]


def activate(base: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` PEFT's active adapter in every LoRA layer (layers without it run the base layer only)."""
    if lora_layers(base):
        from peft.functional import set_adapter

        set_adapter(base, adapter_name)


def adapter_parameters(base: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA parameters of `adapter_name` (names contain `lora_` and `.<adapter_name>.`)."""
    return [
        p
        for layer in lora_layers(base)
        for attr in layer.adapter_layer_names
        if adapter_name in getattr(layer, attr)
        for p in getattr(layer, attr)[adapter_name].parameters()
    ]


def state_dict(base: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s LoRA weights with the keys `PeftModel.save_pretrained` writes."""
    from peft.functional import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(base, adapter_name=adapter_name, save_embedding_layers=False)
    return {PEFT_KEY_PREFIX + k: v for k, v in tensors.items()}


def load_state_dict(base: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Load PEFT-format `tensors` (already checked for keys and shapes) into adapter `adapter_name`."""
    from peft.functional import set_peft_model_state_dict

    stripped = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in tensors.items()}
    set_peft_model_state_dict(base, stripped, adapter_name=adapter_name)


def remove_adapter(base: nn.Module, adapter_name: str) -> None:
    """Remove LoRA adapter `adapter_name`; when no LoRA adapter is left, put the original modules back."""
    layers = lora_layers(base)
    if any(adapter_name in layer.lora_A for layer in layers):
        from peft.functional import delete_adapter
        from peft.tuners.lora import LoraLayer

        delete_adapter(base, adapter_name, prefix="lora_", layer_cls=LoraLayer)
    peft_config = getattr(base, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.pop(adapter_name, None)
    if not any(layer.lora_A for layer in lora_layers(base)):
        unload(base)


def unload(base: nn.Module) -> None:
    """Replace every LoRA layer by the module it wraps (the very object the base had) and drop PEFT's config."""
    layers = set(map(id, lora_layers(base)))
    for name, module in list(base.named_modules()):
        if id(module) in layers:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in base.__dict__:
        del base.peft_config


def base_mode_hooks(base: nn.Module, is_base_mode: Callable[[], bool]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that make every LoRA layer return its base layer's output while `is_base_mode()`.

    This keeps `disable_adapter()` per call and per thread (PEFT's own switch is model-wide): in that mode
    each LoRA-wrapped linear's base layer runs once more and the LoRA output is discarded.
    """

    def hook(module: LoraLayer, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        return module.get_base_layer()(*args, **kwargs) if is_base_mode() else None

    return [layer.register_forward_hook(hook, with_kwargs=True) for layer in lora_layers(base)]
