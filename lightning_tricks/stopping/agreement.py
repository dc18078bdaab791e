"""One monitored value that every rank agrees on, through the strategy's public collectives."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor


def agree_across_ranks(strategy: Strategy, value: Tensor | None, world_size: int) -> tuple[Tensor | None, int, bool]:
    """The value every rank uses for a check, how many ranks logged it, and whether they all logged the same.

    Must be called on every rank (it runs collectives). When every rank holds rank 0's value (a synced
    metric, the usual case) that value is returned unchanged, dtype and all; otherwise every rank gets
    the mean over the ranks that have a value (None when none has). A NaN on any rank counts as a
    disagreement, so its NaN reaches the mean and ``check_finite`` stops every rank.

    Costs one broadcast and one boolean all-reduce per check, plus one all-reduce of two numbers when
    the ranks disagree.
    """
    present = value is not None
    local = float(value) if value is not None else 0.0
    rank0_present, rank0_value = strategy.broadcast((present, local), src=0)
    same = present == rank0_present and (not present or local == rank0_value)
    if strategy.reduce_boolean_decision(same, all=True):
        return value, (world_size if present else 0), True
    device = strategy.root_device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    packed = torch.tensor([float(present), local], dtype=dtype, device=device)
    total = strategy.reduce(packed, reduce_op="sum").cpu()
    count = int(total[0].item())
    return ((total[1] / count).to(torch.float32) if count else None), count, False
