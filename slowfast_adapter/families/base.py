"""What a base-model family must answer; everything else in slowfast-adapter is family-independent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import SlowFastConfig
from ..hybrid import apply_rope, default_query_states
from ..state import SlowTokens


@dataclass
class PreparedInputs:
    """Base-model inputs with fast tokens in the sequence, and the slow tokens beside it.

    model_inputs: keyword arguments for the base model's `forward` / `generate` (the sequence is fitted
    to the fast token count; labels and attention mask stay aligned).
    input_ids: [B, L'] the fitted sequence; visual_mask: [B, L'] True on visual placeholder tokens.
    slow: the slow tokens of every sample, or None when the batch has none.
    """

    model_inputs: dict[str, Any]
    input_ids: torch.Tensor
    visual_mask: torch.Tensor
    slow: SlowTokens | None


class ModelFamily:
    """Base class of a family module. Subclasses set `name`, `architectures` and implement `prepare`."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    # Module paths (in the base model) of the multimodal projector, for recipes that also train it.
    projector_modules: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.architectures

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def text_config(self, model: nn.Module) -> Any:
        return model.config.get_text_config()

    # The hybrid query: how a layer's attention module makes queries and applies RoPE.
    query_states = staticmethod(default_query_states)
    rope = staticmethod(apply_rope)

    def prepare(self, model: nn.Module, config: SlowFastConfig, inputs: dict[str, Any]) -> PreparedInputs:
        """Turn the stock processor's output into fast-token model inputs plus slow tokens."""
        raise NotImplementedError

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        """The base-model shapes an adapter depends on; adapters only load onto a base with equal values."""
        text = self.text_config(model)
        num_heads = text.num_attention_heads
        return {
            "family": self.name,
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // num_heads,
        }
