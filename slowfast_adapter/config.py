"""`SlowFastConfig`: every choice of the slow-fast retrofit, as data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

QUERY_TOKENS = ("text", "text_after_first_video", "all")
GATES = ("dynamic_tanh", "static_tanh")
KV_INITS = ("from_llm", "random")
SLOW_KEY_POSITIONS = ("none", "temporal")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SlowFastConfig:
    """Configuration of the slow-fast adapter.

    The defaults are the reference design's released choices (64 frames, sampling stride 1, temporal
    pooling stride 4, 16 fast frames, a hybrid layer every 8 layers from layer 0), with its defects fixed.
    """

    temporal_sampling_stride: int = field(
        default=1, metadata={"help": "Fast tokens keep every s-th frame (or Qwen temporal group) of the video."}
    )
    temporal_pooling_stride: int = field(
        default=4, metadata={"help": "Fast tokens average-pool groups of t consecutive kept frames."}
    )
    spatial_pooling_stride: int = field(
        default=1,
        metadata={
            "help": "Fast tokens average-pool p x p cells of each frame's token grid (1 = no spatial pooling). "
            "Edge windows that do not fit are averaged over the cells they cover."
        },
    )
    min_fast_frames: int = field(
        default=16,
        metadata={
            "help": "Never fewer fast frames than this: videos with at most this many frames are not pooled in "
            "time, and longer videos get the largest strides (pooling first reduced, then sampling) that keep "
            "at least this many fast frames."
        },
    )
    hybrid_layer_interval: int = field(
        default=8, metadata={"help": "Make every n-th decoder layer hybrid, starting at `hybrid_layer_start`."}
    )
    hybrid_layer_start: int = field(default=0, metadata={"help": "Index of the first hybrid decoder layer."})
    hybrid_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit hybrid decoder layer indices; overrides interval/start when given."},
    )
    query_tokens: str = field(
        default="text",
        metadata={
            "help": "Which tokens query the slow tokens: 'text' (every non-visual token, incl. generated ones), "
            "'text_after_first_video' (text after the sample's first video or image placeholder), or 'all' "
            "(also the fast visual tokens)."
        },
    )
    gate: str = field(
        default="dynamic_tanh",
        metadata={
            "help": "'dynamic_tanh': tanh(Linear(self_attn_output)) * tanh(alpha) per query token (reference); "
            "'static_tanh': tanh(alpha) only. alpha is a scalar initialised to 0, so the wrapped model starts "
            "as the base model."
        },
    )
    kv_init: str = field(
        default="from_llm",
        metadata={
            "help": "'from_llm': the slow K/V projection starts as a copy of the layer's k_proj/v_proj "
            "(head by head); 'random': nn.Linear's default init."
        },
    )
    query_rope: bool = field(
        default=True,
        metadata={"help": "Apply the query token's RoPE to the cross-attention query (the reference does)."},
    )
    slow_key_positions: str = field(
        default="none",
        metadata={
            "help": "Positions of the slow keys. 'none': no positional encoding (the reference), so the slow path "
            "is blind to frame order. 'temporal': each slow key gets the LLM's RoPE at its frame's time in the "
            "sequence (LLaVA-OneVision: frame t of T at the video's first fast token + t * fast grid tokens / T; an "
            "image's tokens at its first placeholder; Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the family's own 3-D M-RoPE, "
            "temporal group g at its time within the fast groups' temporal positions and each token's height and "
            "width index mapped onto the fast grid's, an image's tokens at their own placeholders' positions), so a "
            "query can tell earlier frames from later ones."
        },
    )
    image_slow_tokens: bool = field(
        default=True,
        metadata={
            "help": "Also offer each image's native tokens as slow tokens (an image is a one-frame video); "
            "images always keep their native tokens in the sequence."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "Rank of an optional LoRA (real PEFT) on the language model, trained together with the slow-fast "
            "parameters and saved in PEFT's format in the adapter's `lora/` folder; 0 = no LoRA. For full control "
            "pass a `peft.LoraConfig` to `wrap(..., lora_config=...)` instead."
        },
    )
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (PEFT's `lora_alpha`)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (e.g. ['q_proj', 'v_proj']) that get LoRA, only inside the language model's decoder "
            "layers (never the vision tower); None = every attention and MLP linear "
            f"({', '.join(LORA_DEFAULT_TARGETS)}); ['all-linear'] = every linear of the decoder layers."
        },
    )
    train_projector: bool = field(
        default=False,
        metadata={
            "help": "Also train the multimodal projector (as the reference's first stage does): the adapter keeps its "
            "own trainable copy, saved in adapter_model.safetensors; the base's projector is never modified."
        },
    )
    vision_chunk_frames: int = field(
        default=32,
        metadata={
            "help": "Frames the vision tower encodes per call (Qwen: rounded down to whole temporal groups); 0 = "
            "every frame of the batch in one call. Bounds the tower's activation memory on long videos; the "
            "features are the same up to float rounding (each frame is encoded on its own either way)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("temporal_sampling_stride", "temporal_pooling_stride", "spatial_pooling_stride"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("min_fast_frames", self.min_fast_frames, minimum=1)
        _check_int("hybrid_layer_interval", self.hybrid_layer_interval, minimum=1)
        _check_int("hybrid_layer_start", self.hybrid_layer_start, minimum=0)
        _check_int("vision_chunk_frames", self.vision_chunk_frames, minimum=0)
        if self.hybrid_layers is not None:
            self.hybrid_layers = list(self.hybrid_layers)
            if not self.hybrid_layers:
                raise ValueError("hybrid_layers is empty: give at least one layer index, or None to use the interval.")
            for idx in self.hybrid_layers:
                _check_int("hybrid_layers[i]", idx, minimum=0)
            if len(set(self.hybrid_layers)) != len(self.hybrid_layers):
                raise ValueError(f"hybrid_layers has duplicates: {self.hybrid_layers}.")
            self.hybrid_layers = sorted(self.hybrid_layers)
        _check_choice("query_tokens", self.query_tokens, QUERY_TOKENS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("kv_init", self.kv_init, KV_INITS)
        _check_choice("slow_key_positions", self.slow_key_positions, SLOW_KEY_POSITIONS)
        _check_int("lora_r", self.lora_r, minimum=0)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float):
            raise TypeError(f"lora_dropout must be a number, got {self.lora_dropout!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_target_modules is not None:
            if isinstance(self.lora_target_modules, str):
                self.lora_target_modules = [self.lora_target_modules]
            self.lora_target_modules = list(self.lora_target_modules)
            if not self.lora_target_modules or not all(isinstance(t, str) and t for t in self.lora_target_modules):
                raise ValueError(
                    f"lora_target_modules must be a non-empty list of module names, got {self.lora_target_modules!r}."
                )
            if self.lora_r == 0:
                raise ValueError("lora_target_modules is set but lora_r is 0 (no LoRA): set lora_r > 0 to use LoRA.")
        for name in ("query_rope", "image_slow_tokens", "train_projector"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def resolve_hybrid_layers(self, num_layers: int) -> list[int]:
        """The hybrid layer indices for a decoder with `num_layers` layers."""
        if self.hybrid_layers is not None:
            bad = [i for i in self.hybrid_layers if i >= num_layers]
            if bad:
                raise ValueError(
                    f"hybrid_layers {bad} do not exist: the language model has {num_layers} decoder layers "
                    f"(valid indices 0..{num_layers - 1})."
                )
            return list(self.hybrid_layers)
        if self.hybrid_layer_start >= num_layers:
            raise ValueError(
                f"hybrid_layer_start={self.hybrid_layer_start} is past the last decoder layer "
                f"({num_layers} layers): lower it or give hybrid_layers explicitly."
            )
        return list(range(self.hybrid_layer_start, num_layers, self.hybrid_layer_interval))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def effective_dict(self) -> dict[str, Any]:
        """`to_dict()` without the fields that have no effect: the layer interval/start when `hybrid_layers` is
        given, the other `lora_*` fields when `lora_r` is 0 (for model cards and `inspect`)."""
        values = self.to_dict()
        unused = []
        if self.hybrid_layers is not None:
            unused += ["hybrid_layer_interval", "hybrid_layer_start"]
        if not self.lora_r:
            unused += ["lora_alpha", "lora_dropout", "lora_target_modules"]
        return {k: v for k, v in values.items() if k not in unused}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlowFastConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown SlowFastConfig fields {unknown}: the adapter was written by an incompatible version "
                f"of slowfast-adapter (known fields: {sorted(known)})."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> SlowFastConfig:
        return cls.from_dict(json.loads(text))


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
