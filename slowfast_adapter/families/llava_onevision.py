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
from ..core import surface
from ..core.encoded import EncodedVideos, encoded_items
from ..core.pooling import plan_fast_frames, pool_fast_frames
from ..core.sequence import (
    item_start_positions,
    mask_positions,
    placeholder_item_rows,
    placeholder_keep_mask,
    temporal_positions,
)
from ..core.types import PreparedInputs, SlowItemTokens, VideoFeatures, VideoLayout
from .base import ModelFamily, add_images, add_key_rope, finish_prepare, pop_input_ids

_FEATURE_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy")


class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    projector_modules = ("model.multi_modal_projector",)
    slow_key_positions = ("none", "temporal")

    def video_grid(self, model: nn.Module) -> tuple[int, int]:
        """(h, w) of one frame's native video token grid."""
        vision = model.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return side, side

    def video_layout(
        self, model: nn.Module, frames: int, *, image_size: int | None = None, timestamp_tokens: int = 0
    ) -> VideoLayout:
        size = model.config.vision_config.image_size
        if image_size not in (None, size):
            raise ValueError(f"LLaVA-OneVision encodes frames at its fixed {size} px; drop --image-size.")
        return VideoLayout(frames, "frames", self.video_grid(model), 1, 0, None)

    def encode_meta_video(self, model: nn.Module, layout: VideoLayout) -> None:
        vision = model.config.vision_config
        size = vision.image_size
        surface.video_features(model, torch.empty(1, layout.units, vision.num_channels, size, size, device="meta"))

    def video_items(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        encoded: EncodedVideos | None,
        *,
        chunk_frames: int = 0,
        store: bool = False,
    ) -> tuple[list[VideoFeatures], list[str | None]]:
        """Each video's features [T*h*w + 1, D] (frames' grids, then the newline token), from `encoded` or by
        the vision tower and projector: every video not cached together, `chunk_frames` frames per call."""
        pixel_values_videos = inputs["pixel_values_videos"]  # [V, T, C, H, W]
        feature_kwargs = {k: inputs[k] for k in _FEATURE_KWARGS if inputs.get(k) is not None}
        num_videos, num_frames = pixel_values_videos.shape[:2]
        height, width = self.video_grid(model)
        step = chunk_frames or num_frames

        def encode_chunk(pixels: torch.Tensor) -> torch.Tensor:
            features = surface.video_features(model, pixels, **feature_kwargs).pooler_output
            frames = pixels.shape[1]
            if features.shape[1] != frames * height * width + 1:  # 5.18+: grids + the newline token
                raise surface.changed(
                    "LlavaOnevisionModel.get_video_features(...).pooler_output",
                    f"expected [videos, {frames} x {height} x {width} + 1, D], got {tuple(features.shape)}.",
                )
            return features

        def encode(indices: list[int]) -> list[VideoFeatures]:
            pixels = pixel_values_videos if len(indices) == num_videos else pixel_values_videos[indices]
            chunks = [encode_chunk(pixels[:, f : f + step].contiguous()) for f in range(0, num_frames, step)]
            features = torch.cat([chunk[:, :-1] for chunk in chunks] + [chunks[-1][:, -1:]], dim=1)
            return [VideoFeatures(video) for video in features]

        return encoded_items([pixels for pixels, _ in self.video_pixels(inputs)], encode, encoded, store=store)

    def video_pixels(self, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, str]]:
        return [(video, "") for video in inputs["pixel_values_videos"]]  # [V, T, C, H, W] -> V x [T, C, H, W]

    def slow_video_tokens(self, video: VideoFeatures) -> torch.Tensor:
        return video.native[:-1]  # without the newline token

    def unit_counts(self, inputs: dict[str, Any]) -> list[int]:
        videos = inputs["pixel_values_videos"]  # [V, T, C, H, W]
        return [videos.shape[1]] * videos.shape[0]

    def prepare(
        self,
        model: nn.Module,
        config: SlowFastConfig,
        inputs: dict[str, Any],
        *,
        encoded: EncodedVideos | None = None,
        store: bool = False,
    ) -> PreparedInputs:
        inputs = dict(inputs)
        input_ids = pop_input_ids(inputs)
        inputs.pop("image_sizes_videos", None)
        feature_kwargs = {k: inputs[k] for k in _FEATURE_KWARGS if inputs.get(k) is not None}
        video_id, image_id = model.config.video_token_id, model.config.image_token_id
        mm_outputs: dict[str, BaseModelOutputWithPooling] = dict(inputs.pop(surface.ENCODER_OUTPUTS_KWARG, None) or {})
        slow_items: list[SlowItemTokens] = []
        keep = torch.ones_like(input_ids, dtype=torch.bool)

        pixel_values_videos = inputs.pop("pixel_values_videos", None)
        if pixel_values_videos is not None:
            num_videos, num_frames = pixel_values_videos.shape[:2]
            height, width = self.video_grid(model)

            video_inputs = {**inputs, "pixel_values_videos": pixel_values_videos}
            chunk = config.vision_chunk_frames
            videos, keys = self.video_items(model, video_inputs, encoded, chunk_frames=chunk, store=store)
            features = torch.stack([v.native for v in videos]) if num_videos > 1 else videos[0].native[None]
            frames = features[:, :-1].reshape(num_videos, num_frames, height, width, -1)  # [V, T, h, w, D]
            newline = features[:, -1:]  # [V, 1, D]
            plan = plan_fast_frames(num_frames, config)
            fast = torch.cat([pool_fast_frames(frames, plan).flatten(1, 3), newline], dim=1)  # [V, N_fast, D]
            native = torch.full((num_videos,), features.shape[1])
            rows = placeholder_item_rows(input_ids, video_id, native, what="video")
            keep &= placeholder_keep_mask(input_ids, video_id, native, torch.full_like(native, fast.shape[1]))
            mm_outputs["video"] = BaseModelOutputWithPooling(pooler_output=fast)
            units = self.unit_counts(video_inputs)
            positions: list[torch.Tensor | None] = [None] * num_videos
            if config.slow_key_positions == "temporal":  # each frame at its time within the fast tokens' span
                starts = item_start_positions(input_ids, keep, inputs.get("attention_mask"), video_id, native)
                span = fast.shape[1] - 1  # the fast grid tokens, without the newline
                grid = height * width
                positions = [temporal_positions(s, span, n, grid) for s, n in zip(starts, units, strict=True)]
            slow_items += [
                SlowItemTokens(int(row), self.slow_video_tokens(v), key, count, pos)
                for row, v, key, count, pos in zip(rows, videos, keys, units, positions, strict=True)
            ]

        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None:  # encoded here: the base forward refuses pixels next to encoder outputs
            image_output = surface.image_features(
                model,
                pixel_values,
                inputs.pop("image_sizes", None),
                batch_num_images=inputs.pop("batch_num_images", None),
                **feature_kwargs,
            )
            add_images(image_output, input_ids, image_id, config, mm_outputs, slow_items)
            if config.slow_key_positions == "temporal" and config.image_slow_tokens:  # an image: one frame
                images = slow_items[-len(image_output.pooler_output) :]
                lengths = torch.tensor([item.tokens.shape[0] for item in images])
                starts = item_start_positions(input_ids, keep, inputs.get("attention_mask"), image_id, lengths)
                slow_items[-len(images) :] = [
                    item._replace(positions=temporal_positions(s, 0.0, 1, int(n)))
                    for item, s, n in zip(images, starts, lengths, strict=True)
                ]

        prepared = finish_prepare(
            model, inputs, input_ids, keep, mm_outputs, slow_items, visual_token_ids=(video_id, image_id)
        )
        add_key_rope(model, prepared.slow)
        if pixel_values_videos is not None or pixel_values is not None:
            # Positions from the mask, as `generate` computes them: a sample's positions do not depend on
            # how much padding the batch gave it (the slow-path query RoPE sees absolute positions).
            attention_mask = prepared.model_inputs["attention_mask"]
            prepared.model_inputs.setdefault("position_ids", mask_positions(attention_mask))
        return prepared
