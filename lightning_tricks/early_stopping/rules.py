"""The stopping decision without Lightning: one validator, the rules beyond Lightning's, and :class:`StoppingRule`.

:class:`StoppingRule` and the callback share :class:`StoppingLogic`, which holds everything
Lightning's ``EarlyStopping`` does not: the margin (``abs`` or ``rel``), ``start_from_epoch``, Keras's
``baseline``, the best epoch, the ``worse_for`` and average-change triggers and the messages. Lightning's
own part of the decision (non-finite value, stopping and divergence thresholds, improvement and patience)
is, in the callback, Lightning's ``_evaluate_stopping_criteria`` itself, and in :class:`StoppingRule` the
same algorithm written out (a test compares them step by step on random sequences).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch import Tensor

from lightning_tricks.core.monitor_mode import infer_mode
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_optional_int,
    check_optional_number,
)
from lightning_tricks.errors import StoppingArgumentError  # noqa: F401  (re-exported)

MODES = ("min", "max")
THRESHOLD_MODES = ("abs", "rel")
TRIGGERS = ("non_finite", "stopping_threshold", "divergence_threshold", "patience", "baseline", "worse_for",
            "average_change")
"""Values of :attr:`EarlyStopping.stopping_trigger` (and :attr:`StopDecision.trigger`)."""

LIGHTNING_REASON = {
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    # Lightning's enum has one "no more progress" member; `stopping_trigger` tells these apart.
    "patience": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "baseline": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "worse_for": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "average_change": EarlyStoppingReason.PATIENCE_EXHAUSTED,
}
"""Lightning's ``stopping_reason`` for each of our triggers."""

TRIGGER_OF_REASON = {
    EarlyStoppingReason.NON_FINITE_METRIC: "non_finite",
    EarlyStoppingReason.STOPPING_THRESHOLD: "stopping_threshold",
    EarlyStoppingReason.DIVERGENCE_THRESHOLD: "divergence_threshold",
    EarlyStoppingReason.PATIENCE_EXHAUSTED: "patience",
}


def resolve_mode(mode: str | None, monitor: str) -> str:
    """``mode`` when given (checked), else the one :func:`~lightning_tricks.core.monitor_mode.infer_mode` reads in ``monitor``."""
    if mode is None:
        return infer_mode(monitor)
    if mode not in MODES:  # Lightning's wording, which `except`/`match` clauses written for Lightning look for
        raise StoppingArgumentError(
            f"`mode` can be min, max or None (inferred from the monitored name), got {mode}.")
    return mode


def validate_stopping_arguments(
    *, monitor: Any, patience: Any, min_delta: Any, threshold_mode: Any, baseline: Any, start_from_epoch: Any,
    worse_for: Any, average_window: Any, min_average_change: Any, check_finite: Any, stopping_threshold: Any,
    divergence_threshold: Any, **flags: Any,
) -> None:
    """The one validator of :class:`StoppingRule` and :class:`~lightning_tricks.early_stopping.EarlyStopping`.

    ``flags`` are further booleans (``verbose``, ``strict``, ...). Raises :class:`StoppingArgumentError`
    with one line naming the argument, its value and what is allowed.
    """
    try:
        if not isinstance(monitor, str) or not monitor:
            raise InvalidArgumentError(f"`monitor`={monitor!r} is invalid: expected the name of a logged metric.")
        check_int("patience", patience, 0)
        check_non_negative("min_delta", min_delta)
        if math.isinf(min_delta):
            raise InvalidArgumentError(f"`min_delta`={min_delta!r} is invalid: expected a finite number >= 0.")
        check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
        for name, value in (("baseline", baseline), ("stopping_threshold", stopping_threshold),
                            ("divergence_threshold", divergence_threshold)):
            check_optional_number(name, value)
        check_int("start_from_epoch", start_from_epoch, 0)
        check_optional_int("worse_for", worse_for, 1)
        check_optional_int("average_window", average_window, 1)
        check_non_negative("min_average_change", min_average_change)
        if average_window is not None and not min_average_change > 0:
            raise InvalidArgumentError(
                f"`min_average_change`={min_average_change!r} is invalid with `average_window`={average_window}: "
                "expected a number > 0 (a mean absolute change is never below 0, so the trigger would never fire)."
            )
        if average_window is None and min_average_change > 0:
            raise InvalidArgumentError(
                f"`average_window`=None is invalid with `min_average_change`={min_average_change!r}: expected the "
                "number of changes to average (an integer >= 1), or leave min_average_change at 0."
            )
        check_bool("check_finite", check_finite)
        for name, value in flags.items():
            if not (name == "check_on_train_epoch_end" and value is None):
                check_bool(name, value)
    except StoppingArgumentError:
        raise
    except InvalidArgumentError as error:
        raise StoppingArgumentError(str(error)) from None


def fmt(value: Any) -> str:
    """A number as the messages print it."""
    return f"{float(value):.6g}"


@dataclass(frozen=True)
class StopDecision:
    """What :meth:`StoppingRule.step` concluded from one check.

    Attributes:
        improved: the value is the new best (the caller should keep the current weights).
        stop: a trigger fired.
        trigger: which one (one of :data:`TRIGGERS`), or None.
        message: a human-readable sentence: the trigger, the epoch, the value, the best score and its epoch
            when stopping; the improvement otherwise (None for an ignored check).
        ignored: the check was before ``start_from_epoch``.
    """

    improved: bool
    stop: bool
    trigger: str | None = None
    message: str | None = None
    ignored: bool = False


class StoppingLogic:
    """The rules beyond Lightning's, shared by :class:`StoppingRule` and the callback.

    The host class sets the arguments (``monitor``, ``mode``, ``patience``, ``threshold_mode``, ``baseline``,
    ``start_from_epoch``, ``worse_for``, ``average_window``, ``min_average_change``, ``check_finite``) and
    ``min_delta_magnitude`` (``min_delta`` >= 0), and keeps Lightning's state (``best_score``, ``wait_count``);
    this class keeps the rest of the state (``best_epoch``, ``worse_count``, ``history``, ``checks``).
    """

    monitor: str
    mode: str
    patience: int
    threshold_mode: str
    baseline: float | None
    start_from_epoch: int
    worse_for: int | None
    average_window: int | None
    min_average_change: float
    check_finite: bool
    min_delta_magnitude: float
    best_score: Tensor
    wait_count: int

    def _reset_progress(self) -> None:
        self.best_epoch = -1
        self.worse_count = 0
        self.history: list[float] = []
        self.checks = 0

    # -- comparisons ----------------------------------------------------------------------------
    def _better(self, a: Tensor | float, b: Tensor | float) -> bool:
        return bool(a < b) if self.mode == "min" else bool(a > b)

    def margin(self, reference: Tensor | float | None) -> float:
        """The improvement margin against ``reference``: ``min_delta``, or ``min_delta * |reference|`` in ``rel`` mode."""
        if self.threshold_mode == "rel" and reference is not None and math.isfinite(float(reference)):
            return self.min_delta_magnitude * abs(float(reference))
        return self.min_delta_magnitude

    def is_improvement(self, value: Tensor | float, reference: Tensor | float) -> bool:
        """Whether ``value`` beats ``reference`` by more than :meth:`margin` (Lightning's expression in ``abs`` mode)."""
        value, reference = torch.as_tensor(value), torch.as_tensor(reference)
        signed = self.margin(reference) if self.mode == "max" else -self.margin(reference)
        return self._better(value - signed, reference.to(value.device))

    def ignores(self, current: Tensor, epoch: int) -> bool:
        """A check before ``start_from_epoch`` is ignored, unless it must stop training as non-finite."""
        return epoch < self.start_from_epoch and not (self.check_finite and not bool(torch.isfinite(current)))

    def mean_absolute_change(self) -> float | None:
        """Mean of ``|v_t - v_{t-1}|`` over the last ``average_window`` changes, or None before enough checks."""
        if self.average_window is None or len(self.history) < self.average_window + 1:
            return None
        window = self.history[-(self.average_window + 1):]
        return sum(abs(window[i + 1] - window[i]) for i in range(self.average_window)) / self.average_window

    # -- after Lightning's part of the decision -------------------------------------------------
    def _finish_check(self, current: Tensor, epoch: int, best_before: Tensor, wait_before: int, stop: bool,
                      trigger: str | None) -> tuple[bool, bool, str | None]:
        """Apply our rules after Lightning's; returns ``(improved, stop, trigger)``.

        Lightning's part has updated ``best_score`` (a new object on improvement) and ``wait_count``.
        """
        self.checks += 1
        improved = self.best_score is not best_before
        if (not improved and trigger in ("stopping_threshold", "divergence_threshold")
                and self.is_improvement(current, best_before)):
            # Lightning stops at a threshold before comparing with the best; this check's weights are the best.
            self.best_score, improved = current, True
        if improved:
            self.best_epoch = epoch
            if self.baseline is not None and not self.is_improvement(current, self.baseline):
                # Keras: only an improvement that also beats the baseline restarts the wait; it never stops.
                self.wait_count = wait_before + 1
        previous = self.history[-1] if self.history else None
        worsening = previous is not None and not improved and self._better(previous, float(current))
        self.worse_count = self.worse_count + 1 if worsening else 0
        self.history.append(float(current))
        del self.history[:-(max(self.average_window or 1, self.worse_for or 1) + 1)]
        if not stop and self.worse_for is not None and self.worse_count >= self.worse_for:
            stop, trigger = True, "worse_for"
        mean_change = self.mean_absolute_change()
        if not stop and mean_change is not None and mean_change < self.min_average_change:
            stop, trigger = True, "average_change"
        if trigger == "patience" and self.baseline is not None and not self.is_improvement(self.best_score,
                                                                                           self.baseline):
            trigger = "baseline"
        return improved, stop, (trigger if stop else None)

    # -- messages -------------------------------------------------------------------------------
    def describe_best(self) -> str:
        """``"Best <monitor>=<value> at epoch <e>."`` (or that there is none yet)."""
        if self.best_epoch < 0:
            return f"No best {self.monitor} yet."
        return f"Best {self.monitor}={fmt(self.best_score)} at epoch {self.best_epoch}."

    def stop_sentence(self, trigger: str, epoch: int, current: Tensor) -> str:
        """``"Early stopping (<trigger>) at epoch <e>: <why>. Best ..."``."""
        op = "<" if self.mode == "min" else ">"
        margin = (f"min_delta={fmt(self.min_delta_magnitude)}" if self.threshold_mode == "abs"
                  else f"min_delta={fmt(self.min_delta_magnitude)} x |best|")
        if trigger == "non_finite":
            why = f"{self.monitor}={fmt(current)} is not finite (check_finite)"
        elif trigger == "stopping_threshold":
            why = f"{self.monitor}={fmt(current)} {op} stopping_threshold={fmt(self.stopping_threshold)}"
        elif trigger == "divergence_threshold":
            why = f"{self.monitor}={fmt(current)} is worse than divergence_threshold={fmt(self.divergence_threshold)}"
        elif trigger == "baseline":
            why = (f"{self.monitor} did not beat baseline={fmt(self.baseline)} (by more than {margin}) in "
                   f"{self.wait_count} checks (patience={self.patience})")
        elif trigger == "patience":
            why = (f"{self.monitor} did not improve by more than {margin} in {self.wait_count} checks "
                   f"(patience={self.patience})")
        elif trigger == "worse_for":
            trail = " -> ".join(fmt(v) for v in self.history[-(self.worse_count + 1):])
            why = f"{self.monitor} got worse at each of the last {self.worse_count} checks ({trail}; worse_for={self.worse_for})"
        else:
            why = (f"the mean absolute change of {self.monitor} over the last {self.average_window} changes is "
                   f"{fmt(self.mean_absolute_change())} < min_average_change={fmt(self.min_average_change)}")
        return f"Early stopping ({trigger}) at epoch {epoch}: {why}. {self.describe_best()}"

    # -- checkpoint state -----------------------------------------------------------------------
    def _progress_state(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "worse_count": self.worse_count, "history": list(self.history),
                "checks": self.checks}

    def _load_progress(self, state: Mapping[str, Any]) -> None:
        self.best_epoch = int(state.get("best_epoch", -1))
        self.worse_count = int(state.get("worse_count", 0))
        self.history = [float(v) for v in state.get("history", [])]
        self.checks = int(state.get("checks", 0))

    stopping_threshold: float | None
    divergence_threshold: float | None


class StoppingRule(StoppingLogic):
    """The early-stopping decision as a plain object: one monitored value per check in, a decision out.

    No Lightning and no process group: under DDP the caller passes the same value on every rank (the
    callback reduces it first), and every rank then reaches the same decision. The rules are those of
    :class:`~lightning_tricks.early_stopping.EarlyStopping` (in Lightning's order: non-finite value, stopping
    threshold, divergence threshold, improvement or patience; then ``worse_for`` and the average change);
    the arguments mean what its do.

    Args:
        mode: ``"min"``, ``"max"``, or None to infer it from ``monitor``'s name (``"val_acc"`` -> max).
        patience: checks without improvement before stopping.
        min_delta: the margin an improvement must exceed (>= 0).
        threshold_mode: ``"abs"`` (margin ``min_delta``) or ``"rel"`` (margin ``min_delta * |best|``).
        baseline: Keras's: an improvement restarts the patience count only if it also beats this value.
        start_from_epoch: checks at earlier epochs are ignored.
        worse_for: stop after this many consecutive worsening checks, or None.
        average_window: the number of changes averaged by the average-change trigger, or None.
        min_average_change: stop when the mean absolute change over the window is below this.
        check_finite: stop at a NaN or infinite value.
        stopping_threshold: stop once the value is better than this.
        divergence_threshold: stop once the value is worse than this.
        monitor: the metric's name, for messages and mode inference.

    Examples:
        >>> rule = StoppingRule(mode="min", patience=2)
        >>> [rule.step(v, epoch).stop for epoch, v in enumerate([1.0, 0.8, 0.9, 0.85])]
        [False, False, False, True]
        >>> rule.best_epoch, float(rule.best_score)
        (1, 0.8)
    """

    def __init__(
        self,
        mode: str | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        threshold_mode: str = "abs",
        baseline: float | None = None,
        start_from_epoch: int = 0,
        worse_for: int | None = None,
        average_window: int | None = None,
        min_average_change: float = 0.0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        monitor: str = "metric",
    ) -> None:
        validate_stopping_arguments(
            monitor=monitor, patience=patience, min_delta=min_delta, threshold_mode=threshold_mode,
            baseline=baseline, start_from_epoch=start_from_epoch, worse_for=worse_for,
            average_window=average_window, min_average_change=min_average_change, check_finite=check_finite,
            stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold)
        self.mode = resolve_mode(mode, monitor)
        self.patience, self.min_delta_magnitude, self.threshold_mode = patience, min_delta, threshold_mode
        self.baseline, self.start_from_epoch, self.worse_for = baseline, start_from_epoch, worse_for
        self.average_window, self.min_average_change = average_window, min_average_change
        self.check_finite, self.stopping_threshold = check_finite, stopping_threshold
        self.divergence_threshold, self.monitor = divergence_threshold, monitor
        self.reset()

    @property
    def min_delta(self) -> float:
        return self.min_delta_magnitude

    def reset(self) -> None:
        """Forget every check (a fresh rule with the same arguments)."""
        self.best_score: Tensor = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        self.wait_count = 0
        self._reset_progress()

    def _lightning_part(self, current: Tensor) -> tuple[bool, str | None]:
        """Lightning's ``_evaluate_stopping_criteria``, with our margin: ``(stop, trigger)``; updates best and wait."""
        if self.check_finite and not bool(torch.isfinite(current)):
            return True, "non_finite"
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return True, "stopping_threshold"
        if self.divergence_threshold is not None and self._better(-current, -self.divergence_threshold):
            return True, "divergence_threshold"
        if self.is_improvement(current, self.best_score):
            self.best_score, self.wait_count = current, 0
            return False, None
        self.wait_count += 1
        return (True, "patience") if self.wait_count >= self.patience else (False, None)

    def step(self, value: Tensor | float, epoch: int) -> StopDecision:
        """Take one check of the monitored value at ``epoch`` and decide.

        Args:
            value: the monitored value (a number or a one-element tensor).
            epoch: the epoch of the check (0-based, as ``trainer.current_epoch``).

        Returns:
            The :class:`StopDecision`.
        """
        # A tensor keeps its dtype (Lightning's comparisons, bit for bit); a Python number stays double.
        current = (value.detach() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
                   ).squeeze()
        if current.numel() != 1:
            raise InvalidArgumentError(
                f"the monitored value of `{self.monitor}` has shape {tuple(current.shape)}: expected a scalar."
            )
        current = current.cpu().clone()
        if self.ignores(current, epoch):
            return StopDecision(improved=False, stop=False, ignored=True)
        best_before, wait_before = self.best_score, self.wait_count
        stop, trigger = self._lightning_part(current)
        improved, stop, trigger = self._finish_check(current, epoch, best_before, wait_before, stop, trigger)
        if stop:
            assert trigger is not None
            return StopDecision(improved, True, trigger, self.stop_sentence(trigger, epoch, current))
        if improved:
            gain = "" if not bool(torch.isfinite(best_before)) else f" by {fmt(abs(current - best_before))}"
            return StopDecision(True, False, message=f"{self.monitor} improved{gain} at epoch {epoch}: "
                                                     f"new best {fmt(current)}.")
        return StopDecision(improved=False, stop=False)

    def state_dict(self) -> dict[str, Any]:
        """Counters, best score and epoch, and the history window (weights_only-safe types)."""
        return {"best_score": self.best_score, "wait_count": self.wait_count, **self._progress_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (missing keys, as in Lightning's own state, start from zero)."""
        self.reset()
        if "best_score" in state:
            self.best_score = torch.as_tensor(state["best_score"]).detach().cpu()
        self.wait_count = int(state.get("wait_count", 0))
        self._load_progress(state)
