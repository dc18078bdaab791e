"""Rank-aware helpers: owned random generators and collectives that are safe without a process group.

Every helper here is a no-op on a single process, so the same code path serves CPU, one GPU and DDP.
Collectives must be called by *every* rank (calling one on a subset of ranks hangs): the helpers are
written to be called unconditionally from hooks that all ranks run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_MIX = 0x9E3779B97F4A7C15  # splitmix64 increment (golden ratio)


def is_distributed() -> bool:
    """Whether a default process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _splitmix64(x: int) -> int:
    x = (x + _MIX) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from ``seed`` and any number of integers (rank, step, ...), stable across runs.

    Each part is absorbed after a full avalanche (splitmix64), so (seed=0, rank=1) and (seed=1,
    rank=0) give unrelated seeds.
    """
    h = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    for part in parts:
        h = _splitmix64(h ^ (part & 0xFFFFFFFFFFFFFFFF))
    return h & 0x7FFFFFFFFFFFFFFF


def make_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``derive_seed(seed, *parts)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *parts))
    return generator


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce ``tensor`` in place (sum, max, min or mean) across ranks; identity on one process.

    Works for tensors on any device: under the gloo backend a CUDA tensor is reduced on CPU.
    """
    if not is_distributed():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    work = tensor
    if tensor.device.type != "cpu" and dist.get_backend() == "gloo":
        work = tensor.cpu()
    dist.all_reduce(work, op=ops[op])
    if op == "mean":
        work /= dist.get_world_size()
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            work = tensor.data
            if work.device.type != "cpu" and dist.get_backend() == "gloo":
                work = work.cpu()
            dist.broadcast(work, src=src)
            if work is not tensor.data:
                tensor.data.copy_(work)
