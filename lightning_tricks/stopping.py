"""Early stopping with the four classic triggers, restoring the best weights, the same on every DDP rank.

CS231n: "Early stopping: always do this. Stop training when accuracy on the validation set decreases,
or train for a long time but always keep track of the model snapshot that worked best on val."

Two layers, as everywhere in this package:

* the functional core, usable in any training loop without Lightning: :class:`StoppingRule` (the
  decision: feed it one monitored value per check, it says whether the value improved and whether
  to stop, and why) and :class:`WeightSnapshot` (a host-memory copy of a module's ``state_dict``,
  refreshed in place);
* :class:`EarlyStopping`, a drop-in subclass of Lightning's ``EarlyStopping`` that accepts all of
  its arguments with the same meaning and adds ``restore_best_weights`` (default True), ``baseline``,
  ``start_from_epoch``, ``worse_for``, ``average_window``/``min_average_change`` and
  ``threshold_mode``; it reduces an unsynced monitored value across ranks, so every rank takes the
  same decision, and keeps everything (counters, best score, history window, best weights) in its
  checkpoint state, so a resumed run stops where the uninterrupted one would.

The rules, one check at a time (value ``v`` at epoch ``e``; "better" means lower for ``mode="min"``):

* *improvement*: ``v`` is better than the best so far by more than ``min_delta`` (``abs``) or by more
  than ``min_delta * |best|`` (``rel``). Only an improvement updates the best score and the copy of
  the best weights.
* *patience* (Lightning's): ``wait_count`` counts the checks since the last improvement; stop at a
  check that is not an improvement when it reaches ``patience`` (``patience=0``: at the first one).
* *baseline* (Keras's): only an improvement that also beats ``baseline`` resets ``wait_count``, so
  training stops after ``patience`` checks unless the metric beats the baseline.
* *worse_for=N* (the "decrease in performance over N epochs" trigger; Prechelt's UP criterion): a
  check is *worsening* when it is not an improvement and is strictly worse than the previous check;
  stop after N consecutive worsening checks. Unlike patience, a plateau or any partial recovery
  resets it, so it stops early on a clear overfitting trend and never on a noisy plateau.
* *average change*: with ``average_window=N``, stop when the mean of ``|v_t - v_{t-1}|`` over the
  last N changes (the last N + 1 checks) is below ``min_average_change``.
* ``stopping_threshold``, ``divergence_threshold``, ``check_finite``: as Lightning's.
* ``start_from_epoch``: checks at epochs before it are ignored (no best score, no counting, no
  weights kept) except that a non-finite value still stops training when ``check_finite``.

Counts are in checks, like Lightning's patience (one check per validation by default).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_tricks._validation import (
    ConfigError,
    InvalidArgumentError,
    check_choice,
    check_int,
    check_non_negative,
    check_range,
)
from lightning_tricks.distributed import broadcast_module

MODES = ("min", "max")
THRESHOLD_MODES = ("abs", "rel")
TRIGGERS = ("non_finite", "stopping_threshold", "divergence_threshold", "patience", "baseline", "worse_for",
            "average_change")
"""Values of :attr:`EarlyStopping.stopping_trigger` (and :attr:`StopDecision.trigger`)."""

_LIGHTNING_REASON = {
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    # Lightning's enum has one "no more progress" member; `stopping_trigger` tells these apart.
    "patience": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "baseline": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "worse_for": EarlyStoppingReason.PATIENCE_EXHAUSTED,
    "average_change": EarlyStoppingReason.PATIENCE_EXHAUSTED,
}


class MonitorNotFoundError(ConfigError, RuntimeError):
    """The monitored key is not among the logged metrics (a ``RuntimeError``, as Lightning raises)."""


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"`{name}`={value!r} is invalid: expected true or false.")
    return value


def _check_optional_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    check_range(name, value)
    if math.isinf(value):
        raise InvalidArgumentError(f"`{name}`={value!r} is invalid: expected a finite number or null.")
    return value


def _check_optional_count(name: str, value: Any) -> int | None:
    return None if value is None else check_int(name, value, 1)


def _fmt(value: Any) -> str:
    value = float(value)
    return f"{value:.6g}"


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


class StoppingRule:
    """The early-stopping decision as a plain object: one monitored value per check in, a decision out.

    No Lightning and no process group: under DDP the caller passes the same value on every rank (the
    callback reduces it first), and every rank then reaches the same decision. The rules are in the
    module docstring; the arguments mean what :class:`EarlyStopping`'s do.

    Args:
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before stopping.
        min_delta: the margin an improvement must exceed (>= 0).
        threshold_mode: ``"abs"`` (margin ``min_delta``) or ``"rel"`` (margin ``min_delta * |best|``).
        baseline: a value the metric must beat within ``patience`` checks (Keras), or None.
        start_from_epoch: checks at earlier epochs are ignored.
        worse_for: stop after this many consecutive worsening checks, or None.
        average_window: the number of changes averaged by the average-change trigger, or None.
        min_average_change: stop when the mean absolute change over the window is below this.
        check_finite: stop at a NaN or infinite value.
        stopping_threshold: stop once the value is better than this.
        divergence_threshold: stop once the value is worse than this.
        monitor: the metric's name, for messages.

    Examples:
        >>> rule = StoppingRule(mode="min", patience=2)
        >>> [rule.step(v, epoch).stop for epoch, v in enumerate([1.0, 0.8, 0.9, 0.85])]
        [False, False, False, True]
        >>> rule.best_epoch, float(rule.best_score)
        (1, 0.8)
    """

    def __init__(
        self,
        mode: str = "min",
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
        self.mode = check_choice("mode", mode, MODES)
        self.patience = check_int("patience", patience, 0)
        self.min_delta = check_non_negative("min_delta", min_delta)
        if math.isinf(min_delta):
            raise InvalidArgumentError(f"`min_delta`={min_delta!r} is invalid: expected a finite number >= 0.")
        self.threshold_mode = check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
        self.baseline = _check_optional_number("baseline", baseline)
        self.start_from_epoch = check_int("start_from_epoch", start_from_epoch, 0)
        self.worse_for = _check_optional_count("worse_for", worse_for)
        self.average_window = _check_optional_count("average_window", average_window)
        self.min_average_change = check_non_negative("min_average_change", min_average_change)
        if self.average_window is not None and not min_average_change > 0:
            raise InvalidArgumentError(
                f"`min_average_change`={min_average_change!r} is invalid with `average_window`={average_window}: "
                "expected a number > 0 (a mean absolute change is never below 0, so the trigger would never fire)."
            )
        if self.average_window is None and min_average_change > 0:
            raise InvalidArgumentError(
                f"`average_window`=None is invalid with `min_average_change`={min_average_change!r}: expected the "
                "number of changes to average (an integer >= 1), or leave min_average_change at 0."
            )
        self.check_finite = _check_bool("check_finite", check_finite)
        self.stopping_threshold = _check_optional_number("stopping_threshold", stopping_threshold)
        self.divergence_threshold = _check_optional_number("divergence_threshold", divergence_threshold)
        self.monitor = monitor
        self.reset()

    def reset(self) -> None:
        """Forget every check (a fresh rule with the same arguments)."""
        self.best_score: Tensor = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        self.best_epoch = -1
        self.wait_count = 0
        self.worse_count = 0
        self.history: list[float] = []
        self.checks = 0

    # -- comparisons ----------------------------------------------------------------------------
    def _better(self, a: Tensor, b: Tensor | float) -> bool:
        return bool(a < b) if self.mode == "min" else bool(a > b)

    def is_improvement(self, value: Tensor | float, reference: Tensor | float) -> bool:
        """Whether ``value`` beats ``reference`` by more than the margin (``min_delta`` or ``min_delta * |ref|``).

        In ``abs`` mode this is Lightning's expression, evaluated in the value's dtype, so decisions
        match Lightning's to the last bit.
        """
        value = torch.as_tensor(value)
        reference = torch.as_tensor(reference)
        if not bool(torch.isfinite(reference)):
            return self._better(value, reference)
        delta = self.min_delta if self.threshold_mode == "abs" else self.min_delta * abs(float(reference))
        signed = delta if self.mode == "max" else -delta
        return self._better(value - signed, reference.to(value.device))

    # -- one check ------------------------------------------------------------------------------
    def _describe_best(self) -> str:
        if self.best_epoch < 0:
            return f"No best {self.monitor} yet."
        return f"Best {self.monitor}={_fmt(self.best_score)} at epoch {self.best_epoch}."

    def _stop(self, trigger: str, epoch: int, what: str, improved: bool) -> StopDecision:
        message = f"Early stopping ({trigger}) at epoch {epoch}: {what}. {self._describe_best()}"
        return StopDecision(improved=improved, stop=True, trigger=trigger, message=message)

    def mean_absolute_change(self) -> float | None:
        """Mean of ``|v_t - v_{t-1}|`` over the last ``average_window`` changes, or None before enough checks."""
        if self.average_window is None or len(self.history) < self.average_window + 1:
            return None
        window = self.history[-(self.average_window + 1):]
        return sum(abs(window[i + 1] - window[i]) for i in range(self.average_window)) / self.average_window

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
        if self.check_finite and not bool(torch.isfinite(current)):
            return self._stop("non_finite", epoch, f"{self.monitor}={_fmt(current)} is not finite (check_finite)",
                              improved=False)
        if epoch < self.start_from_epoch:
            return StopDecision(improved=False, stop=False, ignored=True)

        self.checks += 1
        improved = self.is_improvement(current, self.best_score)
        previous_best = self.best_score
        if improved:
            self.best_score, self.best_epoch = current, epoch
        resets = improved and (self.baseline is None or self.is_improvement(current, self.baseline))
        self.wait_count = 0 if resets else self.wait_count + 1
        previous = torch.tensor(self.history[-1], dtype=torch.float64) if self.history else None
        worsening = previous is not None and not improved and self._better(previous, current)
        self.worse_count = self.worse_count + 1 if worsening else 0
        self.history.append(float(current))
        del self.history[:-(max(self.average_window or 1, self.worse_for or 1) + 1)]

        op = "<" if self.mode == "min" else ">"
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return self._stop("stopping_threshold", epoch, f"{self.monitor}={_fmt(current)} {op} stopping_threshold="
                              f"{_fmt(self.stopping_threshold)}", improved)
        if self.divergence_threshold is not None and self._better(torch.tensor(self.divergence_threshold), current):
            return self._stop("divergence_threshold", epoch, f"{self.monitor}={_fmt(current)} is worse than "
                              f"divergence_threshold={_fmt(self.divergence_threshold)}", improved)
        if not resets and self.wait_count >= self.patience:
            margin = f"min_delta={_fmt(self.min_delta)}" + (" relative" if self.threshold_mode == "rel" else "")
            if self.baseline is not None and not self.is_improvement(self.best_score, self.baseline):
                return self._stop("baseline", epoch, f"{self.monitor} did not beat baseline={_fmt(self.baseline)} "
                                  f"(by more than {margin}) in {self.wait_count} checks (patience={self.patience})",
                                  improved)
            return self._stop("patience", epoch, f"{self.monitor} did not improve by more than {margin} in "
                              f"{self.wait_count} checks (patience={self.patience})", improved)
        if self.worse_for is not None and self.worse_count >= self.worse_for:
            trail = " -> ".join(_fmt(v) for v in self.history[-(self.worse_for + 1):])
            return self._stop("worse_for", epoch, f"{self.monitor} got worse at each of the last {self.worse_count} "
                              f"checks ({trail}; worse_for={self.worse_for})", improved)
        mean_change = self.mean_absolute_change()
        if mean_change is not None and mean_change < self.min_average_change:
            return self._stop("average_change", epoch, f"the mean absolute change of {self.monitor} over the last "
                              f"{self.average_window} changes is {_fmt(mean_change)} < min_average_change="
                              f"{_fmt(self.min_average_change)}", improved)
        if improved:
            gain = "" if not bool(torch.isfinite(previous_best)) else f" by {_fmt(abs(current - previous_best))}"
            return StopDecision(improved=True, stop=False,
                                message=f"{self.monitor} improved{gain} at epoch {epoch}: new best {_fmt(current)}.")
        return StopDecision(improved=False, stop=False)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, best score and epoch, and the history window (weights_only-safe types)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "wait_count": self.wait_count,
                "worse_count": self.worse_count, "history": list(self.history), "checks": self.checks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (missing keys, as in Lightning's own state, start from zero)."""
        self.reset()
        if "best_score" in state:
            self.best_score = torch.as_tensor(state["best_score"]).detach().cpu()
        self.best_epoch = int(state.get("best_epoch", -1))
        self.wait_count = int(state.get("wait_count", 0))
        self.worse_count = int(state.get("worse_count", 0))
        self.history = [float(v) for v in state.get("history", [])]
        self.checks = int(state.get("checks", 0))


class WeightSnapshot:
    """A host-memory copy of a module's ``state_dict`` (parameters and persistent buffers), refreshed in place.

    The first :meth:`capture` allocates one CPU tensor per entry (pinned when the source is on CUDA,
    for a fast copy); later captures copy into those tensors, so keeping the best weights costs one
    device-to-host copy per improvement and no allocation. :meth:`restore` loads the copy back with
    ``load_state_dict`` (in place: the optimizer keeps referencing the same parameters).

    Examples:
        >>> net = nn.Linear(3, 2)
        >>> snapshot = WeightSnapshot()
        >>> snapshot.capture(net)
        >>> before = net.weight.detach().clone()
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> snapshot.restore(net)
        >>> torch.equal(net.weight, before)
        True
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    @property
    def state(self) -> dict[str, Any] | None:
        """The copy (name -> CPU tensor), or None before the first capture."""
        return self._state

    @property
    def nbytes(self) -> int:
        """Host memory held by the copy."""
        if self._state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._state.values() if isinstance(t, Tensor))

    def _reusable(self, source: Mapping[str, Any]) -> bool:
        held = self._state
        if held is None or held.keys() != source.keys():
            return False
        return all(
            not isinstance(src, Tensor)
            or (isinstance(dst, Tensor) and dst.shape == src.shape and dst.dtype == src.dtype)
            for dst, src in ((held[k], source[k]) for k in source)
        )

    def capture(self, module: nn.Module) -> None:
        """Copy ``module.state_dict()`` into host memory (reusing the previous copy's storage)."""
        source = module.state_dict()
        if not self._reusable(source):
            pin = torch.cuda.is_available() and any(isinstance(t, Tensor) and t.is_cuda for t in source.values())
            self._state = {k: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                           if isinstance(t, Tensor) else None for k, t in source.items()}
        held = self._state
        assert held is not None
        with torch.no_grad():
            for name, tensor in source.items():
                if isinstance(tensor, Tensor):
                    held[name].copy_(tensor.detach())
                else:  # `get_extra_state` objects
                    held[name] = copy.deepcopy(tensor)

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Adopt a copy (e.g. from a checkpoint), moved to CPU."""
        self._state = None if state is None else {
            k: v.detach().to("cpu") if isinstance(v, Tensor) else v for k, v in state.items()}

    def restore(self, module: nn.Module) -> None:
        """Load the copy into ``module`` (strict: the same keys and shapes)."""
        if self._state is None:
            raise RuntimeError("WeightSnapshot.restore called before any capture.")
        module.load_state_dict(self._state, strict=True)

    def clear(self) -> None:
        """Release the copy."""
        self._state = None


class EarlyStopping(LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` plus restore-best-weights, Keras's baseline and start epoch, and two more triggers.

    A drop-in for ``lightning.pytorch.callbacks.EarlyStopping``: the first eleven arguments are
    Lightning's with the same meaning, the ``state_key`` is the same (a checkpoint written by either
    class loads into the other), ``trainer.should_stop``, ``stopped_epoch``, ``stopping_reason``
    (Lightning's enum) and ``stopping_reason_message`` behave as Lightning's. The rules of every
    trigger are in the module docstring and the method card (``docs/early_stopping.md``).

    Under DDP, the monitored value is all-gathered at every check (one tiny collective, called on
    every rank at the same hook): when the ranks disagree (the metric was logged without
    ``sync_dist=True``) their mean is used, with a warning once, so every rank reaches the same
    decision; ranks where the key is missing are left out of the mean (with ``strict=True`` every
    rank raises the same error). The best weights are copied to host memory by rank 0 only, at each
    improvement, and restored at the end of training (``on_train_end``: early stop, ``max_epochs``,
    ``max_steps`` or ``max_time``) by loading them on rank 0 and broadcasting to every rank.

    Args:
        monitor: quantity to be monitored.
        min_delta: minimum change that counts as an improvement (>= 0); see ``threshold_mode``.
        patience: number of checks without improvement after which training stops (>= 0).
        verbose: log every improvement too (the stop and the restore are always logged).
        mode: ``"min"`` or ``"max"``.
        strict: raise if ``monitor`` is not among the logged metrics at a check (else skip the check).
        check_finite: stop when the monitored value becomes NaN or infinite.
        stopping_threshold: stop once the monitored value is better than this.
        divergence_threshold: stop once the monitored value is worse than this.
        check_on_train_epoch_end: check at the end of the training epoch (True) or of validation
            (False); None chooses as Lightning does.
        log_rank_zero_only: log on rank 0 only.
        restore_best_weights: at the end of training, load the weights of the best check into the model.
        baseline: the metric must beat this value within ``patience`` checks (Keras's ``baseline``).
        start_from_epoch: ignore checks before this epoch (Keras's ``start_from_epoch``).
        worse_for: stop after this many consecutive checks each strictly worse than the one before
            (and not a new best); None disables it.
        average_window: with ``min_average_change``, stop when the mean absolute change over this many
            changes is below ``min_average_change``; None disables it.
        min_average_change: the threshold of the average-change trigger (> 0 when ``average_window`` is set).
        threshold_mode: ``"abs"``: improve by more than ``min_delta``; ``"rel"``: by more than
            ``min_delta * |best|`` (skorch's ``threshold_mode``).

    Attributes:
        best_score: the best monitored value (a tensor, as Lightning's).
        best_epoch: the epoch of the best check (-1 before any).
        stopping_trigger: the trigger that stopped training (one of :data:`TRIGGERS`), or None.
        stopping_reason_message: a sentence naming the trigger, the epoch, the best score and its epoch.
        restored_epoch: the epoch whose weights were restored at the end of training, or None.

    Raises:
        InvalidArgumentError: an argument out of range (at construction).
        MonitorNotFoundError: ``strict`` and the monitored key is not logged (at the first check).
        ConfigError: ``restore_best_weights`` with a sharded strategy or with ``WeightAveraging`` (at setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> import lightning_tricks as lt
        >>> stopper = lt.EarlyStopping(monitor="val_loss", patience=5, worse_for=3)
        >>> trainer = pl.Trainer(max_epochs=100, callbacks=[stopper], logger=False)
        >>> # trainer.fit(model); stopper.stopping_reason_message says why it stopped;
        >>> # the model now holds the weights of epoch stopper.best_epoch.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = True,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        worse_for: int | None = None,
        average_window: int | None = None,
        min_average_change: float = 0.0,
        threshold_mode: str = "abs",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise InvalidArgumentError(f"`monitor`={monitor!r} is invalid: expected the name of a logged metric.")
        for name, value in (("verbose", verbose), ("strict", strict), ("log_rank_zero_only", log_rank_zero_only),
                            ("restore_best_weights", restore_best_weights)):
            _check_bool(name, value)
        if check_on_train_epoch_end is not None:
            _check_bool("check_on_train_epoch_end", check_on_train_epoch_end)
        # Built first: the parent's __init__ assigns `wait_count` and `best_score`, which live in the rule.
        self.rule = StoppingRule(
            mode=mode, patience=patience, min_delta=min_delta, threshold_mode=threshold_mode, baseline=baseline,
            start_from_epoch=start_from_epoch, worse_for=worse_for, average_window=average_window,
            min_average_change=min_average_change, check_finite=check_finite,
            stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold, monitor=monitor,
        )
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=mode,
                         strict=strict, check_finite=check_finite, stopping_threshold=stopping_threshold,
                         divergence_threshold=divergence_threshold,
                         check_on_train_epoch_end=check_on_train_epoch_end, log_rank_zero_only=log_rank_zero_only)
        self.restore_best_weights = restore_best_weights
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.worse_for = worse_for
        self.average_window = average_window
        self.min_average_change = min_average_change
        self.threshold_mode = threshold_mode
        self.stopping_trigger: str | None = None
        self.restored_epoch: int | None = None
        self._snapshot = WeightSnapshot()
        # True when a resumed checkpoint holds a best score but no copy of its weights (identical on all ranks).
        self._best_weights_missing = False
        self._warned_unsynced = False
        self._fit_checks = 0

    # Lightning's attributes, kept in the rule so there is one source of truth.
    @property
    def wait_count(self) -> int:  # type: ignore[override]
        return self.rule.wait_count

    @wait_count.setter
    def wait_count(self, value: int) -> None:
        self.rule.wait_count = value

    @property
    def best_score(self) -> Tensor:  # type: ignore[override]
        return self.rule.best_score

    @best_score.setter
    def best_score(self, value: Tensor) -> None:
        self.rule.best_score = torch.as_tensor(value).detach().cpu()

    @property
    def patience(self) -> int:  # type: ignore[override]
        return self.rule.patience

    @patience.setter
    def patience(self, value: int) -> None:
        self.rule.patience = check_int("patience", value, 0)

    @property
    def best_epoch(self) -> int:
        return self.rule.best_epoch

    @property
    def best_state_dict(self) -> dict[str, Any] | None:
        """The host copy of the best weights (rank 0 holds it under DDP; None on other ranks and before any check)."""
        return self._snapshot.state

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.restore_best_weights:
            return
        from lightning.pytorch.callbacks import WeightAveraging
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ConfigError(
                f"EarlyStopping(restore_best_weights=True) needs every rank to hold the whole model, but the strategy "
                f"is {type(trainer.strategy).__name__}, which shards it. Set restore_best_weights=False and keep the best "
                "weights with ModelCheckpoint(monitor=..., save_top_k=1) instead."
            )
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        if averaging:
            raise ConfigError(
                f"EarlyStopping(restore_best_weights=True) cannot be combined with {averaging[0]}: validation scores the "
                "averaged weights, which that callback copies into the model when training ends, so the weights kept "
                "here would not be the ones scored. Set restore_best_weights=False (the model then ends with the "
                "averaged weights)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_checks = 0
        self.restored_epoch = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume (restored before or after on_fit_start, by strategy) every rank has loaded the
        # checkpoint's copy; only rank 0 needs it.
        if not trainer.is_global_zero:
            self._snapshot.clear()

    # -- the check ------------------------------------------------------------------------------
    def _monitored_value(self, trainer: pl.Trainer) -> Tensor | None:
        """The monitored value every rank agrees on, or None to skip the check (on every rank alike)."""
        logs = trainer.callback_metrics
        raw = logs.get(self.monitor)
        if raw is not None:
            raw = torch.as_tensor(raw).detach()
            if raw.numel() != 1:
                raise InvalidArgumentError(
                    f"`monitor`={self.monitor!r} is a tensor of shape {tuple(raw.shape)}: expected a scalar metric."
                )
        missing_on: list[int] = []
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            packed = torch.tensor([float(raw) if raw is not None else 0.0, float(raw is not None)],
                                  dtype=dtype, device=device)
            gathered = trainer.strategy.all_gather(packed).reshape(-1, 2).cpu()
            present = gathered[:, 1] > 0
            missing_on = [rank for rank, ok in enumerate(present.tolist()) if not ok]
            values = gathered[present, 0]
            if len(values):
                agree = bool((values == values[0]).all())
                merged = values[0] if agree else values.mean()
                if not agree and not self._warned_unsynced:
                    self._warned_unsynced = True
                    rank_zero_warn(
                        f"EarlyStopping: `{self.monitor}` differs across ranks ({[_fmt(v) for v in values]}): it was "
                        "logged without sync_dist=True. Every rank now uses the mean over ranks, so all of them take the "
                        "same decision; log it with sync_dist=True (or a torchmetrics metric) to choose the reduction.",
                        category=RuntimeWarning,
                    )
                raw = merged.to(torch.float32)
            else:
                raw = None
        if raw is not None and not missing_on:
            return raw.squeeze()
        message = (
            f"Early stopping conditioned on metric `{self.monitor}` which is not available"
            + (f" on ranks {missing_on}" if raw is not None else "")
            + ". Pass in or modify your `EarlyStopping` callback to use any of the following: "
            f"`{'`, `'.join(logs.keys())}` (or set strict=False to skip checks where it is missing)."
        )
        if self.strict:
            raise MonitorNotFoundError(message)
        if self.verbose:
            rank_zero_warn(message, category=RuntimeWarning)
        return None if raw is None else raw.squeeze()

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run:  # as Lightning: no early stopping in a fast_dev_run
            return
        current = self._monitored_value(trainer)
        if current is None:
            return
        decision = self.rule.step(current, trainer.current_epoch)
        self._fit_checks += not decision.ignored
        if decision.improved:
            self._best_weights_missing = False
            if self.restore_best_weights and trainer.is_global_zero:
                self._snapshot.capture(trainer.lightning_module)
        # Decisions are identical by construction; Lightning's "stop if any rank stops" is kept as a guard.
        should_stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            if decision.stop:
                self.stopping_trigger = decision.trigger
                self.stopping_reason = _LIGHTNING_REASON[decision.trigger]  # type: ignore[index]
                self.stopping_reason_message = decision.message
                self._log_info(trainer, decision.message, self.log_rank_zero_only)  # type: ignore[arg-type]
        elif decision.message and self.verbose:
            self._log_info(trainer, decision.message, self.log_rank_zero_only)

    # -- the restore ----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every branch depends only on state that is identical on all ranks, so all ranks reach the broadcast.
        if self._fit_checks == 0 and not trainer.fast_dev_run:
            rank_zero_warn(
                f"EarlyStopping counted no check of `{self.monitor}` in this fit (missing with strict=False, or every "
                f"check before start_from_epoch={self.start_from_epoch}): it could not stop training"
                + (" and restored no weights." if self.rule.best_epoch < 0 else "."), category=RuntimeWarning)
        if not self.restore_best_weights:
            return
        if self._best_weights_missing:
            rank_zero_warn(
                f"EarlyStopping: the best {self.monitor}={_fmt(self.best_score)} comes from a checkpoint without a copy "
                "of its weights (written by Lightning's EarlyStopping or with restore_best_weights=False) and no later "
                "check beat it, so the model keeps its final weights.", category=RuntimeWarning)
            return
        if self.rule.best_epoch < 0:
            if self._fit_checks:
                self._log_info(trainer, f"EarlyStopping: no finite best {self.monitor}; the model keeps its final "
                               "weights.", self.log_rank_zero_only)
            return
        if trainer.is_global_zero and self._snapshot.state is not None:
            self._snapshot.restore(pl_module)
        broadcast_module(pl_module)  # on every rank; a no-op on one process
        self.restored_epoch = self.rule.best_epoch
        self._log_info(trainer, f"Restored the weights of epoch {self.rule.best_epoch} (best {self.monitor}="
                       f"{_fmt(self.best_score)}).", self.log_rank_zero_only)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # Lightning's keys, so Lightning's EarlyStopping can load ours
        state.update(self.rule.state_dict())
        state["stopping_trigger"] = self.stopping_trigger
        held = self._snapshot.state if self.restore_best_weights else None
        # A copy, so a later capture cannot change a checkpoint that is still being written (async checkpoint IO).
        state["best_state_dict"] = None if held is None else {
            k: v.clone() if isinstance(v, Tensor) else v for k, v in held.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Unlike Lightning's, the configured `patience` is kept: the arguments of this run are the user's intent.
        self.rule.load_state_dict(state_dict)
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
        self.stopping_trigger = state_dict.get("stopping_trigger")
        weights = state_dict.get("best_state_dict")
        self._snapshot.load(weights if self.restore_best_weights else None)
        self._best_weights_missing = (self.restore_best_weights and weights is None
                                      and bool(torch.isfinite(self.rule.best_score)))


__all__ = ["MODES", "THRESHOLD_MODES", "TRIGGERS", "EarlyStopping", "MonitorNotFoundError", "StopDecision",
           "StoppingRule", "WeightSnapshot"]
