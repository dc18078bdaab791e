"""The update/weight ratio: how far one optimizer step moves each parameter tensor, relative to its size.

CS231n: track ``||dW|| / ||W||`` for each layer; it "should be roughly 1e-3". Much lower and the
learning rate is probably too low; much higher and it is probably too high. We measure the *real*
update (the parameters right before and right after ``optimizer.step()``), so it holds for any
optimizer (SGD with momentum, Adam, weight decay, gradient clipping, schedules) instead of assuming
``dW = -lr * grad``.

* :func:`update_ratios` is the functional core: per-tensor ratios from two lists of tensors.
* :class:`UpdateRatioMonitor` is the Lightning callback: every ``every_n_steps`` optimizer steps it
  copies the parameters in ``on_before_optimizer_step``, compares them in ``on_train_batch_end``, logs
  ``update_ratio/<parameter>`` and ``update_ratio/median``, and warns when the median leaves
  ``[warn_below, warn_above]``. Optionally it sends histograms of the weights, gradients and
  activations of the measured step to loggers that take them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._lightning_internals import callback_state_key
from lightning_tricks.core.validation import InvalidArgumentError, check_choice, check_int, check_positive
from lightning_tricks.monitoring.dead_units import (
    DEFAULT_ACTIVATIONS,
    NothingToMonitorError,
    find_watched_modules,
)
from lightning_tricks.monitoring.measurements import log_measurement

MEDIAN_OVER = ("weights", "all")
"""``median_over`` choices: weight matrices and kernels only (tensors of 2+ dimensions), or every tensor."""

HISTOGRAM_SAMPLES = 65536
"""At most this many values per tensor go into a histogram (a fixed stride, no randomness)."""


def snapshot(tensors: Sequence[Tensor]) -> list[Tensor]:
    """float32 copies of ``tensors``, detached (the "before" side of :func:`update_ratios`)."""
    return [t.detach().to(torch.float32, copy=True) for t in tensors]


def update_ratios(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """``||after_i - before_i||_2 / ||before_i||_2`` for each pair, as a float32 vector.

    A tensor whose ``before`` norm is zero (a zero-initialized bias) has no defined ratio and gets NaN.

    Args:
        before: the tensors before the update.
        after: the same tensors after it (same shapes).

    Raises:
        ValueError: lists of different lengths, or a pair of different shapes.

    Examples:
        >>> update_ratios([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])])
        tensor([0.1000])
    """
    if len(before) != len(after):
        raise ValueError(f"`before` has {len(before)} tensors and `after` {len(after)}.")
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if b.shape != a.shape:
            raise ValueError(f"tensor {i} changed shape from {tuple(b.shape)} to {tuple(a.shape)}.")
    if not before:
        return torch.empty(0)
    with torch.no_grad():
        b32 = [b.detach().float() for b in before]
        a32 = [a.detach().float() for a in after]
        deltas = torch._foreach_sub(a32, b32)
        num = torch.stack(torch._foreach_norm(deltas))
        den = torch.stack(torch._foreach_norm(b32))
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.nan)


def median_ratio(ratios: Tensor) -> float:
    """The median of the finite ratios (average of the two middle ones for an even count); NaN if none."""
    finite = ratios[torch.isfinite(ratios)]
    return float(torch.quantile(finite.double(), 0.5)) if finite.numel() else math.nan


def _sample(tensor: Tensor) -> Tensor:
    flat = tensor.detach().flatten()
    stride = max(1, math.ceil(flat.numel() / HISTOGRAM_SAMPLES))
    return flat[::stride].float().cpu()


class UpdateRatioMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps, log ``||W_after - W_before|| / ||W_before||`` per parameter tensor.

    The parameters of the optimizer being stepped are copied (float32) in ``on_before_optimizer_step``
    of a measured step and compared at ``on_train_batch_end``: the ratio is the update the optimizer
    really made, whatever the optimizer. The median is taken over the weight tensors (see
    ``median_over``); zero-norm tensors (zero-initialized biases) have no ratio and are left out.
    Metrics ``update_ratio/median`` and, with ``log_per_tensor``, ``update_ratio/<parameter name>`` go
    through ``pl_module.log`` (``trainer.callback_metrics`` holds the last measurement, so
    ``EarlyStopping``/``ModelCheckpoint`` can monitor them) and to the loggers at the measured step. ``history`` keeps the medians
    (``{"step", "median"}`` per measurement, checkpointed) and ``last_ratios`` the per-tensor ratios
    of the last measurement. A warning is raised when the median enters the region below
    ``warn_below`` or above ``warn_above`` (CS231n: about 1e-3 is healthy). A measured step that moved
    no parameter (skipped by AMP's gradient scaler, or a zero learning rate) is not recorded.

    Between measured steps it does nothing (no copies, no hooks). Under DDP the parameters are
    identical on every rank after the step, so the figures are too; no collective is used.

    Args:
        every_n_steps: measure the steps whose index (``trainer.global_step`` before the step) is a multiple
            of this; >= 1. With manual optimization, ``global_step`` counts every optimizer's steps (a GAN's
            two optimizers make two per batch): a training batch whose optimizer steps include such an index
            is measured as a whole, every optimizer's update, and recorded at the batch's first step.
        warn_below: warn when the median ratio is below this; > 0.
        warn_above: warn when it is above this; > ``warn_below``.
        log_per_tensor: log one metric per parameter tensor besides the median.
        median_over: ``"weights"``: the median is over weight matrices and conv kernels (tensors of two or
            more dimensions: the lectures' ratio; biases and normalization parameters have their own scale and
            are logged but not in the median); ``"all"``: over every tensor.
        histograms: also send histograms of the weights, gradients and activations (outputs of the
            ReLU-family/sigmoid/tanh modules) of each measured step to loggers whose ``experiment`` has
            ``add_histogram`` (TensorBoard); a warning says so when no logger takes them.

    Raises:
        InvalidArgumentError: an argument out of range.

    Examples:
        >>> monitor = UpdateRatioMonitor(every_n_steps=50)
        >>> trainer = pl.Trainer(callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> monitor.history[-1]["median"]  # doctest: +SKIP
        0.0011
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        warn_below: float = 1e-4,
        warn_above: float = 1e-2,
        log_per_tensor: bool = True,
        histograms: bool = False,
        median_over: str = "weights",
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1)
        check_choice("median_over", median_over, MEDIAN_OVER)
        check_positive("warn_below", warn_below)
        check_positive("warn_above", warn_above)
        if warn_above <= warn_below:
            raise InvalidArgumentError(
                f"`warn_above`={warn_above!r} is invalid: expected a number above `warn_below`={warn_below!r}."
            )
        self.every_n_steps, self.warn_below, self.warn_above = every_n_steps, warn_below, warn_above
        self.log_per_tensor, self.histograms, self.median_over = log_per_tensor, histograms, median_over
        self.history: list[dict[str, Any]] = []
        self.last_ratios: dict[str, float] = {}
        self._names: dict[int, str] = {}
        self._params: list[Tensor] = []
        self._before: list[Tensor] = []
        self._step: int | None = None
        self._batch_measured: bool | None = None
        self._zone = "inside"
        self._hist_values: dict[str, Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._activation_modules: list[tuple[str, torch.nn.Module]] = []

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, every_n_steps=self.every_n_steps)

    def _measured(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _batch_is_measured(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether the optimizer steps this batch will take include a measured index.

        Automatic optimization takes one step per batch (or per accumulated batches); manual optimization
        takes, as a rule, one step per optimizer, each advancing ``global_step``.
        """
        steps = 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers))
        return any(self._measured(trainer.global_step + k) for k in range(steps))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        if self.histograms:
            try:
                self._activation_modules = [(w.name, w.module) for w in
                                            find_watched_modules(pl_module, (*DEFAULT_ACTIVATIONS, "leaky_relu"))]
            except NothingToMonitorError:
                self._activation_modules = []  # weights and gradients only
            if trainer.is_global_zero and not self._histogram_loggers(trainer):
                rank_zero_warn("UpdateRatioMonitor(histograms=True): no logger takes histograms (one whose experiment "
                               "has add_histogram, e.g. TensorBoardLogger); only the ratios are logged.")

    @staticmethod
    def _histogram_loggers(trainer: pl.Trainer) -> list[Any]:
        return [lg for lg in trainer.loggers if callable(getattr(getattr(lg, "experiment", None), "add_histogram", None))]

    # -- activations of the measured step (histograms only) ------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        self._batch_measured = self._batch_is_measured(trainer, pl_module)
        if self.histograms and self._batch_measured and not self._hooks and f"step{step}" not in self._hist_values:
            self._hist_values[f"step{step}"] = torch.empty(0)  # marks the step: one micro-batch only
            for name, module in self._activation_modules:
                self._hooks.append(module.register_forward_hook(self._activation_hook(name)))

    def _activation_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and f"activations/{name}" not in self._hist_values:
                self._hist_values[f"activations/{name}"] = _sample(output)

        return hook

    # -- the measurement ---------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if not (self._measured(step) if self._batch_measured is None else self._batch_measured):
            return
        if self._step is None:  # the batch's first measured optimizer step; later ones join its measurement
            self._step = step
        seen = {id(p) for p in self._params}
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad and id(p) not in seen]
        self._params.extend(params)
        self._before.extend(snapshot(params))
        if self.histograms:
            for p in params:
                name = self._names.get(id(p), f"param{len(self._hist_values)}")
                self._hist_values[f"weights/{name}"] = _sample(p)
                if p.grad is not None:
                    self._hist_values[f"gradients/{name}"] = _sample(p.grad)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._step is None:
            return
        step, params, before = self._step, self._params, self._before
        self._step, self._params, self._before = None, [], []
        ratios = update_ratios(before, params).cpu()
        if not ratios[torch.isfinite(ratios)].any():
            return  # no parameter moved: the step was skipped (AMP found inf gradients) or the learning rate is 0
        names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
        per_tensor = dict(zip(names, ratios.tolist(), strict=True))
        if self.median_over == "weights" and any(p.ndim >= 2 for p in params):
            median = median_ratio(ratios[torch.tensor([p.ndim >= 2 for p in params])])
        else:
            median = median_ratio(ratios)
        self.history.append({"step": step, "median": median})
        self.last_ratios = per_tensor
        metrics = {"update_ratio/median": median}
        if self.log_per_tensor:
            metrics.update({f"update_ratio/{n}": r for n, r in per_tensor.items() if math.isfinite(r)})
        log_measurement(trainer, pl_module, metrics, step)
        if trainer.is_global_zero and self.histograms:
            self._log_histograms(trainer, step)
        self._hist_values = {}
        self._warn(step, median, per_tensor)

    def _log_histograms(self, trainer: pl.Trainer, step: int) -> None:
        for logger in self._histogram_loggers(trainer):
            for tag, values in self._hist_values.items():
                if values.numel():
                    logger.experiment.add_histogram(tag, values, step)

    def _warn(self, step: int, median: float, per_tensor: dict[str, float]) -> None:
        zone = "inside"
        if math.isfinite(median) and median < self.warn_below:
            zone = "below"
        elif math.isfinite(median) and median > self.warn_above:
            zone = "above"
        if zone != "inside" and zone != self._zone:
            finite = sorted(((r, n) for n, r in per_tensor.items() if math.isfinite(r)), reverse=zone == "above")
            extremes = ", ".join(f"{n} {r:.1e}" for r, n in finite[:3])
            bound, advice = ((self.warn_below, "the learning rate is probably too low") if zone == "below" else
                             (self.warn_above, "the learning rate is probably too high"))
            rank_zero_warn(
                f"UpdateRatioMonitor: at step {step} the median update/weight ratio ||dW||/||W|| is {median:.2e}, "
                f"{zone} {bound:g} (CS231n: about 1e-3 is healthy); {advice}. Most extreme tensors: {extremes}."
            )
        self._zone = zone

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._params, self._before, self._step, self._batch_measured = [], [], None, None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "zone": self._zone}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._zone = state_dict.get("zone", "inside")


__all__ = ["UpdateRatioMonitor", "median_ratio", "snapshot", "update_ratios"]
