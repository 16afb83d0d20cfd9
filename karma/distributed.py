"""All torch.distributed code of karma lives here; everything else calls these helpers.

The same code runs as one process or under torchrun: `init_distributed()` reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK) and falls back to a single process when RANK is unset.

    dist_info = init_distributed()                 # gloo on CPU, nccl on CUDA
    device = resolve_device("auto")                # the device rule of single-process commands
    objective = KarmaObjective(model, cfg.loss, dist_info.rank, dist_info.world_size)
    item_emb = gather_with_grad(item_emb)          # (sum_r N_r, k), gradients flow to every rank
    val = all_reduce_mean(torch.tensor(metric))
    cleanup()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from karma.errors import KarmaError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    is_main: bool
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(device: str = "auto") -> torch.device:
    """The one device rule: "auto" is CUDA when available, else CPU; "cpu"; "cuda" (the current
    CUDA device, an error when there is none)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise KarmaError("train.device=cuda: CUDA is not available here; use cpu or auto")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes, or describe a single process if RANK is unset.

    `device` is "auto" (CUDA when available), "cpu" or "cuda". The backend follows the device:
    nccl for CUDA, gloo for CPU.
    """
    dev = resolve_device(device)
    use_cuda = dev.type == "cuda"
    if "RANK" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, is_main=True, device=dev)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, device=dev
    )


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The first-dimension size `n` of every rank, in rank order ([n] on one process)."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather of equal-shape tensors whose backward sums the gradient over ranks."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)  # (W, N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's rows: sum their gradients, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) of all ranks along dim 0, keeping the autograd graph.

    Ranks may hold different N_r. In backward, the gradient of the gathered tensor is summed over
    ranks and each rank keeps its own slice, so after DDP divides by world_size the parameter
    gradient equals that of one process on the concatenated batch.
    """
    if not is_distributed():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    parts = _AllGather.apply(_pad_rows(t, max(sizes)))  # (W, N_max, ...)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


@torch.no_grad()
def gather_no_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) of all ranks along dim 0 without gradient (e.g. item ids)."""
    if not is_distributed():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    padded = _pad_rows(t, max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (a new tensor; `t` itself on one process)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (a new tensor; `t` itself on one process)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
