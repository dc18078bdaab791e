"""What activations a model has: activation modules by kind, and functional calls one forward pass makes.

Shared by :mod:`lightning_tricks.setup.activations` (which re-exports these names) and the callback:
:data:`KINDS` and :func:`activation_kind` name the activation modules :func:`~lightning_tricks.swap_activations`
can replace; :func:`trace_forward` runs one forward pass under a ``TorchFunctionMode`` to read each
activation's channel count (PReLU per channel) and to list the functional calls (``F.relu(x)``) no module
swap can reach.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_tricks.core.activations import kind_of, kinds
from lightning_tricks.core.validation import check_choice

KINDS = kinds(["relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "sigmoid", "tanh"])
"""Activation kinds that can be replaced (``activations``) -> (module classes, class names, for timm's own)."""

# the functional forms of each kind, seen by the TorchFunctionMode trace (a module's own call is not counted)
_FUNCTIONS: dict[str, tuple[Any, ...]] = {
    "relu": (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_),
    "relu6": (F.relu6, F.hardtanh),
    "leaky_relu": (F.leaky_relu, F.leaky_relu_),
    "prelu": (F.prelu, torch.prelu),
    "elu": (F.elu, F.elu_),
    "selu": (F.selu, torch.selu),
    "gelu": (F.gelu,),
    "silu": (F.silu,),
    "sigmoid": (torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_),
    "tanh": (torch.tanh, F.tanh, torch.Tensor.tanh, torch.Tensor.tanh_),
}

_TORCH_DIR = os.path.dirname(torch.__file__)


def activation_kind(module: nn.Module) -> str | None:
    """The kind (a key of :data:`KINDS`) of an activation module, or None."""
    return kind_of(module, KINDS)


@dataclass
class ForwardTrace:
    """What one forward pass showed: each activation module's channel counts, and functional calls.

    Attributes:
        channels: module name -> the set of channel counts (input dim 1, as ``nn.PReLU`` uses) it saw.
        functional: ``(kind, where)`` of each functional activation call made outside an activation module;
            ``where`` names the calling ``forward`` (``Class.forward (file:line)``).
    """

    channels: dict[str, set[int]] = field(default_factory=dict)
    functional: list[tuple[str, str]] = field(default_factory=list)

    def functional_summary(self, limit: int = 3) -> str:
        """``"3 F.relu calls (in BasicBlock.forward (backbones.py:118))"``-style text, '' when none."""
        if not self.functional:
            return ""
        places = list(dict.fromkeys(where for _, where in self.functional))
        kinds = "/".join(dict.fromkeys(kind for kind, _ in self.functional))
        shown = ", ".join(places[:limit]) + (f" and {len(places) - limit} more" if len(places) > limit else "")
        return f"{len(self.functional)} functional {kinds} call(s) in {shown}"


def _caller() -> str:
    """The first frame outside torch (and this file): ``Class.forward (file:line)``."""
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            owner = frame.f_locals.get("self")
            prefix = f"{type(owner).__name__}." if isinstance(owner, nn.Module) else ""
            return f"{prefix}{frame.f_code.co_name} ({os.path.basename(filename)}:{frame.f_lineno})"
        frame = frame.f_back
    return "unknown"


class _FunctionalSpy(TorchFunctionMode):
    """Records functional activation calls of the given kinds that no activation module made."""

    def __init__(self, kinds: Sequence[str], trace: ForwardTrace) -> None:
        super().__init__()
        self.lookup = {fn: kind for kind in kinds for fn in _FUNCTIONS[kind]}
        self.trace = trace
        self.depth = 0  # > 0 while an activation module's forward runs

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = self.lookup.get(func)
        if kind is not None and self.depth == 0 and not (kind == "relu6" and func is F.hardtanh):
            self.trace.functional.append((kind, _caller()))
        return func(*args, **(kwargs or {}))


def _channels_of(x: Any) -> int | None:
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return None
    return int(x.shape[1]) if x.ndim >= 2 else int(x.shape[0])  # the dimension nn.PReLU's weight applies to


def trace_forward(model: nn.Module, example: Any, kinds: Sequence[str] = ("relu",)) -> ForwardTrace:
    """Run ``model(example)`` once (eval mode, no grad) and record activations (see :class:`ForwardTrace`).

    The model's training flag and BatchNorm running statistics are left as they were.
    """
    trace = ForwardTrace()
    spy = _FunctionalSpy(kinds, trace)
    handles = []
    for name, module in model.named_modules():
        if activation_kind(module) is None:
            continue

        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            spy.depth += 1
            channels = _channels_of(args[0]) if args else None
            if channels is not None:
                trace.channels.setdefault(name, set()).add(channels)

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            spy.depth -= 1

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), spy:
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return trace


def find_functional_activations(model: nn.Module, example: Any, kinds: Sequence[str] = ("relu",)
                                ) -> list[tuple[str, str]]:
    """Functional activation calls (``F.relu(x)``, ``x.relu()``, ``torch.sigmoid``) made outside modules.

    Returns:
        ``[(kind, "Class.forward (file:line)"), ...]`` in call order; empty when every call of those kinds
        goes through an activation module (which :func:`swap_activations` can replace).

    Examples:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return F.relu(self.fc(x))
        >>> kind, where = find_functional_activations(Net(), torch.zeros(2, 4))[0]
        >>> kind
        'relu'
    """
    for kind in kinds:
        check_choice("kinds", kind, KINDS)
    return trace_forward(model, example, kinds).functional


__all__ = ["KINDS", "ForwardTrace", "activation_kind", "find_functional_activations", "trace_forward"]
