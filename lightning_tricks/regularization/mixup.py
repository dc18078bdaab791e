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

import inspect
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_tricks.core.batch import (
    BatchFormatError,
    BatchTransformCallback,
    Key,
    can_replace,
    check_float_images,
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
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_int,
    check_optional_int,
    check_positive,
    check_probability,
    check_range,
)
from lightning_tricks.errors import MixupTargetsUnusedError  # noqa: F401  (re-exported)
from lightning_tricks.regularization._mix_tasks import dense_mixed_loss, mix_masks
from lightning_tricks.regularization.cutout import rectangle_mask

MODES = ("batch", "sample")
TARGET_FORMATS = ("labels", "soft")


@dataclass(frozen=True)
class MixPlan:
    """How a batch is mixed: each sample's partner, weight, and CutMix box.

    Attributes:
        perm: ``(N,)`` int64, the partner ``j`` of each sample ``i`` (a random permutation).
        lam: ``(N,)`` float32, the weight of each sample's own image and target; for CutMix the
            fraction of its own pixels kept (area-corrected).
        boxes: ``(N, 4)`` int64 ``[top, left, bottom, right)`` of the pasted CutMix box, clipped to the
            image; an empty box (zero height or width) means plain Mixup for that sample. None: no CutMix.
    """

    perm: torch.Tensor
    lam: torch.Tensor
    boxes: torch.Tensor | None = None


def _beta(concentration: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Beta(c, c) draws as G1 / (G1 + G2) with Gamma(c) draws (float64 where the device has it: no underflow).

    ``torch.distributions.Beta`` takes no generator; ``Gamma.sample`` does, so Beta is built from two Gamma draws.
    """
    gamma = torch.distributions.Gamma(concentration, torch.ones_like(concentration), validate_args=False)
    g1, g2 = gamma.sample((2,), generator=generator)  # validate_args=False: no host synchronization
    return g1 / (g1 + g2)  # Gamma clamps its draws to the smallest positive float: the sum is > 0


def check_mix_args(alpha: float, cutmix_alpha: float | None, switch_prob: float | None, p: float, mode: str,
                   label_smoothing: float) -> float:
    """Validate the mixing arguments; return the effective switch probability (0 without CutMix)."""
    check_positive("alpha", alpha)
    if cutmix_alpha is not None:
        check_positive("cutmix_alpha", cutmix_alpha)
    if switch_prob is not None:
        check_probability("switch_prob", switch_prob)
        if cutmix_alpha is None:
            raise InvalidArgumentError(f"`switch_prob`={switch_prob!r} is invalid without `cutmix_alpha`: set "
                                       "cutmix_alpha (> 0) to use CutMix, or leave switch_prob unset.")
    check_probability("p", p)
    check_choice("mode", mode, MODES)
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=False)
    if cutmix_alpha is None:
        return 0.0
    return 0.5 if switch_prob is None else switch_prob


def sample_mix_plan(
    batch_size: int,
    image_size: tuple[int, int] | None = None,
    *,
    alpha: float = 1.0,
    cutmix_alpha: float | None = None,
    switch_prob: float | None = None,
    p: float = 1.0,
    mode: str = "batch",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    sequence: bool = False,
) -> MixPlan:
    """Draw a :class:`MixPlan` on ``device``, without host synchronization.

    Args:
        batch_size: N.
        image_size: ``(H, W)``; needed for CutMix only.
        alpha: Mixup's Beta(alpha, alpha) concentration (> 0).
        cutmix_alpha: CutMix's Beta concentration (> 0); None: no CutMix.
        switch_prob: probability of CutMix instead of Mixup when both are on (default 0.5; 1 is CutMix only).
        p: probability that the batch (``mode="batch"``) or each sample (``mode="sample"``) is mixed; an
            unmixed sample has ``lam=1`` and an empty box.
        mode: ``"batch"``: one weight, one choice Mixup/CutMix and one box for the batch (the papers');
            ``"sample"``: each sample its own.
        generator: random generator on ``device``; None uses torch's global one.
        device: where to draw (the images' device).
        sequence: CutMix on sequences ``(N, C, L)`` (``image_size=(C, L)``): the pasted box is a span of
            ``floor(L * (1 - lam))`` steps across every channel (``lam`` then area-corrected as for images).

    Draw order (a seeded generator reproduces it): permutation, then Mixup/CutMix choice, Beta draws,
    skip decisions, box centers.
    """
    switch = check_mix_args(alpha, cutmix_alpha, switch_prob, p, mode, 0.0)
    check_int("batch_size", batch_size, 1)
    device = torch.device(device) if device is not None else torch.device("cpu")
    float_dtype = torch.float32 if device.type == "mps" else torch.float64
    draws = batch_size if mode == "sample" else 1
    perm = torch.randperm(batch_size, generator=generator, device=device)
    if cutmix_alpha is None:
        use_cutmix = torch.zeros(draws, dtype=torch.bool, device=device)
    elif switch >= 1.0:
        use_cutmix = torch.ones(draws, dtype=torch.bool, device=device)
    else:
        use_cutmix = torch.rand(draws, generator=generator, device=device) < switch
    concentration = torch.full((draws,), float(alpha), dtype=float_dtype, device=device)
    if cutmix_alpha is not None:
        concentration = concentration.masked_fill(use_cutmix, float(cutmix_alpha))
    lam = _beta(concentration, generator)
    if p < 1.0:
        applied = torch.rand(draws, generator=generator, device=device) < p
        lam = lam.masked_fill(~applied, 1.0)
        use_cutmix = use_cutmix & applied
    boxes = None
    if cutmix_alpha is not None:
        if image_size is None:
            raise InvalidArgumentError("`image_size`=None is invalid with CutMix: expected (height, width).")
        height, width = image_size
        ratio = (1.0 - lam) if sequence else torch.sqrt(1.0 - lam)
        cut_h = (height * (torch.ones_like(ratio) if sequence else ratio)).floor().long() * use_cutmix
        cut_w = (width * ratio).floor().long() * use_cutmix
        rows = torch.randint(0, height, (draws,), generator=generator, device=device)
        cols = torch.randint(0, width, (draws,), generator=generator, device=device)
        top, left = (torch.zeros_like(rows) if sequence else rows - cut_h // 2), cols - cut_w // 2
        boxes = torch.stack((top.clamp(0, height), left.clamp(0, width),
                             (top + cut_h).clamp(0, height), (left + cut_w).clamp(0, width)), dim=1)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        lam = torch.where(use_cutmix, 1.0 - area.to(float_dtype) / (height * width), lam)
        boxes = boxes.expand(batch_size, 4) if draws == 1 else boxes
    return MixPlan(perm=perm, lam=lam.float().expand(batch_size), boxes=boxes)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, height, width)`` bool, True inside each sample's ``[top, left, bottom, right)`` box."""
    return rectangle_mask(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], height, width)


def apply_mix(images: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Blend each image with its partner: ``lam * x + (1 - lam) * x[perm]``, or paste the partner's box.

    Returns a new tensor with the dtype and memory format of ``images``: the partners are gathered into
    it and blended in place (one allocation, one fused ``lerp`` pass). A weight of exactly 1 (an unmixed
    sample) returns the sample bit for bit, a weight of 0 the partner.
    """
    n = images.shape[0]
    out = torch.empty_like(images)
    torch.index_select(images, 0, plan.perm, out=out)
    if plan.boxes is None:
        weight = plan.lam.to(images.dtype).view(n, *([1] * (images.ndim - 1)))
    else:
        height, width = images.shape[-2:]
        inside = box_mask(plan.boxes, height, width)
        has_box = (plan.boxes[:, 2] > plan.boxes[:, 0]) & (plan.boxes[:, 3] > plan.boxes[:, 1])
        outside_weight = torch.where(has_box, 1.0, plan.lam)  # CutMix keeps its own pixels outside the box
        weight = (outside_weight[:, None, None] * ~inside).to(images.dtype)
        weight = weight.view(n, *([1] * (images.ndim - 3)), height, width)
    return out.lerp_(images, weight)


def _check_labels(labels: torch.Tensor, num_classes: int, owner: str) -> None:
    if labels.numel() == 0:
        return
    low, high = torch.aminmax(labels)
    if int(low) < 0 or int(high) >= num_classes:
        raise InvalidArgumentError(f"{owner}: labels in [{int(low)}, {int(high)}] are invalid for num_classes="
                                   f"{num_classes}: expected labels in [0, {num_classes - 1}].")


def mix_targets(
    targets: torch.Tensor,
    plan: MixPlan,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
    check: bool = True,
) -> torch.Tensor:
    """Soft targets ``lam * t_i + (1 - lam) * t_perm(i)`` of shape ``(N, num_classes)``; each row sums to 1.

    Args:
        targets: ``(N,)`` class indices, or ``(N, K)`` class probabilities.
        plan: the batch's :class:`MixPlan`.
        num_classes: K; needed for class indices (taken from the shape for probabilities).
        label_smoothing: eps: each one-hot (or distribution) becomes ``(1 - eps) * t + eps / K`` first.
        dtype: floating dtype of the result (probabilities keep theirs).
        check: verify that class indices lie in ``[0, K)`` (one host synchronization).
    """
    lam = plan.lam
    if targets.is_floating_point() and targets.ndim == 2:
        k = targets.shape[1]
        if num_classes is not None and num_classes != k:
            raise InvalidArgumentError(f"`num_classes`={num_classes} is invalid for targets of shape "
                                       f"{tuple(targets.shape)}: expected {k}.")
        probs = targets
        if label_smoothing:
            probs = probs * (1.0 - label_smoothing) + label_smoothing / k
        w = lam.to(probs.dtype)[:, None]
        return torch.lerp(probs.index_select(0, plan.perm), probs, w)
    if targets.is_floating_point() or targets.ndim != 1:
        raise InvalidArgumentError(f"targets of shape {tuple(targets.shape)} and dtype {targets.dtype} are invalid: "
                                   "expected (N,) class indices or (N, K) class probabilities.")
    if num_classes is None:
        raise InvalidArgumentError("`num_classes`=None is invalid for class-index targets: expected the number "
                                   "of classes.")
    if check:
        _check_labels(targets, num_classes, "mix_targets")
    labels = targets.long()
    keep = 1.0 - label_smoothing
    out = torch.full((labels.shape[0], num_classes), label_smoothing / num_classes, dtype=dtype, device=labels.device)
    lam = lam.to(dtype)
    out.scatter_add_(1, labels[:, None], (lam * keep)[:, None])
    out.scatter_add_(1, labels.index_select(0, plan.perm)[:, None], ((1.0 - lam) * keep)[:, None])
    return out


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int | None = None,
    *,
    alpha: float = 1.0,
    cutmix_alpha: float | None = None,
    switch_prob: float | None = None,
    p: float = 1.0,
    mode: str = "batch",
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch: returns ``(mixed images, soft targets (N, K))``. Any batch size, odd or 1, works.

    Args: as :func:`sample_mix_plan` and :func:`mix_targets`.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
        >>> mixed, soft = mixup(x, y, num_classes=3, alpha=0.4, generator=g)
        >>> soft.shape, torch.allclose(soft.sum(1), torch.ones(5))
        (torch.Size([5, 3]), True)
    """
    check_float_images(images, "mixup", 3 if cutmix_alpha is not None else 1)
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=False)
    image_size = tuple(images.shape[-2:]) if cutmix_alpha is not None else None
    plan = sample_mix_plan(images.shape[0], image_size, alpha=alpha, cutmix_alpha=cutmix_alpha,  # type: ignore[arg-type]
                           switch_prob=switch_prob, p=p, mode=mode, generator=generator, device=images.device)
    return apply_mix(images, plan), mix_targets(targets, plan, num_classes, label_smoothing)


class _MixState:
    """Shared by a batch's :class:`MixedLabels` and its derived copies: what the loss did with them."""

    def __init__(self, plan: MixPlan, label_smoothing: float, num_classes: int | None, owner: str,
                 warn_double_smoothing: bool = True, check_labels: bool = True, partner: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> None:
        self.plan, self.label_smoothing, self.num_classes, self.owner = plan, label_smoothing, num_classes, owner
        # dense masks: the partner's masks and the weight of each sample's own (CutMix-pasted) mask in the loss
        self.partner, self.weight = partner, weight
        self.warn_double_smoothing = warn_double_smoothing
        self.check_labels = check_labels  # one host synchronization: the callback asks for it on its first batch
        self.consumed = False
        self.double_smoothing = False


def _reduction(arguments: dict[str, Any]) -> str:
    """The ``reduction`` a call means, also when it uses the deprecated ``size_average``/``reduce`` flags."""
    size_average, reduce = arguments.get("size_average"), arguments.get("reduce")
    if size_average is None and reduce is None:
        return arguments["reduction"]
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


def _soft_cross_entropy(arguments: dict[str, Any], soft: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` itself takes class probabilities as targets."""
    return F.cross_entropy(**{**arguments, "target": soft})


def _soft_nll(arguments: dict[str, Any], soft: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of soft targets ``q`` under log-probabilities ``input``: ``-sum_c w_c q_c input_c``.

    With ``q`` a one-hot it is ``F.nll_loss``; ``"mean"`` averages over samples, as ``F.cross_entropy``
    does with class-probability targets (so both losses agree on ``log_softmax`` outputs).
    """
    log_probs, weight = arguments["input"], arguments.get("weight")
    weighted = soft if weight is None else soft * weight
    per_sample = -(weighted * log_probs).sum(dim=1)
    reduction = _reduction(arguments)
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


@dataclass(frozen=True)
class _LabelLoss:
    """A loss of ``(input, target)`` with class-index targets, and how it is computed on soft targets."""

    function: Any
    name: str
    soft: Any  # (arguments with a plain input, (N, K) soft targets) -> the loss
    smoothing_arg: str | None = None

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.function)


# The label losses MixedLabels serve; nn.CrossEntropyLoss and nn.NLLLoss call these functions.
_LABEL_LOSSES = {loss.function: loss for loss in (
    _LabelLoss(F.cross_entropy, "F.cross_entropy", _soft_cross_entropy, "label_smoothing"),
    _LabelLoss(F.nll_loss, "F.nll_loss", _soft_nll),
)}
SERVED_LOSSES = "F.cross_entropy, nn.CrossEntropyLoss, F.nll_loss or nn.NLLLoss"
# Tensor methods after which the result still holds the same labels, so it stays mixed.
_KEEPS_LABELS = {torch.Tensor.to, torch.Tensor.long, torch.Tensor.int, torch.Tensor.cuda, torch.Tensor.cpu,
                 torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.contiguous, torch.Tensor.view,
                 torch.Tensor.reshape, torch.Tensor.flatten, torch.Tensor.squeeze, torch.Tensor.type}


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, MixedLabels):
        return obj.as_subclass(torch.Tensor)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_unwrap, obj))
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


class MixedLabels(torch.Tensor):
    """Class-index labels ``(N,)`` that the label losses read as Mixup's soft targets.

    What :class:`Mixup` puts in the batch with ``targets="labels"``. Everywhere else it is an ordinary
    int64 tensor of each sample's own label, so a training step that computes accuracy from ``y`` keeps
    working. When a label loss receives it as its target -- ``F.cross_entropy(logits, y)`` or
    ``F.nll_loss(log_probs, y)``, directly or through ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` -- the
    loss is computed on the ``(N, K)`` mixed distribution ``q`` instead, ``K`` taken from the input:
    the cross-entropy with probability targets, or the soft negative log-likelihood
    ``-sum_c q_c log p_c``, which is ``lam * nll(y_i) + (1 - lam) * nll(y_j)`` without label smoothing.
    ``.to()``, ``.long()``, ``.view()`` and similar keep it mixed; any other operation returns a plain tensor.
    """

    _mix_state: _MixState

    @staticmethod
    def wrap(labels: torch.Tensor, state: _MixState) -> MixedLabels:
        out = labels.as_subclass(MixedLabels)
        out._mix_state = state
        return out

    def soft_targets(self, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(N, num_classes)`` mixed distribution these labels stand for."""
        state = self._mix_state
        return mix_targets(self.as_subclass(torch.Tensor), state.plan, num_classes, state.label_smoothing,
                           dtype=dtype, check=False)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        loss = _LABEL_LOSSES.get(func)
        if loss is not None:
            return _mixed_loss(loss, args, kwargs)
        source = args[0] if args and isinstance(args[0], MixedLabels) else None
        # every argument unwrapped to a plain tensor: `func` runs as on any tensor and does not come back here
        out = func(*_unwrap(args), **_unwrap(kwargs))
        if (source is not None and func in _KEEPS_LABELS and isinstance(out, torch.Tensor)
                and out.shape == source.shape and not out.is_floating_point()):
            return MixedLabels.wrap(out, source._mix_state)
        return out


def _mixed_loss(loss: _LabelLoss, args: Any, kwargs: Any) -> torch.Tensor:
    """Compute a label loss whose target is :class:`MixedLabels` on the mixed distribution instead."""
    bound = loss.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    target = bound.arguments["target"]
    arguments = {name: _unwrap(value) for name, value in bound.arguments.items()}
    if not isinstance(target, MixedLabels):  # the mixed labels are in another argument: nothing to mix
        return loss.function(**arguments)
    state, scores = target._mix_state, arguments["input"]
    if state.partner is not None and scores.ndim == target.ndim + 1 and scores.shape[0] == target.shape[0]:
        state.consumed = True
        return dense_mixed_loss(loss.function, arguments, _reduction(arguments), state.partner, state.weight)
    if scores.ndim != 2 or scores.shape[0] != target.shape[0]:
        raise BatchFormatError(f"{state.owner}: {loss.name} got an input of shape {tuple(scores.shape)} for "
                               f"{target.shape[0]} mixed labels: expected (N, num_classes).")
    k = scores.shape[1]
    if state.num_classes is not None and state.num_classes != k:
        raise InvalidArgumentError(f"{state.owner}: `num_classes`={state.num_classes} does not match the "
                                   f"{k} classes {loss.name} got; fix num_classes or leave it unset.")
    if state.check_labels:
        state.check_labels = False
        _check_labels(target.as_subclass(torch.Tensor), k, state.owner)
    smoothing = arguments[loss.smoothing_arg] if loss.smoothing_arg else 0.0
    if smoothing and state.label_smoothing and state.warn_double_smoothing and not state.double_smoothing:
        state.double_smoothing = True
        rank_zero_warn(f"{state.owner}(label_smoothing={state.label_smoothing}) and a cross-entropy loss with "
                       f"label_smoothing={smoothing} smooth the labels twice; keep one of them.")
    state.consumed = True
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return loss.soft(arguments, target.soft_targets(k, dtype))


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
                 seed: int | None = None, task: str | None = None, layout: str = "auto") -> None:
        super().__init__(input_key=input_key, seed=seed)
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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pending = None  # a step that skipped backward (returned None) is not checked


__all__ = ["MixPlan", "MixedLabels", "Mixup", "MixupTargetsUnusedError", "apply_mix", "box_mask",
           "infer_num_classes", "mix_masks", "mix_targets", "mixup", "sample_mix_plan"]
