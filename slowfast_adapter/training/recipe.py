"""Training recipes: YAML files with four sections (model, slowfast, data, train), plus `key=value` overrides."""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import SlowFastConfig


@dataclass
class ModelArgs:
    """The base model (what trains is the `slowfast` section's: LoRA, `train_projector`)."""

    name_or_path: str = ""
    dtype: str = "auto"  # base weights: auto (the checkpoint's), float32, bfloat16, float16
    attn_implementation: str | None = None  # sdpa (default), eager, flash_attention_2 where installed


@dataclass
class DataArgs:
    """LLaVA-format conversations and how frames are sampled (give num_frames, or fps with max_frames)."""

    train_file: str = ""
    media_root: str | None = None  # video/image paths are relative to this (default: train_file's folder)
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    frame_multiple: int | None = None  # fps frame counts round down to this; None: the fast-token strides
    video_backend: str = "auto"
    skip_bad_videos: bool = False
    num_workers: int = 0
    shuffle: bool = True
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for every processor call


@dataclass
class TrainArgs:
    """The optimisation loop. Steps are optimizer steps; batch sizes are per process."""

    output_dir: str = "slowfast-output"
    seed: int = 0
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when given
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: dict[str, float] = field(default_factory=lambda: {"slowfast": 2e-4, "projector": 1e-3, "lora": 2e-4})
    weight_decay: float = 0.0  # applied to weight matrices only
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine, linear, constant (all with linear warmup)
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio when given
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; no on CPU), no, bf16, fp16
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume: str | bool = "auto"  # auto: latest complete checkpoint in output_dir; a path; or false
    ddp_find_unused_parameters: bool = True  # text-only batches leave the slow-fast parameters without grads


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    slowfast: dict[str, Any] = field(default_factory=dict)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def slowfast_config(self) -> SlowFastConfig:
        _check_known_keys(SlowFastConfig, self.slowfast, "slowfast")
        return SlowFastConfig(**self.slowfast)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | os.PathLike | None = None) -> Recipe:
        """Build and validate a recipe; relative data paths resolve against `base_dir` (the YAML's folder)."""
        data = yaml_numbers(dict(data or {}))
        unknown = sorted(set(data) - {"model", "slowfast", "data", "train"})
        if unknown:
            raise ValueError(f"Unknown recipe sections {unknown}; expected model, slowfast, data, train.")
        if "train_projector" in (data.get("model") or {}):
            raise ValueError(
                "model.train_projector was removed: set `train_projector: true` in the slowfast section "
                "(the SlowFastConfig field) instead."
            )
        recipe = cls(
            model=_section(ModelArgs, data.get("model"), "model"),
            slowfast=dict(data.get("slowfast") or {}),
            data=_section(DataArgs, data.get("data"), "data"),
            train=_section(TrainArgs, data.get("train"), "train"),
        )
        if base_dir is not None:
            for args, key in ((recipe.data, "train_file"), (recipe.data, "media_root")):
                value = getattr(args, key)
                if value and not os.path.isabs(value) and (Path(base_dir) / value).exists():
                    setattr(args, key, str(Path(base_dir) / value))
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data, base_dir=Path(path).parent)

    def validate(self) -> None:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (a hub id or a local folder).")
        if not self.data.train_file:
            raise ValueError("data.train_file is required (a LLaVA-format .json or .jsonl file).")
        if (self.data.num_frames is None) == (self.data.fps is None):
            raise ValueError("Set exactly one of data.num_frames (uniform) or data.fps (with data.max_frames).")
        self.slowfast_config()  # raises on bad fields
        t = self.train
        for name in ("num_epochs", "per_device_batch_size", "gradient_accumulation_steps", "save_steps"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}.")
        if t.max_steps is not None and t.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}.")
        if t.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_scheduler must be cosine, linear or constant, got {t.lr_scheduler!r}.")
        if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {t.mixed_precision!r}.")
        bad = {k: v for k, v in t.learning_rate.items() if k not in ("slowfast", "projector", "lora")}
        if bad:
            raise ValueError(f"train.learning_rate has unknown groups {sorted(bad)}; use slowfast, projector, lora.")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def yaml_numbers(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads `2e-4` as a string: turn such strings into floats, recursively."""
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml_numbers(v) for v in value]
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether `value` (parsed from YAML) fits a field's type hint (int, float, str, bool, dict, tuple, unions)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is Any:
        return True
    return isinstance(value, origin or annotation) or (origin is tuple and isinstance(value, list))


def _check_known_keys(cls: type, values: dict[str, Any], section: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown keys in recipe section '{section}': {unknown}. Known: {sorted(known)}.")


def _section(cls: type, values: dict[str, Any] | None, name: str) -> Any:
    values = dict(values or {})
    _check_known_keys(cls, values, name)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _accepts(hints[key], value):
            raise ValueError(f"{name}.{key} must be {_describe(hints[key])}, got {value!r}.")
    if "learning_rate" in values and isinstance(values["learning_rate"], dict):
        values["learning_rate"] = {**TrainArgs().learning_rate, **values["learning_rate"]}
    if "adam_betas" in values:
        values["adam_betas"] = tuple(values["adam_betas"])
    return cls(**values)


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` (or `train.learning_rate.slowfast=1e-4`) override; values parse as YAML."""
    import yaml

    if "=" not in item:
        raise ValueError(f"Override {item!r} is not key=value (e.g. train.max_steps=100).")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ValueError(f"Override key {key!r} needs a section, e.g. train.{key} or data.{key}.")
    value = yaml.safe_load(raw)
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"Override {item!r}: {part} is not a section.")
    node[parts[-1]] = value
