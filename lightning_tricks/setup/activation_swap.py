"""The Lightning callback of :mod:`lightning_tricks.setup.activations`: :class:`ActivationSwap`.

It swaps at ``setup`` through the functional core (:func:`~lightning_tricks.setup.activations.apply_swap`)
and shares the shell of the structural regularizers (:class:`~lightning_tricks.core.callback.StructuralCallback`):
the swapped network evaluates differently from the plain one, so the callback records itself in every
checkpoint, and our loaders (:mod:`lightning_tricks.checkpoint`) rebuild the swap from that record, or from
the swapped modules' marker buffers when a checkpoint has no record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_tricks.core.batch import find_slot, get_item
from lightning_tricks.core.callback import StructuralCallback
from lightning_tricks.core.lightning_classes import is_overridden
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.surgery import ModelNotSupportedError, SurgeryReport
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.init.schemes import _GAIN_SCHEMES  # which schemes have a gain
from lightning_tricks.setup.activations import (
    _SLOPE_TARGETS,
    RENAMES,
    apply_swap,
    resolve_swap,
    set_prelu_channels,
    swap_marker_values,
)


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """A small model input for the trace, from public places only; None when none is at hand yet.

    ``example_input_array`` first, then the first images (two rows) of the datamodule's (set up before
    ``Callback.setup``) or the module's own ``train_dataloader``. Iterating a shuffling loader draws from the
    global RNG: it is forked, so the run's randomness is the same with and without the swap.
    """
    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        return example
    for source in (getattr(trainer, "datamodule", None), pl_module):
        if source is None or not is_overridden("train_dataloader", source):
            continue
        try:
            with torch.random.fork_rng(devices=[]):
                batch = next(iter(source.train_dataloader()))
            images = get_item(batch, find_slot(batch, None, "images", "ActivationSwap"))
        except Exception:  # noqa: BLE001 - a loader that needs the module's own setup first, an odd batch
            return None
        return images[:2] if isinstance(images, torch.Tensor) else None
    return None


class ActivationSwap(StructuralCallback):
    """Replace the model's activation modules when a stage starts (``setup``), keeping module names.

    Runs in ``Callback.setup`` of every stage, before the strategy moves and wraps the model and before a
    checkpoint is restored, so every rank swaps alike, a resumed run (``ckpt_path``) loads its PReLU slopes
    into swapped modules, and validate/test/predict of a checkpoint see the network it was trained as.
    Idempotent: a second ``fit`` finds the modules already swapped.

    The swapped network evaluates differently from the plain one, so, like the structural regularizers,
    the callback records itself in every checkpoint (request, swapped names, PReLU channel counts) and each
    swapped module holds a marker buffer: :func:`lightning_tricks.load_from_checkpoint`, the Ensemble
    loaders and the CLI's ``validate/test/predict --ckpt_path`` rebuild the swap (PReLU slopes then load),
    and a plain ``MyModule.load_from_checkpoint`` fails with ``Unexpected key(s) in state_dict:
    "...lightning_tricks_ActivationSwap"`` instead of evaluating ReLUs.

    Put it **before** ``WeightInit`` in ``trainer.callbacks`` (setups run in list order): WeightInit then
    uses the new activation's gain; the other order is an error at setup when the gain would differ.

    One training batch (``example_input_array``, else the datamodule's first) is run forward once to size
    PReLU per channel and to find functional calls (``F.relu(x)`` in a ``forward``) that no module swap
    can reach: none of the requested modules at all is an error; some calls left is one warning line
    (an error with ``strict``).

    Args:
        to: the new activation: ``leaky_relu``, ``prelu`` (learnable, per channel), ``elu``, ``selu``,
            ``gelu``, ``silu``, or ``relu``/``tanh``/``sigmoid`` for comparisons.
        activations: the kinds replaced: ``relu`` (default), ``relu6``, ``leaky_relu``, ``prelu``, ``elu``,
            ``selu``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``.
        slope: negative slope in [0, 1) of ``leaky_relu`` (default 0.01), initial slope of ``prelu`` (0.25).
        alpha: ELU's alpha > 0 (default 1).
        include: glob patterns on module names (``model.layer4``: the activations inside it); default every
            module of those kinds.
        strict: fail when functional calls of the requested kinds remain after the swap.
        exclude: patterns of the same form for the modules left alone.
        replace: Deprecated: use ``activations``.
        layers: Deprecated: use ``include``.

    Raises:
        InvalidArgumentError: in ``__init__``, an unknown activation name, a slope outside [0, 1), ...;
            at setup, an ``include`` pattern that matches no activation, an ``exclude`` pattern that matches nothing.
        ModelNotSupportedError: at setup, no activation module of the requested kinds (a model that calls
            ``F.relu`` in ``forward``).

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ActivationSwap(to="prelu", include=["layer4"])])
    """

    converts = "activations"

    def __init__(self, to: str = "leaky_relu", activations: list[str] | None = None, slope: float | None = None,
                 alpha: float | None = None, include: list[str] | None = None, strict: bool = False,
                 exclude: list[str] | None = None, replace: list[str] | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__(seed=None)  # deterministic: the seed of the shared shell is unused
        self.spec = resolve_swap(to, activations, slope, alpha, include, exclude, replace=replace, layers=layers)
        self.strict = bool(strict)
        self._example: Any = None
        self._channels: list[int] = []

    @property
    def state_key(self) -> str:
        # the keywords of the first release, so that older checkpoints' states keep their key
        extra = {} if self.spec.exclude is None else {"exclude": self.spec.exclude}
        return self._generate_state_key(to=self.spec.to, replace=self.spec.activations, layers=self.spec.include,
                                        **extra)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_order(trainer)
        self._example = example_input(trainer, pl_module)
        try:
            super().setup(trainer, pl_module, stage)  # convert, log, after_convert
        finally:
            self._example = None

    def convert(self, model: nn.Module, randomness: LayerRandomness, modules: list[str] | None = None
                ) -> SurgeryReport:
        spec = self.spec if modules is None else dataclasses.replace(self.spec, include=tuple(modules), exclude=None)
        report = apply_swap(model, spec, self._example, trace_optional=True)
        self._channels = [int(getattr(model.get_submodule(name), "num_parameters", 0))
                          for name in report.converted + report.already]
        return report

    def after_convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.report is not None
        functional = [reason for name, reason in self.report.skipped if name == "forward"]
        if functional:
            message = (f"ActivationSwap: {functional[0]}; those stay {'/'.join(self.spec.activations)}: replace them by "
                       "modules in your forward to swap them too.")
            if self.strict:
                raise ModelNotSupportedError(message)
            rank_zero_warn(message)

    def _check_order(self, trainer: pl.Trainer) -> None:
        from lightning_tricks.init import WeightInit

        for callback in trainer.callbacks:
            if callback is self:
                return
            if (isinstance(callback, WeightInit) and callback.initialized_layers and callback.skipped is None
                    and not callback.args.nonlinearity_given and callback.args.scheme in _GAIN_SCHEMES
                    and callback.args.nonlinearity != self.spec.init_gain[0]):
                raise ConfigError(
                    f"ActivationSwap comes after WeightInit in trainer.callbacks, so WeightInit used the "
                    f"{callback.args.nonlinearity} gain before the swap to {self.spec.to}: put ActivationSwap first "
                    "(WeightInit then follows the new activation) or give WeightInit a `nonlinearity`.")

    def state_dict(self) -> dict[str, Any]:
        """What a loader needs to rebuild the swapped model: the request and the names it swapped."""
        spec = self.spec
        return {"to": spec.to, "activations": list(spec.activations), "slope": spec.slope, "alpha": spec.alpha,
                "include": None if spec.include is None else list(spec.include),
                "exclude": None if spec.exclude is None else list(spec.exclude),
                "swapped": list(self.report.converted + self.report.already) if self.report else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the swap is made again at setup, and the checkpoint's weights load into it."""

    # -- the checkpoint record (see lightning_tricks.checkpoint) ---------------------------------------------------

    def init_args(self) -> dict[str, Any]:
        spec = self.spec
        return {"to": spec.to, "activations": list(spec.activations),
                "slope": spec.slope if spec.to in _SLOPE_TARGETS else None,
                "alpha": spec.alpha if spec.to == "elu" else None,
                "include": None if spec.include is None else list(spec.include),
                "exclude": None if spec.exclude is None else list(spec.exclude), "strict": self.strict}

    def changes_evaluation(self) -> bool:
        return True

    def record(self) -> dict[str, Any] | None:
        record = super().record()
        if record is not None and self.spec.to == "prelu":  # the slopes' shapes, to load them strictly
            record["channels"] = list(self._channels)
        return record

    @classmethod
    def reapply(cls, model: nn.Module, record: dict[str, Any]) -> SurgeryReport:
        # a checkpoint of an earlier release writes the arguments' old names: read them without a warning
        init_args = {RENAMES.get(key, key): value for key, value in record["init_args"].items()}
        record = {**record, "init_args": init_args}
        report = super().reapply(model, record)
        for name, channels in zip(record["modules"], record.get("channels") or [], strict=False):
            set_prelu_channels(model.get_submodule(name), int(channels))
        return report

    @classmethod
    def records_from_markers(cls, markers: Sequence[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
        """The records of a checkpoint saved without callback hooks, from its ``(module name, marker)`` pairs.

        Registered in :data:`lightning_tricks.checkpoint.MARKER_DECODERS`: a ``save_weights_only`` checkpoint
        has no record, but its markers hold what the swap needs (:func:`~lightning_tricks.setup.activations.swap_marker_values`).

        Args:
            markers: ``(qualified module name, marker buffer)`` for each swapped module, in ``state_dict`` order.

        Returns:
            One record per distinct ``(to, slope, alpha)``, as :meth:`record` writes them.

        Examples:
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
            >>> _ = apply_swap(net, resolve_swap("elu"))
            >>> [r["init_args"]["to"] for r in ActivationSwap.records_from_markers(
            ...     [("1", net[1].lightning_tricks_ActivationSwap)])]
            ['elu']
        """
        groups: dict[tuple[str, float, float], list[tuple[str, str, int]]] = {}
        for module, marker in markers:
            to, kind, slope, alpha, channels = swap_marker_values(marker)
            groups.setdefault((to, slope, alpha), []).append((module, kind, channels))
        records = []
        for (to, slope, alpha), swapped in groups.items():
            swap = cls(to, list(dict.fromkeys(kind for _, kind, _ in swapped)),
                       slope if to in _SLOPE_TARGETS else None, alpha if to == "elu" else None)
            record = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": swap.init_args(),
                      "modules": [module for module, _, _ in swapped]}
            if to == "prelu":
                record["channels"] = [channels for _, _, channels in swapped]
            records.append(record)
        return records


__all__ = ["ActivationSwap", "example_input"]
