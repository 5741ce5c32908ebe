"""Adapter fine-tuning on accelerate: one CPU process, DDP, FSDP or DeepSpeed (chosen by the launcher).

`slowfast-adapter train RECIPE.yaml [section.key=value ...]` runs `train(recipe)`. Launch it with
`torchrun --nproc_per_node N -m slowfast_adapter.cli train ...` or `accelerate launch --config_file
recipes/accelerate/<ddp|fsdp|zero2|zero3>.yaml -m slowfast_adapter.cli train ...`.

Work is never lost: every `save_steps` optimizer steps a checkpoint is written to a temporary folder and
renamed into `output_dir/checkpoints/checkpoint-<step>` only when complete. It holds the trainable
parameters, the adapter (`adapter/`, loadable with `SlowFastModel.from_pretrained`), optimizer, scheduler,
every rank's RNG states and the data position (epoch, batches consumed, sampler seed). A restarted run
(`train.resume: auto`) continues from the latest complete checkpoint and ends with the same weights as
an uninterrupted run. SIGTERM (e.g. a preempted job) saves a checkpoint at the next step and exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..files import atomic_write_text
from ..model import SlowFastModel, wrap
from .data import ConversationCollator, ConversationDataset
from .recipe import Recipe

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
GROUPS = ("slowfast", "lora", "projector")


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
    """Wrap `base` (frozen; the adapter trains, with its own projector copy if asked); enable checkpointing."""
    config = recipe.slowfast_config()
    if recipe.model.train_projector:
        config = dataclasses.replace(config, train_projector=True)
    model = wrap(base, config)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def parameter_group_name(model: SlowFastModel, name: str) -> str:
    """'slowfast', 'lora' or 'projector' for a trainable parameter name of `model` (see `parameter_groups`)."""
    if ".slow_branches." in name:
        return "slowfast"
    if "lora_" in name:
        return "lora"
    if ".projectors." in name:
        return "projector"
    raise ValueError(
        f"Trainable parameter {name} is neither slow-fast (*.slow_branches.*), LoRA (lora_*) nor an adapter's "
        "projector copy (*.projectors.*): freeze it, or train it through one of those groups."
    )


def parameter_groups(
    model: SlowFastModel, learning_rates: dict[str, float], weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups: each trainable parameter in exactly one of slowfast / lora / projector, each with its
    own learning rate; weight decay only on weight matrices (not biases, gates, norms). Empty groups are
    skipped."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((parameter_group_name(model, name), param.ndim >= 2), []).append(param)
    groups = []
    for group in GROUPS:
        for decay in (True, False):
            params = buckets.get((group, decay))
            if not params:
                continue
            if group not in learning_rates:
                raise ValueError(f"train.learning_rate has no entry for the '{group}' parameters.")
            groups.append(
                {
                    "params": params,
                    "lr": float(learning_rates[group]),
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{group}{'' if decay else '_no_decay'}",
                }
            )
    if not groups:
        raise ValueError("The model has no trainable parameters.")
    return groups


def trainable_state(model: SlowFastModel) -> dict[str, torch.Tensor]:
    """Every trainable parameter of `model`, by name, as contiguous CPU tensors."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: SlowFastModel, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(
            f"Checkpoint parameters do not match this run: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}. Resume with the recipe that wrote the checkpoint."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_outputs(model: SlowFastModel, directory: Path) -> None:
    """`save_pretrained` the adapter (slow-fast parameters, LoRA and a trained projector copy)."""
    model.save_pretrained(directory)


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


# ---------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first; temporary folders are ignored."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` in a JSONL log (the run continues from `step`)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


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


def _mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _make_accelerator(recipe: Recipe):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin

    t = recipe.train
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(t.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.ddp_find_unused_parameters)],
    )


class _Stop:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next optimizer step and exits.

    A second SIGINT (Ctrl-C twice) interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        return {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}


# ------------------------------------------------------------------------------------------- train
def train(recipe: Recipe, *, log=None) -> dict[str, Any]:
    """Run a recipe to the end (or to a SIGTERM); returns a summary (also in output_dir/train_summary.json)."""
    from accelerate.utils import DistributedType, set_seed
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t, d = recipe.train, recipe.data
    accelerator = _make_accelerator(recipe)
    say = log or (lambda message: accelerator.print(message))
    output_dir = Path(t.output_dir)
    set_seed(t.seed)

    base, processor = load_base(recipe)
    model = build_model(recipe, base)
    model.train()
    dataset = ConversationDataset(
        d.train_file,
        processor,
        media_root=d.media_root,
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
    total_steps = t.max_steps or t.num_epochs * plan.steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)

    groups = parameter_groups(model, t.learning_rate, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=tuple(t.adam_betas), eps=t.adam_epsilon)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = t.per_device_batch_size
        ds_config["gradient_clipping"] = t.max_grad_norm or 0.0
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: SlowFastModel = accelerator.unwrap_model(model)
    own_weights = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    if own_weights:  # accelerate would write/read the whole frozen base; we keep the trainable tensors only
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "losses": []}
    world = {
        "num_processes": accelerator.num_processes,
        "per_device_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "seed": t.seed,
        "shuffle": d.shuffle,
        "num_samples": len(dataset),
    }
    resume_from = resolve_resume(recipe)
    if resume_from is not None:
        saved = json.loads((resume_from / TRAINER_STATE).read_text())
        if saved["data"] != world:
            raise ValueError(
                f"Cannot resume exactly from {resume_from}: it was written with {saved['data']}, this run has "
                f"{world}. Use the same processes, batch sizes, seed and data, or start a new output_dir."
            )
        accelerator.load_state(str(resume_from))
        if own_weights:
            load_trainable_state(unwrapped, load_file(str(resume_from / TRAINABLE)))
        state.update({k: saved[k] for k in state})
        say(f"resumed from {resume_from} at step {state['global_step']}")

    def save_checkpoint() -> Path:
        step = state["global_step"]
        root = output_dir / "checkpoints"
        final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if own_weights:
                save_file(trainable_state(unwrapped), str(tmp / TRAINABLE), metadata={"format": "pt"})
            save_outputs(unwrapped, tmp / "adapter")
            (tmp / TRAINER_STATE).write_text(json.dumps({**state, "data": world}, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint appears complete, or not at all
            old = list_checkpoints(output_dir)
            if t.save_total_limit:
                for path in old[: max(0, len(old) - t.save_total_limit)]:
                    shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    stop = _Stop()
    previous = stop.install()
    trainable, total = unwrapped.get_nb_trainable_parameters()
    say(
        f"training {trainable:,d} of {total:,d} parameters ({', '.join(g['name'] for g in groups)}) on "
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, mixed precision "
        f"{accelerator.mixed_precision}; {total_steps} steps, {plan.steps_per_epoch} per epoch"
    )
    bar = tqdm(
        total=total_steps,
        initial=state["global_step"],
        disable=not accelerator.is_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    log_path = output_dir / "log.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, state["global_step"])  # lines a killed run wrote past its last checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    tally = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, samples, tokens (this rank)
    window_start, stopped = time.perf_counter(), False
    try:
        while state["global_step"] < total_steps and not stopped:
            epoch = state["epoch"]
            batches = plan.batches(epoch, skip=state["batches_in_epoch"])
            loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collator,
                num_workers=d.num_workers,
                pin_memory=torch.cuda.is_available(),
                generator=torch.Generator().manual_seed(t.seed + epoch),  # never touches the global RNG
            )
            for batch in loader:
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["batches_in_epoch"] += 1
                tally += torch.tensor(
                    [loss.item(), 1, batch["input_ids"].shape[0], batch["attention_mask"].sum().item()],
                    dtype=torch.float64,
                )
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state["global_step"] += 1
                summed = accelerator.reduce(
                    torch.cat([tally, torch.tensor([float(stop.requested)], dtype=torch.float64)]).to(
                        accelerator.device
                    ),
                    reduction="sum",
                ).cpu()
                tally.zero_()
                loss_value = float(summed[0] / summed[1])
                state["losses"].append(round(loss_value, 6))
                elapsed = time.perf_counter() - window_start
                window_start = time.perf_counter()
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{next(iter(lrs.values())):.2e}",
                    samples_s=f"{summed[2] / elapsed:.2f}",
                    tok_s=f"{summed[3] / elapsed:.0f}",
                )
                if accelerator.is_main_process:
                    with log_path.open("a") as f:
                        record = {
                            "step": state["global_step"],
                            "epoch": epoch,
                            "loss": loss_value,
                            "lr": lrs,
                            "samples_per_s": float(summed[2] / elapsed),
                            "tokens_per_s": float(summed[3] / elapsed),
                        }
                        f.write(json.dumps(record) + "\n")
                step = state["global_step"]
                if step % t.logging_steps == 0 and accelerator.is_main_process:
                    rates = ", ".join(
                        f"{group} {rate:.3g}" for group, rate in lrs.items() if not group.endswith("_no_decay")
                    )
                    tqdm.write(f"step {step}/{total_steps} loss {loss_value:.4f} lr {rates}")
                stopped = bool(summed[4] > 0)
                if step % t.save_steps == 0 or stopped or step == total_steps:
                    path = save_checkpoint()
                    if stopped:
                        say(f"stop requested: checkpoint {path} written at step {step}; rerun to resume")
                if stopped or step >= total_steps:
                    break
            else:  # the epoch ran out: the next one starts from its first batch
                state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    summary = {
        "global_step": state["global_step"],
        "total_steps": total_steps,
        "stopped_early": stopped,
        "losses": state["losses"],
        "num_processes": accelerator.num_processes,
        "trainable_parameters": trainable,
    }
    if accelerator.is_main_process and not stopped:
        save_outputs(unwrapped, output_dir / "adapter")
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        say(f"adapter saved to {output_dir / 'adapter'}")
    accelerator.wait_for_everyone()
    summary["model"] = unwrapped
    return summary
