"""Large-batch training: the linear scaling rule with gradual warm-up (Goyal et al. 2017).

When the global batch grows by a factor \\(k\\) (more GPUs, or gradient accumulation), multiply the
learning rate by \\(k\\); to survive the first steps, ramp it linearly from the reference value over a
warm-up. With \\(s(t)\\) the learning rate the user's optimizer and scheduler give at optimizer step
\\(t\\) (0-based), \\(T\\) the warm-up length in steps and
\\(k = \\frac{\\text{world size} \\times \\text{per-device batch} \\times \\text{accumulation}}{\\text{reference batch}}\\):

\\[ \\eta(t) = s(t)\\, m(t), \\qquad m(t) = 1 + (k - 1)\\frac{t}{T} \\text{ for } t < T, \\qquad m(t) = k \\text{ after.} \\]

(For \\(k \\le 1\\), \\(m = k\\): no warm-up is needed for a smaller batch.) The functional core is
:func:`scaling_factor` and :func:`lr_multiplier`; :class:`LargeBatchScaling` applies \\(m(t)\\) inside each
optimizer step through torch's optimizer step hooks (``register_step_pre_hook`` sets
``lr = s(t) * m(t)``, ``register_step_post_hook`` puts ``s(t)`` back). The user's scheduler therefore
runs unchanged on its own values, whatever it is (cosine, OneCycleLR, ReduceLROnPlateau,
``SnapshotEnsemble``'s cycles, ``Finetune``'s per-group rates), the checkpointed optimizer state holds
the unscaled values, and a resumed run, even on another number of devices, recomputes \\(k\\) and
continues the formula from ``trainer.global_step``. Under manual optimization, where ``global_step`` counts
every optimizer's steps (a GAN's generator and discriminator make two per batch), \\(t\\) counts each
optimizer's own steps, so the warm-up lasts as long in batches as with one optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_tricks._lightning_internals import callback_state_key
from lightning_tricks.core.validation import (
    ConfigError,
    InvalidArgumentError,
    check_bool,
    check_int,
    check_non_negative,
)

DEFAULT_WARMUP_EPOCHS = 5.0
"""Goyal et al.'s warm-up, used when neither ``warmup_epochs`` nor ``warmup_steps`` is given."""


def check_scaling_args(reference_batch_size: int | None, warmup_epochs: float | None, warmup_steps: int | None,
                       batch_size: int | None) -> None:
    """Validate :class:`LargeBatchScaling`'s arguments (one line per error)."""
    if reference_batch_size is not None:
        check_int("reference_batch_size", reference_batch_size, 1)
    if warmup_epochs is not None:
        check_non_negative("warmup_epochs", warmup_epochs)
    if warmup_steps is not None:
        check_int("warmup_steps", warmup_steps, 0)
    if warmup_epochs is not None and warmup_steps is not None:
        raise InvalidArgumentError(f"`warmup_epochs`={warmup_epochs!r} and `warmup_steps`={warmup_steps!r} are both "
                                   "set: expected one of them.")
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)


def scaling_factor(world_size: int, batch_size: int, accumulate_grad_batches: int = 1,
                   reference_batch_size: int | None = None) -> float:
    """``k = world_size * batch_size * accumulate_grad_batches / reference_batch_size`` (reference: ``batch_size``).

    Examples:
        >>> scaling_factor(world_size=4, batch_size=64)
        4.0
        >>> scaling_factor(world_size=2, batch_size=64, accumulate_grad_batches=4, reference_batch_size=256)
        2.0
    """
    return world_size * batch_size * accumulate_grad_batches / (reference_batch_size or batch_size)


def lr_multiplier(step: int, factor: float, warmup_steps: int) -> float:
    """``m(t)``: ``1 + (k - 1) t / T`` during the warm-up (``t < T``), ``k`` after; ``k`` throughout when ``k <= 1``.

    Examples:
        >>> tuple(lr_multiplier(t, factor=4.0, warmup_steps=3) for t in range(5))
        (1.0, 2.0, 3.0, 4.0, 4.0)
    """
    if factor <= 1.0 or step >= warmup_steps:
        return factor
    return 1.0 + (factor - 1.0) * step / warmup_steps


def _loader_batch_size(loader: Any) -> int | None:
    for source in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(source, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


class LargeBatchScaling(Callback):
    """Linear scaling rule with gradual warm-up: the learning rate follows the global batch size.

    The global batch is ``trainer.world_size * per-device batch * trainer.accumulate_grad_batches``. With
    the defaults (``reference_batch_size=None``: the per-device batch), the learning rate you tuned on one
    device is multiplied by the number of devices (and by the accumulation): going from 1 to 4 GPUs
    scales it by 4, after a 5-epoch linear warm-up from your learning rate. Set ``reference_batch_size``
    to the batch your learning rate was tuned for when that is not the per-device batch.

    Args:
        reference_batch_size: the global batch size the optimizer's learning rate was tuned for; ``None``
            takes the per-device batch size.
        warmup_epochs: epochs of linear warm-up from the reference learning rate (fractions allowed);
            ``None`` with ``warmup_steps=None`` means 5 (Goyal et al.). 0 switches the warm-up off.
        warmup_steps: the warm-up in optimizer steps instead of epochs.
        batch_size: the per-device batch size, when the train dataloader does not tell it (a custom
            batch sampler or an iterable dataset).
        log: log ``large_batch/lr_scale`` (``m(t)``) every step, next to the user's ``LearningRateMonitor`` which shows the
            unscaled schedule.

    Raises:
        InvalidArgumentError: a reference batch below 1, a negative warm-up, or both warm-up arguments.
        ConfigError: at train start, a per-device batch size that cannot be read and was not given.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(devices=4, callbacks=[LargeBatchScaling(warmup_epochs=5)])  # doctest: +SKIP
    """

    def __init__(self, reference_batch_size: int | None = None, warmup_epochs: float | None = None,
                 warmup_steps: int | None = None, batch_size: int | None = None, log: bool = True) -> None:
        check_scaling_args(reference_batch_size, warmup_epochs, warmup_steps, batch_size)
        self.reference_batch_size, self.warmup_epochs, self.warmup_steps = reference_batch_size, warmup_epochs, warmup_steps
        self.batch_size = batch_size
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        self.factor: float | None = None
        self.total_warmup_steps: int | None = None
        self.global_batch_size: int | None = None
        self.last_multiplier: float | None = None
        self._trainer: pl.Trainer | None = None
        self._handles: list[Any] = []
        self._saved: list[list[float]] = []
        self._own_steps: dict[int, int] | None = None  # manual optimization: steps taken by each optimizer

    @property
    def state_key(self) -> str:
        return callback_state_key(self, reference_batch_size=self.reference_batch_size)

    def _warmup_length(self, trainer: pl.Trainer) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        epochs = DEFAULT_WARMUP_EPOCHS if self.warmup_epochs is None else self.warmup_epochs
        if epochs == 0:
            return 0
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ConfigError("LargeBatchScaling cannot count the steps of an epoch of this train dataloader (no "
                              "length): give the warm-up as `warmup_steps`.")
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        return round(epochs * per_epoch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_device = self.batch_size or _loader_batch_size(trainer.train_dataloader)
        if per_device is None:
            raise ConfigError("LargeBatchScaling cannot read the per-device batch size from the train dataloader: "
                              "pass it as `batch_size`.")
        self.global_batch_size = trainer.world_size * per_device * trainer.accumulate_grad_batches
        self.factor = scaling_factor(trainer.world_size, per_device, trainer.accumulate_grad_batches,
                                     self.reference_batch_size)
        self.total_warmup_steps = self._warmup_length(trainer)
        self._trainer = trainer
        self._remove_hooks()
        if pl_module.automatic_optimization:
            self._own_steps = None
        else:  # global_step counts every optimizer's steps; a resumed run took as many with each
            start = trainer.global_step // max(1, len(trainer.optimizers))
            self._own_steps = {id(optimizer): start for optimizer in trainer.optimizers}
        for optimizer in trainer.optimizers:
            self._handles += [optimizer.register_step_pre_hook(self._scale),
                              optimizer.register_step_post_hook(self._restore)]
        rank_zero_info(f"LargeBatchScaling: global batch {self.global_batch_size} = {trainer.world_size} x {per_device}"
                       f" x {trainer.accumulate_grad_batches}; learning rates x{self.factor:g} after a warm-up of "
                       f"{self.total_warmup_steps} optimizer steps")

    def multiplier(self, step: int) -> float:
        """``m(step)`` for the current run (after train start)."""
        assert self.factor is not None and self.total_warmup_steps is not None, "called before on_train_start"
        return lr_multiplier(step, self.factor, self.total_warmup_steps)

    def _step_index(self, optimizer: torch.optim.Optimizer) -> int:
        """``t``: ``trainer.global_step``, or under manual optimization the steps ``optimizer`` itself has taken."""
        assert self._trainer is not None
        if self._own_steps is None:
            return self._trainer.global_step
        return self._own_steps.setdefault(id(optimizer), self._trainer.global_step // max(1, len(self._own_steps)))

    def _scale(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.last_multiplier = self.multiplier(self._step_index(optimizer))
        self._saved.append([group["lr"] for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.last_multiplier

    def _restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved.pop(), strict=True):
            group["lr"] = lr
        if self._own_steps is not None:
            self._own_steps[id(optimizer)] = self._step_index(optimizer) + 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.log_enabled and self.last_multiplier is not None:
            # the same on every rank: no sync needed
            pl_module.log("large_batch/lr_scale", self.last_multiplier, on_step=True, on_epoch=False)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._saved = [], []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
