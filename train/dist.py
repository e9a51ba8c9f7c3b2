"""Several processes under torchrun: process group, device per rank, DDP (or FSDP2) wrapping, gradient
accumulation so the global batch does not depend on the process count, and rank-0-first work.

With one process (plain ``python -m train``) every function here is a no-op around the model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from cli import UserError
from devices import resolve_device

__all__ = ["Context", "setup", "teardown", "wrap", "micro_batches", "no_sync_unless_last", "main_first",
           "mean_across_ranks", "FullModelState", "FullOptimizerState"]


@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str, fsdp: bool = False) -> Context:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Context(device, fsdp=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device, rank, world_size, local_rank, fsdp)


def teardown(ctx: Context) -> None:
    if ctx.world_size > 1 and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """The model to train: itself with one process, DDP with several, FSDP2 (``fully_shard``) with --fsdp."""
    if ctx.world_size == 1:
        return model
    if ctx.fsdp:
        from torch.distributed.fsdp import fully_shard

        # Every transformer block is its own unit (gathered just before it runs, freed after), then the
        # rest (embeddings, norms, head) is the root's. Parameters become DTensor shards in place.
        for stack in model.modules():
            if isinstance(stack, torch.nn.ModuleList):
                for block in stack:
                    fully_shard(block)
        return fully_shard(model)

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def micro_batches(batch_size: int, micro_batch_size: int | None, ctx: Context) -> int:
    """How many forward/backward passes each process makes per optimizer step for a global ``batch_size``."""
    if batch_size % ctx.world_size:
        raise UserError(f"--batch-size {batch_size} must be divisible by the {ctx.world_size} processes")
    per_rank = batch_size // ctx.world_size
    if micro_batch_size is None:
        return 1
    if micro_batch_size < 1 or per_rank % micro_batch_size:
        raise UserError(f"--micro-batch-size {micro_batch_size} must divide the per-process batch {per_rank}")
    return per_rank // micro_batch_size


@contextlib.contextmanager
def no_sync_unless_last(model: torch.nn.Module, last: bool, ctx: Context) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
    if ctx.world_size > 1 and not last and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def main_first(ctx: Context) -> Iterator[None]:
    """Rank 0 runs the block first (building a cache, say); the others run it after, finding the result."""
    if ctx.world_size > 1 and not ctx.is_main:
        torch_dist.barrier()
    yield
    if ctx.world_size > 1 and ctx.is_main:
        torch_dist.barrier()


def mean_across_ranks(value: float, ctx: Context) -> float:
    """The mean of a per-process float over all processes (itself with one)."""
    if ctx.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    torch_dist.all_reduce(tensor)
    return tensor.item() / ctx.world_size


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class FullModelState:
    """An FSDP2-sharded model seen through ``state_dict`` / ``load_state_dict`` as its whole, unsharded state.

    ``gather()`` is a collective (every rank calls it); rank 0 then holds the full tensors on the CPU,
    the others an empty dict, which is all ``Run.save_checkpoint`` (rank 0 writes) needs. Loading takes
    the full state on every rank and shards it back.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state: dict = {}

    def gather(self) -> FullModelState:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.state = get_model_state_dict(self.model, options=_full_options(cpu_offload=True))
        return self

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=_full_options(strict=strict))


class FullOptimizerState:
    """The optimizer of an FSDP2 model, its state gathered whole (keyed by parameter name) like FullModelState."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.state: dict = {}

    def gather(self) -> FullOptimizerState:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self.state = get_optimizer_state_dict(self.model, self.optimizer, options=_full_options(cpu_offload=True))
        return self

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=_full_options())
