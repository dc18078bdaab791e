"""Stop a run whose training loss diverges: not finite, or above a multiple of the first loss.

CS231n, "babysitting the learning process": a loss that explodes to NaN means the learning rate is
too high (or the initialization is bad), and in a hyperparameter search "if the cost is ever > 3 *
original cost, break out early". :class:`DivergenceStop` applies both rules to the loss each
``training_step`` returns and sets ``trainer.should_stop`` at the first step that breaks one, with
the same decision on every DDP rank.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_tricks._validation import InvalidArgumentError, check_range

_DIAGNOSIS = "the lectures' diagnosis: learning rate too high or bad initialization"


def _loss_value(outputs: Any) -> float | None:
    """The scalar loss in what ``training_step`` returned (a tensor or a dict with ``"loss"``), else None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None


class DivergenceStop(Callback):
    """Stop training at the first step whose training loss is not finite or exceeds ``factor`` x the first loss.

    The loss is the one your ``training_step`` returned (a tensor, or a dict with a ``"loss"`` tensor),
    read in ``on_train_batch_end``; steps that return no loss are skipped. The reference is the loss of
    the first training step (before any update), averaged over DDP ranks; it is kept in the checkpoint,
    so a resumed run compares with the same reference. Under DDP every rank stops at the same step as
    soon as any rank's loss diverged. Stopping follows Lightning's rules for ``trainer.should_stop``:
    ``min_epochs``/``min_steps`` keep a run going. Each step costs one scalar read of the loss and,
    under DDP, one all-reduce of a boolean.

    The ``factor`` rule assumes a positive loss (cross-entropy, MSE); it is skipped, with a warning,
    when the first loss is not positive. A new ``fit`` with the same callback object starts afresh.

    Args:
        factor: stop when the loss exceeds ``factor`` x the first loss; > 1, or None to use only the
            finiteness rule (what the ``lightning-tricks`` CLI adds by default).
        check_finite: stop when the loss is NaN or infinite.
        verbose: log the reason (rank zero) when stopping.

    Attributes:
        first_loss: the first training loss (mean over ranks), or None before the first step.
        stopping_reason: one line saying why training stopped, or None while it has not.
        stopped_step: the ``trainer.global_step`` of the batch whose loss diverged (0 for the first
            batch), or None.
        stopped_epoch: the epoch of that batch, or None.

    Raises:
        InvalidArgumentError: ``factor`` <= 1, or both rules switched off.

    Examples:
        >>> stop = DivergenceStop(factor=3.0)
        >>> trainer = pl.Trainer(callbacks=[stop])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> stop.stopping_reason  # doctest: +SKIP
        "DivergenceStop: training loss nan at step 12 (epoch 0): the lectures' diagnosis: ..."
    """

    def __init__(self, factor: float | None = 3.0, check_finite: bool = True, verbose: bool = True) -> None:
        if factor is not None:
            check_range("factor", factor, 1.0, None, low_inclusive=False)
        if factor is None and not check_finite:
            raise InvalidArgumentError(
                "`factor`=None with `check_finite`=False is invalid: expected at least one rule switched on.")
        self.factor = None if factor is None else float(factor)
        self.check_finite = bool(check_finite)
        self.verbose = bool(verbose)
        self.first_loss: float | None = None
        self.stopping_reason: str | None = None
        self.stopped_step: int | None = None
        self.stopped_epoch: int | None = None
        self._batch_step = 0
        self._warned_nonpositive = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(factor=self.factor, check_finite=self.check_finite)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before a checkpoint is restored: a second fit with this object must not reuse the first fit's reference
        if stage == "fit":
            self.first_loss = self.stopping_reason = self.stopped_step = self.stopped_epoch = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the optimizer step this batch's loss belongs to

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopping_reason is not None:
            return
        value = _loss_value(outputs)
        if value is not None and pl_module.automatic_optimization:
            value *= trainer.accumulate_grad_batches  # Lightning hands over the loss divided by it
        if self.first_loss is None:
            self._set_first_loss(trainer, pl_module, value)
        diverged = value is not None and self._diverged(value)
        # every rank calls the collective at every step: stop on all ranks if any rank diverged
        if not trainer.strategy.reduce_boolean_decision(diverged, all=False):
            return
        self.stopped_step, self.stopped_epoch = self._batch_step, trainer.current_epoch
        self.stopping_reason = self._reason(trainer, pl_module, value)
        trainer.should_stop = True
        if self.verbose:
            rank_zero_warn(self.stopping_reason)

    def _diverged(self, value: float) -> bool:
        if not math.isfinite(value):
            return self.check_finite
        reference = self.first_loss
        return self.factor is not None and reference is not None and reference > 0 and value > self.factor * reference

    def _set_first_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float | None) -> None:
        """All ranks: the mean over ranks of the finite first losses (None when no rank has one yet)."""
        finite = value is not None and math.isfinite(value)
        local = torch.tensor([value if finite else 0.0, 1.0 if finite else 0.0], dtype=torch.float64,
                             device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        if float(total[1]) == 0:
            return
        self.first_loss = float(total[0] / total[1])
        if self.factor is not None and self.first_loss <= 0 and not self._warned_nonpositive:
            self._warned_nonpositive = True
            rank_zero_warn(f"DivergenceStop: the first training loss is {self.first_loss:.4g} (not positive): the "
                           f"rule 'loss > {self.factor:g} x first loss' is skipped; only non-finite losses stop.")

    def _reason(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float | None) -> str:
        """The same line on every rank: the worst loss over ranks (NaN before inf before the largest value)."""
        local = math.nan if value is None else value
        # rank code 3 = nan, 2 = inf, 1 = finite above the threshold, 0 = fine or no loss
        code = 3.0 if value is not None and math.isnan(value) else 2.0 if value is not None and math.isinf(value) \
            else 1.0 if value is not None and self._diverged(value) else 0.0
        row = torch.tensor([code, local if code == 1.0 else -math.inf], dtype=torch.float64, device=pl_module.device)
        rows = trainer.strategy.all_gather(row).reshape(-1, 2).cpu()
        worst = int(rows[:, 0].max())
        where = f"at step {self._batch_step} (epoch {trainer.current_epoch})"
        if worst >= 2:
            shown = "nan" if worst == 3 else "inf"
            return f"DivergenceStop: training loss {shown} {where}: {_DIAGNOSIS}."
        largest = float(rows[:, 1].max())
        return (f"DivergenceStop: training loss {largest:.4g} {where} exceeds {self.factor:g} x the first loss "
                f"{self.first_loss:.4g}: {_DIAGNOSIS}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        # only the reference: a run resumed from a checkpoint (say with a lower learning rate) is checked afresh
        return {"first_loss": self.first_loss}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_loss = state_dict.get("first_loss")


__all__ = ["DivergenceStop"]
