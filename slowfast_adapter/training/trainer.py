"""One training loop on accelerate, used by `slowfast-adapter train`, the needle demo and the quickstart.

`Trainer(model, args, batches, ...).fit()` runs AdamW with a warmup schedule over `batches`, a callable
`batches(epoch, skip)` that yields this process's batches of `epoch` without the first `skip` (a DataLoader
over a resumable plan, endless random batches, one batch repeated). Each concern is one method:

- `setup`: fp32 master weights under mixed precision, optimizer groups, scheduler and `accelerator.prepare`;
- `resume`: continue exactly from a checkpoint (weights, optimizer, scheduler, RNG states, data position);
- `step`: forward, backward, gradient clipping and the optimizer step, with gradient accumulation;
- `log`: progress bar, `log.jsonl` and a text callback;
- `checkpoint`: written to a temporary folder and renamed into place only when complete;
- `evaluate`: an optional score every `eval_every` steps; keeps the best weights and stops at a target
  score or when the score stopped improving.

With `output_dir=None` (the demo, the quickstart) nothing is written and there is nothing to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

try:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
except ImportError:  # torch built without distributed support
    pass
from transformers import get_scheduler

from ..io.files import atomic_write_text
from .accelerator import make_accelerator
from .recipe import TrainArgs
from .sharded_weights import gathered_trainable, load_trainable_state, trainable_state

TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer_full.pt"
GROUPS = ("slowfast", "lora", "projector")

BatchSource = Callable[[int, int], Iterable[dict[str, Any]]]
"""`batches(epoch, skip)`: this process's batches of `epoch` without the first `skip`; may never end."""


# ---------------------------------------------------------------------------------- parameter groups
def parameter_group_name(name: str) -> str:
    """'slowfast', 'lora' or 'projector' for a trainable parameter name of a SlowFastModel."""
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


def parameter_groups(model: nn.Module, learning_rates: dict[str, float], weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of a SlowFastModel: each trainable parameter in exactly one of slowfast / lora /
    projector, each with its own learning rate; weight decay only on weight matrices (not biases, gates,
    norms). Empty groups are skipped."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((parameter_group_name(name), param.ndim >= 2), []).append(param)
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


def one_group(model: nn.Module, lr: float, name: str = "all") -> list[dict]:
    """Every trainable parameter of any model in one optimizer group, without weight decay."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.0, "name": name}]


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


# ------------------------------------------------------------------------------------------ engine
HALF_PRECISION = (torch.bfloat16, torch.float16)


def fp32_master_weights(model: nn.Module) -> list[str]:
    """Cast `model`'s trainable half-precision parameters to fp32 in place; returns their names.

    accelerate's mixed precision autocasts the forward (the matmuls still run in bf16/fp16) but leaves the
    parameters as they are: on a base loaded in bf16 the adapter would train in bf16, with bf16 gradients and AdamW
    moments and no fp32 master copy. An update smaller than half a bf16 step (2^-9 to 2^-8 of the weight) then
    rounds away: AdamW moves a weight by about lr per step, so lr 2e-4 would leave every weight above 1/16 in
    magnitude unchanged (and fp16's GradScaler refuses to unscale fp16 gradients). fp32 trainable parameters fix
    that, as PEFT does for its adapters (`autocast_adapter_dtype=True`) and accelerate's FSDP2 for every trainable
    parameter. The parameter objects stay the same (`param.data` is replaced), so optimizer groups built before or
    after hold them; the frozen base keeps its dtype."""
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype in HALF_PRECISION:
            param.data = param.data.to(torch.float32)
            names.append(name)
    return names


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


def _interactive() -> bool:
    """Whether progress bars can redraw in place: a terminal or a notebook (in a file or pipe they would glue log
    lines onto their last state)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """Train `model`'s trainable parameters on `batches` with the optimisation settings of `args`.

    groups: optimizer parameter groups (default: `parameter_groups` of a SlowFastModel with
        `args.learning_rate`; pass `one_group(model, lr)` for any other model).
    steps_per_epoch: for `args.num_epochs`; None when `args.max_steps` bounds the run.
    output_dir: where checkpoints, `log.jsonl`, the final adapter and `train_summary.json` go; None: nowhere.
    data: what else must match for an exact resume (e.g. the number of samples), stored in checkpoints.
    evaluate, eval_every: a score (higher is better) computed every `eval_every` steps and at the end;
        the best-scoring weights are kept. Training stops once the score reaches `stop_at`, or after
        `patience` evaluations in a row without a better score.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainArgs,
        batches: BatchSource,
        *,
        accelerator: Accelerator | None = None,
        groups: list[dict] | None = None,
        steps_per_epoch: int | None = None,
        output_dir: Path | None = None,
        data: dict[str, Any] | None = None,
        evaluate: Callable[[], float] | None = None,
        eval_every: int = 0,
        stop_at: float | None = None,
        patience: int | None = None,
        name: str = "train",
        log: Callable[[str], None] = tqdm.write,
    ) -> None:
        if args.max_steps is None and steps_per_epoch is None:
            raise ValueError("Give args.max_steps, or steps_per_epoch for args.num_epochs.")
        self.args, self.batches, self.output_dir, self.name = args, batches, output_dir, name
        self.accelerator = accelerator or make_accelerator(args)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = args.max_steps or args.num_epochs * steps_per_epoch
        self.evaluate_fn, self.eval_every, self.stop_at, self.patience = evaluate, eval_every, stop_at, patience
        self._log = log
        self.data = {
            "num_processes": self.accelerator.num_processes,
            "per_device_batch_size": args.per_device_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed,
            **(data or {}),
        }
        self.state: dict[str, Any] = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "losses": []}
        self.scores: list[float] = []
        self.best_score, self._best_weights, self._since_best = float("-inf"), None, 0
        self.setup(model, groups)

    # -------------------------------------------------------------------------------------- setup
    def setup(self, model: nn.Module, groups: list[dict] | None) -> None:
        """fp32 master weights, optimizer, scheduler and `accelerator.prepare`; accelerate saves only the trainable
        tensors.

        Under mixed precision (bf16/fp16 autocast) half-precision trainable parameters become fp32 first
        (`fp32_master_weights`): their gradients, AdamW moments, checkpoints and the saved adapter are fp32 too.
        DeepSpeed is left alone: it casts the module to bf16/fp16 itself and keeps fp32 master weights in its
        optimizer. With `mixed_precision: no` the parameters train in the dtype they have (a bf16 base with
        `no` trains in pure bf16, as asked)."""
        args, accelerator = self.args, self.accelerator
        self.upcast: list[str] = []
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if accelerator.mixed_precision in ("bf16", "fp16") and not deepspeed:
            self.upcast = fp32_master_weights(model)
        self.groups = groups or parameter_groups(model, args.learning_rate, args.weight_decay)
        self.trainable = sum(p.numel() for g in self.groups for p in g["params"])
        optimizer = torch.optim.AdamW(self.groups, betas=tuple(args.adam_betas), eps=args.adam_epsilon)
        warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(
            "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
        )
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = args.per_device_batch_size
            ds_config["gradient_clipping"] = args.max_grad_norm or 0.0
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Checkpoints hold the trainable tensors only, never the frozen base: accelerate would write/read the
        # whole model. Under FSDP (FSDP2) accelerate's save_state has no such hook: the trainable tensors and the
        # optimizer state are gathered whole (`_save_sharded`) and resharded on resume, so a checkpoint is the
        # same few files as a one-process run's. DeepSpeed keeps its own engine checkpoint (optimizer partitions
        # per rank), written without the frozen parameters.
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self.own_weights = accelerator.distributed_type != DistributedType.DEEPSPEED
        if self.own_weights and not self.sharded:
            accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
            accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    # ------------------------------------------------------------------------------------- resume
    def resume(self, checkpoint: Path) -> None:
        """Continue exactly where `checkpoint` (written by `checkpoint`) left off."""
        saved = json.loads((checkpoint / TRAINER_STATE).read_text())
        if saved["data"] != self.data:
            raise ValueError(
                f"Cannot resume exactly from {checkpoint}: it was written with {saved['data']}, this run has "
                f"{self.data}. Use the same processes, batch sizes, seed and data, or start a new output_dir."
            )
        if self.sharded:
            self._load_sharded(checkpoint)
        elif self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.accelerator.load_state(str(checkpoint), load_module_strict=False)  # saved without the frozen base
        else:
            self.accelerator.load_state(str(checkpoint))
        if self.own_weights:
            load_trainable_state(self.unwrapped, load_file(str(checkpoint / TRAINABLE)))
        self.state.update({k: saved[k] for k in self.state})
        self.log(f"resumed from {checkpoint} at step {self.state['global_step']}")

    # --------------------------------------------------------------------------------------- step
    def step(self, batch: dict[str, Any]) -> None:
        """Forward and backward one micro-batch; clip and step the optimizer at accumulation boundaries."""
        accelerator = self.accelerator
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.args.max_grad_norm:
                accelerator.clip_grad_norm_(self.params, self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state["batches_in_epoch"] += 1
        self.tally += torch.tensor(
            [loss.item(), 1, batch["input_ids"].shape[0], batch["attention_mask"].sum().item()], dtype=torch.float64
        )

    def end_step(self, stop_requested: bool) -> tuple[bool, bool]:
        """After an optimizer step: schedule, log, evaluate and checkpoint. Returns (interrupted, done):
        whether any process was asked to stop (SIGTERM), and whether training ends here."""
        accelerator, state = self.accelerator, self.state
        self.scheduler.step()
        state["global_step"] += 1
        flag = torch.tensor([float(stop_requested)], dtype=torch.float64)
        summed = accelerator.reduce(torch.cat([self.tally, flag]).to(accelerator.device), reduction="sum").cpu()
        self.tally.zero_()
        loss = float(summed[0] / summed[1])
        state["losses"].append(round(loss, 6))
        elapsed, self.window_start = time.perf_counter() - self.window_start, time.perf_counter()
        self.log_step(loss, float(summed[2] / elapsed), float(summed[3] / elapsed))
        interrupted = bool(summed[4] > 0)
        done = interrupted or state["global_step"] >= self.total_steps
        if self.evaluation_due() and not interrupted:
            done = self.evaluate() or done
        if self.output_dir is not None and (state["global_step"] % self.args.save_steps == 0 or done):
            path = self.checkpoint()
            if interrupted:
                self.log(f"stop requested: checkpoint {path} written at step {state['global_step']}; rerun to resume")
        return interrupted, done

    # ---------------------------------------------------------------------------------------- log
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self._log(message)

    def log_step(self, loss: float, samples_per_s: float, tokens_per_s: float) -> None:
        """Progress bar, one `log.jsonl` record per step and a text line every `logging_steps`."""
        step = self.state["global_step"]
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{next(iter(lrs.values())):.2e}",
            samples_s=f"{samples_per_s:.2f}",
            tok_s=f"{tokens_per_s:.0f}",
        )
        if self.output_dir is not None and self.accelerator.is_main_process:
            record = {
                "step": step,
                "epoch": self.state["epoch"],
                "loss": loss,
                "lr": lrs,
                "samples_per_s": samples_per_s,
                "tokens_per_s": tokens_per_s,
            }
            with (self.output_dir / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % self.args.logging_steps == 0 or step == self.total_steps:
            rates = ", ".join(
                f"{rate:.3g}" if group == "all" else f"{group} {rate:.3g}"
                for group, rate in lrs.items()
                if not group.endswith("_no_decay")
            )
            window = self.state["losses"][-self.args.logging_steps :]
            self.log(
                f"{self.name} step {step}/{self.total_steps} loss {sum(window) / len(window):.4f} "
                f"(mean of the last {len(window)} steps) lr {rates}"
            )

    # --------------------------------------------------------------------------------- checkpoint
    def checkpoint(self) -> Path:
        """Write `output_dir/checkpoints/checkpoint-<step>` through a temporary folder renamed when complete;
        keep the newest `save_total_limit`."""
        accelerator, step = self.accelerator, self.state["global_step"]
        root = self.output_dir / "checkpoints"
        final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self.sharded:
            self._save_sharded(tmp)
        elif accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.save_state(str(tmp), exclude_frozen_parameters=True)  # the engine's files, no base weights
        else:
            accelerator.save_state(str(tmp))
        tensors = trainable_state(self.unwrapped)  # on every rank: gathering FSDP2/ZeRO-3 shards is collective
        with gathered_trainable(self.unwrapped, tensors):  # FSDP: whole adapter tensors for save_pretrained
            if accelerator.is_main_process:
                self.unwrapped.save_pretrained(tmp / "adapter")
        accelerator.wait_for_everyone()  # every rank's files (RNG states, engine partitions) are written
        if accelerator.is_main_process:
            if self.own_weights:
                save_file(tensors, str(tmp / TRAINABLE), metadata={"format": "pt"})
            (tmp / TRAINER_STATE).write_text(json.dumps({**self.state, "data": self.data}, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint appears complete, or not at all
            old = list_checkpoints(self.output_dir)
            if self.args.save_total_limit:
                for path in old[: max(0, len(old) - self.args.save_total_limit)]:
                    shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _save_sharded(self, folder: Path) -> None:
        """FSDP: the optimizer state gathered whole (torch.distributed.checkpoint's full state dict, on rank 0),
        the scheduler and every rank's RNG states (accelerate's files). Collective."""
        accelerator = self.accelerator
        optimizer = get_optimizer_state_dict(
            self.model, self.optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if accelerator.is_main_process:
            torch.save(optimizer, folder / OPTIMIZER)
        save_accelerator_state(
            str(folder), [], [], [self.scheduler], [], accelerator.process_index, self.state["global_step"]
        )

    def _load_sharded(self, checkpoint: Path) -> None:
        """FSDP: undo `_save_sharded`; each rank keeps its shard of the whole optimizer state. Collective."""
        optimizer = torch.load(checkpoint / OPTIMIZER, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model, self.optimizer.optimizer, optimizer, options=StateDictOptions(full_state_dict=True)
        )
        load_accelerator_state(str(checkpoint), [], [], [self.scheduler], [], self.accelerator.process_index)

    # ----------------------------------------------------------------------------------- evaluate
    def evaluation_due(self) -> bool:
        """Every `eval_every` steps and at the last step, when there is something to evaluate."""
        if self.evaluate_fn is None or self.eval_every < 1:
            return False
        step = self.state["global_step"]
        return step % self.eval_every == 0 or step >= self.total_steps

    def evaluate(self) -> bool:
        """Score the model, keep its weights if best so far; whether training should stop."""
        score = self.evaluate_fn()
        self.model.train()
        self.scores.append(score)
        self.log(f"{self.name} step {self.state['global_step']}: validation {score:.3f}")
        if score > self.best_score:
            self.best_score, self._best_weights, self._since_best = score, trainable_state(self.unwrapped), 0
        else:
            self._since_best += 1
        if self.stop_at is not None and score >= self.stop_at:
            self.log(f"{self.name}: validation reached {self.stop_at:g}, stopping")
            return True
        if self.patience and self._since_best >= self.patience:
            self.log(f"{self.name}: no better validation score in {self.patience} evaluations, stopping")
            return True
        return False

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, resume_from: Path | None = None) -> dict[str, Any]:
        """Train to `total_steps`, a stop rule or a SIGTERM; returns a summary (with the model)."""
        accelerator, state = self.accelerator, self.state
        if resume_from is not None:
            self.resume(resume_from)
            if state["global_step"] >= self.total_steps:  # finished, or killed after its last checkpoint
                self.log(
                    f"{self.name}: the run is complete ({resume_from} is at step {state['global_step']} of "
                    f"{self.total_steps}); nothing was trained or written. Raise train.max_steps to train further."
                )
                return {**self.summary(interrupted=False), "already_complete": True, "model": self.unwrapped}
        total = sum(p.numel() for p in self.unwrapped.parameters())
        per_epoch = f", {self.steps_per_epoch} per epoch" if self.steps_per_epoch else ""
        names = list(dict.fromkeys(g["name"].removesuffix("_no_decay") for g in self.groups))
        groups = "" if names == ["all"] else f" (learning-rate groups: {', '.join(names)})"
        processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
        if accelerator.distributed_type != DistributedType.NO:
            processes += f" ({accelerator.distributed_type.value})"
        self.log(
            f"training {self.trainable:,d} of {total:,d} parameters{groups} on {processes}, mixed precision "
            f"{accelerator.mixed_precision}"
            f"{f' ({len(self.upcast)} trainable tensors upcast to fp32)' if self.upcast else ''}; "
            f"{self.total_steps} steps{per_epoch}"
        )
        stop = _Stop()
        previous = stop.install() if self.output_dir is not None else {}
        if self.output_dir is not None and accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(self.output_dir / "log.jsonl", state["global_step"])  # past a killed run's checkpoint
        self.bar = tqdm(
            total=self.total_steps,
            initial=state["global_step"],
            disable=not accelerator.is_main_process or not _interactive(),  # log lines only, in files and pipes
            desc=self.name,
            dynamic_ncols=True,
        )
        self.model.train()
        self.tally = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, samples, tokens (this rank)
        self.window_start, interrupted, done = time.perf_counter(), False, False
        try:
            with logging_redirect_tqdm() if not self.bar.disable else contextlib.nullcontext():  # lines above the bar
                while not done:
                    epoch = state["epoch"]
                    for batch in self.batches(epoch, state["batches_in_epoch"]):
                        self.step(batch)
                        if accelerator.sync_gradients:
                            interrupted, done = self.end_step(stop.requested)
                            if done:
                                break
                    else:  # the epoch ran out: the next one starts from its first batch
                        state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._best_weights is not None:
            load_trainable_state(self.unwrapped, self._best_weights)
        return self.finish(interrupted)

    def summary(self, *, interrupted: bool) -> dict[str, Any]:
        """What the run did: steps, losses, processes, trainable parameters (and validation scores)."""
        summary = {
            "global_step": self.state["global_step"],
            "total_steps": self.total_steps,
            "stopped_early": interrupted,
            "losses": self.state["losses"],
            "num_processes": self.accelerator.num_processes,
            "trainable_parameters": self.trainable,
        }
        if self.scores:
            summary["scores"], summary["best_score"] = self.scores, self.best_score
        return summary

    def finish(self, interrupted: bool) -> dict[str, Any]:
        """The run's summary; unless interrupted, the adapter and summary are saved to `output_dir`."""
        summary = self.summary(interrupted=interrupted)
        if self.output_dir is not None and not interrupted:
            with gathered_trainable(self.unwrapped):  # FSDP: whole adapter tensors (collective)
                if self.accelerator.is_main_process:
                    self.unwrapped.save_pretrained(self.output_dir / "adapter")
            if self.accelerator.is_main_process:
                (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
                self.log(f"adapter saved to {self.output_dir / 'adapter'}")
        self.accelerator.wait_for_everyone()
        summary["model"] = self.unwrapped
        return summary
