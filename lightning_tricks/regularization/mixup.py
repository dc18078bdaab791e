"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019): train on blends of image pairs and of their labels.

Functional core (plain torch): :func:`sample_mix_plan` draws the pairing and the weights,
:func:`apply_mix` blends the images, :func:`mix_targets` the labels, :func:`mixup` does all three.
:class:`Mixup` is the callback that applies them to training batches.

For sample ``i`` paired with ``j = perm[i]`` and weight ``lam_i``:

* Mixup: ``x_i' = lam_i * x_i + (1 - lam_i) * x_j``, ``lam_i ~ Beta(alpha, alpha)``;
* CutMix: a box of ``x_j`` pasted into ``x_i``; its side ratio is ``sqrt(1 - lam)``, its center uniform
  over the image and it is clipped at the border, so ``lam_i`` is corrected to the kept-area fraction;
* targets: ``y_i' = lam_i * onehot_eps(y_i) + (1 - lam_i) * onehot_eps(y_j)`` with label smoothing ``eps``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_tricks.core.batch import (
    BatchFormatError,
    BatchTransformCallback,
    Key,
    can_replace,
    check_key,
    find_slot,
    get_item,
    read_images,
    replace_item,
)
from lightning_tricks.core.layout import check_layout, input_layout
from lightning_tricks.core.model_probe import infer_num_classes
from lightning_tricks.core.task import (
    Task,
    TaskNotSupportedError,
    check_task_kind,
    infer_target_task,
    require_task,
)
from lightning_tricks.core.validation import check_bool, check_choice, check_optional_int
from lightning_tricks.errors import MixupTargetsUnusedError  # noqa: F401  (re-exported)
from lightning_tricks.regularization._mix_core import (  # noqa: F401  (re-exported: the functional core)
    MODES,
    MixPlan,
    _beta,
    _check_labels,
    apply_mix,
    box_mask,
    check_mix_args,
    mix_targets,
    mixup,
    sample_mix_plan,
)
from lightning_tricks.regularization._mix_tasks import mix_masks
from lightning_tricks.regularization._mixed_labels import (  # noqa: F401  (re-exported)
    SERVED_LOSSES,
    MixedLabels,
    _mixed_loss,
    _MixState,
)

TARGET_FORMATS = ("labels", "soft")


def _smoothing_losses(module: nn.Module) -> list[float]:
    return [m.label_smoothing for m in module.modules() if isinstance(m, nn.CrossEntropyLoss) and m.label_smoothing > 0]


class Mixup(BatchTransformCallback):
    """Mixup and CutMix on training batches; validation, test and predict see the original data.

    The images are blended with a random partner (a permutation of the batch) and the targets become
    the same blend of the two labels. An unmodified ``training_step`` with ``F.cross_entropy(logits, y)``,
    ``nn.CrossEntropyLoss``, or ``F.nll_loss(F.log_softmax(logits, 1), y)`` / ``nn.NLLLoss`` keeps working,
    whether it calls ``self(x)``, ``self.forward(x)`` or a submodule (``self.model(x)``):

    * ``targets="labels"`` (default): ``y`` stays the ``(N,)`` labels of each sample's own image (so
      ``(logits.argmax(1) == y)`` accuracy keeps working) as a :class:`MixedLabels` tensor, which
      the label losses read as the mixed distribution (cross-entropy with probability targets, or the soft
      negative log-likelihood ``lam * nll(y_i) + (1 - lam) * nll(y_j)``). If the training step never gives
      ``y`` to one of them, the first backward raises :class:`MixupTargetsUnusedError`.
    * ``targets="soft"``: ``y`` becomes the ``(N, K)`` class probabilities, for soft-target losses (timm's
      ``SoftTargetCrossEntropy``, a BCE); accuracy must then use ``y.argmax(1)``.

    Tasks (read once, at the first batch, from the targets: :func:`~lightning_tricks.core.task.infer_target_task`,
    or ``task``):

    * classification (``(N,)`` labels or ``(N, K)`` class probabilities): as above;
    * multi-label (``(N, K)`` multi-hot rows): the rows are mixed like the images (``lam * t_i + (1 - lam) * t_j``,
      CutMix's area-corrected ``lam``) into soft targets for ``BCEWithLogits``; ``label_smoothing`` moves
      each label toward 1/2;
    * dense (masks ``(N, H, W)`` on the images' grid): CutMix pastes the partner's mask box with its image
      box (exact labels); Mixup keeps ``y`` as each sample's own mask (a :class:`MixedLabels`) and the
      per-pixel ``F.cross_entropy``/``F.nll_loss`` becomes ``lam * loss(y_i) + (1 - lam) * loss(y_j)``, with
      the loss's own ``weight``, ``ignore_index`` and ``label_smoothing`` (see :func:`mix_masks`); 0/1 float
      maps ``(N, C, H, W)`` are blended (or pasted) like the images;
    * regression: refused in one line.

    List and dict batches are changed in ``on_train_batch_start``; tuple batches need
    :class:`~lightning_tricks.BatchTransformMixin` on the module (the first tuple batch raises an error
    saying so).

    Args:
        alpha: Mixup's Beta(alpha, alpha) concentration, > 0 (the paper: 0.1-0.4 on ImageNet, 1 on CIFAR).
        cutmix_alpha: CutMix's Beta concentration, > 0; None: no CutMix.
        switch_prob: probability of CutMix instead of Mixup when ``cutmix_alpha`` is set (default 0.5;
            1.0 gives CutMix only).
        p: probability that a batch (``mode="batch"``) or a sample (``mode="sample"``) is mixed; 0 turns the
            callback off (the batch is left exactly as it is).
        mode: ``"batch"``: one weight and one box per batch, as in the papers; ``"sample"``: each sample its own.
        label_smoothing: eps in [0, 1): one-hots become ``(1 - eps) * onehot + eps / K`` before mixing.
        num_classes: K. Not needed with ``targets="labels"`` (taken from the loss's input, checked if given);
            with ``"soft"``, None infers it with :func:`~lightning_tricks.infer_num_classes` (the datamodule's
            ``num_classes``, else the model's last ``nn.Linear``).
        targets: ``"labels"`` or ``"soft"`` (see above).
        input_key: where the images are (dict key or position); None finds them.
        target_key: where the targets are; None: the element after the images, or a dict's ``label``/``y``/...
        seed: seed of the callback's generator; None takes the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        task: ``classification``, ``multilabel``, ``dense``, ``regression`` (refused) or None (read from the
            first batch's targets).
        layout: for CutMix: ``auto`` (4D inputs are images; 3D inputs are sequences ``(N, C, L)`` when the model
            has 1D conv/pool/recurrent layers, images ``(N, H, W)`` when it has 2D ones), ``image`` or
            ``sequence``. On sequences CutMix pastes a span of the partner's steps across all channels.
        log: log ``mixup/p`` (the probability applied) and ``mixup/lam`` (the mixing weight of the step's
            batch: the weight of each sample's own image, 1.0 when the batch was not mixed; with
            ``mode="sample"`` the mean of the samples' weights) at every training batch, through
            ``pl_module.log`` (so ``EarlyStopping``/``ModelCheckpoint`` can monitor them); ``False`` logs nothing.

    Raises:
        TaskNotSupportedError: at the first batch, regression targets; masks with ``targets="soft"``,
            ``label_smoothing`` or CutMix off their images' grid.
        InvalidArgumentError: an argument out of range; at setup, ``num_classes`` that cannot be inferred
            (``targets="soft"``); at the first batch, non-floating-point images or labels out of range.
        BatchFormatError: at the first batch, a batch whose targets cannot be found or replaced.
        MixupTargetsUnusedError: at the first backward (``targets="labels"``), a loss that never read ``y``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[Mixup(alpha=0.4, cutmix_alpha=1.0)])  # doctest: +SKIP
    """

    def __init__(self, alpha: float = 1.0, cutmix_alpha: float | None = None, switch_prob: float | None = None,
                 p: float = 1.0, mode: str = "batch", label_smoothing: float = 0.0, num_classes: int | None = None,
                 targets: str = "labels", input_key: Key = None, target_key: Key = None,
                 seed: int | None = None, task: str | None = None, layout: str = "auto", log: bool = True) -> None:
        super().__init__(input_key=input_key, seed=seed)
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        self._lam: torch.Tensor | None = None  # the mixing weight of the batch just mixed, until it is logged
        self.layout = check_layout(layout)
        self.task_kind = check_task_kind("task", task)
        self.task: Task | None = None  # read at the first batch from its targets
        self.switch = check_mix_args(alpha, cutmix_alpha, switch_prob, p, mode, label_smoothing)
        self.alpha, self.cutmix_alpha, self.switch_prob = float(alpha), cutmix_alpha, switch_prob
        self.p, self.mode, self.label_smoothing = p, mode, float(label_smoothing)
        check_optional_int("num_classes", num_classes, 2)
        self.num_classes = num_classes
        self.targets = check_choice("targets", targets, TARGET_FORMATS)
        self.target_key = check_key("target_key", target_key)
        self._num_classes: int | None = num_classes
        self._pending: _MixState | None = None
        self._labels_checked = False
        self._warned_smoothing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, cutmix_alpha=self.cutmix_alpha, p=self.p, mode=self.mode)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model, so a head built there is seen
        if not self.active:
            return
        smoothing = _smoothing_losses(pl_module)
        if smoothing and self.label_smoothing:
            self._warned_smoothing = True
            rank_zero_warn(f"{self.name}(label_smoothing={self.label_smoothing}) and the module's "
                           f"nn.CrossEntropyLoss(label_smoothing={smoothing[0]}) smooth the labels twice; keep one.")

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, in_place: bool) -> Any:
        image_slot, images = read_images(batch, self.input_key, self.name, 3 if self.cutmix_alpha else 1)
        target_slot = find_slot(batch, self.target_key, "targets", self.name, after=image_slot)
        if in_place and not (can_replace(batch, image_slot) and can_replace(batch, target_slot)):
            raise self._needs_mixin(batch, "replace the targets with mixed ones")
        targets = get_item(batch, target_slot)
        if not isinstance(targets, torch.Tensor) or targets.shape[:1] != images.shape[:1]:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise BatchFormatError(f"{self.name}: the targets ({shape}) do not match the {images.shape[0]} images; "
                                   "set `target_key`.")
        if self.task is None:
            self.task = self._read_task(targets, images)
        sequence = bool(self.cutmix_alpha) and input_layout(images, pl_module, self.layout, self.name) == "sequence"
        generator = self._next_generator(trainer, images.device)
        plan = sample_mix_plan(images.shape[0], tuple(images.shape[-2:]) if self.cutmix_alpha else None,  # type: ignore[arg-type]
                               alpha=self.alpha, cutmix_alpha=self.cutmix_alpha, switch_prob=self.switch_prob,
                               p=self.p, mode=self.mode, generator=generator, device=images.device,
                               sequence=sequence)
        if self.log_enabled:  # a device scalar: no host synchronization here
            self._lam = plan.lam[0] if self.mode == "batch" else plan.lam.mean()
        check = not self._labels_checked
        self._labels_checked = True
        if self.task.kind == "dense":
            if targets.is_floating_point():  # 0/1 maps: blended like the images, or the box pasted
                new_targets: torch.Tensor = apply_mix(targets, plan)
            else:
                own, partner, weight = mix_masks(targets, plan)
                self._pending = _MixState(plan, 0.0, None, self.name, check_labels=False, partner=partner,
                                          weight=weight)
                new_targets = MixedLabels.wrap(own, self._pending)
        elif self.task.kind == "multilabel":  # multi-hot rows: soft targets for BCE, smoothed toward 1/2
            multi_hot = targets.float() if not targets.is_floating_point() else targets
            if self.label_smoothing:
                multi_hot = multi_hot * (1.0 - self.label_smoothing) + self.label_smoothing / 2
            new_targets = mix_targets(multi_hot, plan, None, 0.0)
        elif self.targets == "labels" and not targets.is_floating_point() and targets.ndim == 1:
            state = _MixState(plan, self.label_smoothing, self.num_classes, self.name,
                              warn_double_smoothing=not self._warned_smoothing, check_labels=check)
            new_targets = MixedLabels.wrap(targets, state)
            self._pending = state
        else:
            num_classes = self._num_classes if not targets.is_floating_point() else None
            if num_classes is None and not targets.is_floating_point():
                num_classes = self._num_classes = infer_num_classes(trainer, pl_module, self.name)
            new_targets = mix_targets(targets, plan, num_classes, self.label_smoothing, check=check)
        batch = replace_item(batch, image_slot, apply_mix(images, plan))
        return replace_item(batch, target_slot, new_targets)

    def _read_task(self, targets: torch.Tensor, images: torch.Tensor) -> Task:
        """The task of the batch's targets (once, at the first batch), refused in one line where Mixup cannot serve it."""
        task = infer_target_task(targets, images, self.task_kind)
        require_task(self.name, task, ("classification", "multilabel", "dense"),
                     "Mixup mixes class labels; remove it for a regression model, or pass task= if the targets are "
                     "class labels.")
        if task.kind == "dense" and not targets.is_floating_point():
            if self.targets == "soft":
                raise TaskNotSupportedError(f"{self.name}(targets='soft') cannot turn masks into class maps; use "
                                            "targets='labels' (the per-pixel loss is mixed).")
            if self.label_smoothing:
                raise TaskNotSupportedError(f"{self.name}(label_smoothing={self.label_smoothing}) does not smooth "
                                            "masks; pass label_smoothing to F.cross_entropy instead.")
        if task.kind == "dense" and self.cutmix_alpha is not None and (
                targets.ndim < 3 or targets.shape[-2:] != images.shape[-2:]):
            raise TaskNotSupportedError(f"{self.name}: CutMix pastes boxes on a 2-D grid, but the targets "
                                        f"{tuple(targets.shape)} are not on the images' {tuple(images.shape[-2:])} "
                                        "grid; use Mixup alone (cutmix_alpha=None).")
        return task

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        state, self._pending = self._pending, None
        if state is not None and state.double_smoothing:
            self._warned_smoothing = True
        if state is not None and not state.consumed:
            raise MixupTargetsUnusedError(
                f"{self.name} mixed the images, but the training step did not pass the targets `y` to "
                f"{SERVED_LOSSES}, so the loss did not see the mixed labels. Pass `y` unchanged to one of "
                "them, or use Mixup(targets='soft') to receive (N, num_classes) class probabilities for your own loss."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # mixes here, or the mixin did already
        if self.log_enabled and self.active:
            pl_module.log("mixup/p", self.p, on_step=True, on_epoch=False)
            if self._lam is not None:
                pl_module.log("mixup/lam", self._lam, on_step=True, on_epoch=False)
                self._lam = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pending = None  # a step that skipped backward (returned None) is not checked


__all__ = ["MixPlan", "MixedLabels", "Mixup", "MixupTargetsUnusedError", "apply_mix", "box_mask",
           "infer_num_classes", "mix_masks", "mix_targets", "mixup", "sample_mix_plan"]
