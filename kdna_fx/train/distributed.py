"""DistributedDataParallel plumbing: one process per device, started by torchrun (env:// rendezvous).

Order matters for KernelDNA: the model is traced/transformed first (transform refuses or unwraps DDP and
compiled models), then optionally converted to SyncBatchNorm, then wrapped in DDP, then compiled.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from kdna_fx.errors import ConfigError



@dataclass
class DistContext:
    """Where this process sits: its rank, the world size, its device, and whether we started the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group if needed.

    ``device``: 'cpu', 'cuda' or None (CUDA when available). Backend: nccl on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if use_cuda:
        explicit = torch.device(device).index if device not in (None, "auto") else None
        index = local_rank if world > 1 else (explicit or 0)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank, world, local_rank, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=dev if use_cuda else None)
        ctx.owns_group = True
    return ctx


def cleanup(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``model`` (already transformed, on its device) in DistributedDataParallel.

    A KernelDNA parent kernel is one Parameter read by the parent and all its children, so DDP sees it once
    and all-reduces its summed gradient once; every rank then applies the same update.
    """
    if not ctx.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm everywhere, the BatchNorm1d inside KernelDNA gates included (a gate calls its norm module).

    Needs CUDA when run under a process group: PyTorch's SyncBatchNorm has no CPU implementation.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def has_batch_statistics(model: nn.Module) -> bool:
    """True when some layer normalises over the batch (BatchNorm, including a gate's BatchNorm1d)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def warn_per_process_bn(model: nn.Module, ctx: DistContext, sync_bn: bool) -> None:
    if ctx.distributed and not sync_bn and has_batch_statistics(model):
        if ctx.is_main:
            warnings.warn("BatchNorm layers (including KernelDNA gate norms) use per-process batch statistics "
                          "under DDP; pass --sync-bn (CUDA) for global-batch statistics.", stacklevel=3)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes items r, r + W, ... with no padding, so summed counts are exact."""

    def __init__(self, size: int, ctx: DistContext):
        self.size, self.rank, self.world = size, ctx.rank, ctx.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))
