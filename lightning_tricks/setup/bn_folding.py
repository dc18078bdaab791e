"""Fold BatchNorm into the convolution or linear layer before it, for inference.

CS231n: batch normalization has "zero overhead at test time: can be fused with the conv". In eval mode
a BatchNorm layer is a fixed per-channel affine map,

    y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta,

so when ``x = W * in + b`` comes straight from a convolution or linear layer, the pair is one layer with

    W' = W * s,   b' = (b - mu) * s + beta,   s = gamma / sqrt(sigma^2 + eps)   (per output channel).

:func:`fold_batch_norm` returns an inference copy of a model with every such pair folded. Which
BatchNorm follows which layer is read from one traced forward pass, not from module order: a pair is
folded only when the layer runs once, its output goes to the BatchNorm and nowhere else (checked on the
autograd graph), and the BatchNorm runs once on exactly that tensor. That holds for ``nn.Sequential``
stacks as for torchvision, timm and zoo blocks that call ``self.conv1`` and ``self.bn1`` in ``forward``;
a pair where it does not hold is left as it is and listed. The folding arithmetic is torch's
``torch.nn.utils.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``; the copy's outputs are compared
with the original's on the traced input before it is returned.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_weights, fuse_linear_bn_weights

from lightning_tricks.errors import MissingExampleInputError  # noqa: F401  (re-exported)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE_LAYERS = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # timm's BatchNormAct2d included


@dataclass
class FoldReport:
    """What :func:`fold_batch_norm` did (``return_report=True``).

    Attributes:
        folded: each folded BatchNorm's name -> the name of the layer it went into.
        skipped: each BatchNorm left in place -> the reason.

    Examples:
        >>> print(FoldReport(folded={"1": "0"}, skipped={"4": "its input does not come straight from a conv"}))
        folded 1 BatchNorm layer(s), left 1
          left 4: its input does not come straight from a conv
    """

    folded: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s), left {len(self.skipped)}"]
        lines += [f"  left {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _Trace:
    calls: Counter = field(default_factory=Counter)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)  # foldable layer -> its output per call
    inputs: dict[str, Tensor] = field(default_factory=dict)  # BatchNorm -> its input
    keep: list[Any] = field(default_factory=list)  # tensors held so their autograd nodes stay alive


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _as_args(example: Any) -> tuple[Any, ...]:
    return tuple(example) if isinstance(example, (list, tuple)) else (example,)


def _trace(model: nn.Module, args: tuple[Any, ...]) -> tuple[_Trace, Counter]:
    """Run one forward pass recording layer outputs, BatchNorm inputs, call counts, and the number of
    autograd consumers of every graph node (so a layer output also used elsewhere is not folded)."""
    trace = _Trace()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _FOLDABLE_LAYERS):
            def after(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
                trace.calls[name] += 1
                if isinstance(out, Tensor):
                    trace.outputs.setdefault(name, []).append(out)
            handles.append(module.register_forward_hook(after))
        elif isinstance(module, _BATCH_NORMS):
            def before(mod: nn.Module, inp: Any, name: str = name) -> None:
                trace.calls[name] += 1
                if inp and isinstance(inp[0], Tensor):
                    trace.inputs[name] = inp[0]
            handles.append(module.register_forward_pre_hook(before))
    # inputs that require grad give every layer output an autograd node, even for frozen weights
    args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, Tensor) and a.is_floating_point() else a
                 for a in args)
    try:
        with torch.enable_grad():
            output = model(*args)
    finally:
        for handle in handles:
            handle.remove()
    trace.keep.append(output)
    consumers: Counter = Counter()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                consumers[child] += 1
                stack.append(child)
    return trace, consumers


def _plain_norm(bn: nn.Module) -> nn.Module | None:
    """What replaces a folded BatchNorm: Identity for torch's classes, timm's ``drop`` then ``act`` for its
    BatchNormAct layers, None for a subclass whose forward we do not know."""
    # torch's three BatchNormNd share one forward; SyncBatchNorm's equals it in eval mode
    if type(bn).forward is nn.BatchNorm2d.forward or isinstance(bn, nn.SyncBatchNorm):
        return nn.Identity()
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if type(bn).__name__.startswith("BatchNormAct") and isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        return nn.Sequential(drop, act)
    return None


def _why_not(bn_name: str, bn: nn.Module, layer_name: str | None, layer: nn.Module | None, trace: _Trace,
             consumers: Counter) -> str | None:
    if trace.calls[bn_name] != 1:
        return f"it runs {trace.calls[bn_name]} times in one forward pass"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if layer_name is None or layer is None:
        return "its input does not come straight from a convolution or linear layer"
    if trace.calls[layer_name] != 1:
        return f"{layer_name!r} before it runs {trace.calls[layer_name]} times in one forward pass"
    if consumers[trace.outputs[layer_name][0].grad_fn] != 1:
        return f"the output of {layer_name!r} is also used outside this BatchNorm"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"{layer_name!r} has {channels} output channels, the BatchNorm {bn.num_features}"
    if isinstance(layer, _CONV_TRANSPOSE) and layer.groups != 1:
        return f"{layer_name!r} is a grouped transposed convolution"
    if _plain_norm(bn) is None:
        return f"{type(bn).__name__} overrides forward with something other than batch normalization"
    return None


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    fused = copy.deepcopy(layer)
    stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            weight, bias = fuse_linear_bn_weights(layer.weight, layer.bias, *stats)
        else:
            weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *stats,
                                                transpose=isinstance(layer, _CONV_TRANSPOSE))
    fused.weight, fused.bias = weight, bias
    return fused


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _example_input(model: nn.Module, example_input: Any) -> tuple[Any, ...]:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise MissingExampleInputError(
            "fold_batch_norm needs `example_input` (a batch of inputs, e.g. torch.randn(1, 3, 224, 224)) to trace "
            f"which layer feeds which BatchNorm; {type(model).__name__} has no `example_input_array` to use instead.")
    return _as_args(example_input)


def fold_batch_norm(model: nn.Module, example_input: Any = None, *, atol: float = 1e-4,
                    return_report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Return an inference copy of ``model`` with every BatchNorm folded into the layer before it.

    The original model is not changed. The copy is in eval mode; its outputs equal the original's in
    eval mode up to float rounding. BatchNorm layers that cannot be folded (not right after a conv or
    linear layer, that layer's output also used elsewhere, no running statistics, an unknown subclass)
    stay as they are and are listed in a warning (and in the report).

    Args:
        model: any ``nn.Module`` or LightningModule (torchvision, timm, zoo or your own).
        example_input: one input batch for the traced forward pass (a tensor, or a tuple of positional
            arguments); defaults to the model's ``example_input_array``. A batch of 1-2 is enough.
        atol: largest absolute difference allowed between the original's and the copy's outputs on
            ``example_input`` (relative to the output's scale); a larger one raises ``RuntimeError``.
        return_report: also return the :class:`FoldReport`.

    Returns:
        The folded copy, or ``(copy, report)`` with ``return_report=True``.

    Raises:
        MissingExampleInputError: no ``example_input`` and no ``example_input_array``.
        RuntimeError: the folded copy's outputs differ from the original's (a model whose forward
            depends on something the trace did not see).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> folded = fold_batch_norm(net, torch.randn(2, 3, 16, 16))
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> x = torch.randn(4, 3, 16, 16)
        >>> torch.allclose(folded(x), net(x), atol=1e-6)
        True
    """
    args = _example_input(model, example_input)
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = [t.detach().clone() for t in _tensors(folded(*args))]
    trace, consumers = _trace(folded, args)
    producer = {id(out.grad_fn): name for name, outs in trace.outputs.items() for out in outs
                if out.grad_fn is not None}
    modules = dict(folded.named_modules())
    report = FoldReport()
    for bn_name, bn in modules.items():
        if not isinstance(bn, _BATCH_NORMS):
            continue
        if bn_name not in trace.inputs:
            report.skipped[bn_name] = "it does not run in the forward pass"
            continue
        layer_name = producer.get(id(trace.inputs[bn_name].grad_fn))
        layer = modules.get(layer_name) if layer_name is not None else None
        reason = _why_not(bn_name, bn, layer_name, layer, trace, consumers)
        if reason is not None:
            report.skipped[bn_name] = reason
            continue
        report.folded[bn_name] = layer_name
    trace.keep.clear()
    for bn_name, layer_name in report.folded.items():
        bn = modules[bn_name]
        _set(folded, layer_name, _fold_pair(modules[layer_name], bn))
        _set(folded, bn_name, _plain_norm(bn))
    _check_outputs(folded, args, reference, atol)
    if report.skipped:
        warnings.warn(f"fold_batch_norm: {report}", stacklevel=2)
    return (folded, report) if return_report else folded


def _check_outputs(folded: nn.Module, args: tuple[Any, ...], reference: list[Tensor], atol: float) -> None:
    with torch.no_grad():
        outputs = [t.detach() for t in _tensors(folded(*args))]
    for ref, out in zip(reference, outputs, strict=True):
        scale = max(1.0, float(ref.abs().max())) if ref.numel() and ref.is_floating_point() else 1.0
        if ref.shape != out.shape or not torch.allclose(out.float(), ref.float(), atol=atol * scale, rtol=0):
            worst = float((out.float() - ref.float()).abs().max()) if ref.shape == out.shape else float("nan")
            raise RuntimeError(
                f"fold_batch_norm: the folded copy's output differs from the original's by {worst:.3g} "
                f"(allowed {atol * scale:.3g}); the model's forward may depend on something one traced "
                "pass does not show. Fold by hand with torch.nn.utils.fuse_conv_bn_eval, or leave it unfolded.")
