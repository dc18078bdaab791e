"""The Lightning callback of test-time augmentation: the steps' model returns merged predictions."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_tricks.core.batch import find_targets
from lightning_tricks.core.layout import model_layout
from lightning_tricks.core.model_probe import InputModuleProbe, batch_input, infer_num_classes
from lightning_tricks.core.seeding import RandomStream
from lightning_tricks.core.task import Task, infer_task
from lightning_tricks.core.validation import InvalidArgumentError, check_bool
from lightning_tricks.errors import ForwardNotCalledError  # noqa: F401  (re-exported)
from lightning_tricks.exact_evaluation import (
    check_stages,
    install_exact_evaluation,
    uninstall_exact_evaluation,
)
from lightning_tricks.tta.config import tta_config
from lightning_tricks.tta.core import tta_forward
from lightning_tricks.tta.hooks import StageHooks
from lightning_tricks.tta.sequence import sequence_tta_forward
from lightning_tricks.tta.wrapper import _has_randomness, _no_stochastic_layers

TTA_STAGES = ("validate", "test", "predict")
_STAGE_IDS = {"validate": 0, "test": 1, "predict": 2}


def submodule_at(pl_module: pl.LightningModule, path: str | None) -> nn.Module:
    """The submodule of ``pl_module`` at the dotted attribute path ``path`` (the module itself for None)."""
    target: Any = pl_module
    for part in path.split(".") if path else ():
        if not isinstance(getattr(target, part, None), nn.Module):
            raise InvalidArgumentError(
                f"`module`={path!r} is invalid for {type(pl_module).__name__}: it has no submodule at "
                f"{part!r}. Submodules: {', '.join(n for n, _ in pl_module.named_children()) or 'none'}."
            )
        target = getattr(target, part)
    return target


def predictions_accepter(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, task: str | None) -> Any:
    """What a call must return to be the model: one row per input; (rows, classes) scores of the model's
    number of classes for classification kinds, (rows, classes, *spatial) maps for dense ones."""
    x = batch_input(batch)
    classes = infer_num_classes(trainer, pl_module, required=False) if task in (None, "classification",
                                                                                 "multilabel") else None

    def accept(output: Any) -> bool:
        if not isinstance(output, Tensor) or x is None or not output.ndim or output.shape[0] != x.shape[0]:
            return False
        if task == "dense" or (task is None and output.ndim > 2):
            return output.ndim > 2
        return task == "regression" or (task is None and output.ndim == 1) or (output.ndim == 2 and classes in (None, output.shape[1]))
    return accept


class TestTimeAugmentation(StageHooks):
    """Test-time augmentation for an unmodified LightningModule: the model its steps call returns merged predictions.

    During the chosen stages the callback replaces ``forward`` of the model the steps call by
    :func:`tta_forward` around the original, so ``test_step`` and ``predict_step`` get the merged
    prediction (for classification the log-probabilities of the merged distribution; see ``task`` for the
    other kinds), and the user's loss and metrics report
    TTA figures. Which model: with ``module=None``, the LightningModule's ``forward`` is wrapped, which
    serves steps that call ``self(x)`` or ``self.forward(x)``; if the first batch of a stage never calls
    it (a step that calls ``self.model(images)``, as Lightning's ImageNet example does), hooks during
    that batch find the outermost module the step called with the batch's input
    (:class:`~lightning_tricks.core.model_probe.InputModuleProbe`), that call's output is replaced by the
    merged prediction, and that module is wrapped for the rest of the stage and later ones. The
    original ``forward`` is restored when the stage ends, when it raises, and at teardown; nothing is
    added to the model's ``state_dict``. A step that calls no module with its input raises
    :class:`ForwardNotCalledError` at the first batch.

    Under DDP, evaluation loaders of the TTA stages are made exact (every sample evaluated once, see
    :mod:`lightning_tricks.exact_evaluation`), so test metrics equal the single-process values.

    Args:
        views: view families, combined as a cartesian product (default ``["hflip"]``); see
            :class:`TTAConfig`. Flips are label-preserving for natural images, not for digits or text.
        crop_size: side of the crops of ``center_crop``/``five_crop``/``ten_crop``.
        scales: shorter-side sizes for multi-scale testing.
        translate: shift in pixels of the ``translate`` views.
        padding_mode: border fill of shifted views (``replicate``, ``reflect``, ``zeros``).
        stochastic_passes: draws per view with dropout and ``lt_stochastic_eval`` modules active.
        merge: ``mean``, ``gmean``, ``max`` or ``vote``; see :func:`merge_predictions`.
        task: ``classification``, ``multilabel``, ``dense``, ``regression`` or None (default): read once, at
            the first augmented batch, from the model's output and the batch's targets
            (:func:`~lightning_tricks.core.task.infer_task`). Multi-label outputs get the logits of the mean
            sigmoid probabilities; dense ``(batch, classes, *spatial)`` maps are mapped back onto the
            input's grid (flips undone, shifts moved back, crops pasted back, scales resized back) before
            the merge; a forward ending in softmax gets probabilities back. Predict batches without
            targets read the task from the output alone (``(batch, C)`` is single-label): pass
            ``task="multilabel"`` there, or run test first with the same callback (the task read then is kept).
        max_batch: largest number of rows per model call (memory bound); ``None``: all views of a shape at once.
        stages: stages to augment, from ``validate`` (also fit's validation), ``test``, ``predict``
            (default ``["test", "predict"]``).
        module: dotted attribute path of the submodule whose ``forward`` to wrap (e.g. ``"model"``);
            ``None``: found as described above.
        exact_distributed: under DDP, evaluate every ``validate``/``test`` sample exactly once.
        seed: seed of the stochastic passes; draws depend on (seed, rank, stage, dataloader, batch index).
            ``None`` (default) takes the run's seed, as every stochastic callback of the package does (the
            one given to ``seed_everything``, else ``torch.initial_seed()``; rank 0's under DDP), resolved
            once at setup and kept in the checkpoint.

    Examples:
        >>> tta = TestTimeAugmentation(views=["hflip", "five_crop"], crop_size=28)
        >>> trainer = pl.Trainer(callbacks=[tta])  # doctest: +SKIP
        >>> trainer.test(model, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(self, views: list[str] | None = None, crop_size: int | None = None, scales: list[int] | None = None,
                 translate: int = 2, padding_mode: str = "replicate", stochastic_passes: int = 1, merge: str = "mean",
                 task: str | None = None, max_batch: int | None = None, stages: list[str] | None = None,
                 module: str | None = None, exact_distributed: bool = True, seed: int | None = None) -> None:
        self.config = tta_config(views, crop_size, scales, translate, padding_mode, stochastic_passes, merge, task,
                                 max_batch)
        self._views_given = views is not None  # on sequences the default 'hflip' (a reversal) is refused
        self.stages = check_stages("stages", stages, TTA_STAGES, ("test", "predict"))
        if module is not None and (not isinstance(module, str) or not all(p.isidentifier() for p in module.split("."))):
            raise InvalidArgumentError(f"`module`={module!r} is invalid: expected a dotted attribute path such as "
                                       "'model' or 'net.backbone', or None for the LightningModule.")
        self.randomness = RandomStream(seed)
        self.module, self.exact_distributed, self.seed = module, check_bool("exact_distributed", exact_distributed), seed
        self._wrapped: tuple[nn.Module, Any, bool] | None = None
        self._stage: str | None = None
        self._batch = (0, 0)
        self._calls = 0
        self._batches = 0
        self._announced: set[tuple[str, str | None]] = set()
        self._found: dict[str, str] = {}  # stage -> the submodule its steps call, found at its first batch of the run
        self._probe: InputModuleProbe | None = None
        self._targets: Any = None  # the current batch's targets (None when it has none)
        self.task: Task | None = None  # read at the first augmented batch (kept while the module is the same)
        self._task_from_targets = False
        self._task_module: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config, stages=self.stages, module=self.module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.randomness.setup(trainer)
        self._found.clear()  # found again for this run's module
        if self._task_module != id(pl_module):
            self.task, self._task_module = None, id(pl_module)
        target = submodule_at(pl_module, self.module)
        if self.config.stochastic_passes > 1 and not _has_randomness(target):
            raise _no_stochastic_layers(self.config.stochastic_passes, f"{type(target).__name__} (`module`={self.module!r})")
        if self.config.num_views == 1:
            rank_zero_warn("TestTimeAugmentation has a single identity view: predictions are the plain model's.")
        if self.exact_distributed:
            install_exact_evaluation(trainer, self, self.stages)

    # -- forward wrapping -------------------------------------------------------------------------

    def _augment(self, trainer: pl.Trainer, stage: str, target: nn.Module, forward: Any, args: tuple,
                 kwargs: dict) -> Tensor:
        """The merged prediction of ``forward(*args, **kwargs)`` over the views of ``args[0]``."""
        if not args:
            raise TypeError("TestTimeAugmentation wraps forward(x, ...): call the model with the input batch as "
                            "its first positional argument.")
        x, rest = args[0], args[1:]
        batch = x.shape[0] if isinstance(x, Tensor) and x.ndim else None
        for value in (*rest, *kwargs.values()):
            if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch:
                raise TypeError("TestTimeAugmentation augments forward's first argument only; forward also got a "
                                f"tensor with {batch} rows, which the views would not match.")
        seed = None
        if self.config.stochastic_passes > 1:
            seed = self.randomness.key(_STAGE_IDS[stage], *self._batch)
        with self._probe.paused() if self._probe is not None else contextlib.nullcontext():
            if isinstance(x, Tensor) and x.ndim in (2, 3) and model_layout(target) == "sequence":
                return sequence_tta_forward(lambda v: forward(v, *rest, **kwargs), x, self.config, seed=seed,
                                            views_given=self._views_given, stochastic_module=target,
                                            task=self._read_task)
            return tta_forward(lambda v: forward(v, *rest, **kwargs), x, self.config, seed=seed,
                               stochastic_module=target, task=self._read_task)

    def _read_task(self, output: Tensor) -> Task:
        """The task, read once from the first output and the batch's targets (again if read without targets)."""
        if self.task is None or (not self._task_from_targets and self._targets is not None):
            self.task = infer_task(output, self._targets, self.config.task)
            self._task_from_targets = self._targets is not None
            rank_zero_info(f"TestTimeAugmentation: merging the views of {self.task.describe()}.")
        return self.task

    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, path: str | None) -> None:
        target = submodule_at(pl_module, path)
        had_own = "forward" in target.__dict__
        original, callback = target.forward, self

        def forward_with_tta(*args: Any, **kwargs: Any) -> Tensor:
            callback._calls += 1
            return callback._augment(trainer, stage, target, original, args, kwargs)

        target.forward = forward_with_tta
        self._wrapped = (target, original, had_own)
        if (stage, path) not in self._announced:
            self._announced.add((stage, path))
            where = type(pl_module).__name__ + (f".{path}" if path else "")
            rank_zero_info(f"TestTimeAugmentation: {stage} predictions of {where} average {self.config.describe()}.")

    def _wrap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or self._wrapped is not None:
            return
        self._install(trainer, pl_module, stage, self.module if self.module is not None else self._found.get(stage))
        self._stage, self._calls, self._batches = stage, 0, 0

    def _unwrap(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self._wrapped is None:
            return
        target, original, had_own = self._wrapped
        if had_own:
            target.forward = original
        else:
            target.__dict__.pop("forward", None)
        self._wrapped, self._stage = None, None

    @property
    def active(self) -> bool:
        """Whether the model's forward is currently wrapped."""
        return self._wrapped is not None

    # -- finding the model the step calls ----------------------------------------------------------

    def _batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, batch: Any,
                     batch_idx: int, dataloader_idx: int) -> None:
        if self._stage != stage:
            return
        self._batch = (dataloader_idx, batch_idx)
        self._targets = find_targets(batch)
        if self._batches == 0 and self.module is None and stage not in self._found:
            self._probe = InputModuleProbe(pl_module, batch, accept=predictions_accepter(trainer, pl_module, batch, self.config.task),
                                           replace=lambda module, args, kwargs, output: self._replace(
                                               trainer, stage, module, args, kwargs))
            self._probe.__enter__()

    def _replace(self, trainer: pl.Trainer, stage: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self._wrapped is not None and module is self._wrapped[0]:
            return None  # its forward is the wrapped one: the output is already merged
        return self._augment(trainer, stage, module, module.forward, args, kwargs)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stage != stage:
            return
        self._batches += 1
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        if self._batches > 1 or self._calls:
            return
        self._unwrap()
        if probe is not None and probe.found is not None:  # the step called a submodule: wrap it from now on
            self._found[stage] = probe.found.name
            self._install(trainer, pl_module, stage, probe.found.name)
            self._stage = stage
            return
        name = type(pl_module).__name__ + (f".{self.module}" if self.module else "")
        hint = ("no module of it was called with the batch's input tensor either (hooks watched that batch). Compute "
                "the predictions with self(x), self.forward(x) or a submodule called on the batch's input, or set "
                "`module` to the submodule to augment" if self.module is None else "check `module`")
        raise ForwardNotCalledError(f"TestTimeAugmentation could not act: the first {stage} batch never called "
                                    f"{name}.forward, and {hint}.")

    # -- hooks (the per-stage ones are routed by StageHooks) ---------------------------------------

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap()
        uninstall_exact_evaluation(trainer, self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()
        uninstall_exact_evaluation(trainer, self)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.randomness.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.randomness.load_state_dict(state_dict)


