"""Transfer learning: find and replace the classifier head, freeze all but the last blocks, load local weights.

CS231n: "Transfer learning with CNNs: train on a big dataset (or take a trained network), then for a
small dataset of C classes reinitialize the last layer and train only it; with more data, fine-tune
more layers." The functional core, usable without Lightning:

* :func:`find_head` names the classifier (a timm model's ``pretrained_cfg["classifier"]``, else the
  last ``nn.Linear``/``nn.Conv2d`` registered), or checks a name the user gives;
* :func:`replace_head` puts a freshly initialized layer for ``num_classes`` classes in its place;
* :func:`backbone_units` cuts the rest of the model into ordered *units* (a residual block, or a
  layer with weights together with the normalization layers that follow it) so that ``last:K`` means
  the same thing on torchvision, timm, zoo and plain models;
* :func:`freeze` trains the head plus ``"head"`` / ``"last:K"`` / ``"all"`` units, puts every frozen
  unit in eval mode (BatchNorm running statistics do not drift, dropout is off), and
  :func:`param_groups` splits the parameters into head and backbone groups for discriminative learning
  rates;
* :func:`load_weights` reads a local file (a Lightning checkpoint, a torchvision or timm
  ``state_dict``, ``.safetensors``), aligns its key prefixes with the model's, skips the head, and
  lists every missing, unexpected or mis-shaped key in one message. Nothing is ever downloaded.

:class:`~lightning_tricks.finetune.Finetune` is the Lightning callback built on these.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.checkpoint_io import checkpoint_error
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import DataNotFoundError, InvalidArgumentError, check_int
from lightning_tricks.errors import WeightsMismatchError  # noqa: F401  (re-exported)

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


# ------------------------------------------------------------------------------------------- loading


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: a Lightning checkpoint's ``state_dict``, a torchvision or timm
    ``state_dict`` (``.pth``/``.pt``/``.bin``, or a dict holding it under ``state_dict`` or ``model``), or a
    ``.safetensors`` file. Loaded with ``weights_only=True`` unless ``trust``.

    Raises:
        DataNotFoundError: no such file.
        WeightsMismatchError: the file holds no tensors by name, or needs unpickling and is not trusted.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"`weights`={str(path)!r} does not exist: expected a local checkpoint or state_dict "
                                "file (nothing is downloaded).")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    try:
        content = torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        translated = checkpoint_error(path, err, "`weights`")
        if "Weights only load failed" not in str(err) or "not a PyTorch checkpoint" in str(translated):
            raise translated or err from None  # a damaged file, not a pickle of objects
        raise WeightsMismatchError(f"`weights`={str(path)!r} holds Python objects beyond tensors ({str(err)[:120]}...);"
                                   " if you trust the file, set trust_checkpoints=True.") from None
    except Exception as err:  # empty, truncated, corrupt: one line naming the file
        translated = checkpoint_error(path, err, "`weights`")
        if translated is None:
            raise
        raise translated from None
    for key in ("state_dict", "model", "module"):
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if not isinstance(content, Mapping) or not content or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise WeightsMismatchError(f"`weights`={str(path)!r} is not a state_dict: expected a mapping of names to "
                                   "tensors, or a checkpoint holding one under 'state_dict'.")
    return dict(content)


def _align(file_keys: list[str], model_keys: set[str]) -> tuple[str, str]:
    """The (file prefix, model prefix) pair under which the most file keys name model keys."""
    counts: dict[str, int] = {}
    for key in file_keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    file_prefixes = [""] + [p for p, c in counts.items() if 2 * c >= len(file_keys)]
    best = ("", "", -1)
    for fp in file_prefixes:
        stripped = [k[len(fp):] for k in file_keys if k.startswith(fp)]
        model_prefixes = {""}
        for key in stripped[:8]:
            model_prefixes |= {m[: len(m) - len(key)] for m in model_keys if m.endswith("." + key)}
        for mp in model_prefixes:
            score = sum(mp + k in model_keys for k in stripped)
            if score > best[2]:
                best = (fp, mp, score)
    return best[0], best[1]


@dataclass
class LoadReport:
    """What :func:`load_weights` did: how many tensors loaded, and the file's keys it left out (the head)."""

    loaded: int
    skipped_head: list[str]
    file_prefix: str
    model_prefix: str


def _listing(kind: str, keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{len(keys)} {kind} ({shown})"


def load_weights(model: nn.Module, path: str | os.PathLike, head: str | None = None, strict: bool = True,
                 trust: bool = False, skip_head: bool = True) -> LoadReport:
    """Load a local weights file into ``model``'s backbone, skipping the classifier head.

    The file's keys and the model's may differ by a prefix (``model.`` in a LightningModule's checkpoint,
    ``module.`` from DDP, none in a torchvision file): the pair of prefixes under which most keys match is
    used. The head's keys are skipped whatever their shape, so a checkpoint trained for another number of
    classes loads. Every other difference (backbone keys missing from the file, file keys the model does
    not have, shapes that differ) is listed in one error, or ignored with ``strict=False``.
    ``skip_head=False`` loads the head too (its shape must then match).

    Raises:
        WeightsMismatchError: with ``strict``, any missing, unexpected or mis-shaped backbone key.
    """
    state = read_state_dict(path, trust)
    head_name = find_head(model, head)
    own = model.state_dict()
    fp, mp = _align(list(state), set(own))
    head_prefix = head_name + "." if skip_head else "\0"
    mapped = {mp + k[len(fp):]: (k, v) for k, v in state.items() if k.startswith(fp)}
    skipped = [k for m, (k, _) in mapped.items() if m.startswith(head_prefix)]
    target = [k for k in own if k.startswith(mp) and not k.startswith(head_prefix)]
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in state if not k.startswith(fp)] + [
        k for m, (k, _) in mapped.items() if m not in own and not m.startswith(head_prefix)]
    shapes = [f"{m} {tuple(mapped[m][1].shape)} vs {tuple(own[m].shape)}" for m in target
              if m in mapped and mapped[m][1].shape != own[m].shape]
    problems = [_listing(kind, keys) for kind, keys in (
        ("backbone keys missing from the file", missing), ("unexpected keys in the file", unexpected),
        ("shape mismatches (file vs model)", shapes)) if keys]
    if problems and strict:
        raise WeightsMismatchError(f"`weights`={str(path)!r} does not fit {type(model).__name__} (file prefix "
                                   f"{fp!r} -> model prefix {mp!r}, head {head_name!r} skipped): "
                                   + "; ".join(problems) + ". Set strict=False to load the matching keys only.")
    bad = {m.split(" ")[0] for m in shapes}
    loadable = {m: v for m, (_, v) in mapped.items() if m in own and m not in bad and not m.startswith(head_prefix)}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(len(loadable), skipped, fp, mp)

