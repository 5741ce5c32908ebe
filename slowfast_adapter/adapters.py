"""One named slow-fast adapter: its hybrid-layer branches and, optionally, its own trained projector.

A `SlowFastModel` holds several of these (`model.slowfast_adapters[name]`); one is active at a time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import surface
from .config import SlowFastConfig
from .families import ModelFamily
from .hybrid import SlowBranch


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

    def state_dict_for_file(self, family: ModelFamily) -> dict[str, torch.Tensor]:
        """File keys: `slow_branches.<layer>.<param>` and `projector.<base module path>.<param>`."""
        tensors = {f"slow_branches.{k}": v for k, v in self.slow_branches.state_dict().items()}
        if self.projectors is not None:
            for path, module in zip(family.projector_modules, self.projectors, strict=True):
                tensors.update({f"projector.{path}.{k}": v for k, v in module.state_dict().items()})
        return tensors
