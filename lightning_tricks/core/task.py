"""The task contract: what a model outputs and what its targets are, read once and shared by every trick.

Public Lightning projects train more than single-label classifiers. A trick that averages, mixes,
flips or checks predictions must know which of these it faces, or it runs and gives a wrong result
(softmax across the labels of a multi-label model, flipped segmentation maps averaged without being
flipped back). :func:`infer_task` reads it from one output and the batch's targets:

============== ===================================== ================================ ==============
kind           output                                targets                          activation
============== ===================================== ================================ ==============
classification ``[B, C]``                            ``[B]`` class indices, or        softmax
                                                     ``[B, C]`` rows summing to 1
multilabel     ``[B, C]``                            ``[B, C]`` multi-hot (0/1)       sigmoid
dense          ``[B, C, *spatial]``                  ``[B, *spatial]`` class indices  softmax
                                                     (or ``[B, C, *spatial]`` 0/1:    (sigmoid)
                                                     multi-label maps)
regression     anything else (``[B]``, ``[B, 1]``,   floats                           none
               a float map the shape of its target)
============== ===================================== ================================ ==============

The output's *form* says how to turn it into probabilities: ``logits``, ``log_probs`` (a forward
ending in ``log_softmax``, for ``F.nll_loss``) or ``probs`` (a forward ending in ``softmax`` or
``sigmoid``). A trick declares the kinds it serves with :func:`require_task`, which refuses the
others in one line saying what to do instead; a ``task=`` argument (:data:`TASK_KINDS`) overrides
what the probe reads.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tricks.core.validation import check_choice
from lightning_tricks.errors import TaskNotSupportedError  # noqa: F401  (re-exported)

TASK_KINDS = ("classification", "multilabel", "dense", "regression")
"""The values of every trick's ``task`` argument (``None`` lets the probe decide)."""
OUTPUT_FORMS = ("logits", "log_probs", "probs", "values")


@dataclass(frozen=True)
class Task:
    """What one model computes, as far as the tricks need to know.

    Attributes:
        kind: one of :data:`TASK_KINDS`.
        form: ``logits``, ``log_probs``, ``probs`` (classification kinds) or ``values`` (regression).
        num_classes: the size of the class dimension (dim 1) for classification kinds, else None.
        spatial_ndim: the number of dimensions after the class dimension (2 for ``[B, C, H, W]`` maps).
        sigmoid: whether probabilities come from a per-class sigmoid (multi-label, multi-label maps)
            rather than a softmax over the class dimension.
    """

    kind: str
    form: str = "logits"
    num_classes: int | None = None
    spatial_ndim: int = 0
    sigmoid: bool = False

    def describe(self) -> str:
        """A few words for messages, e.g. ``a dense model (outputs [B, 3, *2 spatial dims])``."""
        if self.kind == "regression":
            return "a regression model (outputs that are not class scores)"
        shape = f"[B, {self.num_classes}" + (f", *{self.spatial_ndim} spatial dims]" if self.spatial_ndim else "]")
        return f"a {self.kind} model (outputs {shape}, {self.form.replace('_', '-')})"

    def probabilities(self, output: Tensor) -> Tensor:
        """The output as probabilities (softmax or sigmoid over the class dimension, by :attr:`form`).

        Examples:
            >>> task = Task("classification", "log_probs", 3)
            >>> task.probabilities(torch.log(torch.tensor([[0.2, 0.3, 0.5]]))).round(decimals=3)
            tensor([[0.2000, 0.3000, 0.5000]])
        """
        if self.kind == "regression":
            raise TaskNotSupportedError("a regression output has no class probabilities")
        output = output.float()
        if self.form == "probs":
            return output
        if self.sigmoid:
            return output.sigmoid()
        return output.exp() if self.form == "log_probs" else output.softmax(dim=1)


def check_task_kind(name: str, value: str | None) -> str | None:
    """Validate a ``task`` argument: None (inferred) or one of :data:`TASK_KINDS`."""
    return None if value is None else check_choice(name, value, TASK_KINDS)


def _is_binary(values: Tensor) -> bool:
    return bool(((values == 0) | (values == 1)).all())


def output_form(output: Tensor, sigmoid: bool) -> str:
    """``probs`` when the class dimension already holds probabilities, ``log_probs`` for log-softmax rows."""
    x = output.detach().float()
    if not torch.isfinite(x).all():
        return "logits"
    if sigmoid:
        return "probs" if bool(((x >= 0) & (x <= 1)).all()) and not _is_binary(x) else "logits"
    if bool(((x >= 0) & (x <= 1)).all()) and torch.allclose(x.sum(dim=1), torch.ones(()), atol=1e-3):
        return "probs"
    if bool((x <= 0).all()) and torch.allclose(x.logsumexp(dim=1), torch.zeros(()), atol=1e-3):
        return "log_probs"
    return "logits"


def infer_task(output: Any, targets: Any = None, kind: str | None = None) -> Task:
    """Read the task from one batch's model output and targets (the table in the module docstring).

    Args:
        output: the model's output for a batch (a tensor; anything else is a regression output).
        targets: the batch's targets, when known. Without them a ``[B, C]`` output is taken for
            single-label classification and a ``[B, C, *spatial]`` output for a dense one.
        kind: the user's ``task`` argument; overrides the kind read from the targets.

    Examples:
        >>> logits = torch.randn(4, 5)
        >>> infer_task(logits, torch.tensor([0, 1, 4, 2])).kind
        'classification'
        >>> infer_task(logits, torch.randint(0, 2, (4, 5)).float()).kind
        'multilabel'
        >>> task = infer_task(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
        >>> task.kind, task.num_classes, task.spatial_ndim
        ('dense', 3, 2)
        >>> infer_task(torch.randn(4, 5).log_softmax(1)).form
        'log_probs'
        >>> infer_task(torch.randn(4), torch.randn(4)).kind
        'regression'
    """
    check_task_kind("task", kind)
    binary = _binary_output(output, targets, kind)
    if binary is not None:
        return binary
    if not isinstance(output, Tensor) or not output.is_floating_point() or output.ndim < 2 or output.shape[1] < 2:
        if kind not in (None, "regression"):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TaskNotSupportedError(f"task={kind!r} needs outputs of shape [B, C, ...] with C >= 2 class scores, "
                                        f"got {shape}; use task='regression' or return class scores from forward.")
        return Task("regression", "values")
    if kind is None:
        kind = _kind_from_targets(output, targets)
    if kind == "regression":
        return Task("regression", "values")
    spatial = output.ndim - 2
    if kind in ("classification", "multilabel") and spatial:
        raise TaskNotSupportedError(f"task={kind!r} needs outputs of shape [B, C], got {tuple(output.shape)}; "
                                    "use task='dense' for per-pixel (per-position) class maps.")
    if kind == "dense" and not spatial:
        raise TaskNotSupportedError(f"task='dense' needs outputs of shape [B, C, *spatial], got {tuple(output.shape)}.")
    sigmoid = kind == "multilabel" or (kind == "dense" and isinstance(targets, Tensor)
                                       and targets.shape == output.shape and targets.is_floating_point())
    return Task(kind, output_form(output, sigmoid), int(output.shape[1]), spatial, sigmoid)


def _binary_output(output: Any, targets: Any, kind: str | None) -> Task | None:
    """A single-logit binary model (``[B]``/``[B, 1]`` scores, or a ``[B, 1, *spatial]`` map) with 0/1 targets.

    It is a one-label multi-label model (a one-class map for dense outputs): BCE-with-logits, sigmoid
    probabilities. Without targets (or with other targets) such an output is a regression output.
    """
    if kind not in (None, "multilabel", "dense") or not isinstance(output, Tensor) or not output.is_floating_point():
        return None
    if output.ndim == 0 or (output.ndim >= 2 and output.shape[1] != 1):
        return None
    if kind is None and not (isinstance(targets, Tensor) and targets.numel() == output.numel() and targets.numel()
                             and _is_binary(targets)):
        return None
    spatial = max(output.ndim - 2, 0)
    if kind == "dense" and not spatial or kind == "multilabel" and spatial:
        return None  # refused below with the usual message
    return Task("dense" if spatial else "multilabel", output_form(output.reshape(output.shape[0], 1, -1), True), 1,
                spatial, True)


def _kind_from_targets(output: Tensor, targets: Any) -> str:
    if output.ndim > 2:
        if isinstance(targets, Tensor) and targets.is_floating_point() and targets.shape == output.shape \
                and not _is_binary(targets):
            return "regression"
        return "dense"
    if not isinstance(targets, Tensor):
        return "classification"
    if targets.shape == output.shape:  # [B, C] targets: multi-hot, one-hot/soft labels, or regression values
        if not _is_binary(targets):
            rows = targets.float().sum(dim=1)
            sums_to_one = bool(((targets >= 0).all()) and torch.allclose(rows, torch.ones_like(rows), atol=1e-3))
            return "classification" if sums_to_one else "regression"
        one_hot = bool((targets.sum(dim=1) == 1).all())
        return "classification" if one_hot and targets.is_floating_point() else "multilabel"
    if targets.ndim == 1 and not targets.is_floating_point():
        return "classification"
    if targets.is_floating_point():
        return "regression"
    return "classification"


def aligned_with_inputs(targets: Any, inputs: Any) -> bool:
    """Whether ``targets`` is a map on the inputs' grid: ``[B, *spatial]`` or ``[B, C, *spatial]`` for inputs
    ``[B, C, *spatial]`` (the trailing dimensions agree; ``[B, H, W]`` inputs count ``W`` as their grid)."""
    if not isinstance(targets, Tensor) or not isinstance(inputs, Tensor) or inputs.ndim < 3 or targets.ndim < 2:
        return False
    spatial = inputs.ndim - 2
    return (targets.shape[0] == inputs.shape[0] and targets.ndim - 1 >= spatial
            and tuple(targets.shape[-spatial:]) == tuple(inputs.shape[-spatial:]) and targets.ndim <= inputs.ndim)


def infer_target_task(targets: Any, inputs: Any = None, kind: str | None = None) -> Task:
    """The task read from a batch's targets alone (and its inputs): what a batch trick sees before the forward.

    The batch-side half of :func:`infer_task`, for tricks that change training batches (Mixup, BatchAugment):
    ``[B]`` class indices are classification; ``[B, C]`` rows summing to 1 are classification, 0/1 rows
    multi-label, other floats regression; a map on the inputs' grid (:func:`aligned_with_inputs`) is dense
    (integer masks ``[B, *spatial]``, 0/1 float maps ``[B, C, *spatial]``) or regression (other float maps).
    The output's form is unknown here (``logits``).

    Examples:
        >>> images = torch.randn(2, 3, 8, 8)
        >>> infer_target_task(torch.randint(0, 4, (2, 8, 8)), images).kind
        'dense'
        >>> infer_target_task(torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), images).kind
        'multilabel'
        >>> infer_target_task(torch.tensor([3, 1]), images).kind
        'classification'
    """
    check_task_kind("task", kind)
    if not isinstance(targets, Tensor) or targets.ndim == 0:
        if kind is not None:
            return Task(kind, "logits" if kind != "regression" else "values")
        raise TaskNotSupportedError(f"the targets ({type(targets).__name__}) are not a tensor with a row per sample; "
                                    "pass `task` or yield (inputs, targets) tensors.")
    aligned = aligned_with_inputs(targets, inputs)
    floating = targets.is_floating_point()
    if kind is None:
        if aligned and (not floating or targets.ndim == inputs.ndim):
            kind = "dense" if not floating or _is_binary(targets) else "regression"
        elif targets.ndim == 1:
            kind = "regression" if floating and not _is_binary(targets) else "classification"
        elif targets.ndim == 2:
            kind = _kind_from_targets(targets.float(), targets)
        else:
            kind = "regression"
    if kind == "regression":
        return Task("regression", "values")
    if kind == "dense":
        if not aligned:
            raise TaskNotSupportedError(f"task='dense' needs targets on the inputs' grid ([B, *spatial] masks or "
                                        f"[B, C, *spatial] maps), got {tuple(targets.shape)} for inputs "
                                        f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else None}.")
        channels = floating and targets.ndim == inputs.ndim
        return Task("dense", "logits", int(targets.shape[1]) if channels else None,
                    targets.ndim - (2 if channels else 1), sigmoid=floating)
    classes = int(targets.shape[1]) if targets.ndim == 2 else None
    return Task(kind, "logits", classes, 0, sigmoid=kind == "multilabel")


def require_task(owner: str, task: Task, supported: Collection[str], fix: str) -> None:
    """Refuse, in one line, a task ``owner`` does not serve.

    Args:
        owner: the trick's name, for the message.
        task: what :func:`infer_task` read (or the user's override).
        supported: the kinds the trick serves (:data:`TASK_KINDS`).
        fix: what the user should do instead (a sentence).

    Raises:
        TaskNotSupportedError: ``task.kind`` is not in ``supported``.

    Examples:
        >>> require_task("Mixup", Task("classification"), ["classification"], "")
        >>> try:
        ...     require_task("Mixup", Task("regression", "values"), ["classification"], "remove Mixup.")
        ... except TaskNotSupportedError as error:
        ...     print(error)
        Mixup serves classification models, not a regression model (outputs that are not class scores); remove Mixup.
    """
    if task.kind in supported:
        return
    served = ", ".join(k for k in TASK_KINDS if k in supported)
    raise TaskNotSupportedError(f"{owner} serves {served} models, not {task.describe()}; {fix}".rstrip("; "))


__all__ = ["OUTPUT_FORMS", "output_form", "TASK_KINDS", "Task", "TaskNotSupportedError", "aligned_with_inputs", "check_task_kind",
           "infer_target_task", "infer_task", "require_task"]
