"""Which modules a dead-unit tracker watches: activation kinds, pre-activation layers and the unit dimension.

The selection half of the dead-unit monitor (``dead_units.py`` holds the tracker that counts):
:func:`find_watched_modules` finds the activation modules of the kinds asked for and the layers named in
``preactivation_layers`` (whose outputs feed a functional activation), and says, for each, which dimension
holds its units. ``layers`` is the deprecated name of ``preactivation_layers`` (``docs/glossary.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_tricks.core.activations import kind_of, kinds
from lightning_tricks.core.deprecation import register_renames, renamed_argument
from lightning_tricks.core.selection import check_patterns, select
from lightning_tricks.core.validation import (
    check_choice,
    check_non_negative,
    check_range,
)
from lightning_tricks.errors import NothingToMonitorError

ACTIVATION_TYPES = kinds(["relu", "relu6", "leaky_relu", "prelu", "rrelu"], merged={"elu": ["elu", "celu", "selu"]})
ACTIVATION_TYPES.update(kinds(["gelu", "silu", "sigmoid", "tanh"]))
"""Activation names accepted by ``activations`` -> (module classes, class names)."""

SATURATING = frozenset({"sigmoid", "tanh"})
"""Kinds checked for saturation instead of death."""

DEFAULT_ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh")
"""Monitored unless ``activations`` says otherwise. Leaky ReLU, PReLU, GELU, SiLU and ELU are opt-in: a unit whose
outputs are all negative still passes a gradient (slope 0.01 or 0.2 for Leaky ReLU), so it cannot die; counting it
would report a GAN's healthy Leaky ReLU discriminator as dead."""

UNIT_DIMS = ("auto", "channel", "last")

for _owner in ("DeadUnitMonitor", "DeadUnitTracker", "find_watched_modules"):
    register_renames(_owner, {"layers": "preactivation_layers"})

_LAST_DIM_LAYERS = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)
_CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
_PRE_ACTIVATION_LAYERS = _LAST_DIM_LAYERS + _CHANNEL_LAYERS


@dataclass(frozen=True)
class WatchedModule:
    """A module whose outputs are tracked.

    Attributes:
        name: the module's name in the model (``named_modules``).
        module: the module.
        kind: ``"dead"`` (ReLU family or a pre-activation layer) or ``"saturation"`` (sigmoid/tanh).
        saturation_low: lower bound of the output (saturation kinds).
        saturation_high: upper bound of the output (saturation kinds).
        dim_rule: ``"channel"`` (dimension 1), ``"last"``, or ``"auto-channel"``/``"auto-last"``: dimension 1
            for 4-D/5-D outputs, the last one for 2-D, and for 3-D the one named after ``auto-``.
        source: what selected it (``"activation:relu"`` or ``"preactivation_layers"``).
    """

    name: str
    module: nn.Module
    kind: str
    saturation_low: float = 0.0
    saturation_high: float = 0.0
    dim_rule: str = "auto-channel"
    source: str = ""


def _activation_kind(module: nn.Module, names: Sequence[str]) -> str | None:
    return kind_of(module, {name: ACTIVATION_TYPES[name] for name in names})


def _previous_siblings(model: nn.Module) -> dict[int, nn.Module | None]:
    """id(module) -> the module registered just before it in its parent (None for a first child)."""
    previous: dict[int, nn.Module | None] = {}
    for parent in model.modules():
        before: nn.Module | None = None
        for child in parent.children():
            previous.setdefault(id(child), before)
            before = child
    return previous


def _layer_dim_rule(module: nn.Module) -> str | None:
    if isinstance(module, _LAST_DIM_LAYERS):
        return "last"
    if isinstance(module, _CHANNEL_LAYERS):
        return "channel"
    return None


def _not_a_preactivation_layer(module: nn.Module) -> str | None:
    """Why the selector skips ``module`` inside a ``preactivation_layers`` match (None: it is watched).

    Conv, linear and norm layers are watched, and so is a leaf module with parameters of its own (a
    custom layer); containers and parameter-free modules (activations, dropout, pooling) are not: the
    layers inside a named block are.
    """
    if isinstance(module, _PRE_ACTIVATION_LAYERS):
        return None
    if not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False)):
        return None
    return "not a conv, linear or norm layer (nor a leaf layer with parameters)"


def _check_selection(activations: Sequence[str], preactivation_layers: Sequence[str] | None, unit_dim: str,
                     layers: Sequence[str] | None, owner: str) -> tuple[list[str], list[str]]:
    activations = list(activations)
    for name in activations:
        check_choice("activations", name, ACTIVATION_TYPES)
    # `layers` is the deprecated name of `preactivation_layers` (the glossary's); an empty list means "none"
    chosen = renamed_argument(owner, "layers", "preactivation_layers", layers, preactivation_layers or None, None)
    chosen = check_patterns("layers" if layers is not None else "preactivation_layers", chosen, allow_empty=True)
    check_choice("unit_dim", unit_dim, UNIT_DIMS)
    return activations, chosen or []


def check_dead_unit_args(activations: Sequence[str], preactivation_layers: Sequence[str] | None, threshold: float,
                         unit_dim: str, saturation_eps: float, saturation_fraction: float,
                         layers: Sequence[str] | None = None,
                         owner: str = "DeadUnitTracker") -> tuple[list[str], list[str]]:
    """The one validator of the dead-unit arguments, shared by :class:`DeadUnitTracker`,
    :func:`find_watched_modules` and :class:`DeadUnitMonitor`; returns ``(activations, preactivation_layers)``
    as lists. ``layers`` (deprecated: use ``preactivation_layers``) warns and is used in its place."""
    activations, preactivation_layers = _check_selection(activations, preactivation_layers, unit_dim, layers, owner)
    check_non_negative("threshold", threshold)
    check_range("saturation_eps", saturation_eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
    check_range("saturation_fraction", saturation_fraction, 0.0, 1.0, low_inclusive=False)
    return activations, preactivation_layers


def find_watched_modules(
    model: nn.Module,
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
    preactivation_layers: Sequence[str] = (),
    unit_dim: str = "auto",
    owner: str = "find_watched_modules",
    layers: Sequence[str] | None = None,
) -> list[WatchedModule]:
    """The modules a :class:`DeadUnitTracker` watches, in registration order.

    Args:
        model: the model to search.
        activations: activation kinds to find (keys of :data:`ACTIVATION_TYPES`).
        preactivation_layers: names or glob patterns (``"*.bn1"``) of layers whose *outputs* are the pre-activations of a
            functional ReLU (``F.relu(layer(x))``): a unit is alive when its pre-activation is ``> threshold``
            somewhere. Patterns follow the one selector (:func:`lightning_tricks.core.selection.select`): a
            pattern naming a block selects the conv, linear and norm layers inside it (and leaf layers with
            parameters of their own), not the block's output.
        unit_dim: ``"auto"``, ``"channel"`` (dimension 1) or ``"last"``.
        owner: the name that starts the error messages.
        layers: Deprecated: use ``preactivation_layers``.

    Raises:
        NothingToMonitorError: a ``preactivation_layers`` pattern that matches no module (or only modules that are not
            layers), or nothing found at all, with the candidates and the fix.
    """
    activations, preactivation_layers = _check_selection(activations, preactivation_layers, unit_dim, layers, owner)
    named = [(n, m) for n, m in model.named_modules() if n]
    previous = _previous_siblings(model)
    found: dict[str, WatchedModule] = {}
    for name, module in named:
        kind = _activation_kind(module, activations)
        if kind is None:
            continue
        if unit_dim != "auto":
            rule = unit_dim
        else:  # a 3-D output is (N, L, features) after a Linear/LayerNorm and (N, C, L) after a Conv1d
            rule = "auto-last" if isinstance(previous.get(id(module)), _LAST_DIM_LAYERS) else "auto-channel"
        low, high = (0.0, 1.0) if kind == "sigmoid" else (-1.0, 1.0)
        found[name] = WatchedModule(name, module, "saturation" if kind in SATURATING else "dead", low, high, rule,
                                    f"activation:{kind}")
    chosen = select(named, include=preactivation_layers, why_not=_not_a_preactivation_layer, owner=owner,
                    include_arg="layers" if layers is not None else "preactivation_layers",
                    error=NothingToMonitorError) if preactivation_layers else []
    for name, module in chosen:
        rule = unit_dim if unit_dim != "auto" else (_layer_dim_rule(module) or "auto-channel")
        found[name] = WatchedModule(name, module, "dead", dim_rule=rule, source="preactivation_layers")
    if not found:
        raise NothingToMonitorError(
            f"{owner} found nothing to monitor in {type(model).__name__}: no module of the kinds activations="
            f"{list(activations)} ({_class_list(activations)}) and no `preactivation_layers` named. If the model applies "
            f"F.relu (or another activation) functionally, name the layers whose outputs feed it, e.g. "
            f"preactivation_layers=['{_example_layer(named)}']; pre-activation layers there: {_candidates(named)}."
        )
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(found.values(), key=lambda w: order[w.name])


def _class_list(activations: Sequence[str]) -> str:
    return ", ".join(c.__name__ for a in activations for c in ACTIVATION_TYPES[a][0]) or "none"


def _candidates(named: Sequence[tuple[str, nn.Module]], limit: int = 12) -> str:
    layers = [f"{n} ({type(m).__name__})" for n, m in named if isinstance(m, _PRE_ACTIVATION_LAYERS)]
    if not layers:
        return "none (no conv, linear or norm layer)"
    return ", ".join(layers[:limit]) + (f", ... ({len(layers)} in all)" if len(layers) > limit else "")


def _example_layer(named: Sequence[tuple[str, nn.Module]]) -> str:
    return next((n for n, m in named if isinstance(m, _PRE_ACTIVATION_LAYERS)), "net.0")

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_ACTIVATIONS",
    "SATURATING",
    "UNIT_DIMS",
    "WatchedModule",
    "check_dead_unit_args",
    "find_watched_modules",
]
