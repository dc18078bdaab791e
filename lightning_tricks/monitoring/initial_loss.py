"""Sanity checks before training for real: the initial loss is about log(C), and a small sample can be overfit.

CS231n, "babysitting the learning process": with small random weights a C-class softmax classifier
predicts about 1/C for every class, so its cross-entropy starts at about ``-log(1/C) = log(C)``
(2.30 for 10 classes). A start far from it means badly scaled logits (a too-large last layer, a
wrong loss reduction, inputs not normalized). Then: "make sure that you can overfit very small
portion of the training data" -- a model and loss that cannot reach ~100% training accuracy on a
batch or two have a bug.

* :class:`InitialLossCheck` reads the loss of the first training step (computed before the first
  optimizer step) and compares it with ``log(C)``.
* :func:`overfit_check` trains a copy of the model on the first batches of the training data with
  Lightning's ``overfit_batches`` and reports the accuracy reached.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks.core.batch import find_targets
from lightning_tricks.core.callback import HookHolder
from lightning_tricks.core.distributed import all_reduce
from lightning_tricks.core.lightning_classes import trainer_class_for
from lightning_tricks.core.model_probe import FoundModule, InputModuleProbe, infer_num_classes
from lightning_tricks.core.task import Task, check_task_kind, infer_task, require_task
from lightning_tricks.core.validation import (
    ConfigError,
    InvalidArgumentError,
    check_int,
    check_optional_int,
    check_positive,
    check_probability,
)
from lightning_tricks.errors import InitialLossError  # noqa: F401  (re-exported)
from lightning_tricks.monitoring.dead_units import NothingToMonitorError
from lightning_tricks.monitoring.measurements import log_measurement

_SERVED = ("classification", "multilabel", "dense")
_REGRESSION_FIX = ("a regression loss has no expected initial value (log C is for class scores); remove "
                   "InitialLossCheck, or pass task= if the model is a classifier.")


def expected_initial_loss(num_classes: int) -> float:
    """``log(C)``: the cross-entropy of a uniform prediction over ``num_classes`` classes.

    Examples:
        >>> round(expected_initial_loss(10), 4)
        2.3026
    """
    check_int("num_classes", num_classes, 2)
    return math.log(num_classes)


def _logits(output: Any) -> Tensor | None:
    if isinstance(output, dict):
        output = output.get("logits", next((v for v in output.values() if isinstance(v, Tensor)), None))
    elif isinstance(output, (tuple, list)):
        output = next((v for v in output if isinstance(v, Tensor)), None)
    return output if isinstance(output, Tensor) and output.ndim >= 2 else None


def _scores(output: Any) -> Tensor | None:
    """The model's scores for the task probe: like :func:`_logits`, also a single-logit ``[B]`` output."""
    if isinstance(output, Tensor) and output.ndim == 1 and output.is_floating_point():
        return output
    return _logits(output)


def _loss(outputs: Any) -> Tensor | None:
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, Tensor) and outputs.numel() == 1 else None


class InitialLossCheck(HookHolder):
    """Compare the loss of the first training step with ``log(C)`` and warn (or fail) when it is far off.

    The loss is the one your ``training_step`` returned for the first batch (Lightning passes it to
    ``on_train_batch_end``); it was computed before the first optimizer step, so it is the loss of the
    initial weights, in training mode, and costs nothing extra. Under DDP it is averaged over ranks
    and every rank takes the same decision. The logits are those of the outermost module the first
    step calls with the batch's input (hooks for that one step, see
    :class:`~lightning_tricks.core.model_probe.InputModuleProbe`), so ``self(x)``, ``self.forward(x)`` and
    ``self.model(x)`` in ``training_step`` all work. The check is skipped when fit resumes from a
    checkpoint past step 0.

    What the loss should be depends on the task, read once from those logits and the batch's targets
    (:func:`~lightning_tricks.core.task.infer_task`, or ``task``):

    * classification (``[B, C]`` scores, class-index or probability targets): ``log C``;
    * dense (``[B, C, *spatial]`` maps, masks ``[B, *spatial]``): ``log C`` with ``C`` the class
      dimension (dim 1), for a per-pixel cross-entropy averaged over pixels;
    * multi-label (``[B, C]`` scores, multi-hot targets; also a single-logit binary model and 0/1 float
      maps): ``log 2``, the binary cross-entropy of ``p = 0.5`` averaged over labels (BCE-with-logits'
      default ``mean``; a loss summed over labels starts at ``C log 2``);
    * regression: refused in one line (there is no expected value).

    ``C`` is ``num_classes`` when given, else found by :func:`~lightning_tricks.infer_num_classes`: the
    datamodule's ``num_classes``, else the size of the logits' class dimension, else the model's last
    ``nn.Linear``.

    It is off when ``|loss - expected| > tolerance * expected``; the warning gives both numbers. The check
    assumes a loss averaged over the batch; a regularization term added to the loss raises it (switch it
    off for this check, as the lectures say). ``initial_loss/observed`` and ``initial_loss/expected`` go
    through ``pl_module.log`` at the first step (``trainer.callback_metrics``) and to the loggers at step 0.

    Args:
        num_classes: C; None infers it (datamodule, logits, last ``nn.Linear``).
        tolerance: allowed relative deviation from ``log C``; > 0.
        fail: raise :class:`InitialLossError` instead of warning.
        task: ``classification``, ``multilabel``, ``dense``, ``regression`` (refused) or None (default):
            read from the first step's logits and targets.

    Attributes:
        observed: the first loss (mean over ranks), or None before the check.
        expected: ``log C``, or None before the check.
        passed: whether the loss was within the tolerance, or None before the check.
        task: the task the check read (or was given), or None before the check.

    Raises:
        TaskNotSupportedError: a regression model (``task="regression"`` at construction, else after the first step).
        InvalidArgumentError: an argument out of range; after the first step, no number of classes found
            (or the datamodule's disagrees with the logits).

    Examples:
        >>> check = InitialLossCheck(tolerance=0.2)
        >>> trainer = pl.Trainer(callbacks=[check])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> check.observed, check.expected  # doctest: +SKIP
        (2.31, 2.302585092994046)
    """

    def __init__(self, num_classes: int | None = None, tolerance: float = 0.25, fail: bool = False,
                 task: str | None = None) -> None:
        check_optional_int("num_classes", num_classes, 2)
        check_positive("tolerance", tolerance)
        self.num_classes, self.tolerance, self.fail = num_classes, tolerance, fail
        self.task_kind = check_task_kind("task", task)
        if task == "regression":
            require_task("InitialLossCheck", Task("regression", "values"), _SERVED, _REGRESSION_FIX)
        self.task: Task | None = None
        self._targets: Any = None
        self.observed: float | None = None
        self.expected: float | None = None
        self.passed: bool | None = None
        self._pending = False
        self._probe: InputModuleProbe | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after a checkpoint is restored: global_step > 0 means the weights are no longer initial
        self._pending = trainer.global_step == 0
        if not self._pending:
            rank_zero_info(f"InitialLossCheck: skipped, fit resumes at step {trainer.global_step}.")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending and self._probe is None:
            self._targets = find_targets(batch)
            self._probe = InputModuleProbe(pl_module, batch, accept=lambda output: _scores(output) is not None)
            self._probe.__enter__()

    def _remove_hook(self) -> FoundModule | None:
        """Close the probe; return what it found."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        probe.close()
        return probe.found

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._pending:
            return
        self._pending = False
        found = self._remove_hook()
        loss = _loss(outputs)
        if loss is None:
            raise NothingToMonitorError(
                "InitialLossCheck found no loss in what the first training_step returned "
                f"({type(outputs).__name__}): return the loss tensor (or a dict with a 'loss' tensor), which "
                "automatic optimization needs anyway and manual optimization allows."
            )
        scores = _scores(found.output) if found is not None else None
        targets, self._targets = self._targets, None
        if scores is not None:
            self.task = infer_task(scores, targets, self.task_kind)
        else:  # no model call seen: what the user said, else a classifier (the last nn.Linear gives C)
            self.task = Task(self.task_kind or "classification", "logits", sigmoid=self.task_kind == "multilabel")
        require_task("InitialLossCheck", self.task, _SERVED, _REGRESSION_FIX)
        num_classes = self.num_classes
        if self.task.sigmoid:
            num_classes = 2  # each label is a two-class problem: BCE of p = 1/2
        elif num_classes is None:
            logits = scores.movedim(1, -1) if scores is not None and scores.ndim >= 2 else None  # classes last
            num_classes = infer_num_classes(trainer, pl_module, "InitialLossCheck", logits=logits)
        if num_classes is None or num_classes < 2:
            raise NothingToMonitorError(f"InitialLossCheck found {num_classes} class(es): the check needs a "
                                        "classifier with C >= 2 classes; pass num_classes=C.")
        # the loss Lightning hands over is divided by accumulate_grad_batches; undo it, then average ranks
        value = loss.detach().double() * trainer.accumulate_grad_batches
        observed = float(all_reduce(value.clone(), "mean"))
        self.expected = expected_initial_loss(num_classes)
        self.observed = observed
        self.passed = math.isfinite(observed) and abs(observed - self.expected) <= self.tolerance * self.expected
        log_measurement(trainer, pl_module, {"initial_loss/observed": observed, "initial_loss/expected": self.expected},
                        step=0)
        what = ("a per-label sigmoid (binary cross-entropy, mean over labels)" if self.task.sigmoid else
                f"a {num_classes}-class softmax" + (" per position" if self.task.kind == "dense" else ""))
        message = (f"InitialLossCheck: the first training loss is {observed:.4f}, expected about log({num_classes}) = "
                   f"{self.expected:.4f} for {what} at initialization")
        if self.passed:
            rank_zero_info(f"{message}: ok (within {self.tolerance:.0%}).")
            return
        advice = (f", off by more than tolerance={self.tolerance}. Check the scale of the last layer's init, the "
                  "loss reduction ('mean'), input normalization, and that no regularization term is in the loss.")
        if self.fail:
            raise InitialLossError(message + advice)
        rank_zero_warn(message + advice)

    def release_hooks(self) -> None:
        self._remove_hook()


@dataclass(frozen=True)
class OverfitReport:
    """The outcome of :func:`overfit_check`.

    Attributes:
        accuracy: training accuracy on the overfit batches after training (eval mode).
        initial_loss: cross-entropy on them before training (eval mode).
        final_loss: cross-entropy on them after training (eval mode).
        num_samples: samples in the overfit batches.
        epochs: epochs trained.
        target_accuracy: the accuracy that counts as a pass.
    """

    accuracy: float
    initial_loss: float
    final_loss: float
    num_samples: int
    epochs: int
    target_accuracy: float

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.target_accuracy


def _split_batch(batch: Any, input_key: Any = None, target_key: Any = None) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a tuple, list or dict batch, through the shared batch accessor."""
    from lightning_tricks.core.batch import find_slot, get_item

    slot = find_slot(batch, input_key, "images", "overfit_check")
    targets = get_item(batch, find_slot(batch, target_key, "targets", "overfit_check",
                                        after=slot if isinstance(slot, int) else None))
    inputs = get_item(batch, slot)
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ConfigError("overfit_check needs tensors for the inputs and the targets; set input_key/target_key.")
    return inputs, targets


@torch.no_grad()
def _evaluate(model: pl.LightningModule, batches: list[Any], input_key: Any = None,
              target_key: Any = None) -> tuple[float, float, int]:
    model.eval()
    device = next(model.parameters()).device
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        x, y = _split_batch(batch, input_key, target_key)
        x, y = x.to(device), y.to(device)
        logits = _logits(model(x))
        if logits is None:
            raise ConfigError("overfit_check needs a model whose forward returns (batch, C) logits.")
        hard = y.argmax(dim=1) if y.is_floating_point() and y.ndim == 2 else y
        correct += int((logits.argmax(dim=-1) == hard).sum())
        total += int(hard.numel())
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
    return correct / max(total, 1), loss_sum / max(total, 1), total


def overfit_check(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloader: Any = None,
    num_batches: int = 1,
    max_epochs: int = 100,
    target_accuracy: float = 0.99,
    input_key: str | int | None = None,
    target_key: str | int | None = None,
    **trainer_kwargs: Any,
) -> OverfitReport:
    """Train a copy of ``model`` on the first ``num_batches`` training batches and report the accuracy reached.

    The CS231n sanity check: a correct model and loss drive the training accuracy on a tiny sample to
    about 100% (with regularization switched off). It runs Lightning's ``overfit_batches`` (the same
    first batches every epoch, shuffling disabled) on a deep copy, so ``model`` is left untouched,
    with no validation, logger or checkpoints; then it evaluates the copy on those batches in eval
    mode. Batches are ``(inputs, targets)`` tuples or lists, or dicts (``batch["image"]``/``batch["label"]``
    and the other usual names, or ``input_key``/``target_key``), and the forward must return logits. Run it
    on one device (the default); it is a debugging step, not a training run.

    Args:
        model: the LightningModule to check (not modified).
        datamodule: gives the training data (``setup("fit")`` and ``train_dataloader()`` are called).
        train_dataloader: the training data when there is no datamodule.
        num_batches: how many batches to overfit; >= 1.
        max_epochs: passes over them; >= 1.
        target_accuracy: the accuracy that counts as a pass; in [0, 1].
        input_key: where the inputs are in a batch: a dict key or a position (default: the usual names).
        target_key: where the targets are (default: the usual names, or the item after the inputs).
        **trainer_kwargs: more ``Trainer`` arguments (``accelerator``, ``precision``, ...).

    Returns:
        An :class:`OverfitReport`; ``report.passed`` tells whether ``target_accuracy`` was reached.

    Raises:
        InvalidArgumentError: bad arguments, or neither or both of ``datamodule`` and ``train_dataloader``.
        ConfigError: batches without findable inputs and targets (the message names the key to set), or a
            forward without logits.

    Examples:
        >>> report = overfit_check(MyModule(), datamodule=MyData(), num_batches=1)  # doctest: +SKIP
        >>> report.passed, report.accuracy  # doctest: +SKIP
        (True, 1.0)
    """
    check_int("num_batches", num_batches, 1)
    check_int("max_epochs", max_epochs, 1)
    check_probability("target_accuracy", target_accuracy)
    if (datamodule is None) == (train_dataloader is None):
        raise InvalidArgumentError("`datamodule`/`train_dataloader` is invalid: expected exactly one of them.")
    if datamodule is not None:
        datamodule.setup("fit")
        train_dataloader = datamodule.train_dataloader()
    trained = copy.deepcopy(model)
    settings: dict[str, Any] = dict(devices=1, max_epochs=max_epochs, overfit_batches=num_batches, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0)
    settings.update(trainer_kwargs)
    trainer = trainer_class_for(model)(**settings)  # pytorch_lightning's for a module written against it
    # the batches overfit_batches trains on: the first ones in dataset order (Lightning turns shuffling off)
    batches: list[Any] = []
    for batch in _sequential(train_dataloader):
        batches.append(batch)
        if len(batches) == num_batches:
            break
    _, initial_loss, num_samples = _evaluate(copy.deepcopy(model), batches, input_key, target_key)
    trainer.fit(trained, train_dataloaders=train_dataloader)
    accuracy, final_loss, _ = _evaluate(trained, batches, input_key, target_key)
    return OverfitReport(accuracy, initial_loss, final_loss, num_samples, trainer.current_epoch, target_accuracy)


def _sequential(loader: Any) -> Any:
    """The loader's batches in dataset order (what ``overfit_batches`` trains on)."""
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                          num_workers=0, drop_last=loader.drop_last)
    return loader


__all__ = ["InitialLossCheck", "InitialLossError", "OverfitReport", "expected_initial_loss", "overfit_check"]
