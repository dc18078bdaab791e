"""The mixed labels Mixup puts in a batch (``targets="labels"``): class indices that the label losses
(``F.cross_entropy``, ``F.nll_loss`` and their modules) read as Mixup's soft targets.

Public names are re-exported from :mod:`lightning_tricks.regularization.mixup`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tricks.core.batch import BatchFormatError
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization._mix_core import MixPlan, _check_labels, mix_targets
from lightning_tricks.regularization._mix_tasks import dense_mixed_loss


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
