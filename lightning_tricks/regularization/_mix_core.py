"""Mixup and CutMix, functional core (plain torch): draw a batch's :class:`MixPlan`, blend images, mix labels.

:func:`sample_mix_plan` draws the pairing and the weights, :func:`apply_mix` blends the images,
:func:`mix_targets` the labels, :func:`mixup` does all three. Public names are re-exported from
:mod:`lightning_tricks.regularization.mixup`, whose docstring has the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_tricks.core.batch import check_float_images
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_int,
    check_positive,
    check_probability,
    check_range,
)
from lightning_tricks.regularization.cutout import rectangle_mask

MODES = ("batch", "sample")


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
