"""The pruning baselines of the demo: the base model on its native video tokens pruned to a token budget.

`pruned_inputs` turns the stock processor's output into the base model's inputs where each video keeps `budget`
tokens in the sequence (the pruning rule's kept grid tokens in frame order, then the video's newline token), the
same way the wrapper puts its fast tokens there: a shortened placeholder run and precomputed video features
(`mm_encoder_outputs`). Run the result with the adapter off (`model.disable_adapter()`): training-free.
LLaVA-OneVision only (the demo's base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..core import surface
from ..core.pruning import keep_mask, keep_tokens
from ..core.sequence import fit_sequence, mask_positions, placeholder_keep_mask


@dataclass
class PrunedBatch:
    """model_inputs: keyword arguments for the base model's `forward` / `generate`; keep: [V, T, N] bool, the grid
    tokens each video kept (N = tokens per frame)."""

    model_inputs: dict[str, Any]
    keep: torch.Tensor


@torch.no_grad()
def pruned_inputs(model, inputs: dict[str, Any], rule: str, budget: int) -> PrunedBatch:
    """`inputs` (the processor's output for a LLaVA-OneVision `SlowFastModel`) with each video's native tokens
    pruned by `rule` ('evs' or 'vidcom2', see `core/pruning.py`) to `budget` tokens in the sequence, its newline
    token included (as the fast tokens count it)."""
    family, base = model.family, model.base_model
    if family.name != "llava_onevision":
        raise NotImplementedError(f"The pruning baselines are written for LLaVA-OneVision, not {family.name}.")
    inputs = dict(inputs)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask", None)
    videos, _ = family.video_items(base, inputs, None)
    height, width = family.video_grid(base)
    kept, masks = [], []
    for video in videos:
        grid = video.native[:-1].reshape(-1, height * width, video.native.shape[-1])  # [T, N, D]
        keep = keep_mask(rule, grid, budget - 1)
        kept.append(torch.cat([keep_tokens(grid, keep), video.native[-1:]]))  # [budget, D]
        masks.append(keep)
    native = torch.tensor([v.native.shape[0] for v in videos])
    video_id = base.config.video_token_id
    keep_ids = placeholder_keep_mask(input_ids, video_id, native, torch.full_like(native, budget))
    pad = base.config.get_text_config().pad_token_id or 0
    fitted = fit_sequence(keep_ids, input_ids, attention_mask, pad_token_id=pad)
    model_inputs = {
        "input_ids": fitted["input_ids"],
        "attention_mask": fitted["attention_mask"],
        "position_ids": mask_positions(fitted["attention_mask"]),
        surface.ENCODER_OUTPUTS_KWARG: {"video": BaseModelOutputWithPooling(pooler_output=torch.stack(kept))},
    }
    return PrunedBatch(model_inputs, torch.stack(masks))
