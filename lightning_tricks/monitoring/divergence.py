"""Stop a run whose training loss diverges: not finite, or above a multiple of the first loss.

CS231n, "babysitting the learning process": a loss that explodes to NaN means the learning rate is
too high (or the initialization is bad), and in a hyperparameter search "if the cost is ever > 3 *
original cost, break out early". :class:`DivergenceStop` applies both rules to the loss each
``training_step`` returns, or to the losses it logs (manual optimization: a GAN returns nothing), and
sets ``trainer.should_stop`` at the first step that breaks one, with the same decision on every DDP rank.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_tricks._lightning_internals import callback_state_key, training_step_logged
from lightning_tricks.core.validation import InvalidArgumentError, check_range
from lightning_tricks.errors import MonitorNotFoundError

_DIAGNOSIS = "the lectures' diagnosis: learning rate too high or bad initialization"
RETURNED = "loss"
"""The name the loss ``training_step`` returned goes by (``monitor=None``)."""


def _loss_value(outputs: Any) -> float | None:
    """The scalar loss in what ``training_step`` returned (a tensor or a dict with ``"loss"``), else None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None


def _scalars(logged: dict[str, Any]) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in logged.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1}


def _logged_losses(trainer: pl.Trainer) -> dict[str, float]:
    """This training step's logged scalars whose name says loss (``g_loss``, ``train/loss``, ``lossD``)."""
    return {name: v for name, v in _scalars(training_step_logged(trainer)).items() if "loss" in name.lower()}


class DivergenceStop(Callback):
    """Stop training at the first step whose training loss is not finite or exceeds ``factor`` x the first loss.

    What is watched, read in ``on_train_batch_end`` of every step:

    * ``monitor`` given: the value of that name your step logs (``self.log(monitor, ...)`` with
      ``on_step=True``, the default in ``training_step``); both rules apply to it.
    * else the loss your ``training_step`` returned (a tensor, or a dict with a ``"loss"`` tensor); both
      rules apply to it.
    * else (manual optimization: a GAN's step returns nothing) every value the step logs, or returns in
      a dict, whose name contains ``loss`` (``g_loss``, ``d_loss``): only the finiteness rule applies to them, as adversarial
      losses need not decrease (name the one that must with ``monitor`` to apply ``factor`` to it).

    The first step says once what is watched; with nothing to watch it warns once, in one line, what to
    pass (``monitor`` naming a value that the first step did not log is an error listing what it logged).

    The reference is the first finite watched loss (before any update), averaged over DDP ranks; it is
    kept in the checkpoint, so a resumed run compares with the same reference. Under DDP every rank stops
    at the same step as soon as any rank's loss diverged. Stopping follows Lightning's rules for
    ``trainer.should_stop``: ``min_epochs``/``min_steps`` keep a run going. Each step costs one scalar
    read per watched loss and, under DDP, one all-reduce of a boolean.

    The ``factor`` rule assumes a positive loss (cross-entropy, MSE); it is skipped, with a warning,
    when the first loss is not positive. A new ``fit`` with the same callback object starts afresh.

    Args:
        factor: stop when the loss exceeds ``factor`` x the first loss; > 1, or None to use only the
            finiteness rule (what the ``lightning-tricks`` CLI adds by default).
        check_finite: stop when the loss is NaN or infinite.
        verbose: log the reason (rank zero) when stopping.
        monitor: the name of a logged training value to watch instead of the returned loss (e.g.
            ``"g_loss"``); None: the returned loss, else the logged losses.

    Attributes:
        first_loss: the first training loss (mean over ranks), or None before the first step (and for
            logged losses, which only the finiteness rule checks).
        watched: the names watched at the first step (``["loss"]`` for the returned loss), or None before.
        stopping_reason: one line saying why training stopped, or None while it has not.
        stopped_step: the ``trainer.global_step`` of the batch whose loss diverged (0 for the first
            batch; with manual optimization ``global_step`` counts every optimizer's steps), or None.
        stopped_epoch: the epoch of that batch, or None.

    Raises:
        InvalidArgumentError: ``factor`` <= 1, both rules switched off, or an empty ``monitor``.
        MonitorNotFoundError: ``monitor`` names a value the first training step did not log.

    Examples:
        >>> stop = DivergenceStop(factor=3.0)
        >>> trainer = pl.Trainer(callbacks=[stop])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> stop.stopping_reason  # doctest: +SKIP
        "DivergenceStop: training loss nan at step 12 (epoch 0): the lectures' diagnosis: ..."
        >>> gan_stop = DivergenceStop(factor=None)  # a GAN that logs g_loss and d_loss: both are watched
    """

    def __init__(self, factor: float | None = 3.0, check_finite: bool = True, verbose: bool = True,
                 monitor: str | None = None) -> None:
        if factor is not None:
            check_range("factor", factor, 1.0, None, low_inclusive=False)
        if factor is None and not check_finite:
            raise InvalidArgumentError(
                "`factor`=None with `check_finite`=False is invalid: expected at least one rule switched on.")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise InvalidArgumentError(f"`monitor`={monitor!r} is invalid: expected the name of a value your "
                                       "training_step logs (self.log(name, ...)), or None.")
        self.factor = None if factor is None else float(factor)
        self.check_finite = bool(check_finite)
        self.verbose = bool(verbose)
        self.monitor = monitor
        self.first_loss: float | None = None
        self.watched: list[str] | None = None
        self.stopping_reason: str | None = None
        self.stopped_step: int | None = None
        self.stopped_epoch: int | None = None
        self._batch_step = 0
        self._warned_nonpositive = False

    @property
    @override
    def state_key(self) -> str:
        keys: dict[str, Any] = {"factor": self.factor, "check_finite": self.check_finite}
        if self.monitor is not None:
            keys["monitor"] = self.monitor
        return callback_state_key(self, **keys)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before a checkpoint is restored: a second fit with this object must not reuse the first fit's reference
        if stage == "fit":
            self.first_loss = self.stopping_reason = self.stopped_step = self.stopped_epoch = None
            self.watched = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the optimizer step this batch's loss belongs to

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> tuple[bool, dict[str, float]]:
        """``(whether both rules apply, {name: value})`` of what this step gives to watch."""
        if self.monitor is not None:
            logged = _scalars(training_step_logged(trainer))
            if self.monitor not in logged and self.watched is None:
                shown = ", ".join(sorted(logged)) or "nothing"
                raise MonitorNotFoundError(f"DivergenceStop: `monitor`={self.monitor!r} was not logged by the first training "
                                  f"step, which logged {shown}: log it with self.log({self.monitor!r}, loss) in "
                                  "training_step (on_step=True), or name one of those.")
            return True, {self.monitor: logged[self.monitor]} if self.monitor in logged else {}
        value = _loss_value(outputs)
        if value is not None:
            if pl_module.automatic_optimization:
                value *= trainer.accumulate_grad_batches  # Lightning hands over the loss divided by it
            return True, {RETURNED: value}
        if pl_module.automatic_optimization:
            return True, {}  # a step that returned no loss is skipped (Lightning skips its update too)
        returned = _scalars(outputs) if isinstance(outputs, dict) else {}  # {"g_loss": ..., "d_loss": ...}
        return False, {**{k: v for k, v in returned.items() if "loss" in k.lower()}, **_logged_losses(trainer)}

    def _announce(self, both_rules: bool, values: dict[str, float]) -> None:
        """Once, at the first step: what is watched, or that nothing is and what to pass."""
        self.watched = sorted(values)
        if not values:
            rank_zero_warn("DivergenceStop watches nothing: the first training step returned no loss and logged no "
                           "value named '*loss*' (with on_step=True); return the loss, log it with "
                           "self.log('train_loss', loss), or pass monitor='<a name your step logs>'.")
        elif not both_rules:
            rank_zero_info(f"DivergenceStop watches the logged losses {', '.join(self.watched)} (manual optimization):"
                           " a non-finite value stops training; pass monitor='<name>' to also apply the factor rule.")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopping_reason is not None:
            return
        both_rules, values = self._read(trainer, pl_module, outputs)
        if self.watched is None and (values or not pl_module.automatic_optimization):
            self._announce(both_rules, values)  # (a skipped automatic step, returning None, says nothing yet)
        reference = next(iter(values.values())) if both_rules and values else None
        if self.first_loss is None and both_rules:
            self._set_first_loss(trainer, pl_module, reference)
        diverged = any(self._diverged(v, both_rules) for v in values.values())
        # every rank calls the collective at every step: stop on all ranks if any rank diverged
        if not trainer.strategy.reduce_boolean_decision(diverged, all=False):
            return
        self.stopped_step, self.stopped_epoch = self._batch_step, trainer.current_epoch
        self.stopping_reason = self._reason(trainer, pl_module, values, both_rules)
        trainer.should_stop = True
        if self.verbose:
            rank_zero_warn(self.stopping_reason)

    def _diverged(self, value: float, both_rules: bool = True) -> bool:
        if not math.isfinite(value):
            return self.check_finite
        reference = self.first_loss
        return (both_rules and self.factor is not None and reference is not None and reference > 0
                and value > self.factor * reference)

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

    def _reason(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float],
                both_rules: bool) -> str:
        """The same line on every rank: the worst loss over ranks (NaN before inf before the largest value)."""
        # per rank, its worst watched value: code 3 = nan, 2 = inf, 1 = finite above the threshold, 0 = fine
        names = sorted(values)
        rows = [(3.0 if math.isnan(v) else 2.0 if math.isinf(v) else 1.0 if self._diverged(v, both_rules) else 0.0,
                 v, float(i)) for i, (name, v) in enumerate((n, values[n]) for n in names)]
        code, value, index = max(rows, key=lambda r: (r[0], r[1] if r[0] == 1.0 else -math.inf),
                                 default=(0.0, -math.inf, -1.0))  # the first of equally bad values
        row = torch.tensor([code, value if code == 1.0 else -math.inf, index], dtype=torch.float64,
                           device=pl_module.device)
        gathered = trainer.strategy.all_gather(row).reshape(-1, 3).cpu()
        worst_rank = int(torch.argmax(gathered[:, 0] * 4 + (gathered[:, 1] == gathered[:, 1].max())).item())
        worst, largest, at = (float(v) for v in gathered[worst_rank])
        name = names[int(at)] if 0 <= int(at) < len(names) else (self.watched or [RETURNED])[0]
        what = "training loss" if name == RETURNED and self.monitor is None else f"training loss {name!r}"
        where = f"at step {self._batch_step} (epoch {trainer.current_epoch})"
        if worst >= 2:
            shown = "nan" if worst == 3 else "inf"
            return f"DivergenceStop: {what} {shown} {where}: {_DIAGNOSIS}."
        return (f"DivergenceStop: {what} {largest:.4g} {where} exceeds {self.factor:g} x the first loss "
                f"{self.first_loss:.4g}: {_DIAGNOSIS}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        # only the reference: a run resumed from a checkpoint (say with a lower learning rate) is checked afresh
        return {"first_loss": self.first_loss}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_loss = state_dict.get("first_loss")


__all__ = ["DivergenceStop"]
