"""Dead and saturated units: forward hooks that record, per unit, whether it ever fired during an epoch.

CS231n: a ReLU unit "dies" when its input is negative for every example (a bad initialization, or a
too-high learning rate that knocks the weights into that region); it then gets no gradient and
never recovers, and "as much as 40% of your network can be dead". Sigmoid and tanh units saturate
(outputs pinned to the bounds) and stop passing gradient too.

* :class:`DeadUnitTracker` is the functional core, plain torch: forward hooks accumulate, on the
  activations' device and without any host synchronization, one "ever fired" bit per unit (and a
  saturated-position count for sigmoid/tanh), then :meth:`DeadUnitTracker.report` all-reduces them
  across DDP ranks and returns per-layer masks and fractions.
* :class:`DeadUnitMonitor` is the Lightning callback: it tracks the training and/or validation
  passes per epoch, logs ``dead_units/<layer>`` and ``dead_units/overall``, warns above
  ``warn_fraction``, and draws a layers-by-epochs heat map.

A **unit** is a feature of a linear layer (the last dimension) and a channel of a convolution
(dimension 1). A unit is **dead** for the epoch when its output is ``<= threshold`` at every position
of every example seen (all batch and spatial positions) on every rank.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_tricks._validation import (
    ConfigError,
    InvalidArgumentError,
    check_choice,
    check_non_negative,
    check_probability,
    check_range,
)
from lightning_tricks.distributed import all_reduce, is_distributed

# Activation kinds and the modules that implement them. Classes are matched with isinstance, and also by
# class name so that timm's own GELU/Sigmoid/Tanh/Swish classes are found.
ACTIVATION_TYPES: dict[str, tuple[tuple[type[nn.Module], ...], frozenset[str]]] = {
    "relu": ((nn.ReLU,), frozenset()),
    "relu6": ((nn.ReLU6,), frozenset()),
    "leaky_relu": ((nn.LeakyReLU,), frozenset()),
    "prelu": ((nn.PReLU,), frozenset()),
    "rrelu": ((nn.RReLU,), frozenset()),
    "elu": ((nn.ELU, nn.CELU, nn.SELU), frozenset()),
    "gelu": ((nn.GELU,), frozenset({"GELU", "GELUTanh", "QuickGELU"})),
    "silu": ((nn.SiLU,), frozenset({"SiLU", "Swish"})),
    "sigmoid": ((nn.Sigmoid,), frozenset({"Sigmoid"})),
    "tanh": ((nn.Tanh,), frozenset({"Tanh"})),
}
"""Activation names accepted by ``activations`` -> (module classes, class names)."""

SATURATING = frozenset({"sigmoid", "tanh"})
"""Kinds checked for saturation instead of death."""

DEFAULT_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "sigmoid", "tanh")
"""Monitored unless ``activations`` says otherwise (GELU/SiLU/ELU are opt-in: they are never exactly zero)."""

UNIT_DIMS = ("auto", "channel", "last")

_LAST_DIM_LAYERS = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)
_CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
_PRE_ACTIVATION_LAYERS = _LAST_DIM_LAYERS + _CHANNEL_LAYERS


class NothingToMonitorError(ConfigError, ValueError):
    """The model has no module the monitor can watch (raised at setup, with what was looked for)."""


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
        source: what selected it (``"activation:relu"`` or ``"layers"``).
    """

    name: str
    module: nn.Module
    kind: str
    saturation_low: float = 0.0
    saturation_high: float = 0.0
    dim_rule: str = "auto-channel"
    source: str = ""


def _activation_kind(module: nn.Module, names: Sequence[str]) -> str | None:
    for name in names:
        classes, class_names = ACTIVATION_TYPES[name]
        if isinstance(module, classes) or type(module).__name__ in class_names:
            return name
    return None


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


def find_watched_modules(
    model: nn.Module,
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
    layers: Sequence[str] = (),
    unit_dim: str = "auto",
    owner: str = "find_watched_modules",
) -> list[WatchedModule]:
    """The modules a :class:`DeadUnitTracker` watches, in registration order.

    Args:
        model: the model to search.
        activations: activation kinds to find (keys of :data:`ACTIVATION_TYPES`).
        layers: module names or ``fnmatch`` patterns (``"*.bn1"``) of layers whose *outputs* are the
            pre-activations of a functional ReLU (``F.relu(layer(x))``): a unit is alive when its
            pre-activation is ``> threshold`` somewhere.
        unit_dim: ``"auto"``, ``"channel"`` (dimension 1) or ``"last"``.
        owner: the name that starts the error messages.

    Raises:
        NothingToMonitorError: a ``layers`` pattern that matches no module, or nothing found at all,
            with the candidates and the fix.
    """
    for name in activations:
        check_choice("activations", name, ACTIVATION_TYPES)
    check_choice("unit_dim", unit_dim, UNIT_DIMS)
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
    for pattern in layers:
        matches = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise NothingToMonitorError(
                f"{owner}: `layers` pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"pre-activation layers there: {_candidates(named)}."
            )
        for name, module in matches:
            rule = unit_dim if unit_dim != "auto" else (_layer_dim_rule(module) or "auto-channel")
            found[name] = WatchedModule(name, module, "dead", dim_rule=rule, source="layers")
    if not found:
        raise NothingToMonitorError(
            f"{owner} found nothing to monitor in {type(model).__name__}: no module of the kinds activations="
            f"{list(activations)} ({_class_list(activations)}) and no `layers` named. If the model applies "
            f"F.relu (or another activation) functionally, name the layers whose outputs feed it, e.g. "
            f"layers=['{_example_layer(named)}']; pre-activation layers there: {_candidates(named)}."
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


def _unit_dim(rule: str, ndim: int) -> int:
    if ndim <= 1:
        return 0
    if rule == "channel":
        return 1
    if rule == "last":
        return ndim - 1
    if ndim == 2:
        return 1
    if ndim == 3:
        return 2 if rule == "auto-last" else 1
    return 1


@dataclass(frozen=True)
class SiteReport:
    """One monitored site (a module, or one call of a module called several times per forward).

    Attributes:
        name: ``module`` for its first call in a forward, ``module#k`` for its k-th call.
        module: the module's name in the model.
        kind: ``"dead"`` or ``"saturation"``.
        flagged: bool per unit, on the CPU: dead (``kind="dead"``) or saturated.
        positions: outputs seen per unit (examples x spatial positions, summed over ranks).
    """

    name: str
    module: str
    kind: str
    flagged: torch.Tensor
    positions: int

    @property
    def units(self) -> int:
        return int(self.flagged.numel())

    @property
    def count(self) -> int:
        """Number of dead (or saturated) units."""
        return int(self.flagged.sum())

    @property
    def fraction(self) -> float:
        return self.count / self.units if self.units else math.nan


@dataclass(frozen=True)
class DeadUnitReport:
    """What a :class:`DeadUnitTracker` saw since its last reset, identical on every rank.

    Attributes:
        sites: site name -> :class:`SiteReport`, in first-call order.
        never_called: watched modules that produced no output in this period (not counted).
    """

    sites: dict[str, SiteReport]
    never_called: list[str] = field(default_factory=list)

    def _total(self, kind: str) -> tuple[int, int]:
        chosen = [s for s in self.sites.values() if s.kind == kind]
        return sum(s.count for s in chosen), sum(s.units for s in chosen)

    @property
    def dead_units(self) -> int:
        return self._total("dead")[0]

    @property
    def dead_fraction(self) -> float:
        """Dead units over all units of the ReLU-family / pre-activation sites (NaN if there are none)."""
        dead, units = self._total("dead")
        return dead / units if units else math.nan

    @property
    def saturated_fraction(self) -> float:
        """Saturated units over all units of the sigmoid/tanh sites (NaN if there are none)."""
        saturated, units = self._total("saturation")
        return saturated / units if units else math.nan

    def fractions(self, kind: str = "dead") -> dict[str, float]:
        """Site name -> fraction of its units dead (``kind="dead"``) or saturated."""
        return {n: s.fraction for n, s in self.sites.items() if s.kind == kind}


class DeadUnitTracker:
    """Forward hooks that record which units fire, per unit, over any number of forward passes.

    For a ReLU-family module (or a pre-activation layer given in ``layers``) a unit *fired* if its
    output was ``> threshold`` at least once; units that never fired are dead. For sigmoid/tanh a
    unit is *saturated* when at least ``saturation_fraction`` of its outputs lie within
    ``saturation_eps`` of the bounds (0 and 1 for sigmoid, -1 and 1 for tanh). The hooks only run
    tensor reductions on the activations' device: nothing is synchronized with the host until
    :meth:`report`.

    A module called several times in one forward (torchvision's ``BasicBlock`` applies its single
    ``self.relu`` twice) is tracked as separate sites, ``name`` and ``name#2``: each call sees a
    different tensor, and merging them would hide a unit dead at one place behind the same unit alive
    at the other. Calls are counted from the start of each forward of ``model`` (a forward pre-hook on
    it); call :meth:`new_pass` yourself if you run the submodules without calling ``model``.

    Args:
        model: the model; the hooks go on its submodules.
        activations: activation kinds to watch (see :data:`ACTIVATION_TYPES`); ``[]`` to watch only ``layers``.
        layers: names or ``fnmatch`` patterns of layers whose outputs go into a functional activation
            (``F.relu(self.bn1(x))`` -> ``"*.bn1"``).
        threshold: a unit fires when its output is ``> threshold`` (>= 0).
        unit_dim: ``"auto"`` (linear: last dimension; conv/norm: dimension 1; 3-D activations: last when the
            module follows a Linear/LayerNorm), ``"channel"`` or ``"last"``.
        saturation_eps: distance to the bounds that counts as saturated, in (0, 0.5).
        saturation_fraction: share of a unit's outputs that must be saturated, in (0, 1].
        owner: the name that starts error messages (the callback passes its own).

    Raises:
        InvalidArgumentError: an argument out of range.
        NothingToMonitorError: nothing to watch in ``model``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with DeadUnitTracker(model) as tracker:
        ...     _ = model(torch.randn(16, 4))
        >>> report = tracker.report()
        >>> report.sites["1"].units
        8
    """

    def __init__(
        self,
        model: nn.Module,
        activations: Sequence[str] = DEFAULT_ACTIVATIONS,
        layers: Sequence[str] = (),
        threshold: float = 0.0,
        unit_dim: str = "auto",
        saturation_eps: float = 0.01,
        saturation_fraction: float = 0.99,
        owner: str = "DeadUnitTracker",
    ) -> None:
        check_non_negative("threshold", threshold)
        check_range("saturation_eps", saturation_eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
        check_range("saturation_fraction", saturation_fraction, 0.0, 1.0, low_inclusive=False)
        self.model = model
        self.threshold = float(threshold)
        self.saturation_eps = float(saturation_eps)
        self.saturation_fraction = float(saturation_fraction)
        self.watched = find_watched_modules(model, activations, layers, unit_dim, owner)
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._site_module: dict[str, str] = {}
        self._site_kind: dict[str, str] = {}
        self._fired: dict[str, torch.Tensor] = {}
        self._saturated: dict[str, torch.Tensor] = {}
        self._positions: dict[str, int] = {}

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> DeadUnitTracker:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(lambda *_: self.new_pass()))
            for watched in self.watched:
                self._handles.append(watched.module.register_forward_hook(self._make_hook(watched)))
        return self

    def detach(self) -> None:
        """Remove every hook; the accumulated counts stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> DeadUnitTracker:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def new_pass(self) -> None:
        """Start a new forward: the next call of each module is its first call again."""
        self._calls.clear()

    def reset(self) -> None:
        """Forget everything seen so far (start of an epoch)."""
        self._calls.clear()
        self._site_module.clear()
        self._site_kind.clear()
        self._fired.clear()
        self._saturated.clear()
        self._positions.clear()

    def _make_hook(self, watched: WatchedModule) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.enabled:
                self.observe(watched, output)

        return hook

    def observe(self, watched: WatchedModule, output: Any) -> None:
        """Record one output of ``watched`` (what the hook does; public for custom wiring)."""
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.ndim == 0:
            return
        call = self._calls.get(watched.name, 0)
        self._calls[watched.name] = call + 1
        site = watched.name if call == 0 else f"{watched.name}#{call + 1}"
        dim = _unit_dim(watched.dim_rule, output.ndim)
        reduce_dims = [d for d in range(output.ndim) if d != dim]
        units = output.shape[dim]
        with torch.no_grad():
            out = output.detach()
            if watched.kind == "dead":
                peak = out.amax(dim=reduce_dims) if reduce_dims else out
                fired = peak > self.threshold
                seen = self._fired.get(site)
                if seen is None:
                    self._register_site(site, watched)
                    self._fired[site] = fired
                else:
                    self._check_units(site, seen, units)
                    seen |= fired
            else:
                eps = self.saturation_eps
                pinned = (out <= watched.saturation_low + eps) | (out >= watched.saturation_high - eps)
                counts = pinned.sum(dim=reduce_dims) if reduce_dims else pinned.long()
                seen = self._saturated.get(site)
                if seen is None:
                    self._register_site(site, watched)
                    self._saturated[site] = counts
                else:
                    self._check_units(site, seen, units)
                    seen += counts
        self._positions[site] = self._positions.get(site, 0) + out.numel() // max(units, 1)

    def _register_site(self, site: str, watched: WatchedModule) -> None:
        self._site_module[site] = watched.name
        self._site_kind[site] = watched.kind

    @staticmethod
    def _check_units(site: str, seen: torch.Tensor, units: int) -> None:
        if seen.numel() != units:
            raise RuntimeError(
                f"DeadUnitTracker: site {site!r} had {seen.numel()} units and now outputs {units}; a unit must keep "
                "its place. Set unit_dim='channel' or 'last' to pick the unit dimension."
            )

    # -- results -------------------------------------------------------------------------------
    def report(self, sync: bool = True) -> DeadUnitReport:
        """Per-site masks and fractions since the last :meth:`reset`.

        Under DDP (``sync=True``) this is a collective that every rank must call: a unit is alive if
        it fired on any rank (all-reduce max of the fired bits) and saturation counts are summed, so
        every rank gets the same report. Without a process group it is local.

        Raises:
            RuntimeError: the ranks saw different sites (a model that differs between ranks).
        """
        sites = sorted(self._site_kind)
        dead_sites = [s for s in sites if self._site_kind[s] == "dead"]
        sat_sites = [s for s in sites if self._site_kind[s] == "saturation"]
        fired = [self._fired[s] for s in dead_sites]
        saturated = [self._saturated[s] for s in sat_sites]
        device = (fired + saturated)[0].device if fired or saturated else torch.device("cpu")
        positions = torch.tensor([self._positions[s] for s in sites], dtype=torch.long, device=device)
        if sync and is_distributed():
            units = sum(t.numel() for t in fired + saturated)
            shape = torch.tensor([len(dead_sites), len(sat_sites), units], dtype=torch.long, device=device)
            both = all_reduce(torch.cat([shape, -shape]), "max")
            if not both[:3].any():  # no rank saw anything: nothing to reduce
                return DeadUnitReport({}, [w.name for w in self.watched])
            if not torch.equal(both[:3], -both[3:]):
                raise RuntimeError(
                    "DeadUnitTracker: the ranks saw different sites (dead sites, saturation sites, units from "
                    f"{(-both[3:]).tolist()} to {both[:3].tolist()}); every rank must run the same model."
                )
            if fired:
                flat = all_reduce(torch.cat(fired).to(torch.uint8), "max").bool()
                fired = list(flat.split([t.numel() for t in fired]))
            counts = all_reduce(torch.cat([*saturated, positions]), "sum")
            saturated = list(counts[: counts.numel() - len(sites)].split([t.numel() for t in saturated]))
            positions = counts[counts.numel() - len(sites):]
        total = dict(zip(sites, positions.tolist(), strict=True))
        flagged = {s: ~f.cpu() for s, f in zip(dead_sites, fired, strict=True)}
        for site, count in zip(sat_sites, saturated, strict=True):
            flagged[site] = count.cpu() >= self.saturation_fraction * total[site]
        order = {w.name: i for i, w in enumerate(self.watched)}

        def key(site: str) -> tuple[int, int]:
            module, _, call = site.partition("#")
            return order[module], int(call or 1)

        reports = {s: SiteReport(s, self._site_module[s], self._site_kind[s], flagged[s], int(total[s]))
                   for s in sorted(sites, key=key)}
        seen_modules = set(self._site_module.values())
        return DeadUnitReport(reports, [w.name for w in self.watched if w.name not in seen_modules])


STAGES = ("train", "validation", "both")


def _none_if_nan(value: float) -> float | None:
    """History holds None, not NaN, so that records compare equal after a checkpoint round trip."""
    return None if math.isnan(value) else value


class DeadUnitMonitor(Callback):
    """Log, per layer and per epoch, the fraction of dead ReLU units (and saturated sigmoid/tanh units).

    A unit (a feature of a linear layer, a channel of a convolution) is dead for the epoch when its
    output was ``<= threshold`` for every example and position of the epoch, on every DDP rank.
    ReLU-family modules are found automatically; for a model that calls ``F.relu`` functionally,
    name the layers whose outputs feed it in ``layers`` (pre-activation mode: alive when
    ``> threshold``). For ``LeakyReLU``/``PReLU``/``RReLU`` "dead" means the unit stayed in the
    negative-slope region (its output never exceeded the threshold): it still passes a gradient scaled
    by the slope, but it is a linear unit. Per epoch it logs ``dead_units/<layer>`` and
    ``dead_units/overall`` (validation pass: ``val_dead_units/...``), ``saturated_units/...`` for
    sigmoid/tanh layers, warns on rank zero when the overall fraction exceeds ``warn_fraction``, and
    at the end of fit draws a layers x epochs heat map (PNG file, and into loggers that take images).

    The hooks reduce each activation to one value per unit on its device and never synchronize with
    the host; the per-unit bits are all-reduced once per epoch. Hooks are registered at the start of
    fit (after ``configure_model``) and removed at its end.

    Args:
        activations: activation kinds to find: ``relu``, ``relu6``, ``leaky_relu``, ``prelu``, ``rrelu``,
            ``elu``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``. Default: relu, relu6, leaky_relu, sigmoid, tanh.
            ``[]`` watches only ``layers``.
        layers: names or ``fnmatch`` patterns (``"*.bn1"``) of conv/linear/norm layers whose outputs go into a
            functional activation (pre-activation mode).
        threshold: a unit fires when its output is ``> threshold``; >= 0.
        warn_fraction: warn when the overall dead (or saturated) fraction exceeds it; in [0, 1].
            Default 0.1, as keras-contrib's ``DeadReluDetector``.
        stages: ``"train"``, ``"validation"`` or ``"both"``: the passes to track, each with its own epoch count.
        unit_dim: ``"auto"``, ``"channel"`` (dimension 1) or ``"last"``.
        saturation_eps: distance from the bounds that counts as saturated; in (0, 0.5).
        saturation_fraction: share of a unit's outputs within ``saturation_eps`` of the bounds for it to count
            as saturated; in (0, 1].
        log_per_layer: log one metric per layer besides the overall fraction.
        plot: draw the heat map at the end of fit (rank zero).
        plot_dir: folder of the PNG; default the logger's ``log_dir``, else the trainer's ``default_root_dir``.

    Raises:
        InvalidArgumentError: an argument out of range.
        NothingToMonitorError: at the start of fit, when the model has nothing to monitor (the message
            lists the conv/linear/norm layers to name in ``layers``).

    Examples:
        >>> monitor = DeadUnitMonitor(warn_fraction=0.2)
        >>> trainer = pl.Trainer(callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> monitor.history["train"][-1]["overall"]  # doctest: +SKIP
        0.03
    """

    def __init__(
        self,
        activations: list[str] | None = None,
        layers: list[str] | None = None,
        threshold: float = 0.0,
        warn_fraction: float = 0.1,
        stages: str = "train",
        unit_dim: str = "auto",
        saturation_eps: float = 0.01,
        saturation_fraction: float = 0.99,
        log_per_layer: bool = True,
        plot: bool = True,
        plot_dir: str | None = None,
    ) -> None:
        self.activations = list(DEFAULT_ACTIVATIONS if activations is None else activations)
        for name in self.activations:
            check_choice("activations", name, ACTIVATION_TYPES)
        self.layers = list(layers or [])
        for pattern in self.layers:
            if not isinstance(pattern, str) or not pattern:
                raise InvalidArgumentError(f"`layers`={layers!r} is invalid: expected a list of module names or patterns.")
        if not self.activations and not self.layers:
            raise InvalidArgumentError("`activations`=[] is invalid: expected activation kinds, or `layers` to watch.")
        check_non_negative("threshold", threshold)
        check_probability("warn_fraction", warn_fraction)
        check_choice("stages", stages, STAGES)
        check_choice("unit_dim", unit_dim, UNIT_DIMS)
        check_range("saturation_eps", saturation_eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
        check_range("saturation_fraction", saturation_fraction, 0.0, 1.0, low_inclusive=False)
        self.threshold, self.warn_fraction, self.stages, self.unit_dim = threshold, warn_fraction, stages, unit_dim
        self.saturation_eps, self.saturation_fraction = saturation_eps, saturation_fraction
        self.log_per_layer, self.plot, self.plot_dir = log_per_layer, plot, plot_dir
        self.trackers: dict[str, DeadUnitTracker] = {}
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
        self.last_report: dict[str, DeadUnitReport] = {}
        self.heatmap_paths: list[Path] = []
        self._train_epoch_closed = False
        self._warned: dict[str, bool] = {}
        self._plot_folder: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(stages=self.stages, activations=self.activations, layers=self.layers)

    def _tracked(self, stage: str) -> bool:
        return self.stages in (stage, "both")

    # -- setup and teardown ---------------------------------------------------------------------
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trackers:
            return
        stages = ("train", "validation") if trainer.state.fn == "fit" else ("validation",)
        for stage in stages:
            if self._tracked(stage):
                tracker = DeadUnitTracker(pl_module, self.activations, self.layers, self.threshold, self.unit_dim,
                                          self.saturation_eps, self.saturation_fraction, owner="DeadUnitMonitor")
                tracker.enabled = False
                self.trackers[stage] = tracker.attach()
        if self.plot:  # trainer.log_dir broadcasts under DDP: resolve it here, on every rank
            self._plot_folder = Path(self.plot_dir or trainer.log_dir or trainer.default_root_dir)

    def _detach(self) -> None:
        for tracker in self.trackers.values():
            tracker.detach()
        self.trackers.clear()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and self._tracked("validation"):
            self._attach(trainer, pl_module)  # trainer.validate(): no on_fit_start

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        if self.plot and trainer.is_global_zero:
            self._draw(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    # -- switching between passes ---------------------------------------------------------------
    def _start(self, stage: str) -> None:
        tracker = self.trackers.get(stage)
        if tracker is not None:
            tracker.reset()
            tracker.enabled = True

    def _pause(self, stage: str) -> None:
        if stage in self.trackers:
            self.trackers[stage].enabled = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_epoch_closed = False
        self._start("train")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if "train" in self.trackers:
            self.trackers["train"].new_pass()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("train")
        if trainer.sanity_checking:
            return
        # Validation at the end of a training epoch runs before on_train_epoch_end, and a ModelCheckpoint
        # monitoring a validation metric may save right after it (check_val_every_n_epoch > 1): close the
        # training epoch first, so that the checkpoint holds its figures.
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.state.fn == "fit" and epoch_loop.batch_progress.is_last_batch:
            self._finish(trainer, pl_module, "train")
        self._start("validation")

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if "validation" in self.trackers:
            self.trackers["validation"].new_pass()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "validation")
        self._pause("validation")
        if trainer.state.fn == "fit" and "train" in self.trackers and not self._train_epoch_closed:
            self.trackers["train"].enabled = True  # validation in the middle of a training epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "train")

    # -- per-epoch results ---------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        tracker = self.trackers.get(stage)
        epoch = trainer.current_epoch
        if tracker is None or (stage == "train" and self._train_epoch_closed):
            return
        if stage == "train":
            self._train_epoch_closed = True  # closed at validation start or at the epoch's end, not both
        tracker.enabled = False
        report = tracker.report()  # all ranks reach here: collective
        if not report.sites:
            return
        self.last_report[stage] = report
        record = {"epoch": epoch, "overall": _none_if_nan(report.dead_fraction),
                  "saturated_overall": _none_if_nan(report.saturated_fraction),
                  "dead": report.fractions("dead"), "saturated": report.fractions("saturation")}
        self.history[stage].append(record)
        self._log(pl_module, stage, report)
        self._warn(stage, epoch, report)

    def _log(self, pl_module: pl.LightningModule, stage: str, report: DeadUnitReport) -> None:
        prefix = "" if stage == "train" else "val_"
        metrics: dict[str, float] = {}
        for kind, key, overall in (("dead", "dead_units", report.dead_fraction),
                                   ("saturation", "saturated_units", report.saturated_fraction)):
            if math.isnan(overall):
                continue
            metrics[f"{prefix}{key}/overall"] = overall
            if self.log_per_layer:
                metrics.update({f"{prefix}{key}/{site}": f for site, f in report.fractions(kind).items()})
        # Already identical on every rank; sync_dist with "max" is exact and silences Lightning's per-key DDP warning.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def _warn(self, stage: str, epoch: int, report: DeadUnitReport) -> None:
        for kind, overall, what in (("dead", report.dead_fraction, "dead"),
                                    ("saturation", report.saturated_fraction, "saturated")):
            key = f"{stage}:{kind}"
            above = not math.isnan(overall) and overall > self.warn_fraction
            if above and not self._warned.get(key):
                worst = sorted(report.fractions(kind).items(), key=lambda kv: -kv[1])[:5]
                advice = ("A too-high learning rate or a bad initialization kills ReLUs (CS231n): lower the learning "
                          "rate, check the init (He for ReLU), or add normalization." if kind == "dead" else
                          "Saturated units pass almost no gradient: normalize inputs, use a smaller init, or ReLU.")
                units = sum(s.units for s in report.sites.values() if s.kind == kind)
                rank_zero_warn(
                    f"DeadUnitMonitor: {100 * overall:.1f}% of {units} units are {what} after epoch {epoch} "
                    f"({stage} pass), above warn_fraction={self.warn_fraction}. Worst layers: "
                    + ", ".join(f"{n} {100 * f:.0f}%" for n, f in worst) + f". {advice}"
                )
            self._warned[key] = above
        if report.never_called and epoch == self.history[stage][0]["epoch"]:
            rank_zero_warn(f"DeadUnitMonitor: {', '.join(report.never_called)} produced no output in the {stage} "
                           f"pass of epoch {epoch} and are not counted.")

    # -- heat map --------------------------------------------------------------------------------
    def heatmap(self, stage: str = "train") -> Any:
        """The layers x epochs figure of ``stage`` (dead fractions; saturated fractions for sigmoid/tanh rows).

        Raises:
            ValueError: no epoch of ``stage`` was recorded.
        """
        from lightning_tricks.monitoring.plots import dead_unit_heatmap

        records = self.history[stage]
        if not records:
            raise ValueError(f"no {stage} epoch has been recorded yet.")
        rows: dict[str, list[float]] = {}
        for kind, suffix in (("dead", ""), ("saturated", " [saturated]")):
            for record in records:
                for site in record[kind]:
                    rows.setdefault(site + suffix, [])
        for row in rows:
            kind, site = ("saturated", row.removesuffix(" [saturated]")) if row.endswith(" [saturated]") else ("dead", row)
            rows[row] = [record[kind].get(site, math.nan) for record in records]
        last = records[-1]["overall"]
        title = f"Dead units per layer ({stage} pass)"
        if last is not None:
            title += f"; overall {100 * last:.1f}% at epoch {records[-1]['epoch']}"
        return dead_unit_heatmap(rows, [record["epoch"] for record in records], title=title,
                                 colorbar_label="dead (saturated) fraction")

    def _draw(self, trainer: pl.Trainer) -> None:
        from lightning_tricks.monitoring.plots import log_figure, save_figure

        folder = self._plot_folder or Path(trainer.default_root_dir)
        for stage, records in self.history.items():
            if not records:
                continue
            figure = self.heatmap(stage)
            path = save_figure(figure, folder / f"dead_units_{stage}.png")
            self.heatmap_paths.append(path)
            taken = log_figure(trainer.loggers, f"dead_units/heatmap_{stage}", figure, trainer.global_step)
            where = f"sent to {', '.join(taken)} and " if taken else ""
            rank_zero_info(f"DeadUnitMonitor: heat map {where}saved to {path}")

    # -- checkpoint --------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {"train": [], "validation": [], **state_dict.get("history", {})}


__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_ACTIVATIONS",
    "DeadUnitMonitor",
    "DeadUnitReport",
    "DeadUnitTracker",
    "NothingToMonitorError",
    "SiteReport",
    "WatchedModule",
    "find_watched_modules",
]
