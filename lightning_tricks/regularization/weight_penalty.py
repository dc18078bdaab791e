"""L1, L2 and elastic-net weight penalties, applied to the gradients once per optimizer step.

The objective is ``loss + l1 * sum|W| + l2 * sum W^2`` over the selected weights. A callback cannot
change the loss, but it can change the gradients: :class:`WeightPenalty` adds
``l1 * sign(W) + 2 * l2 * W`` to each selected parameter's gradient in ``on_before_optimizer_step``,
which Lightning calls once per optimizer step, after AMP unscaling and after the gradients of all
accumulated micro-batches are summed (each scaled by ``1 / accumulate_grad_batches``), and before
gradient clipping. The result is exactly the gradient of the penalized loss of the effective batch.

Functional core: :func:`select_parameters`, :func:`penalty_value`, :func:`add_penalty_gradient_`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_tricks.core.selection import check_patterns, select
from lightning_tricks.core.validation import InvalidArgumentError, check_bool, check_non_negative

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Modules whose parameters are normalization parameters (excluded by default)."""


def select_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exclude_bias_and_norm: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to penalize, in ``named_parameters()`` order.

    Chosen by :func:`lightning_tricks.core.selection.select` (the package's one selector): a parameter is
    eligible when it is trainable and, with ``exclude_bias_and_norm``, neither a bias-like tensor (one
    dimension or fewer) nor a parameter of a normalization layer (:data:`NORM_TYPES`); it is selected when
    ``include`` (all when None) matches its name or an ancestor's (``"head"`` selects ``head.0.weight``) and
    ``exclude`` does not. Patterns are globs on the full names (``model.head.1.weight``).

    Raises:
        InvalidArgumentError: a pattern matches no parameter name (a typo would otherwise do nothing), or an
            ``include`` pattern matches only parameters that are not eligible (each with its reason).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> [n for n, _ in select_parameters(net)]
        ['0.weight', '2.weight']
        >>> [n for n, _ in select_parameters(net, include=["2"], exclude_bias_and_norm=False)]
        ['2.weight', '2.bias']
    """
    norm_params = {id(p) for m in module.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}

    def why_not(param: nn.Parameter) -> str | None:
        if not param.requires_grad:
            return "frozen (requires_grad=False)"
        if exclude_bias_and_norm and id(param) in norm_params:
            return "a normalization layer's parameter (exclude_bias_and_norm=True)"
        if exclude_bias_and_norm and param.ndim <= 1:
            return "bias-like, one dimension or fewer (exclude_bias_and_norm=True)"
        return None

    return select(module.named_parameters(), include=include, exclude=exclude, why_not=why_not,
                  owner="WeightPenalty", what="parameter")


def penalty_value(params: Iterable[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum|W| + l2 * sum W^2`` over ``params`` (differentiable; a float32-or-wider scalar)."""
    params = list(params)
    if not params:
        return torch.zeros(())
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    total = torch.zeros((), dtype=dtype, device=params[0].device)
    for p in params:
        w = p.to(dtype)
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


@torch.no_grad()
def add_penalty_gradient_(params: Iterable[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> int:
    """Add ``l1 * sign(W) + 2 * l2 * W`` to the ``.grad`` of each parameter that has one; return how many.

    Parameters without a gradient (unused in this step, or a step whose backward was skipped) are left alone.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0
    grads = [p.grad for p in with_grad]
    if l2:
        torch._foreach_add_(grads, with_grad, alpha=2.0 * l2)
    if l1:
        torch._foreach_add_(grads, torch._foreach_sign(with_grad), alpha=l1)
    return len(with_grad)


class WeightPenalty(Callback):
    """L1 / L2 / elastic-net penalty on the weights, through the gradients, once per optimizer step.

    Adds the gradient of ``l1 * sum|W| + l2 * sum W^2`` (the lectures' ``lambda * R(W)``) to the selected
    parameters' gradients in ``on_before_optimizer_step``: after AMP unscaling, after all micro-batches
    of gradient accumulation, before gradient clipping and the optimizer. Biases and normalization
    parameters are excluded by default; ``include``/``exclude`` name patterns refine the selection.
    The value of the penalty term is logged as ``weight_penalty`` (your ``train_loss`` does not contain
    it). ``l1=l2=0`` is off.

    Versus the optimizer's ``weight_decay``: with plain SGD, ``weight_decay=wd`` is the gradient of
    ``(wd / 2) * sum W^2``, i.e. ``l2 = wd / 2``, but it applies to every parameter of its group; with
    Adam it is the same coupled gradient, rescaled by Adam's per-parameter step; AdamW's decoupled decay
    shrinks the weights directly (``W -= lr * wd * W``) and is not the gradient of any loss term. This
    callback is the coupled (loss-term) form, for any optimizer, with L1 and a per-name selection.

    Args:
        l1: lambda of ``sum |W|`` (>= 0).
        l2: lambda of ``sum W^2`` (>= 0); the gradient is ``2 * l2 * W``.
        include: glob patterns on ``named_parameters()`` names of the parameters to penalize; a pattern also
            selects what is inside a match (``"model.head"`` selects ``model.head.1.weight``). None: all.
        exclude: patterns of the same form, of parameters not to penalize.
        exclude_bias_and_norm: skip parameters with at most one dimension (biases) and parameters of
            normalization layers.
        log: log the penalty term as ``weight_penalty/loss`` every optimizer step (``pl_module.log``, so
            ``EarlyStopping``/``ModelCheckpoint`` can monitor it).

    Raises:
        InvalidArgumentError: a negative penalty or malformed patterns at construction; at setup, a pattern
            that matches no parameter, or a selection that is empty.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[WeightPenalty(l2=5e-4)])  # doctest: +SKIP
    """

    def __init__(self, l1: float = 0.0, l2: float = 0.0, include: list[str] | None = None,
                 exclude: list[str] | None = None, exclude_bias_and_norm: bool = True, log: bool = True) -> None:
        self.l1 = float(check_non_negative("l1", l1))
        self.l2 = float(check_non_negative("l2", l2))
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude, allow_empty=True)
        self.exclude_bias_and_norm = check_bool("exclude_bias_and_norm", exclude_bias_and_norm)
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        self.selected_names: list[str] = []
        self._selected: set[int] = set()

    @property
    def active(self) -> bool:
        return self.l1 > 0.0 or self.l2 > 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(l1=self.l1, l2=self.l2, include=self.include, exclude=self.exclude)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built there are seen); the parameters keep their identity under DDP
        if not self.active:
            rank_zero_warn("WeightPenalty(l1=0, l2=0) is off: set l1 and/or l2 to penalize the weights.")
            return
        selected = select_parameters(pl_module, self.include, self.exclude, self.exclude_bias_and_norm)
        if not selected:
            raise InvalidArgumentError(
                "WeightPenalty selected no parameter: it looked for trainable parameters with more than one "
                f"dimension outside normalization layers (exclude_bias_and_norm={self.exclude_bias_and_norm}), "
                f"include={self.include}, exclude={self.exclude}; widen the patterns or set exclude_bias_and_norm=false."
            )
        self.selected_names = [name for name, _ in selected]
        self._selected = {id(p) for _, p in selected}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.l2:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                decay = group.get("weight_decay", 0.0) or 0.0
                if decay > 0 and any(id(p) in self._selected for p in group["params"]):
                    rank_zero_warn(f"WeightPenalty(l2={self.l2}) and the optimizer's weight_decay={decay} both "
                                   "penalize the same weights (L2 twice); set one of them to 0.")
                    return

    def _params(self, optimizer: Any) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"] if id(p) in self._selected]

    def _logged_value(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The penalty term from fused norms (no autograd; accumulated in float32 or wider)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(torch.promote_types(p.dtype, torch.float32), []).append(p)
        device = params[0].device
        total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        for dtype, group in by_dtype.items():
            if self.l1:
                total += self.l1 * torch.stack(torch._foreach_norm(group, 1, dtype=dtype)).sum()
            if self.l2:
                total += self.l2 * torch.stack(torch._foreach_norm(group, 2, dtype=dtype)).pow(2).sum()
        return total

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.active:
            return
        params = self._params(optimizer)
        if not params:
            return
        if self.log_enabled:
            with torch.no_grad():
                value = self._logged_value(params)
            pl_module.log("weight_penalty/loss", value, on_step=True, on_epoch=False)
        add_penalty_gradient_(params, self.l1, self.l2)


__all__ = ["NORM_TYPES", "WeightPenalty", "add_penalty_gradient_", "penalty_value", "select_parameters"]
