"""Trainable weights under sharding engines: snapshots, restores and whole-tensor views of a model's trainable
parameters that work alike without sharding, under FSDP2 (DTensor shards) and under DeepSpeed ZeRO-3 (partitions).
Gathering is collective: every function here is called on every rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; gathering is collective: every rank must call), else itself."""
    return tensor.full_tensor() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _zero3_partitioned(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters DeepSpeed ZeRO-3 partitioned (they carry a `ds_id`); [] for any other engine."""
    return [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]


@contextlib.contextmanager
def _zero3_gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """DeepSpeed's `GatheredParameters` (collective) when there are ZeRO-3 partitions, else nothing."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of every trainable parameter of `model`, by name: contiguous CPU copies (never views).

    Under FSDP2 and ZeRO-3 the parameters are gathered whole (a collective: call it on every rank)."""
    with _zero3_gathered(_zero3_partitioned(model)):
        return {
            n: _full(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (from `trainable_state`) into `model`'s trainable parameters; the names must match.

    Under FSDP2 each rank keeps its own shard of the whole tensors (every rank must hold all of `tensors`); under
    ZeRO-3 rank 0's copy is partitioned to all (collective)."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(
            f"Checkpoint parameters do not match this run: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}. Resume with the recipe that wrote the checkpoint."
        )
    with torch.no_grad(), _zero3_gathered(_zero3_partitioned(model), modifier_rank=0):
        for name, tensor in tensors.items():
            param = params[name]
            if DTensor is not None and isinstance(param, DTensor):  # this rank's shard, no communication
                tensor = distribute_tensor(
                    tensor.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
                )
            param.copy_(tensor)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside: `model`'s trainable parameters that FSDP2 holds sharded are whole tensors (`tensors`, by default
    `trainable_state(model)`), so `save_pretrained` and `state_dict` write full adapter files; the frozen base
    stays sharded. Gathering is collective: enter it on every rank. Without FSDP2 or ZeRO-3 it does nothing.

    ZeRO-3: DeepSpeed's `GatheredParameters`. FSDP2: its `unshard()` is not enough, module state dicts still
    return the DTensor shards; so the registered parameters are swapped for the gathered tensors for the duration
    and put back after."""
    partitioned = _zero3_partitioned(model)
    if partitioned:
        with _zero3_gathered(partitioned):
            yield
        return
    sharded = [
        (name, module, attr, param)
        for module_name, module in model.named_modules()
        for attr, param in module.named_parameters(recurse=False)
        if param.requires_grad and DTensor is not None and isinstance(param, DTensor)
        for name in [f"{module_name}.{attr}" if module_name else attr]
    ]
    if not sharded:
        yield
        return
    tensors = trainable_state(model) if tensors is None else tensors
    for name, module, attr, _ in sharded:
        setattr(module, attr, nn.Parameter(tensors[name], requires_grad=True))
    try:
        yield
    finally:
        for _, module, attr, param in sharded:
            setattr(module, attr, param)
