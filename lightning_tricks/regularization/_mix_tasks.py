"""Mixup and CutMix on dense (per-pixel) targets: masks pasted with CutMix's box, per-pixel losses mixed for Mixup.

Kept beside :mod:`~lightning_tricks.regularization.mixup`, which calls these for a dense task
(:mod:`lightning_tricks.core.task`): :func:`mix_masks` when the batch is mixed, :func:`dense_mixed_loss`
when the training step's ``F.cross_entropy``/``F.nll_loss`` reads the mixed masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_tricks.regularization.cutout import rectangle_mask


def _mean_denominator(arguments: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
    """What a ``"mean"`` label loss divides by: the (class-weighted) number of pixels that are not ignored."""
    valid = target != arguments.get("ignore_index", -100)
    weight = arguments.get("weight")
    if weight is None:
        return valid.sum()
    return (weight[target.masked_fill(~valid, 0)] * valid).sum()


def dense_mixed_loss(function: Callable[..., torch.Tensor], arguments: dict[str, Any], reduction: str,
                     partner: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-pixel label loss on Mixup's dense masks: ``w * loss(own mask) + (1 - w) * loss(partner's mask)``.

    ``arguments`` are the loss's bound arguments (``target`` the own masks, which already carry CutMix's
    pasted box: their weight ``w`` is then 1; a Mixup sample has ``w = lam``). The user's ``weight``,
    ``ignore_index`` and ``label_smoothing`` apply to both masks; ``"mean"`` divides each part by its
    mask's own denominator (the pixels not ignored), so with one ``lam`` for the batch it is exactly
    ``lam * loss(y_i) + (1 - lam) * loss(y_j)``.
    """
    plain = {**arguments, "size_average": None, "reduce": None, "reduction": "none"}
    own = arguments["target"]
    per_own = function(**{**plain, "target": own})
    per_partner = function(**{**plain, "target": partner})
    w = weight.to(per_own.dtype).view(-1, *([1] * (per_own.ndim - 1)))
    if reduction == "none":
        return w * per_own + (1 - w) * per_partner
    own_part, partner_part = (w * per_own).sum(), ((1 - w) * per_partner).sum()
    if reduction == "sum":
        return own_part + partner_part
    return own_part / _mean_denominator(arguments, own) + partner_part / _mean_denominator(arguments, partner)


def mix_masks(masks: torch.Tensor, plan: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer masks ``[N, *spatial]`` under a :class:`~lightning_tricks.regularization.mixup.MixPlan`:
    ``(own, partner, weight)``.

    ``own`` is each sample's mask with CutMix's box pasted from its partner (the box's pixels now show the
    partner's image, so they get its labels), ``partner`` the partners' masks, ``weight`` the weight of
    ``own`` in the loss: 1 for a CutMix sample (its labels are exact), ``lam`` for a Mixup sample.

    Examples:
        >>> from lightning_tricks.regularization.mixup import MixPlan
        >>> plan = MixPlan(perm=torch.tensor([1, 0]), lam=torch.tensor([0.75, 0.75]),
        ...                boxes=torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))
        >>> own, partner, weight = mix_masks(torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]]), plan)
        >>> own[0].tolist(), weight.tolist()
        ([[1, 0], [0, 0]], [1.0, 0.75])
    """
    partner = masks.index_select(0, plan.perm)
    if plan.boxes is None:
        return masks, partner, plan.lam
    height, width = masks.shape[-2:]
    boxes = plan.boxes
    has_box = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    inside = rectangle_mask(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], height, width) & has_box[:, None, None]
    inside = inside.view(masks.shape[0], *([1] * (masks.ndim - 3)), height, width)
    return torch.where(inside, partner, masks), partner, torch.where(has_box, 1.0, plan.lam)


__all__ = ["dense_mixed_loss", "mix_masks"]
