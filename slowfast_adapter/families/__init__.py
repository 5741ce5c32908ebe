"""Base-model families: one small module each, answering where the layers are and how visual tokens flow."""

from __future__ import annotations

from torch import nn

from .base import ModelFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_5_vl import Qwen2_5_VLFamily
from .qwen2_vl import Qwen2VLFamily
from .qwen3_vl import Qwen3VLFamily

FAMILIES: tuple[ModelFamily, ...] = (LlavaOnevisionFamily(), Qwen2VLFamily(), Qwen2_5_VLFamily(), Qwen3VLFamily())


def family_for(model: nn.Module) -> ModelFamily:
    """The family module for `model`, or a clear error listing the supported architectures."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = ", ".join(arch for family in FAMILIES for arch in family.architectures)
    raise TypeError(
        f"{type(model).__name__} is not a supported base model. slowfast-adapter wraps: {supported}. "
        "Load the model with its *ForConditionalGeneration class (e.g. AutoModelForImageTextToText)."
    )


def family_by_name(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"Unknown model family {name!r}; known: {[f.name for f in FAMILIES]}.")


__all__ = ["FAMILIES", "ModelFamily", "family_by_name", "family_for"]
