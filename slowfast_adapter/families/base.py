"""What a base-model family must answer; everything else in slowfast-adapter is family-independent."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import SlowFastConfig
from ..core import surface
from ..core.encoded import EncodedVideos
from ..core.hybrid import apply_rope, default_query_states
from ..core.sequence import fit_sequence, placeholder_item_rows
from ..core.types import PreparedInputs, SlowItemTokens, SlowTokens, VideoFeatures, VideoLayout


class ModelFamily:
    """Base class of a family module. Subclasses set `name`, `architectures` and implement `prepare`."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    # Module paths (in the base model) of the multimodal projector, for recipes that also train it.
    projector_modules: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.architectures

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return surface.decoder_layers(model)

    def text_config(self, model: nn.Module) -> Any:
        return model.config.get_text_config()

    # The hybrid query: how a layer's attention module makes queries and applies RoPE.
    query_states = staticmethod(default_query_states)
    rope = staticmethod(apply_rope)
    slow_key_positions: tuple[str, ...] = ("none",)
    """The `SlowFastConfig.slow_key_positions` values this family implements."""

    def prepare(
        self,
        model: nn.Module,
        config: SlowFastConfig,
        inputs: dict[str, Any],
        *,
        encoded: EncodedVideos | None = None,
        store: bool = False,
    ) -> PreparedInputs:
        """Turn the stock processor's output into fast-token model inputs plus slow tokens.

        encoded: videos encoded earlier, reused instead of running the vision tower on the same pixels again;
        with `store`, the videos this call encodes are added to it (`SlowFastModel.encode`)."""
        raise NotImplementedError

    # Encode once, ask many (`encoded.py`).
    def video_pixels(self, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, str]]:
        """Each video's pixels in `inputs` (views of `pixel_values_videos`, in order) and what more identifies it
        ('' or e.g. its patch grid): what the encode cache matches videos by (`video_items` reads these views)."""
        raise NotImplementedError

    def video_items(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        encoded: EncodedVideos | None,
        *,
        chunk_frames: int = 0,
        store: bool = False,
    ) -> tuple[list[VideoFeatures], list[str | None]]:
        """Each video of `inputs` encoded by the vision tower and projector, at most `chunk_frames` frames per
        call (0: all at once), or taken from `encoded`; and its fingerprint (None without `encoded`). With
        `store`, new videos are added to `encoded`."""
        raise NotImplementedError

    def slow_video_tokens(self, video: VideoFeatures) -> torch.Tensor:
        """A video's slow tokens [S, D] from its features."""
        raise NotImplementedError

    def encode_videos(
        self, model: nn.Module, config: SlowFastConfig, inputs: dict[str, Any], encoded: EncodedVideos
    ) -> SlowTokens | None:
        """Add the videos of `inputs` to `encoded`; returns their slow tokens, one video per row (None: none)."""
        if inputs.get("pixel_values_videos") is None:
            return None
        videos, keys = self.video_items(model, inputs, encoded, chunk_frames=config.vision_chunk_frames, store=True)
        units = self.unit_counts(inputs)
        items = [
            SlowItemTokens(row, self.slow_video_tokens(video), key, count)
            for row, (video, key, count) in enumerate(zip(videos, keys, units, strict=True))
        ]
        return SlowTokens.pack(items, batch_size=len(items))

    unit_name = "frame"
    """What one slice of a video's slow tokens covers: a frame (LLaVA) or a temporal group of frames (Qwen)."""

    def unit_counts(self, inputs: dict[str, Any]) -> list[int]:
        """The frames (or temporal groups) of each video of `inputs` (the processor's output)."""
        raise NotImplementedError

    def forget_generate_state(self, model: nn.Module) -> None:
        """Drop what the base's `generate` keeps between calls (none here; Qwen-VL's M-RoPE offset)."""

    # FLOP counting (`flops.py`): the video layout and the vision path on meta tensors.
    vision_cost_per_unit = False
    """True when the tower encodes each unit on its own (cost linear in units: counted for 1 and 2 units)."""

    def video_layout(
        self, model: nn.Module, frames: int, *, image_size: int | None = None, timestamp_tokens: int = 0
    ) -> VideoLayout:
        """The layout of one square video of `frames` frames (`timestamp_tokens`: Qwen3-VL's per-group text)."""
        raise NotImplementedError

    def encode_meta_video(self, model: nn.Module, layout: VideoLayout) -> None:
        """Run the video feature path (vision tower + projector/merger) on meta pixels of `layout`."""
        raise NotImplementedError

    def base_shapes(self, model: nn.Module) -> dict[str, Any]:
        """The base-model shapes an adapter depends on (`fingerprint` in adapter_config.json); adapters only load
        onto a base with equal values."""
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


def pop_input_ids(inputs: dict[str, Any]) -> torch.Tensor:
    """Take `input_ids` out of the inputs; slow-fast needs them (to find and shorten placeholder runs)."""
    input_ids = inputs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("slowfast-adapter needs `input_ids` (from the processor), not `inputs_embeds`.")
    has_visual = any(inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
    if has_visual and inputs.get("position_ids") is not None:
        raise ValueError(
            "position_ids cannot be given with images or videos: the sequence is fitted to the fast tokens and "
            "positions are recomputed for it. Drop position_ids."
        )
    return input_ids


def add_images(
    image_output: Any,
    input_ids: torch.Tensor,
    image_token_id: int,
    config: SlowFastConfig,
    mm_outputs: dict[str, Any],
    slow_items: list[SlowItemTokens],
) -> None:
    """Images keep their native tokens in the sequence (`mm_outputs["image"]`) and, with
    `config.image_slow_tokens`, also offer them as slow tokens of their sample.

    image_output: the family's `get_image_features` output; its `pooler_output` holds each image's [N_i, D].
    """
    images = list(image_output.pooler_output)
    lengths = torch.tensor([image.shape[0] for image in images])
    rows = placeholder_item_rows(input_ids, image_token_id, lengths, what="image")
    mm_outputs["image"] = image_output
    if config.image_slow_tokens:
        slow_items += [SlowItemTokens(int(row), image) for row, image in zip(rows, images, strict=True)]


def add_key_rope(model: nn.Module, slow: SlowTokens | None) -> None:
    """Set `slow.key_rope` (cos, sin) [B, S, hd] from the language model's own rotary embedding at
    `slow.key_positions` ([B, S] 1-D or [3, B, S] M-RoPE positions; nothing to do without them)."""
    if slow is None or slow.key_positions is None:
        return
    rotary = getattr(surface.language_model(model), "rotary_emb", None)
    if rotary is None:
        raise surface.changed("model.model.language_model.rotary_emb", "slow_key_positions needs the LLM's RoPE.")
    slow.key_rope = rotary(slow.tokens, slow.key_positions.to(slow.tokens.device))


def finish_prepare(
    model: nn.Module,
    inputs: dict[str, Any],
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    mm_outputs: dict[str, Any],
    slow_items: list[SlowItemTokens],
    *,
    visual_token_ids: tuple[int, ...],
    extra_token_tensors: dict[str, int] | None = None,
) -> PreparedInputs:
    """Fit the sequence to `keep` [B, L] and assemble the base-model inputs and slow tokens.

    extra_token_tensors: names of further per-token inputs (e.g. `mm_token_type_ids`) -> pad value;
    they are fitted like `input_ids`. Labels are fitted with pad -100.
    """
    text_config = model.config.get_text_config()
    pad_id = text_config.pad_token_id if text_config.pad_token_id is not None else 0
    others = {"labels": (inputs.pop("labels", None), -100)}
    for name, pad in (extra_token_tensors or {}).items():
        others[name] = (inputs.pop(name, None), pad)
    fitted = fit_sequence(keep, input_ids, inputs.pop("attention_mask", None), pad_token_id=pad_id, others=others)
    model_inputs = {**inputs, **{k: v for k, v in fitted.items() if v is not None}}
    if mm_outputs:
        model_inputs[surface.ENCODER_OUTPUTS_KWARG] = mm_outputs
    new_ids = fitted["input_ids"]
    visual = torch.zeros_like(new_ids, dtype=torch.bool)
    for token_id in visual_token_ids:
        visual |= new_ids == token_id
    return PreparedInputs(
        model_inputs=model_inputs,
        input_ids=new_ids,
        visual_mask=visual,
        slow=SlowTokens.pack(slow_items, batch_size=input_ids.shape[0]),
    )
