"""Qwen2-VL (and the shared Qwen-VL token layout that Qwen2.5-VL and Qwen3-VL refine).

Video path of the base model: two frames form one temporal patch; the vision merger merges 2x2 patches,
so a video of grid `(T, H, W)` (`video_grid_thw`, in patches) gives `T * (H/2) * (W/2)` tokens. Slow
tokens are those merged tokens of every temporal group. Fast tokens pool them over groups and over the
merged grid; the model then sees a video whose grid is the pooled grid, so the base's own M-RoPE code
(`get_rope_index`, driven by `video_grid_thw` and `mm_token_type_ids`) computes its positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import SlowFastConfig
from ..core import surface
from ..core.encoded import EncodedVideos, encoded_items
from ..core.pooling import FastPlan, plan_fast_frames, pool_fast_frames
from ..core.sequence import placeholder_item_rows, placeholder_keep_mask
from ..core.types import PreparedInputs, SlowItemTokens, SlowTokens, VideoFeatures, VideoLayout
from .base import ModelFamily, add_images, add_key_rope, finish_prepare, pop_input_ids


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    projector_modules = ("model.visual.merger",)
    slow_key_positions = ("none", "temporal")

    default_image_size = 448  # px, the frame size FLOP reports assume unless told
    vision_cost_per_unit = True  # the tower attends within each temporal group

    def text_tokens_per_group(self, timestamp_tokens: int) -> int:
        """Text the processor writes per temporal group (none for Qwen2-VL and Qwen2.5-VL)."""
        return 0

    def video_layout(
        self, model: nn.Module, frames: int, *, image_size: int | None = None, timestamp_tokens: int = 0
    ) -> VideoLayout:
        vision = model.config.vision_config
        image_size = image_size or self.default_image_size
        step = vision.patch_size * vision.spatial_merge_size
        if image_size % step or frames % vision.temporal_patch_size:
            raise ValueError(
                f"{self.name}: the image size must be a multiple of {step} px (got {image_size}) and the "
                f"frame count a multiple of {vision.temporal_patch_size} (got {frames})."
            )
        side = image_size // step
        units = frames // vision.temporal_patch_size
        return VideoLayout(
            units, "temporal groups", (side, side), 0, self.text_tokens_per_group(timestamp_tokens), image_size
        )

    def encode_meta_video(self, model: nn.Module, layout: VideoLayout) -> None:
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        height, width = layout.grid[0] * merge, layout.grid[1] * merge  # in patches
        channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
        patch_dim = channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.empty(layout.units * height * width, patch_dim, device="meta")
        surface.video_features(model, pixels, torch.tensor([[layout.units, height, width]]))

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
        merge = model.config.vision_config.spatial_merge_size
        video_id, image_id = model.config.video_token_id, model.config.image_token_id
        mm_outputs = dict(inputs.pop(surface.ENCODER_OUTPUTS_KWARG, None) or {})
        slow_items: list[SlowItemTokens] = []
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        native_grids: list[list[int]] = []  # per video (T, H, W) in merged tokens, for slow key positions
        plans: list[FastPlan] = []

        pixel_values_videos = inputs.pop("pixel_values_videos", None)
        if pixel_values_videos is not None:
            grids = inputs["video_grid_thw"]  # [V, 3] (temporal groups, height, width) in patches
            video_inputs = {**inputs, "pixel_values_videos": pixel_values_videos}
            chunk = config.vision_chunk_frames
            videos, keys = self.video_items(model, video_inputs, encoded, chunk_frames=chunk, store=store)
            output = self.video_output(videos)
            fast_grids = []
            for groups, height, width in grids.tolist():
                plan = plan_fast_frames(groups, config, unit="temporal groups")
                fast_h, fast_w = plan.fast_grid(height // merge, width // merge)
                plans.append(plan)
                native_grids.append([groups, height // merge, width // merge])
                fast_grids.append([plan.num_fast_frames, fast_h * merge, fast_w * merge])
            native = torch.tensor([video.shape[0] for video in output.pooler_output])
            rows = placeholder_item_rows(input_ids, video_id, native, what="video")
            units = self.unit_counts(video_inputs)
            slow_items += [
                SlowItemTokens(int(row), self.slow_video_tokens(v), key, count)
                for row, v, key, count in zip(rows, videos, keys, units, strict=True)
            ]
            output.pooler_output = pool_videos(output.pooler_output, grids, plans, merge)
            self.pool_extra_video_features(output, grids, plans, merge)
            keep &= self.video_keep_mask(model, input_ids, grids, fast_grids, plans)
            mm_outputs["video"] = output
            inputs["video_grid_thw"] = torch.tensor(fast_grids, dtype=grids.dtype, device=grids.device)
            self.adjust_video_inputs(inputs, plans)

        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None:  # encoded here: the base forward refuses pixels next to encoder outputs
            output = surface.image_features(model, pixel_values, inputs["image_grid_thw"])
            add_images(output, input_ids, image_id, config, mm_outputs, slow_items)

        # Positions stay with the base model: it computes M-RoPE from the fitted ids and pooled grids.
        prepared = finish_prepare(
            model,
            inputs,
            input_ids,
            keep,
            mm_outputs,
            slow_items,
            visual_token_ids=(video_id, image_id),
            extra_token_tensors={"mm_token_type_ids": 0},
        )
        if config.slow_key_positions == "temporal" and slow_items:
            position_ids = surface.rope_index(model, prepared.model_inputs)  # [3, B, L'], as the base computes them
            positioned = mrope_slow_positions(
                prepared.input_ids, position_ids, slow_items, native_grids, plans, video_id, image_id
            )
            prepared.slow = SlowTokens.pack(positioned, batch_size=input_ids.shape[0])
            add_key_rope(model, prepared.slow)
        return prepared

    def video_items(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        encoded: EncodedVideos | None,
        *,
        chunk_frames: int = 0,
        store: bool = False,
    ) -> tuple[list[VideoFeatures], list[str | None]]:
        """Each video's merged tokens [N, D] (and extra features), from `encoded` or by the vision tower: every
        video not cached in one call, or `chunk_frames` frames (whole temporal groups) per call when a video is
        longer. pixel_values_videos: [sum(T*H*W), patch dim], split by each video's grid (T, H, W)."""
        pixel_values_videos, grids = inputs["pixel_values_videos"], inputs["video_grid_thw"]  # grids: [V, 3]
        per_video, tags = zip(*self.video_pixels(inputs), strict=True)
        step = max(1, chunk_frames // model.config.vision_config.temporal_patch_size) if chunk_frames else 0

        def features(output: Any) -> list[VideoFeatures]:
            extra = self.extra_video_features(output)  # per layer, per video
            return [
                VideoFeatures(native, [layer[i] for layer in extra], type(output))
                for i, native in enumerate(output.pooler_output)
            ]

        def encode_chunked(index: int) -> VideoFeatures:
            """One video, `step` temporal groups per call (the tower attends within each group)."""
            groups, height, width = grids[index].tolist()
            pieces = []
            for first in range(0, groups, step):
                count = min(step, groups - first)
                pixels = per_video[index][first * height * width : (first + count) * height * width]
                grid = grids[index : index + 1].clone()
                grid[0, 0] = count
                pieces += features(surface.video_features(model, pixels, grid))
            extra = [torch.cat([piece.extra[layer] for piece in pieces]) for layer in range(len(pieces[0].extra))]
            return VideoFeatures(torch.cat([piece.native for piece in pieces]), extra, pieces[0].output_type)

        def encode(indices: list[int]) -> list[VideoFeatures]:
            if step and any(grids[i, 0] > step for i in indices):
                return [encode_chunked(i) for i in indices]
            if len(indices) == len(per_video):
                return features(surface.video_features(model, pixel_values_videos, grids))
            return features(surface.video_features(model, torch.cat([per_video[i] for i in indices]), grids[indices]))

        return encoded_items(list(per_video), encode, encoded, tags=list(tags), store=store)

    def video_pixels(self, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, str]]:
        """pixel_values_videos [sum(T*H*W), patch dim] split by each video's grid (T, H, W), the grid as its tag."""
        grids = inputs["video_grid_thw"]
        per_video = inputs["pixel_values_videos"].split(grids.prod(-1).tolist())
        return [(pixels, str(grid)) for pixels, grid in zip(per_video, grids.tolist(), strict=True)]

    def forget_generate_state(self, model: nn.Module) -> None:
        surface.forget_rope_deltas(model)

    def slow_video_tokens(self, video: VideoFeatures) -> torch.Tensor:
        return video.native

    unit_name = "temporal group"

    def unit_counts(self, inputs: dict[str, Any]) -> list[int]:
        return inputs["video_grid_thw"][:, 0].tolist()

    def extra_video_features(self, output: Any) -> list[tuple[torch.Tensor, ...]]:
        """Further per-video features of a `get_video_features` output, per layer (none for Qwen2-VL)."""
        return []

    def video_output(self, videos: list[VideoFeatures]) -> Any:
        """A `get_video_features`-like output holding these videos' features."""
        return videos[0].output_type(pooler_output=tuple(video.native for video in videos))

    def video_keep_mask(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        grids: torch.Tensor,
        fast_grids: list[list[int]],
        plans: list[FastPlan],
    ) -> torch.Tensor:
        """[B, L] tokens to keep: each video keeps its first `fast count` placeholders."""
        merge = model.config.vision_config.spatial_merge_size
        native = grids.prod(-1) // merge**2
        fast = torch.tensor([t * h * w for t, h, w in fast_grids]) // merge**2
        return placeholder_keep_mask(input_ids, model.config.video_token_id, native, fast)

    def pool_extra_video_features(self, output: Any, grids: torch.Tensor, plans: list[FastPlan], merge: int) -> None:
        """Pool any further per-token video features the family has (none for Qwen2-VL)."""

    def adjust_video_inputs(self, inputs: dict[str, Any], plans: list[FastPlan]) -> None:
        """Adapt other per-video inputs to the fast groups (none for Qwen2-VL)."""


def pool_videos(
    videos: tuple[torch.Tensor, ...], grids: torch.Tensor, plans: list[FastPlan], merge: int
) -> tuple[torch.Tensor, ...]:
    """Each video's merged tokens [T*h*w, D] on its grid (T, H, W in patches) -> fast tokens [N_fast, D]."""
    pooled = []
    for tokens, (groups, height, width), plan in zip(videos, grids.tolist(), plans, strict=True):
        frames = tokens.view(1, groups, height // merge, width // merge, -1)
        pooled.append(pool_fast_frames(frames, plan)[0].flatten(0, 2))
    return tuple(pooled)


def spread(knots: torch.Tensor, count: int, per_knot: int) -> torch.Tensor:
    """knots [..., K] positions of K consecutive fast units (groups, rows or columns) -> [..., count] positions of
    `count` native units, native unit n at fractional fast unit u = n / per_knot: knot floor(u) plus frac(u) times
    the step to the next knot (past the last knot, the last step; 1 when K == 1)."""
    steps = knots[..., 1:] - knots[..., :-1]  # [..., K - 1]
    last = steps[..., -1:] if steps.shape[-1] else torch.ones_like(knots[..., :1])
    steps = torch.cat([steps, last], dim=-1).float()  # [..., K]
    u = torch.arange(count, device=knots.device, dtype=torch.float32) / per_knot
    index = u.floor().long().clamp(max=knots.shape[-1] - 1)
    return knots[..., index].float() + (u - index) * steps[..., index]


def mrope_slow_positions(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    items: list[SlowItemTokens],
    native_grids: list[list[int]],
    plans: list[FastPlan],
    video_id: int,
    image_id: int,
) -> list[SlowItemTokens]:
    """The slow items with their M-RoPE key positions [3, S_i] (`slow_key_positions="temporal"`).

    input_ids [B, L'] and position_ids [3, B, L'] are the fitted sequence and the M-RoPE positions the base model
    computes for it (`get_rope_index`: padding-free, so a row's positions do not depend on its padding). items: the
    videos' slow items (in placeholder order, grids `native_grids` (G, H, W) in merged tokens, fast plans `plans`),
    then the images'.

    Mapping, the family's own scheme carried from the fast tokens to the slow ones: the fast tokens of video v, read
    as [3, F, h', w'] from `position_ids`, give per fast group f the position of its first token (t_f, h_f, w_f),
    per fast row i the height offset h(0, i, 0) - h_0 and per fast column j the width offset. Fast group f pools the
    native groups f * window .. (f + 1) * window - 1 (window = sampling stride * pooling stride) and starts at the
    first one's time (as Qwen2.5-VL's scaled `second_per_grid_ts` and Qwen3-VL's kept timestamp say), so native
    group g sits at fractional fast group g / window: (t, h, w)_g are interpolated between the fast groups' values
    (spread over the temporal span the fast tokens occupy; after the last fast group, by the last step). Likewise a
    slow row y (column x) sits at fractional fast row y / s (s: the spatial pooling stride; fast cell i pools rows
    i * s .. i * s + s - 1). So slow token (g, y, x) gets (t_g, h_g + row(y / s), w_g + col(x / s)). Without
    pooling (strides 1) every slow key gets exactly its own native token's position; Qwen3-VL's per-group segment
    starts (timestamps between groups) are interpolated like any other group start. An image (one temporal group,
    never pooled) gets its own placeholders' positions, token for token.
    """
    out = list(items)
    for token_id, first, count in ((video_id, 0, len(native_grids)), (image_id, len(native_grids), None)):
        count = len(items) - first if count is None else count
        if not count:  # no videos, or images without slow tokens (`image_slow_tokens=False`)
            continue
        where = (input_ids == token_id).nonzero()  # [n, 2] row-major: the items' placeholders, in item order
        cursor = 0
        for index in range(first, first + count):
            item = items[index]
            if token_id == video_id:
                (groups, height, width), plan = native_grids[index], plans[index]
                fast_h, fast_w = plan.fast_grid(height, width)
                length = plan.num_fast_frames * fast_h * fast_w
            else:
                length = item.tokens.shape[0]
            spots = where[cursor : cursor + length]
            cursor += length
            fast = position_ids[:, spots[:, 0], spots[:, 1]]  # [3, n_fast]
            if token_id == image_id:
                out[index] = item._replace(positions=fast.float())
                continue
            fast = fast.view(3, plan.num_fast_frames, fast_h, fast_w)
            window = plan.sampling_stride * plan.pooling_stride
            starts = spread(fast[:, :, 0, 0], groups, window)  # [3, G] (t, h, w) of each native group's first token
            rows = spread(fast[1, 0, :, 0] - fast[1, 0, 0, 0], height, plan.spatial_stride)  # [H]
            cols = spread(fast[2, 0, 0, :] - fast[2, 0, 0, 0], width, plan.spatial_stride)  # [W]
            positions = starts[:, :, None, None].repeat(1, 1, height, width)  # [3, G, H, W]
            positions[1] += rows[:, None]
            positions[2] += cols
            out[index] = item._replace(positions=positions.flatten(1))
        if cursor != len(where):  # pragma: no cover - the base's placeholder checks catch it first
            raise ValueError(f"The fitted sequence holds {len(where)} placeholders of token {token_id}, not {cursor}.")
    return out
