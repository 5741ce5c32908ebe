"""One training loop on accelerate, used by `slowfast-adapter train`, the needle demo and the quickstart.

`Trainer(model, args, batches, ...).fit()` runs AdamW with a warmup schedule over `batches`, a callable
`batches(epoch, skip)` that yields this process's batches of `epoch` without the first `skip` (a DataLoader
over a resumable plan, endless random batches, one batch repeated). Each concern is one method:

- `setup`: optimizer groups, scheduler and `accelerator.prepare`;
- `resume`: continue exactly from a checkpoint (weights, optimizer, scheduler, RNG states, data position);
- `step`: forward, backward, gradient clipping and the optimizer step, with gradient accumulation;
- `log`: progress bar, `log.jsonl` and a text callback;
- `checkpoint`: written to a temporary folder and renamed into place only when complete;
- `evaluate`: an optional score every `eval_every` steps; keeps the best weights and stops at a target
  score or when the score stopped improving.

With `output_dir=None` (the demo, the quickstart) nothing is written and there is nothing to resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, GradientAccumulationPlugin
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..files import atomic_write_text
from .recipe import TrainArgs

TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
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


# ------------------------------------------------------------------------------------ weights on disk
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of every trainable parameter of `model`, by name: contiguous CPU copies (never views)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (from `trainable_state`) into `model`'s trainable parameters; the names must match."""
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
def _mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(args: TrainArgs, *, cpu: bool = False) -> Accelerator:
    """The accelerator for `args` (the launcher picks DDP, FSDP or DeepSpeed); `cpu`: stay on the CPU."""
    return Accelerator(
        cpu=cpu or not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(args.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
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
        """Optimizer, scheduler and `accelerator.prepare`; accelerate saves only the trainable tensors."""
        args, accelerator = self.args, self.accelerator
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
        self.own_weights = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if self.own_weights:  # accelerate would write/read the whole frozen base; we keep the trainable tensors
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
            rates = ", ".join(f"{group} {rate:.3g}" for group, rate in lrs.items() if not group.endswith("_no_decay"))
            window = self.state["losses"][-self.args.logging_steps :]
            self.log(f"{self.name} step {step}/{self.total_steps} loss {sum(window) / len(window):.4f} lr {rates}")

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
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if self.own_weights:
                save_file(trainable_state(self.unwrapped), str(tmp / TRAINABLE), metadata={"format": "pt"})
            self.unwrapped.save_pretrained(tmp / "adapter")
            (tmp / TRAINER_STATE).write_text(json.dumps({**self.state, "data": self.data}, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint appears complete, or not at all
            old = list_checkpoints(self.output_dir)
            if self.args.save_total_limit:
                for path in old[: max(0, len(old) - self.args.save_total_limit)]:
                    shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

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
        total = sum(p.numel() for p in self.unwrapped.parameters())
        per_epoch = f", {self.steps_per_epoch} per epoch" if self.steps_per_epoch else ""
        self.log(
            f"training {self.trainable:,d} of {total:,d} parameters ({', '.join(g['name'] for g in self.groups)}) on "
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, mixed precision "
            f"{accelerator.mixed_precision}; {self.total_steps} steps{per_epoch}"
        )
        stop = _Stop()
        previous = stop.install() if self.output_dir is not None else {}
        if self.output_dir is not None and accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(self.output_dir / "log.jsonl", state["global_step"])  # past a killed run's checkpoint
        self.bar = tqdm(
            total=self.total_steps,
            initial=state["global_step"],
            disable=not accelerator.is_main_process,
            desc=self.name,
            dynamic_ncols=True,
        )
        self.model.train()
        self.tally = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, samples, tokens (this rank)
        self.window_start, interrupted, done = time.perf_counter(), False, False
        try:
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

    def finish(self, interrupted: bool) -> dict[str, Any]:
        """The run's summary; unless interrupted, the adapter and summary are saved to `output_dir`."""
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
        if self.output_dir is not None and self.accelerator.is_main_process and not interrupted:
            self.unwrapped.save_pretrained(self.output_dir / "adapter")
            (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            self.log(f"adapter saved to {self.output_dir / 'adapter'}")
        self.accelerator.wait_for_everyone()
        summary["model"] = self.unwrapped
        return summary
