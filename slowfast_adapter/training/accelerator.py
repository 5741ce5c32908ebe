"""The `Accelerator` of a training run: the engine the launcher picked (DDP, FSDP, DeepSpeed), mixed precision, and
FSDP2 on CPU processes, which accelerate does not offer by itself. The one module that touches accelerate's internal
state (`PartialState._shared_state`)."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, GradientAccumulationPlugin

from .recipe import TrainArgs


def _mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(args: TrainArgs, *, cpu: bool = False) -> Accelerator:
    """The accelerator for `args` (the launcher picks DDP, FSDP or DeepSpeed); `cpu`: stay on the CPU.

    On the CPU accelerate always picks plain multi-process data parallelism (MULTI_CPU) and ignores an FSDP
    launch config; with several processes and `ACCELERATE_USE_FSDP=true` (what `accelerate launch` sets for
    `distributed_type: FSDP`) we switch its state to FSDP, which torch's FSDP2 runs on gloo (see `fsdp_on_cpu`).
    """
    # DeepSpeed runs on the CPU through its own CPU accelerator, but accelerate enables it only without cpu=True
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    on_cpu = (cpu or not torch.cuda.is_available()) and not deepspeed
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(backend="gloo")  # else accelerate finds no backend and each process trains alone
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=_mixed_precision(args.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )
    if on_cpu and accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        fsdp_on_cpu(accelerator)
    return accelerator


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Make a CPU accelerator (MULTI_CPU, gloo) prepare the model with FSDP2 from the launch config's plugin.

    accelerate (1.15) only enables FSDP for accelerator devices, but `fully_shard` itself runs on gloo with
    CPU tensors (DTensor on a "cpu" device mesh); everything accelerate does for FSDP2 afterwards (prepare,
    clip_grad_norm_, save_state/load_state through torch.distributed.checkpoint) works there. FSDP1 is refused:
    its CPU path is not the one accelerate or we test."""
    plugin = accelerator.state.fsdp_plugin if getattr(accelerator.state, "fsdp_plugin", None) else None
    plugin = plugin or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on the CPU needs fsdp_version: 2 (FSDP2) in the accelerate config.")
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    # every later AcceleratorState() copies PartialState's fields over its own: set it there too, as accelerate
    # itself does when it picks FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
