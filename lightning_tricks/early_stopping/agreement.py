"""One monitored value that every rank agrees on, through the strategy's public collectives (and what EarlyStopping does
when it is missing)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.early_stopping.rules import fmt
from lightning_tricks.errors import MonitorNotFoundError


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


def agreed_monitor_value(trainer: pl.Trainer, monitor: str, strict: bool, verbose: bool,
                         warned_unsynced: bool) -> tuple[Tensor | None, bool]:
    """The monitored value every rank agrees on, or None to skip the check (on every rank alike), and whether
    the warning about a value that differs across ranks has been given (``warned_unsynced``, updated).

    Must be called on every rank (see :func:`agree_across_ranks`).

    Raises:
        InvalidArgumentError: the monitored value is not a scalar.
        MonitorNotFoundError: ``strict`` and ``monitor`` is missing (on some ranks: on every rank).
    """
    logs = trainer.callback_metrics
    value = logs.get(monitor)
    if value is not None:
        value = torch.as_tensor(value).detach()
        if value.numel() != 1:
            raise InvalidArgumentError(
                f"`monitor`={monitor!r} is a tensor of shape {tuple(value.shape)}: expected a scalar metric.")
    world = trainer.world_size
    count = int(value is not None)
    if world > 1:
        value, count, agreed = agree_across_ranks(trainer.strategy, value, world)
        if not agreed and count == world and not warned_unsynced and bool(torch.isfinite(value)):
            warned_unsynced = True
            rank_zero_warn(
                f"EarlyStopping: `{monitor}` differs across ranks: it was logged without sync_dist=True. "
                f"Every rank now uses the mean over ranks ({fmt(value)} at this check), so all of them take the "
                "same decision; log it with sync_dist=True (or a torchmetrics metric) to choose the reduction.",
                category=RuntimeWarning)
    if count == world:
        return value.squeeze(), warned_unsynced
    message = (
        f"Early stopping conditioned on metric `{monitor}` which is not available"
        + (f" on {world - count} of {world} ranks" if count else "")
        + ". Pass in or modify your `EarlyStopping` callback to use any of the following: "
        f"`{'`, `'.join(logs.keys())}` (or set strict=False to skip checks where it is missing)."
    )
    if strict:
        raise MonitorNotFoundError(message)
    if verbose:
        rank_zero_warn(message, category=RuntimeWarning)
    return (None if value is None else value.squeeze()), warned_unsynced
