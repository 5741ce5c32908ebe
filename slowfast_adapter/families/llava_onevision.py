"""LLaVA-OneVision (and the LLaVA-Video HF checkpoints, which share its architecture).

Video path of the base model: SigLIP per frame -> projector -> 2x2 bilinear pooling to an h x w grid
-> `T * h * w` tokens followed by one `image_newline` token per video. Slow tokens are those `T * h * w`
native tokens; fast tokens are the pooled frames followed by the same newline token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import SlowFastConfig
from ..pooling import plan_fast_frames, pool_fast_frames
from ..sequence import fit_sequence, mask_positions, placeholder_item_rows, placeholder_keep_mask
from ..state import SlowTokens
from .base import ModelFamily, PreparedInputs

_FEATURE_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy")


class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    projector_modules = ("model.multi_modal_projector",)

    def video_grid(self, model: nn.Module) -> tuple[int, int]:
        """(h, w) of one frame's native video token grid."""
        vision = model.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return side, side

    def prepare(self, model: nn.Module, config: SlowFastConfig, inputs: dict[str, Any]) -> PreparedInputs:
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("slowfast-adapter needs `input_ids` (from the processor), not `inputs_embeds`.")
        if inputs.get("position_ids") is not None and inputs.get("pixel_values_videos") is not None:
            raise ValueError(
                "position_ids cannot be given with videos: the sequence is shortened to the fast tokens and "
                "positions are recomputed. Drop position_ids."
            )
        inputs.pop("image_sizes_videos", None)
        pixel_values_videos = inputs.pop("pixel_values_videos", None)
        feature_kwargs = {k: inputs[k] for k in _FEATURE_KWARGS if inputs.get(k) is not None}
        text_config = model.config.get_text_config()
        video_id, image_id = model.config.video_token_id, model.config.image_token_id
        mm_outputs: dict[str, BaseModelOutputWithPooling] = dict(inputs.pop("mm_encoder_outputs", None) or {})
        slow_items: list[tuple[int, torch.Tensor]] = []
        keep = input_ids != video_id

        if pixel_values_videos is not None:
            num_videos, num_frames = pixel_values_videos.shape[:2]
            height, width = self.video_grid(model)
            features = model.model.get_video_features(pixel_values_videos, **feature_kwargs).pooler_output
            frames = features[:, :-1].reshape(num_videos, num_frames, height, width, -1)  # [V, T, h, w, D]
            newline = features[:, -1:]  # [V, 1, D]
            plan = plan_fast_frames(num_frames, config)
            fast = torch.cat([pool_fast_frames(frames, plan).flatten(1, 3), newline], dim=1)  # [V, N_fast, D]
            native_lengths = torch.full((num_videos,), features.shape[1])
            rows = placeholder_item_rows(input_ids, video_id, native_lengths, what="video")
            keep = placeholder_keep_mask(
                input_ids, video_id, native_lengths, torch.full_like(native_lengths, fast.shape[1])
            )
            mm_outputs["video"] = BaseModelOutputWithPooling(pooler_output=fast)
            slow_items += [(int(row), video.flatten(0, 2)) for row, video in zip(rows, frames, strict=True)]

        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:  # encoded here: the base forward refuses pixels next to encoder outputs
            image_inputs = {k: inputs.pop(k, None) for k in ("pixel_values", "image_sizes", "batch_num_images")}
            image_output = model.model.get_image_features(
                image_inputs["pixel_values"],
                image_inputs["image_sizes"],
                batch_num_images=image_inputs["batch_num_images"],
                **feature_kwargs,
            )
            images = list(image_output.pooler_output)  # native tokens of each image, [N_i, D]
            lengths = torch.tensor([image.shape[0] for image in images])
            rows = placeholder_item_rows(input_ids, image_id, lengths, what="image")
            mm_outputs["image"] = image_output
            if config.image_slow_tokens:
                slow_items += [(int(row), image) for row, image in zip(rows, images, strict=True)]

        pad_id = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        fitted = fit_sequence(
            keep,
            input_ids,
            inputs.pop("attention_mask", None),
            pad_token_id=pad_id,
            others={"labels": (inputs.pop("labels", None), -100)},
        )
        model_inputs = {**inputs, **{k: v for k, v in fitted.items() if v is not None}}
        if pixel_values_videos is not None or pixel_values is not None:
            # Positions from the mask, as `generate` computes them: a sample's positions do not depend on
            # how much padding the batch gave it (the slow-path query RoPE sees absolute positions).
            model_inputs.setdefault("position_ids", mask_positions(fitted["attention_mask"]))
        if mm_outputs:
            model_inputs["mm_encoder_outputs"] = mm_outputs
        new_ids = fitted["input_ids"]
        return PreparedInputs(
            model_inputs=model_inputs,
            input_ids=new_ids,
            visual_mask=(new_ids == video_id) | (new_ids == image_id),
            slow=SlowTokens.pack(slow_items, batch_size=input_ids.shape[0]),
        )
