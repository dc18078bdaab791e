"""Transfer learning's functional core: find and replace the classifier head, cut the backbone into units, freeze
all but the last ones, split the parameters into head and backbone groups (no Lightning needed).

Re-exported by :mod:`lightning_tricks.transfer`; loading weights files is :mod:`lightning_tricks.transfer.weights`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import InvalidArgumentError, check_int

HEAD_TYPES = (nn.Linear, nn.Conv2d)
_LAST_K = re.compile(r"^last:(\d+)$")


def parse_train(name: str, value: Any) -> int | None:
    """``"head"`` -> 0, ``"last:K"`` -> K, ``"all"`` -> ``None`` (every unit); anything else is a one-line error."""
    if value == "head":
        return 0
    if value == "all":
        return None
    match = _LAST_K.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise InvalidArgumentError(f"`{name}`={value!r} is invalid: expected 'head', 'all' or 'last:K' with K >= 1.")
    return int(match.group(1))


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _head_candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, HEAD_TYPES)]


def find_head(model: nn.Module, head: str | None = None) -> str:
    """The qualified name of the classifier layer of ``model``.

    Args:
        model: any module (a LightningModule too: names then start at its attributes, ``model.fc``).
        head: the name to check instead of searching (``"fc"``, ``"model.classifier.1"``).

    Returns:
        ``head`` when given and valid; else the ``pretrained_cfg["classifier"]`` of a timm model inside
        ``model``; else the last ``nn.Linear`` or ``nn.Conv2d`` in registration order.

    Raises:
        InvalidArgumentError: ``head`` names no submodule, or one that is not a Linear/Conv2d.
        ModelNotSupportedError: the model has no Linear or Conv2d layer at all.

    Examples:
        >>> find_head(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10)))
        '2'
    """
    candidates = _head_candidates(model)
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            module = None
        if not isinstance(module, HEAD_TYPES):
            what = "is not a submodule" if module is None else f"is a {type(module).__name__}"
            shown = ", ".join(repr(n) for n in candidates[-5:]) or "none"
            raise InvalidArgumentError(f"`head`={head!r} is invalid: it {what} of {type(model).__name__}; expected "
                                       f"the name of its classifier Linear/Conv2d layer, such as {shown}.")
        return head
    for prefix, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        name = cfg.get("classifier") if isinstance(cfg, Mapping) else None
        if isinstance(name, str) and _qualify(prefix, name) in candidates:
            return _qualify(prefix, name)
    if not candidates:
        raise ModelNotSupportedError(f"Finetune found no nn.Linear or nn.Conv2d classifier in {type(model).__name__}: "
                                     "name the classifier layer with `head`.")
    return candidates[-1]


def new_head_like(layer: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialized layer of the same kind, input size, device and dtype, with ``num_classes`` outputs."""
    check_int("num_classes", num_classes, 1)
    weight = layer.weight
    kwargs: dict[str, Any] = {"bias": layer.bias is not None, "device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, **kwargs)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        return nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, **kwargs)
    raise ModelNotSupportedError(f"cannot rebuild a {type(layer).__name__} classifier (groups > 1?): name a "
                                 "Linear or ungrouped Conv2d layer with `head`.")


def replace_head(model: nn.Module, num_classes: int | None = None, head: str | None = None) -> str:
    """Replace the classifier with a freshly initialized one for ``num_classes`` classes; return its name.

    ``num_classes=None`` keeps the current number of outputs (a re-initialization). The parameter names
    stay the same, so checkpoints of the fine-tuned model load into a model whose head was replaced alike.

    Examples:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
        >>> replace_head(net, num_classes=5), net[2].out_features
        ('2', 5)
    """
    name = find_head(model, head)
    old = model.get_submodule(name)
    out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new_head_like(old, num_classes or out))
    return name


# --------------------------------------------------------------------------------------------- units


@dataclass
class Unit:
    """A piece of the backbone that ``last:K`` counts as one: a block, or a layer and the norms after it."""

    name: str
    modules: list[nn.Module] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_weights(module: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in module.parameters())


def backbone_units(model: nn.Module, head: str) -> list[Unit]:
    """The backbone of ``model`` (everything but the ``head`` layer) as an ordered list of units.

    Containers (``Sequential``, ``ModuleList``, ``ModuleDict``) and the modules on the path to the head
    are opened; any other module with parameters is a unit (a ResNet ``BasicBlock``, a ViT ``Block``, a
    stem ``Conv2d``). A unit without weight matrices (a BatchNorm after a conv) joins the unit before it,
    and parameters held directly by an opened module (a ViT's ``cls_token``) join the next unit.
    Every parameter outside the head belongs to exactly one unit. Order is registration order, which is
    the order of computation in the models we know (torchvision, timm, the zoo).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> tuple(u.name for u in backbone_units(net, "4"))
        ('0',)
    """
    units: list[Unit] = []
    pending: list[nn.Parameter] = []

    def add(unit: Unit) -> None:
        if units and not _has_weights(nn.ModuleList(unit.modules)) and not unit.params:
            units[-1].modules += unit.modules
            return
        unit.params = pending + unit.params
        pending.clear()
        units.append(unit)

    def visit(prefix: str, module: nn.Module) -> None:
        pending.extend(module.parameters(recurse=False))
        for name, child in module.named_children():
            qualified = _qualify(prefix, name)
            if qualified == head or next(child.parameters(), None) is None:
                continue
            if isinstance(child, _CONTAINERS) or head.startswith(qualified + "."):
                visit(qualified, child)
            else:
                add(Unit(qualified, [child]))

    visit("", model)
    if pending:
        if not units:
            units.append(Unit("<parameters>"))
        units[-1].params += pending
    for unit in units:
        unit.params += [p for m in unit.modules for p in m.parameters()]
    return units


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


@dataclass
class FreezePlan:
    """What :func:`freeze` decided: the head's name, the units, and how many of the last ones train."""

    head: str
    head_module: nn.Module
    units: list[Unit]
    trained_units: int

    @property
    def frozen_units(self) -> list[Unit]:
        return self.units[: len(self.units) - self.trained_units]

    def head_params(self) -> list[nn.Parameter]:
        return list(self.head_module.parameters())

    def backbone_params(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_params()}
        return [p for p in _unique([p for u in self.units for p in u.params]) if id(p) not in head]

    def trainable_params(self) -> list[nn.Parameter]:
        return _unique(self.head_params() + [p for u in self.units[len(self.frozen_units):] for p in u.params])


def plan_freeze(model: nn.Module, train: str = "head", head: str | None = None) -> FreezePlan:
    """The :class:`FreezePlan` for ``train`` (``"head"``, ``"last:K"`` or ``"all"``) without changing the model.

    Raises:
        InvalidArgumentError: a bad ``train`` or ``head``, or ``last:K`` with more units than the model has.
    """
    k = parse_train("train", train)
    name = find_head(model, head)
    units = backbone_units(model, name)
    if k is not None and k > len(units):
        raise InvalidArgumentError(f"`train`={train!r} is invalid: {type(model).__name__} has {len(units)} backbone "
                                   f"units ({', '.join(u.name for u in units[-4:])} are the last); expected "
                                   f"'last:K' with K <= {len(units)} or 'all'.")
    return FreezePlan(name, model.get_submodule(name), units, len(units) if k is None else k)


def apply_freeze(plan: FreezePlan, keep_frozen: set[int] | None = None, set_modes: bool = True) -> None:
    """Set ``requires_grad`` as ``plan`` says and (``set_modes``) put the frozen units in eval mode.

    Parameters whose ids are in ``keep_frozen`` (frozen by the user before us) stay frozen.
    """
    keep_frozen = keep_frozen or set()
    trainable = {id(p) for p in plan.trainable_params()}
    for unit in plan.units:
        for p in unit.params:
            p.requires_grad_(id(p) in trainable and id(p) not in keep_frozen)
    for p in plan.head_params():
        p.requires_grad_(id(p) not in keep_frozen)
    if set_modes:
        set_unit_modes(plan)


def set_unit_modes(plan: FreezePlan, training: bool = True) -> None:
    """Frozen units compute as at inference (BatchNorm uses and keeps its running statistics, no dropout);
    the head and the trained units are put in ``training`` mode."""
    frozen = len(plan.frozen_units)
    for i, unit in enumerate(plan.units):
        for module in unit.modules:
            module.train(training and i >= frozen)
    plan.head_module.train(training)


def freeze(model: nn.Module, train: str = "head", head: str | None = None) -> FreezePlan:
    """Train only the head plus the last units (``"head"``, ``"last:K"``, ``"all"``); freeze the rest.

    Frozen parameters get ``requires_grad=False`` (their ``grad`` stays ``None``, so SGD, Adam and AdamW
    leave them bit-identical, weight decay included) and frozen units are put in eval mode. Call
    :func:`set_unit_modes` again after every ``model.train()``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> plan = freeze(net, "last:1")
        >>> tuple(p.requires_grad for p in net.parameters())
        (False, False, True, True, True, True)
    """
    plan = plan_freeze(model, train, head)
    apply_freeze(plan)
    return plan


def param_groups(plan: FreezePlan, lr: float, backbone_lr_factor: float = 0.1) -> list[dict[str, Any]]:
    """Two optimizer groups: the head at ``lr``, the backbone at ``lr * backbone_lr_factor``.

    Frozen backbone parameters are included (they have no gradient, so optimizers skip them), so the
    groups do not change when an unfreeze schedule trains more units later.
    """
    return [{"params": plan.head_params(), "lr": lr},
            {"params": plan.backbone_params(), "lr": lr * backbone_lr_factor}]
