"""Lightning callbacks: ``WeightInit`` (a scheme or LSUV, applied once before DDP wrapping) and
``ActivationStatistics`` (the lectures' per-layer activation figure, logged during training)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_tricks._lightning_internals import fit_train_dataloader
from lightning_tricks.core.batch import check_key, find_inputs
from lightning_tricks.core.deprecation import register_renames, renamed_argument
from lightning_tricks.core.distributed import broadcast_module
from lightning_tricks.core.seeding import RandomStream
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError, check_int
from lightning_tricks.init._measure import forward_on_batch_input
from lightning_tricks.init.lsuv_init import LSUVLayer, check_lsuv_arguments, lsuv
from lightning_tricks.init.schemes import apply_scheme, resolve_scheme
from lightning_tricks.init.statistics import (
    LayerStatistics,
    activation_statistics,
    plot_activation_statistics,
)


def _check_names(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise InvalidArgumentError(f"`{name}`={value!r} is invalid: expected a non-empty list of non-empty strings.")
    return list(value)


register_renames("WeightInit", {"batch_key": "input_key"})
register_renames("ActivationStatistics", {"batch_key": "input_key", "save_figure": "plot", "figure_dir": "plot_dir"})


class WeightInit(Callback):
    """Initialize the model's weights with a scheme or LSUV when ``fit`` starts, on every rank alike.

    Runs in ``Callback.setup`` (stage ``fit``), before the strategy moves the model and wraps it in
    DDP. Every rank draws from a generator seeded by ``seed`` (default: the run's seed, rank 0's value
    on every rank, as for every stochastic callback of the package), LSUV all-reduces its variances,
    and rank 0's parameters are then broadcast explicitly, so all ranks start bit-identical whatever
    the strategy does.

    It never leaves a model with weights it should have kept: when ``fit`` resumes from a checkpoint
    (``ckpt_path``), Lightning restores the checkpoint's weights after ``setup``, over the fresh
    initialization (Lightning tells a callback which checkpoint it resumes only after ``setup``:
    :attr:`skipped` says so from ``on_fit_start``); it does not re-initialize on a second ``fit`` of the
    same module, nor for validate/test/predict.

    Args:
        scheme: ``default``, ``zeros``, ``normal``, ``xavier_uniform``, ``xavier_normal`` (torch's Glorot:
            Var = 2/(fan_in + fan_out)), ``lecun_uniform``, ``lecun_normal`` (Var = 1/fan_in: the lectures'
            "Xavier"), ``kaiming_uniform``, ``kaiming_normal``, ``orthogonal`` or ``lsuv``.
        nonlinearity: ``linear``, ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid`` or ``selu``: its gain scales
            the fan-based schemes (default ``relu`` for ``kaiming_*``, ``linear`` otherwise).
        negative_slope: leaky ReLU slope (``nonlinearity: leaky_relu`` only; default 0.01).
        mode: ``fan_in`` or ``fan_out`` (``kaiming_*`` only; default ``fan_in``).
        std: standard deviation for ``normal`` (default 0.01).
        bias: constant for the selected layers' biases, e.g. 0.01 for ReLU nets; None: 0 (``default``
            leaves them).
        layer_types: class names of the layers to initialize (default Linear and Conv1d/2d/3d,
            subclasses included).
        include: glob patterns on module names (``model.fc``, ``model.layer*``); only layers
            named so, or inside a module named so, are initialized.
        exclude: patterns of layers to leave alone.
        zero_init_residual: True zeroes the last norm gamma of each residual branch of our zoo,
            torchvision and timm ResNet blocks; a list of ``"BlockClass.attribute"`` specs or module-name
            patterns names them in your own blocks.
        tol: LSUV stops when ``|Var - 1| < tol`` (``lsuv`` only; default 0.1).
        max_iters: LSUV's most rescalings per layer (``lsuv`` only; default 10).
        num_batches: training batches LSUV measures on, concatenated (``lsuv`` only; default 1).
        input_key: key or index of the model input in a training batch (``lsuv`` only; default: found as
            every trick finds it, :func:`~lightning_tricks.core.batch.find_inputs`: a dict's ``image``, ``x``,
            ``input``, ... key, else a sequence's first tensor).
        seed: seed of the random draws (default: the run's seed, the one given to ``seed_everything``,
            else ``torch.initial_seed()``).
        log: log the metrics below through ``pl_module.log``.
        batch_key: Deprecated: use ``input_key``.

    Metrics (through ``pl_module.log`` in ``on_train_start``, epoch-level, so ``EarlyStopping`` and
    ``ModelCheckpoint`` see them; not when the initialization was skipped): ``weight_init/<layer>/std``, the
    standard deviation of each initialized layer's weight right after the initialization, and for LSUV
    ``weight_init/<layer>/lsuv_variance`` (its output variance after the last rescaling) and
    ``weight_init/<layer>/lsuv_iterations`` (the rescalings applied).

    Raises:
        InvalidArgumentError: in ``__init__``, any invalid argument; at setup, a selector that matches
            nothing, a model without conv/linear layers for LSUV, or no training data for LSUV.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[WeightInit("kaiming_normal", nonlinearity="relu", bias=0.01)])
    """

    def __init__(
        self,
        scheme: str = "kaiming_normal",
        nonlinearity: str | None = None,
        negative_slope: float | None = None,
        mode: str | None = None,
        std: float | None = None,
        bias: float | None = None,
        layer_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        zero_init_residual: bool | list[str] = False,
        tol: float | None = None,
        max_iters: int | None = None,
        num_batches: int | None = None,
        input_key: str | int | None = None,
        seed: int | None = None,
        log: bool = True,
        batch_key: str | int | None = None,
    ) -> None:
        input_key = renamed_argument("WeightInit", "batch_key", "input_key", batch_key, input_key, None)
        self.args = resolve_scheme(scheme, nonlinearity, negative_slope, mode, std, bias)
        self.layer_types = _check_names("layer_types", layer_types)
        self.include = _check_names("include", include)
        self.exclude = _check_names("exclude", exclude)
        if not isinstance(zero_init_residual, bool):
            _check_names("zero_init_residual", zero_init_residual)
        self.zero_init_residual = zero_init_residual
        if scheme != "lsuv":
            for name, value in (("tol", tol), ("max_iters", max_iters), ("num_batches", num_batches),
                                ("input_key", input_key)):
                if value is not None:
                    raise InvalidArgumentError(f"`{name}`={value!r} is invalid with scheme={scheme!r}: it is used only by "
                                               "scheme='lsuv'; remove it.")
        self.tol = 0.1 if tol is None else tol
        self.max_iters = 10 if max_iters is None else max_iters
        check_lsuv_arguments(self.tol, self.max_iters)
        self.num_batches = check_int("num_batches", 1 if num_batches is None else num_batches, 1)
        self.input_key = check_key("input_key", input_key)
        self.randomness = RandomStream(seed, shared=True)
        self.seed = seed  # every rank draws the same initialization
        self.initialized_layers: list[str] = []
        self.lsuv_report: list[LSUVLayer] = []
        # not `self.log`: Lightning sets every callback's `log` to the module's (callback_connector, 2.x)
        self.log_metrics = bool(log)
        self.skipped: str | None = None
        # each initialized layer's weight std right after the initialization (what weight_init/<layer>/std logs)
        self.weight_stds: dict[str, float] = {}
        self._initialized: weakref.ref | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.args.scheme)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_initialized"] = None  # a weak reference does not pickle (ddp_spawn pickles callbacks)
        return state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.skipped = None
        if self._initialized is not None and self._initialized() is pl_module:
            self.skipped = "this module was initialized by an earlier fit: its trained weights are kept"
        if self.skipped is not None:
            rank_zero_info(f"WeightInit: not initializing ({self.skipped}).")
            return
        self.randomness.setup(trainer)
        self.initialized_layers = apply_scheme(
            pl_module, self.args, layer_types=self.layer_types, include=self.include, exclude=self.exclude,
            zero_residual=self.zero_init_residual, generator=self.randomness.seeded("cpu"), owner="WeightInit")
        # ranks seeded differently drew differently: start from rank 0's draw, so that LSUV's all-reduced
        # variances describe one network, and broadcast again after it so that the guarantee does not
        # depend on floating-point agreement or on the strategy's own broadcast
        broadcast_module(pl_module)
        if self.args.scheme == "lsuv":
            self.lsuv_report = self._run_lsuv(trainer, pl_module)
            broadcast_module(pl_module)
        self._initialized = weakref.ref(pl_module)
        self.weight_stds = {name: float(pl_module.get_submodule(name).weight.detach().float().std())
                            for name in self.initialized_layers}
        self._report()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None and self.skipped is None:
            self.skipped = f"resuming from {trainer.ckpt_path}: the checkpoint's weights replaced the initialization"
            self.lsuv_report, self.weight_stds = [], {}  # they described weights that no longer exist
            rank_zero_info(f"WeightInit: {self.skipped}.")

    def _run_lsuv(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[LSUVLayer]:
        loader = fit_train_dataloader(trainer, pl_module)
        if loader is None:
            raise InvalidArgumentError("WeightInit(scheme='lsuv') needs training batches, but this fit has no train "
                                       "dataloader (pass a datamodule or train_dataloaders to Trainer.fit).")
        inputs: list[torch.Tensor] = []
        # iterating a shuffling loader draws from the global RNG: fork it so training's randomness is untouched
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                inputs.append(find_inputs(batch, self.input_key, "WeightInit"))
                if len(inputs) == self.num_batches:
                    break
        if not inputs:
            raise InvalidArgumentError("WeightInit(scheme='lsuv'): the train dataloader yielded no batch.")
        # LSUV runs where training will (the strategy moves the model there next), then the model goes back
        device = trainer.strategy.root_device
        home = next(pl_module.parameters()).device
        pl_module.to(device)
        x = torch.cat(inputs).to(device)
        fix = "pass `input_key` to pick the model input from the batch, or use a fixed scheme (scheme='kaiming_normal')."
        try:
            with forward_on_batch_input("WeightInit(scheme='lsuv')", pl_module, x, fix):
                return lsuv(pl_module, x, tol=self.tol, max_iters=self.max_iters, bias=None,
                            layer_types=self.layer_types, include=self.include, exclude=self.exclude,
                            orthogonal_init=False)
        finally:
            pl_module.to(home)

    def metrics(self) -> dict[str, float]:
        """What :meth:`on_train_start` logs: ``weight_init/<layer>/std`` and LSUV's ``lsuv_variance``, ``lsuv_iterations``."""
        metrics = {f"weight_init/{name}/std": std for name, std in self.weight_stds.items()}
        for r in self.lsuv_report:
            if r.reached:
                metrics[f"weight_init/{r.name}/lsuv_variance"] = float(r.variance)
                metrics[f"weight_init/{r.name}/lsuv_iterations"] = float(r.iterations)
        return metrics

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # setup and on_fit_start may not log (Lightning's rules): the first hook that may is this one
        if self.log_metrics and self.skipped is None and self.weight_stds:
            # the same values on every rank (rank 0's weights were broadcast): no reduction needed
            pl_module.log_dict(self.metrics(), on_step=False, on_epoch=True)

    def _report(self) -> None:
        message = f"WeightInit: {self.args.scheme} on {len(self.initialized_layers)} layers"
        if self.zero_init_residual:
            message += ", zero-init residual branches"
        reached = [r for r in self.lsuv_report if r.reached]
        if reached:
            message += (f"; LSUV output variances {min(r.variance for r in reached):.3f}..."
                        f"{max(r.variance for r in reached):.3f} after {sum(r.iterations for r in reached)} rescalings, "
                        f"{sum(not r.converged for r in reached)} not converged")
        rank_zero_info(message + ".")

    def state_dict(self) -> dict[str, Any]:
        return {"scheme": self.args.scheme, "initialized_layers": list(self.initialized_layers),
                "lsuv": [dataclasses.asdict(r) for r in self.lsuv_report]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initialized_layers = list(state_dict.get("initialized_layers", []))
        self.lsuv_report = [LSUVLayer(**r) for r in state_dict.get("lsuv", [])]


class ActivationStatistics(Callback):
    """Log each layer's activation mean, std, fraction of zeros and fraction saturated, and draw the figure.

    At the first training batch (the initial weights) and then every ``every_n_epochs`` epochs, the
    statistics of :func:`~lightning_tricks.init.activation_statistics` are computed on a fixed batch
    (the first training batch, at most ``max_samples`` rows per rank) and logged through
    ``pl_module.log`` (so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them) as
    ``activation_stats/<layer>/mean``, ``/std``, ``/zero_fraction`` and (tanh, sigmoid)
    ``/saturated_fraction``: the first measurement as a step metric of the first batch (loggers receive it
    at the next logging step, see ``Trainer(log_every_n_steps)``), the later ones as epoch metrics at the
    end of their epoch. The lectures' figure (mean
    and std per layer, one histogram per layer) is written as a PNG to ``plot_dir`` and sent to a
    TensorBoard logger (its writer's ``add_figure``) or a logger with W&B's ``log_image(key, images, step)``.
    Under DDP the statistics are all-reduced over the ranks' batches, so every rank holds the same.

    Args:
        every_n_epochs: epochs between measurements after the first (0: only at the start).
        max_samples: rows of the fixed batch per rank.
        bins: histogram bins (0: no histograms, and no figure).
        layer_types: whose outputs to measure (default: the ``torch.nn`` activation modules).
        include: module-name patterns to restrict the layers to.
        exclude: module-name patterns to drop.
        input_key: key or index of the model input in a training batch (default: found as every trick
            finds it, :func:`~lightning_tricks.core.batch.find_inputs`).
        plot: draw the figure: write the PNG and send it to the loggers.
        plot_dir: folder of the PNGs (default ``<log_dir>/activation_statistics``).
        log: log the metrics through ``pl_module.log``.
        batch_key: Deprecated: use ``input_key``.
        save_figure: Deprecated: use ``plot``.
        figure_dir: Deprecated: use ``plot_dir``.

    Attributes:
        history: ``(epoch, global_step, statistics)`` of every measurement.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ActivationStatistics(every_n_epochs=5)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 256,
        bins: int = 50,
        layer_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        input_key: str | int | None = None,
        plot: bool = True,
        plot_dir: str | None = None,
        log: bool = True,
        batch_key: str | int | None = None,
        save_figure: bool | None = None,
        figure_dir: str | None = None,
    ) -> None:
        input_key = renamed_argument("ActivationStatistics", "batch_key", "input_key", batch_key, input_key, None)
        plot = renamed_argument("ActivationStatistics", "save_figure", "plot", save_figure, plot, True)
        plot_dir = renamed_argument("ActivationStatistics", "figure_dir", "plot_dir", figure_dir, plot_dir, None)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 0)
        self.max_samples = check_int("max_samples", max_samples, 1)
        self.bins = check_int("bins", bins, 0)
        self.layer_types = _check_names("layer_types", layer_types)
        self.include = _check_names("include", include)
        self.exclude = _check_names("exclude", exclude)
        self.input_key = check_key("input_key", input_key)
        self.plot = bool(plot)
        self.plot_dir = plot_dir
        # not `self.log`: Lightning sets every callback's `log` to the module's (callback_connector, 2.x)
        self.log_metrics = bool(log)
        self.history: list[tuple[int, int, list[LayerStatistics]]] = []
        self._inputs: torch.Tensor | None = None
        self._folder = Path(plot_dir or "activation_statistics")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._inputs is None:
            self._inputs = find_inputs(batch, self.input_key, "ActivationStatistics")[: self.max_samples].detach().clone()
            if self._inputs.is_floating_point() and not bool(torch.isfinite(self._inputs).all()):
                raise ConfigError("ActivationStatistics: the first training batch has NaN or infinite inputs, so no "
                                  "activation statistics can be measured: clean the data (e.g. torch.nan_to_num).")
            if not self.__dict__.pop("_resumed_without_inputs", False):  # a resumed run measured at its start
                self._measure(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._inputs is not None and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module, on_step=False)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        self._inputs = self._inputs.to(pl_module.device)  # a resumed run's come from the checkpoint, on the CPU
        fix = "pass `input_key` to pick the model input from the batch, or remove ActivationStatistics for this model."
        with forward_on_batch_input("ActivationStatistics", pl_module, self._inputs, fix):
            stats = activation_statistics(pl_module, self._inputs, layer_types=self.layer_types,
                                          include=self.include, exclude=self.exclude, bins=self.bins)
        epoch, step = trainer.current_epoch, trainer.global_step
        self.history.append((epoch, step, stats))
        if self.log_metrics:
            # the statistics are all-reduced already, the same on every rank: no reduction by Lightning
            pl_module.log_dict(self.metrics(stats), on_step=on_step, on_epoch=not on_step)
        if self.plot and self.bins and trainer.is_global_zero:
            self._draw(trainer, stats, epoch, step)

    @staticmethod
    def metrics(stats: list[LayerStatistics]) -> dict[str, float]:
        """The metrics of one measurement: ``activation_stats/<layer>/{mean,std,zero_fraction,saturated_fraction}``."""
        return {f"activation_stats/{s.name}/{key}": value for s in stats
                for key, value in (("mean", s.mean), ("std", s.std), ("zero_fraction", s.zero_fraction),
                                   ("saturated_fraction", s.saturated_fraction)) if value is not None}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._inputs = None  # each fit measures its own first batch
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank calls it
        self._folder = Path(self.plot_dir) if self.plot_dir else Path(
            trainer.log_dir or trainer.default_root_dir) / "activation_statistics"

    # the fixed probe batch travels in the checkpoint (up to this size), so a resumed run measures the same inputs
    _STATE_BYTES = 16 * 2**20

    def state_dict(self) -> dict[str, Any]:
        inputs = self._inputs
        if inputs is None or inputs.numel() * inputs.element_size() > self._STATE_BYTES:
            return {"measured": inputs is not None}
        return {"measured": True, "inputs": inputs.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inputs = state_dict.get("inputs")
        self._inputs = inputs.clone() if isinstance(inputs, torch.Tensor) else None
        if state_dict.get("measured") and self._inputs is None:
            rank_zero_info(f"ActivationStatistics: the checkpoint's probe batch was over {self._STATE_BYTES >> 20} MiB "
                           "and not saved; the resumed run measures its first batch from now on.")
            self._resumed_without_inputs = True

    def figure_path(self, epoch: int, step: int) -> Path:
        """Where the figure of a measurement at ``epoch``/``step`` is written (known from ``setup`` on)."""
        return self._folder / f"epoch{epoch:03d}_step{step:06d}.png"

    def _draw(self, trainer: pl.Trainer, stats: list[LayerStatistics], epoch: int, step: int) -> None:
        fig = plot_activation_statistics(stats, title=f"activations at epoch {epoch}, step {step}")
        path = self.figure_path(epoch, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_figure", None)):  # TensorBoard's SummaryWriter (and tensorboardX)
                experiment.add_figure("activation_statistics", fig, global_step=step)
            elif callable(getattr(logger, "log_image", None)):  # W&B's signature
                logger.log_image(key="activation_statistics", images=[str(path)], step=step)


__all__ = ["ActivationStatistics", "WeightInit"]
