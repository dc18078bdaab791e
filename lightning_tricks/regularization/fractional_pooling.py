r"""Fractional max pooling (Graham 2014): max pooling by a non-integer factor over pseudo-random regions.

Each pooling layer shrinks the spatial size by :math:`\alpha \in (1, 2)` (``output_ratio`` :math:`= 1/\alpha`,
default :math:`1/\sqrt 2`) instead of 2. The region boundaries are
:math:`a_i = \lceil \alpha (i + u) \rceil`, :math:`i = 0 .. N_{out}`, for a random :math:`u \in (0, 1)` per
example, channel and axis, and each region spans ``kernel_size`` inputs from :math:`a_i` (2: overlapping
regions, the paper's best setting). Training draws a fresh :math:`u` every step; at test the paper
averages the predictions of several draws.

Torch's ``nn.FractionalMaxPool2d`` is random even in ``eval()`` and rejects a sample of another dtype
(autocast). :class:`SeededFractionalMaxPool2d` builds on it: training draws come from the trick's own
generator in the input's dtype; eval uses one fixed draw per channel (deterministic) unless the module's
``lt_stochastic_eval`` flag is set (:func:`lightning_tricks.core.stochastic.stochastic_eval`, test-time
averaging), and :func:`average_pooling_draws` averages ``k`` draws in one batched pass.

The converted network evaluates differently from the plain one (another output size), so each
:class:`SeededFractionalMaxPool2d` holds a marker buffer ``lightning_tricks_FractionalMaxPooling``
(output ratio, kernel size, seed and index): a checkpoint loads into the plain architecture only with
``strict=False``, and the callback records itself in the checkpoint for our loaders to re-apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_tricks.core.callback import StructuralCallback
from lightning_tricks.core.lightning_classes import lightning_module_types
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.surgery import ModelNotSupportedError, SurgeryReport, replace_module
from lightning_tricks.regularization._fractional_layer import (  # noqa: F401  (re-exported: the layer and functional core)
    DEFAULT_RATIO,
    SeededFractionalMaxPool2d,
    _can_wrap,
    apply_fractional_pooling,
    average_pooling_draws,
    check_fractional_pooling_args,
    fractional_pools,
    pooling_draws,
)


def _zeros_like_input(value: Any) -> torch.Tensor | None:
    """Two zero images shaped like the first image-like tensor in ``value`` (a sample, a batch or an example)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    elif isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(value, torch.Tensor) or value.dim() < 3 or not value.is_floating_point():
        return None
    shape = value.shape[1:] if value.dim() == 4 else value.shape
    return torch.zeros(2, *shape, dtype=value.dtype)


def _example_input(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> torch.Tensor | None:
    """Zero images shaped like the model's input, from public sources known at setup.

    ``example_input_array``, else the first sample of the datamodule's loader for ``stage``. Loaders
    passed to ``trainer.fit(...)`` are not public before the loop starts: the check then waits for the
    first batch (see :meth:`FractionalMaxPooling.on_train_batch_start`).
    """
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return torch.zeros_like(example)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    hook = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}.get(
        stage, "train_dataloader")
    try:
        loader = getattr(datamodule, hook)()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        with torch.random.fork_rng(devices=[]):  # a random transform must not shift the run's random stream
            return _zeros_like_input(loader.dataset[0])
    except Exception:  # a loader that cannot be built or indexed here is not our error to report
        return None


def _dry_run(model: nn.Module, x: torch.Tensor, watch: Sequence[tuple[str, nn.Module]],
             sizes: dict[str, tuple[int, ...]]) -> Any:
    """The model's output on ``x`` in eval mode without gradients; ``sizes`` receives the watched layers' output sizes."""
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
               for name, m in watch]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return out


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return [_shapes(o) for o in out]
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return None


class FractionalMaxPooling(StructuralCallback):
    """Fractional max pooling on an unmodified LightningModule: its ``nn.MaxPool2d`` layers pool by ``1/sqrt(2)``.

    At ``setup`` (before checkpoint restore and DDP wrapping) the chosen ``nn.MaxPool2d`` layers are
    replaced by :class:`SeededFractionalMaxPool2d` (they hold no parameters: ``state_dict`` keys are
    unchanged). Training draws pseudo-random overlapping regions from the callback's generator, keyed by
    (seed, rank, step, layer); eval uses one fixed draw per channel (deterministic). With ``test_samples=k > 1`` the
    model's predictions in ``test`` and ``predict`` are the average of ``k`` pooling draws (the paper's
    test procedure): the LightningModule's ``forward`` is wrapped for the duration and restored after
    (also after an exception), and returns the log of the averaged probabilities, so ``cross_entropy``,
    ``argmax`` and ``softmax`` in the user's steps keep working.

    The layers after a converted pool see a larger map (ratio 0.71 instead of 0.5). A model that needs
    the original size (a ``Flatten`` into a ``Linear`` without global pooling) fails before it is
    trained or evaluated: the callback runs the model on two zero images shaped like its input before and
    after the change and reports the layer sizes. The shape comes from ``example_input_array`` or the
    datamodule's first sample at setup, else from the first batch (loaders given to ``trainer.fit``).

    The converted network evaluates differently from the plain one, so the callback records itself in
    every checkpoint (re-applied by :func:`lightning_tricks.load_from_checkpoint`, the Ensemble loaders
    and the CLI's ``--ckpt_path``), and a plain ``MyModule.load_from_checkpoint`` fails with
    ``Unexpected key(s) in state_dict: "...lightning_tricks_FractionalMaxPooling"`` instead of
    evaluating a network with other pooling.

    Args:
        output_ratio: output size / input size of each converted layer, in (0, 1). Default ``1/sqrt(2)``.
        kernel_size: pooling window (2: overlapping regions, the paper's best).
        include: glob patterns on qualified module names (default: every ``nn.MaxPool2d``); a pattern also
            selects the pools inside a match (``["model.features"]``).
        test_samples: number of pooling draws averaged in ``test``/``predict`` (1: the deterministic eval).
        max_batch: most rows per forward pass when averaging (default: ``test_samples * batch``).
        seed: seed of the draws; ``None`` uses the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        exclude: glob patterns of pools to leave as they are.
        layers: deprecated: use ``include``.

    Raises:
        InvalidArgumentError: a bad argument, or an ``include``/``exclude`` pattern that matches no ``nn.MaxPool2d``.
        ModelNotSupportedError: (at setup) no ``nn.MaxPool2d``, or a model that needs the original spatial size.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[FractionalMaxPooling(test_samples=12)], logger=False)  # doctest: +SKIP
    """

    converts = "max-pooling layers"

    def __init__(self, output_ratio: float = DEFAULT_RATIO, kernel_size: int = 2, include: list[str] | None = None,
                 test_samples: int = 1, max_batch: int | None = None, seed: int | None = None,
                 exclude: list[str] | None = None, layers: list[str] | None = None) -> None:
        super().__init__(seed)
        include, exclude = check_fractional_pooling_args(output_ratio, kernel_size, include, test_samples, max_batch,
                                                         exclude, layers=layers)
        self.output_ratio, self.kernel_size, self.include, self.exclude = output_ratio, kernel_size, include, exclude
        self.test_samples, self.max_batch = test_samples, max_batch
        self._replaced: dict[str, nn.Module] = {}  # the original pools, until the size check has run
        self._wrapper: Any = None
        self._saved_forward: Any = None

    @property
    def state_key(self) -> str:
        # `layers`: include's name in the first release, so its checkpoints resume
        return self.selection_state_key(output_ratio=self.output_ratio, layers=self.include)

    def init_args(self) -> dict[str, Any]:
        return {"output_ratio": self.output_ratio, "kernel_size": self.kernel_size, "include": self.include,
                "exclude": self.exclude, "test_samples": self.test_samples, "max_batch": self.max_batch,
                "seed": self.randomness.seed}

    def changes_evaluation(self) -> bool:
        return True

    def convert(self, model: nn.Module, randomness: LayerRandomness, modules: list[str] | None = None
                ) -> SurgeryReport:
        report, self._replaced = apply_fractional_pooling(model, self.output_ratio, kernel_size=self.kernel_size,
                                                          include=self.include if modules is None else modules,
                                                          exclude=self.exclude if modules is None else None,
                                                          randomness=randomness)
        return report

    def after_convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._replaced:
            return
        stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        example = _example_input(trainer, pl_module, stage)
        if example is not None:
            self._check_sizes(pl_module, example)

    def _check_sizes(self, pl_module: nn.Module, example: torch.Tensor) -> None:
        """Run ``example`` through the model with the original pools and with ours; undo and raise on a mismatch."""
        replaced, self._replaced = self._replaced, {}
        example = example.to(pl_module.device if isinstance(pl_module, lightning_module_types()) else example.device)
        ours = {name: pl_module.get_submodule(name) for name in replaced}
        sizes_before: dict[str, tuple[int, ...]] = {}
        for name, old in replaced.items():
            replace_module(pl_module, name, old)
        try:
            out_before = _dry_run(pl_module, example, list(replaced.items()), sizes_before)
        except Exception:  # our guess of the input does not fit the model: nothing to compare with
            out_before = None
        for name, new in ours.items():
            replace_module(pl_module, name, new)
        if out_before is None:
            return
        problem, sizes_after = None, {}
        try:
            out_after = _dry_run(pl_module, example, list(ours.items()), sizes_after)
            if _shapes(out_after) != _shapes(out_before):
                problem = f"the model's output shape changes from {_shapes(out_before)} to {_shapes(out_after)}"
        except Exception as err:
            problem = f"the forward pass fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if problem is None:
            return
        for name, old in replaced.items():  # undo, so the model is left as it was
            replace_module(pl_module, name, old)
        sizes = "; ".join(f"{n}: MaxPool2d gives {'x'.join(map(str, sizes_before.get(n, ())))}, fractional pooling "
                          f"{'x'.join(map(str, sizes_after.get(n, ()))) or '?'}" for n in replaced)
        raise ModelNotSupportedError(
            f"FractionalMaxPooling changes the spatial size after pooling ({sizes}), and the layers after it need the "
            f"original size: {problem} (checked with input {tuple(example.shape)}). This happens when a Flatten feeds "
            "a Linear without global pooling: add nn.AdaptiveAvgPool2d before the Flatten, or choose with `include` "
            "only pools whose following layers accept any size."
        )

    def _check_first_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._replaced:
            example = _zeros_like_input(batch)
            if example is None:
                self._replaced = {}
                rank_zero_warn("FractionalMaxPooling could not find an image batch to check the layers after pooling "
                               "(set `example_input_array` on the LightningModule to a batch it accepts); a size "
                               "mismatch shows in the forward pass instead.")
            else:
                self._check_sizes(pl_module, example)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_first_batch(pl_module, batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(pl_module, batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(pl_module, batch)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(pl_module, batch)

    # -- test-time averaging: wrap forward during test and predict ----------------------------------------------

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if self.test_samples == 1 or self._wrapper is not None:
            return
        assert self.randomness is not None
        self.randomness.reset_eval()  # the same draws in every test run
        had_own = "forward" in pl_module.__dict__
        inner = pl_module.forward
        samples, max_batch = self.test_samples, self.max_batch

        def averaged_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not averaged_forward.active:  # type: ignore[attr-defined]
                return inner(x, *args, **kwargs)
            return average_pooling_draws(pl_module, x, samples, max_batch, lambda v: inner(v, *args, **kwargs))

        averaged_forward.active = True  # type: ignore[attr-defined]
        self._wrapper, self._saved_forward = averaged_forward, (had_own, inner)
        pl_module.forward = averaged_forward  # type: ignore[method-assign]

    def _unwrap(self, pl_module: pl.LightningModule) -> None:
        if self._wrapper is None:
            return
        had_own, inner = self._saved_forward
        if pl_module.__dict__.get("forward") is self._wrapper:
            if had_own:
                pl_module.forward = inner  # type: ignore[method-assign]
            else:
                del pl_module.forward
        else:  # someone wrapped forward after us: we cannot unwrap, so become a pass-through
            self._wrapper.active = False
        self._wrapper = self._saved_forward = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap(pl_module)


__all__ = ["DEFAULT_RATIO", "FractionalMaxPooling", "SeededFractionalMaxPool2d", "apply_fractional_pooling",
           "average_pooling_draws", "fractional_pools", "pooling_draws"]
