"""The Lightning callback of the dead-unit monitor: :class:`DeadUnitMonitor` (the core is ``dead_units.py``).

It tracks the training and/or validation passes per epoch with
:class:`~lightning_tricks.monitoring.dead_units.DeadUnitTracker`, logs ``dead_units/<stage>/<layer>`` and
``dead_units/<stage>/overall``, warns above ``warn_fraction``, and draws a layers-by-epochs heat map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_tricks._lightning_internals import callback_state_key
from lightning_tricks.core.callback import HookHolder
from lightning_tricks.core.deprecation import REMOVED_IN, warn_deprecated
from lightning_tricks.core.validation import InvalidArgumentError, check_choice, check_probability
from lightning_tricks.monitoring.dead_units import (
    DEFAULT_ACTIVATIONS,
    DeadUnitReport,
    DeadUnitTracker,
    check_dead_unit_args,
)

STAGES = ("train", "validate", "both")
"""``stages`` choices: Lightning's names of the training and validation passes, or both."""
OLD_STAGE_NAMES = {"validation": "validate"}
"""Deprecated ``stages`` values (accepted with a ``DeprecationWarning`` until lightning-tricks 0.3.0)."""


def _check_stages(stages: str) -> str:
    """``stages`` after checking it; the deprecated ``"validation"`` warns and becomes ``"validate"``."""
    if isinstance(stages, str) and stages in OLD_STAGE_NAMES:
        new = OLD_STAGE_NAMES[stages]
        warn_deprecated(f"DeadUnitMonitor: `stages`={stages!r} is renamed {new!r}, Lightning's name of the pass (the "
                      f"old value is accepted until lightning-tricks {REMOVED_IN}); write stages={new!r}.")
        return new
    check_choice("stages", stages, STAGES)
    return stages


def _none_if_nan(value: float) -> float | None:
    """History holds None, not NaN, so that records compare equal after a checkpoint round trip."""
    return None if math.isnan(value) else value


class DeadUnitMonitor(HookHolder):
    """Log, per layer and per epoch, the fraction of dead ReLU units (and saturated sigmoid/tanh units).

    A unit (a feature of a linear layer, a channel of a convolution) is dead for the epoch when its
    output was ``<= threshold`` for every example and position of the epoch, on every DDP rank.
    ReLU-family modules are found automatically; for a model that calls ``F.relu`` functionally,
    name the layers whose outputs feed it in ``preactivation_layers`` (pre-activation mode: alive when
    ``> threshold``). For ``LeakyReLU``/``PReLU``/``RReLU`` "dead" means the unit stayed in the
    negative-slope region (its output never exceeded the threshold): it still passes a gradient scaled
    by the slope, but it is a linear unit. Per epoch it logs, through ``pl_module.log`` (so
    ``EarlyStopping``/``ModelCheckpoint`` can monitor them), ``dead_units/<stage>/overall`` and
    ``dead_units/<stage>/<layer>`` (``<stage>``: ``train`` or ``validate``), and
    ``dead_units/<stage>/saturated/overall`` and ``.../saturated/<layer>`` for sigmoid/tanh layers;
    it warns on rank zero when the overall fraction exceeds ``warn_fraction``, and at the end of fit
    draws a layers x epochs heat map (PNG file, and into loggers that take images).

    The hooks reduce each activation to one value per unit on its device and never synchronize with
    the host; the per-unit bits are all-reduced once per epoch. Hooks are registered at the start of
    fit (after ``configure_model``) and removed at its end.

    Args:
        activations: activation kinds to find: ``relu``, ``relu6``, ``leaky_relu``, ``prelu``, ``rrelu``,
            ``elu``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``. Default: relu, relu6, sigmoid, tanh (a Leaky ReLU
            unit cannot die: opt-in).
            ``[]`` watches only ``preactivation_layers``.
        preactivation_layers: names or glob patterns (``"*.bn1"``) of conv/linear/norm layers whose outputs go into a
            functional activation (pre-activation mode).
        threshold: a unit fires when its output is ``> threshold``; >= 0.
        warn_fraction: warn when the overall dead (or saturated) fraction exceeds it; in [0, 1].
            Default 0.1, as keras-contrib's ``DeadReluDetector``.
        stages: ``"train"``, ``"validate"`` (Lightning's name of the validation pass, in ``fit`` and in
            ``trainer.validate``) or ``"both"``: the passes to track, each with its own epoch count. The old
            value ``"validation"`` is accepted with a ``DeprecationWarning``.
        unit_dim: ``"auto"``, ``"channel"`` (dimension 1) or ``"last"``.
        saturation_eps: distance from the bounds that counts as saturated; in (0, 0.5).
        saturation_fraction: share of a unit's outputs within ``saturation_eps`` of the bounds for it to count
            as saturated; in (0, 1].
        log_per_layer: log one metric per layer besides the overall fraction.
        plot: draw the heat map at the end of fit (rank zero).
        plot_dir: folder of the PNG; default the logger's ``log_dir``, else the trainer's ``default_root_dir``.
        layers: Deprecated: use ``preactivation_layers``.

    Raises:
        InvalidArgumentError: an argument out of range.
        NothingToMonitorError: at the start of fit, when the model has nothing to monitor (the message
            lists the conv/linear/norm layers to name in ``preactivation_layers``).

    Examples:
        >>> monitor = DeadUnitMonitor(warn_fraction=0.2)
        >>> trainer = pl.Trainer(callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> monitor.history["train"][-1]["overall"]  # doctest: +SKIP
        0.03
    """

    def __init__(
        self,
        activations: list[str] | None = None,
        preactivation_layers: list[str] | None = None,
        threshold: float = 0.0,
        warn_fraction: float = 0.1,
        stages: str = "train",
        unit_dim: str = "auto",
        saturation_eps: float = 0.01,
        saturation_fraction: float = 0.99,
        log_per_layer: bool = True,
        plot: bool = True,
        plot_dir: str | None = None,
        layers: list[str] | None = None,
    ) -> None:
        self.activations, self.preactivation_layers = check_dead_unit_args(
            DEFAULT_ACTIVATIONS if activations is None else activations, preactivation_layers, threshold, unit_dim,
            saturation_eps, saturation_fraction, layers, owner="DeadUnitMonitor")
        if not self.activations and not self.preactivation_layers:
            raise InvalidArgumentError("`activations`=[] is invalid: expected activation kinds, or "
                                       "`preactivation_layers` to watch.")
        check_probability("warn_fraction", warn_fraction)
        stages = _check_stages(stages)
        self.threshold, self.warn_fraction, self.stages, self.unit_dim = threshold, warn_fraction, stages, unit_dim
        self.saturation_eps, self.saturation_fraction = saturation_eps, saturation_fraction
        self.log_per_layer, self.plot, self.plot_dir = log_per_layer, plot, plot_dir
        self.trackers: dict[str, DeadUnitTracker] = {}
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "validate": []}
        self.last_report: dict[str, DeadUnitReport] = {}
        self.heatmap_paths: list[Path] = []
        self._train_epoch_closed = False
        self._open_epoch: dict[str, Any] | None = None
        self._warned: dict[str, bool] = {}
        self._plot_folder: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        # the names of before the glossary, so that checkpoints written before it keep loading
        return callback_state_key(self, stages="validation" if self.stages == "validate" else self.stages,
                                  activations=self.activations, layers=self.preactivation_layers)

    def _tracked(self, stage: str) -> bool:
        return self.stages in (stage, "both")

    # -- setup and teardown ---------------------------------------------------------------------
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trackers:
            return
        stages = ("train", "validate") if trainer.state.fn == "fit" else ("validate",)
        for stage in stages:
            if self._tracked(stage):
                tracker = DeadUnitTracker(pl_module, self.activations, self.preactivation_layers, self.threshold, self.unit_dim,
                                          self.saturation_eps, self.saturation_fraction, owner="DeadUnitMonitor")
                tracker.enabled = False
                self.trackers[stage] = tracker.attach()
        if self.plot:  # trainer.log_dir broadcasts under DDP: resolve it here, on every rank
            self._plot_folder = Path(self.plot_dir or trainer.log_dir or trainer.default_root_dir)

    def _detach(self) -> None:
        for tracker in self.trackers.values():
            tracker.detach()
        self.trackers.clear()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and self._tracked("validate"):
            self._attach(trainer, pl_module)  # trainer.validate(): no on_fit_start

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        if self.plot and trainer.is_global_zero:
            self.heatmap_paths += draw_heatmaps(self.history, self._plot_folder or Path(trainer.default_root_dir),
                                                trainer)

    def release_hooks(self) -> None:
        self._detach()

    # -- switching between passes ---------------------------------------------------------------
    def _start(self, stage: str) -> None:
        tracker = self.trackers.get(stage)
        if tracker is not None:
            tracker.reset()
            tracker.enabled = True

    def _pause(self, stage: str) -> None:
        if stage in self.trackers:
            self.trackers[stage].enabled = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_epoch_closed = False
        self._start("train")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        tracker = self.trackers.get("train")
        if tracker is None:
            return
        if not tracker.enabled and not self._train_epoch_closed:
            # resumed in the middle of an epoch: Lightning skips on_train_epoch_start; continue the saved tally
            tracker.reset()
            if self._open_epoch is not None:
                tracker.load_state_dict(self._open_epoch)
            tracker.enabled = True
        self._open_epoch = None
        tracker.new_pass()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("train")
        if trainer.sanity_checking:
            return
        # Validation at the end of a training epoch runs before on_train_epoch_end, and a ModelCheckpoint
        # monitoring a validation metric may save right after it (check_val_every_n_epoch > 1): close the
        # training epoch first, so that the checkpoint holds its figures.
        if trainer.state.fn == "fit" and trainer.is_last_batch:
            self._finish(trainer, pl_module, "train")
        self._start("validate")

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if "validate" in self.trackers:
            self.trackers["validate"].new_pass()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "validate")
        self._pause("validate")
        if trainer.state.fn == "fit" and "train" in self.trackers and not self._train_epoch_closed:
            self.trackers["train"].enabled = True  # validation in the middle of a training epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "train")

    # -- per-epoch results ---------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        tracker = self.trackers.get(stage)
        epoch = trainer.current_epoch
        if tracker is None or (stage == "train" and self._train_epoch_closed):
            return
        if stage == "train":
            self._train_epoch_closed = True  # closed at validation start or at the epoch's end, not both
        tracker.enabled = False
        report = tracker.report()  # all ranks reach here: collective
        if not report.sites:
            return
        self.last_report[stage] = report
        self.history[stage].append(_record(epoch, report))
        log_report(pl_module, stage, report, self.log_per_layer)
        _warn(report, stage, epoch, self.warn_fraction, self._warned, first_epoch=self.history[stage][0]["epoch"])

    # -- heat map --------------------------------------------------------------------------------
    def heatmap(self, stage: str = "train") -> Any:
        """The layers x epochs figure of ``stage`` (dead fractions; saturated fractions for sigmoid/tanh rows).

        Raises:
            ValueError: no epoch of ``stage`` was recorded.
        """
        return history_heatmap(self.history[stage], stage)

    # -- checkpoint --------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history}
        if "train" in self.trackers and not self._train_epoch_closed:
            # saved mid-epoch: the units seen so far this epoch, so a resumed run reports the whole epoch.
            # Under DDP this is rank 0's tally (the checkpoint's); the other ranks' part of it is not kept.
            state["train_epoch"] = self.trackers["train"].state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = {OLD_STAGE_NAMES.get(k, k): v for k, v in state_dict.get("history", {}).items()}
        self.history = {"train": [], "validate": [], **history}
        self._open_epoch = state_dict.get("train_epoch")


def log_report(pl_module: pl.LightningModule, stage: str, report: DeadUnitReport, per_layer: bool) -> None:
    """Log one pass's figures of one epoch through ``pl_module.log`` (see :class:`DeadUnitMonitor`)."""
    metrics: dict[str, float] = {}
    for kind, prefix, overall in (("dead", f"dead_units/{stage}", report.dead_fraction),
                                  ("saturation", f"dead_units/{stage}/saturated", report.saturated_fraction)):
        if math.isnan(overall):
            continue
        metrics[f"{prefix}/overall"] = overall
        if per_layer:
            metrics.update({f"{prefix}/{site}": f for site, f in report.fractions(kind).items()})
    # Already identical on every rank; sync_dist with "max" is exact and silences Lightning's per-key DDP warning.
    pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


def _record(epoch: int, report: DeadUnitReport) -> dict[str, Any]:
    """One epoch of :attr:`DeadUnitMonitor.history`."""
    return {"epoch": epoch, "overall": _none_if_nan(report.dead_fraction),
            "saturated_overall": _none_if_nan(report.saturated_fraction),
            "dead": report.fractions("dead"), "saturated": report.fractions("saturation")}


def _warn(report: DeadUnitReport, stage: str, epoch: int, warn_fraction: float, warned: dict[str, bool],
          first_epoch: int) -> None:
    """Warn (rank zero) when a fraction rises above ``warn_fraction``; ``warned`` remembers which are above."""
    for kind, overall in (("dead", report.dead_fraction), ("saturation", report.saturated_fraction)):
        key = f"{stage}:{kind}"
        above = not math.isnan(overall) and overall > warn_fraction
        if above and not warned.get(key):
            rank_zero_warn(_too_many_message(kind, overall, stage, epoch, report, warn_fraction))
        warned[key] = above
    if report.never_called and epoch == first_epoch:
        rank_zero_warn(f"DeadUnitMonitor: {', '.join(report.never_called)} produced no output in the {stage} "
                       f"pass of epoch {epoch} and are not counted.")


def _too_many_message(kind: str, overall: float, stage: str, epoch: int, report: DeadUnitReport,
                      warn_fraction: float) -> str:
    worst = sorted(report.fractions(kind).items(), key=lambda kv: -kv[1])[:5]
    advice = ("A too-high learning rate or a bad initialization kills ReLUs (CS231n): lower the learning "
              "rate, check the init (He for ReLU), or add normalization." if kind == "dead" else
              "Saturated units pass almost no gradient: normalize inputs, use a smaller init, or ReLU.")
    units = sum(s.units for s in report.sites.values() if s.kind == kind)
    what = "dead" if kind == "dead" else "saturated"
    return (f"DeadUnitMonitor: {100 * overall:.1f}% of {units} units are {what} after epoch {epoch} "
            f"({stage} pass), above warn_fraction={warn_fraction}. Worst layers: "
            + ", ".join(f"{n} {100 * f:.0f}%" for n, f in worst) + f". {advice}")


def history_heatmap(records: list[dict[str, Any]], stage: str) -> Any:
    """The layers x epochs figure of one pass's :attr:`DeadUnitMonitor.history` records.

    Raises:
        ValueError: no epoch was recorded.
    """
    from lightning_tricks.monitoring.plots import dead_unit_heatmap

    if not records:
        raise ValueError(f"no {stage} epoch has been recorded yet.")
    rows: dict[str, list[float]] = {}
    for kind, suffix in (("dead", ""), ("saturated", " [saturated]")):
        for record in records:
            for site in record[kind]:
                rows.setdefault(site + suffix, [])
    for row in rows:
        kind, site = ("saturated", row.removesuffix(" [saturated]")) if row.endswith(" [saturated]") else ("dead", row)
        rows[row] = [record[kind].get(site, math.nan) for record in records]
    last = records[-1]["overall"]
    title = f"Dead units per layer ({stage} pass)"
    if last is not None:
        title += f"; overall {100 * last:.1f}% at epoch {records[-1]['epoch']}"
    return dead_unit_heatmap(rows, [record["epoch"] for record in records], title=title,
                             colorbar_label="dead (saturated) fraction")


def draw_heatmaps(history: dict[str, list[dict[str, Any]]], folder: Path, trainer: pl.Trainer) -> list[Path]:
    """Save each pass's heat map as ``folder/dead_units_<stage>.png`` and send it to the loggers that take images."""
    from lightning_tricks.monitoring.plots import log_figure, save_figure

    paths = []
    for stage, records in history.items():
        if not records:
            continue
        figure = history_heatmap(records, stage)
        path = save_figure(figure, folder / f"dead_units_{stage}.png")
        paths.append(path)
        taken = log_figure(trainer.loggers, f"dead_units/{stage}/heatmap", figure, trainer.global_step)
        where = f"sent to {', '.join(taken)} and " if taken else ""
        rank_zero_info(f"DeadUnitMonitor: heat map {where}saved to {path}")
    return paths


__all__ = ["STAGES", "DeadUnitMonitor", "draw_heatmaps", "history_heatmap", "log_report"]
