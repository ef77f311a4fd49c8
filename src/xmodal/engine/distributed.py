"""Process-group setup and the few collectives the engine needs.

`torchrun --nproc_per_node N -m xmodal train ...` sets RANK / WORLD_SIZE / LOCAL_RANK and
MASTER_ADDR / MASTER_PORT; `init_distributed` then joins the group with env:// (gloo on CPU,
nccl on GPU). Without those variables everything runs as a group of one and the
collectives below are identities, so the same engine code serves both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from xmodal.errors import XModalError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise XModalError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise XModalError(f"train.device={device!r}: expected 'auto', 'cpu' or 'cuda'")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def current() -> DistInfo:
    """The group this process is in now (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                        torch.device("cpu"), dist.get_backend())
    return DistInfo()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's loss depends on all ranks' features, so the gradient of the summed loss
    w.r.t. this rank's features is the sum over ranks of the slices (all_reduce + slice;
    all_reduce works on every backend, unlike reduce_scatter on gloo).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_ints(values: List[int], device: torch.device | str = "cpu") -> List[List[int]]:
    """A few integers from every rank (e.g. batch size and frame count), in rank order."""
    if world_size() == 1:
        return [[int(v) for v in values]]
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return [[int(x) for x in p.tolist()] for p in parts]


def gather_sizes(n: int, device: torch.device | str = "cpu") -> List[int]:
    """First-dimension size of every rank's tensor, in rank order."""
    return [v[0] for v in gather_ints([n], device)]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))], dim=0)


def gather_with_grad(x: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """Concatenate `x` over ranks (rank order), gradient-carrying.

    `sizes` (from `gather_sizes`) allows ranks with different batch sizes (samples dropped
    for unreadable media): rows are padded for the collective and the padding is cut off.
    """
    if world_size() == 1:
        return x
    if sizes is None or len(set(sizes)) == 1:
        return _GatherWithGrad.apply(x)
    full = _GatherWithGrad.apply(_pad_rows(x, max(sizes)))
    big = max(sizes)
    return torch.cat([full[r * big:r * big + s] for r, s in enumerate(sizes)], dim=0)


def gather_no_grad(x: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """Concatenate over ranks without gradient (masks, indices)."""
    if world_size() == 1:
        return x
    big = max(sizes) if sizes else x.shape[0]
    padded = _pad_rows(x, big).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    if sizes is None:
        return torch.cat(parts, dim=0)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (evaluation shards)."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    big = max(sizes)
    pad = x.new_zeros((big - x.shape[0],) + tuple(x.shape[1:]))
    padded = torch.cat([x, pad], dim=0).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world_size()


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `t` over ranks (one collective, no host synchronisation)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
    return t


def all_gather_object(obj: Any) -> List[Any]:
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
