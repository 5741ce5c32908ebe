"""Adapter fine-tuning on accelerate: one CPU process, DDP, FSDP or DeepSpeed (chosen by the launcher).

`slowfast-adapter train RECIPE.yaml [section.key=value ...]` runs `train(recipe)`: load the base, wrap it,
read the data, and hand them to the `Trainer` (trainer.py). Launch it with
`torchrun --nproc_per_node N -m slowfast_adapter.cli train ...` or `accelerate launch --config_file
recipes/accelerate/<ddp|fsdp|zero2|zero3>.yaml -m slowfast_adapter.cli train ...`.

Work is never lost: every `save_steps` optimizer steps a checkpoint is written to a temporary folder and
renamed into `output_dir/checkpoints/checkpoint-<step>` only when complete. It holds the trainable
parameters (fp32 under bf16/fp16 mixed precision, also on a bf16 base: see `Trainer.setup`), the adapter
(`adapter/`, loadable with `SlowFastModel.from_pretrained`), optimizer, scheduler, every rank's RNG states and
the data position (epoch, batches consumed, sampler seed). A restarted run (`train.resume: auto`) continues from
the latest complete checkpoint and ends with the same weights as an uninterrupted run. SIGTERM (e.g. a preempted
job) saves a checkpoint at the next step and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader

from ..model import SlowFastModel, wrap
from .accelerator import make_accelerator
from .data import ConversationCollator, ConversationDataset, TrainingDataError, load_records, missing_media
from .recipe import Recipe
from .trainer import TRAINER_STATE, Trainer, list_checkpoints

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ model
def load_base(recipe: Recipe) -> tuple[nn.Module, Any]:
    """The base model and its stock processor, from a hub id or a local folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {}
    if recipe.model.dtype != "auto":
        kwargs["dtype"] = getattr(torch, recipe.model.dtype)
    else:
        kwargs["dtype"] = "auto"
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    base = AutoModelForImageTextToText.from_pretrained(recipe.model.name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(recipe.model.name_or_path)
    return base, processor


def build_model(recipe: Recipe, base: nn.Module) -> SlowFastModel:
    """Wrap `base` (frozen; the adapter trains, with its own projector copy if `slowfast.train_projector`);
    enable gradient checkpointing if asked."""
    model = wrap(base, recipe.slowfast_config())
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@contextlib.contextmanager
def _whole_weights_at_load(accelerator: Accelerator) -> Iterator[None]:
    """Load and wrap the base with whole weights on every process; DeepSpeed partitions them at `prepare`.

    Under DeepSpeed ZeRO-3 accelerate always registers its config with transformers, and `from_pretrained` then
    partitions every weight as it loads (`zero.Init`), even with `zero3_init_flag: false`. `wrap` reads the
    base's weights (the LLM's k/v projections for `kv_init: from_llm`, the projector it copies), which would be
    empty partitions. So the registration is lifted while loading and wrapping, as `zero3_init_flag: false` asks."""
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None:
        yield
        return
    if plugin.is_zero3_init_enabled():
        raise ValueError(
            "zero3_init_flag: true is not supported: wrapping reads the base model's weights, which zero.Init "
            "would have partitioned. Set zero3_init_flag: false (the base is loaded whole, then partitioned)."
        )
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# ------------------------------------------------------------------------------------------- data
def frame_multiple(recipe: Recipe, processor: Any) -> int:
    """What fps-sampled frame counts round down to: `data.frame_multiple`, or by default the fast-token
    strides (temporal sampling x pooling) times the processor's temporal patch (2 frames for Qwen-VL)."""
    if recipe.data.frame_multiple:
        return recipe.data.frame_multiple
    config = recipe.slowfast_config()
    patch = getattr(getattr(processor, "video_processor", None), "temporal_patch_size", None) or 1
    return config.temporal_sampling_stride * config.temporal_pooling_stride * patch


@dataclass
class DataPlan:
    """Deterministic, resumable data order: the same on every restart, sharded by rank."""

    num_samples: int
    batch_size: int
    accumulation: int
    num_processes: int
    rank: int
    seed: int
    shuffle: bool

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for `epoch` (a seeded permutation, strided over the ranks)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank :: self.num_processes][: self.samples_per_rank]

    @property
    def samples_per_rank(self) -> int:
        return self.num_samples // self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the last incomplete accumulation group of an epoch is dropped."""
        return self.samples_per_rank // self.batch_size // self.accumulation

    def batches(self, epoch: int, skip: int = 0) -> list[list[int]]:
        """This rank's batches of `epoch`, without the first `skip` (already trained on)."""
        indices = self.epoch_indices(epoch)
        count = self.steps_per_epoch * self.accumulation
        batches = [indices[i * self.batch_size : (i + 1) * self.batch_size] for i in range(count)]
        return batches[skip:]


# ---------------------------------------------------------------------------------------------- train
def resolve_resume(recipe: Recipe) -> Path | None:
    resume = recipe.train.resume
    if resume is False or resume in (None, "", "false", "no"):
        return None
    if resume in (True, "auto", "latest"):
        found = list_checkpoints(Path(recipe.train.output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"train.resume={resume!r} is not a complete checkpoint folder (no {TRAINER_STATE}).")
    return path


def check_media(recipe: Recipe) -> tuple[list[dict[str, Any]], Path]:
    """The recipe's records and media root, every video/image file checked to exist before anything loads.

    A missing file raises `TrainingDataError` (one line naming the record and the file); with
    `data.skip_bad_videos: true` such records are dropped, each with a warning line."""
    d = recipe.data
    try:
        records = load_records(d.train_file)
    except (OSError, ValueError) as err:
        raise TrainingDataError(f"data.train_file {d.train_file}: {err}") from err
    media_root = Path(d.media_root) if d.media_root is not None else Path(d.train_file).parent
    missing = missing_media(records, media_root)
    if missing and not d.skip_bad_videos:
        first = next(iter(missing.values()))
        more = f" ({len(missing) - 1} more records have missing files)" if len(missing) > 1 else ""
        raise TrainingDataError(
            f"{d.train_file}: {first}{more}. Fix the paths (data.media_root) or set data.skip_bad_videos: true."
        )
    for problem in missing.values():
        logger.warning("Skipping %s (data.skip_bad_videos: true).", problem)
    return [r for i, r in enumerate(records) if i not in missing], media_root


def train(recipe: Recipe) -> dict[str, Any]:
    """Run a recipe to the end (or to a SIGTERM); returns a summary (also in output_dir/train_summary.json).

    Every media file is checked to exist first (`check_media`: `TrainingDataError` before anything loads). A run
    whose latest checkpoint already reached the recipe's steps is complete: nothing trains and nothing is written
    (a larger `train.max_steps` continues it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t, d = recipe.train, recipe.data
    records, media_root = check_media(recipe)
    accelerator = make_accelerator(t)
    set_seed(t.seed)

    with _whole_weights_at_load(accelerator):
        base, processor = load_base(recipe)
        model = build_model(recipe, base)
    dataset = ConversationDataset(
        records,
        processor,
        media_root=media_root,
        num_frames=d.num_frames,
        fps=d.fps,
        max_frames=d.max_frames,
        frame_multiple=frame_multiple(recipe, processor),
        video_backend=d.video_backend,
        skip_bad_videos=d.skip_bad_videos,
    )
    collator = ConversationCollator(processor, **d.processor_kwargs)
    plan = DataPlan(
        num_samples=len(dataset),
        batch_size=t.per_device_batch_size,
        accumulation=t.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=t.seed,
        shuffle=d.shuffle,
    )
    if plan.steps_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} samples are fewer than one optimizer step needs ({accelerator.num_processes} "
            f"processes x batch {t.per_device_batch_size} x accumulation {t.gradient_accumulation_steps})."
        )

    def batches(epoch: int, skip: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=plan.batches(epoch, skip=skip),
            collate_fn=collator,
            num_workers=d.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(t.seed + epoch),  # never touches the global RNG
        )

    trainer = Trainer(
        model,
        t,
        batches,
        accelerator=accelerator,
        steps_per_epoch=plan.steps_per_epoch,
        output_dir=Path(t.output_dir),
        data={"shuffle": d.shuffle, "num_samples": len(dataset)},
    )
    return trainer.fit(resume_from=resolve_resume(recipe))
