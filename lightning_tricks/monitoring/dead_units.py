"""Dead and saturated units: forward hooks that record, per unit, whether it ever fired during an epoch.

CS231n: a ReLU unit "dies" when its input is negative for every example (a bad initialization, or a
too-high learning rate that knocks the weights into that region); it then gets no gradient and
never recovers, and "as much as 40% of your network can be dead". Sigmoid and tanh units saturate
(outputs pinned to the bounds) and stop passing gradient too.

* :func:`~lightning_tricks.monitoring.watched_modules.find_watched_modules` (in ``watched_modules.py``,
  re-exported here) finds the modules to watch and the dimension of their units.
* :class:`DeadUnitTracker` is the functional core, plain torch: forward hooks accumulate, on the
  activations' device and without any host synchronization, one "ever fired" bit per unit (and a
  saturated-position count for sigmoid/tanh), then :meth:`DeadUnitTracker.report` all-reduces them
  across DDP ranks and returns per-layer masks and fractions.
* :class:`~lightning_tricks.monitoring.dead_unit_monitor.DeadUnitMonitor` (in ``dead_unit_monitor.py``)
  is the Lightning callback: it tracks the training and/or validation
  passes per epoch, logs ``dead_units/<stage>/<layer>`` and ``dead_units/<stage>/overall``, warns above
  ``warn_fraction``, and draws a layers-by-epochs heat map.

A **unit** is a feature of a linear layer (the last dimension) and a channel of a convolution
(dimension 1). A unit is **dead** for the epoch when its output is ``<= threshold`` at every position
of every example seen (all batch and spatial positions) on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.distributed import all_reduce, is_distributed
from lightning_tricks.errors import NothingToMonitorError  # noqa: F401  (re-exported)
from lightning_tricks.monitoring.watched_modules import (  # noqa: F401  (re-exported: the public names stay here too)
    ACTIVATION_TYPES,
    DEFAULT_ACTIVATIONS,
    SATURATING,
    UNIT_DIMS,
    WatchedModule,
    check_dead_unit_args,
    find_watched_modules,
)


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

    For a ReLU-family module (or a pre-activation layer given in ``preactivation_layers``) a unit *fired* if its
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
        activations: activation kinds to watch (see :data:`ACTIVATION_TYPES`); ``[]`` to watch only
            ``preactivation_layers``.
        preactivation_layers: names or glob patterns of layers whose outputs go into a functional activation
            (``F.relu(self.bn1(x))`` -> ``"*.bn1"``).
        threshold: a unit fires when its output is ``> threshold`` (>= 0).
        unit_dim: ``"auto"`` (linear: last dimension; conv/norm: dimension 1; 3-D activations: last when the
            module follows a Linear/LayerNorm), ``"channel"`` or ``"last"``.
        saturation_eps: distance to the bounds that counts as saturated, in (0, 0.5).
        saturation_fraction: share of a unit's outputs that must be saturated, in (0, 1].
        owner: the name that starts error messages (the callback passes its own).
        layers: Deprecated: use ``preactivation_layers``.

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
        preactivation_layers: Sequence[str] = (),
        threshold: float = 0.0,
        unit_dim: str = "auto",
        saturation_eps: float = 0.01,
        saturation_fraction: float = 0.99,
        owner: str = "DeadUnitTracker",
        layers: Sequence[str] | None = None,
    ) -> None:
        activations, preactivation_layers = check_dead_unit_args(
            activations, preactivation_layers, threshold, unit_dim, saturation_eps, saturation_fraction, layers, owner)
        self.model = model
        self.threshold = float(threshold)
        self.saturation_eps = float(saturation_eps)
        self.saturation_fraction = float(saturation_fraction)
        self.watched = find_watched_modules(model, activations, preactivation_layers, unit_dim, owner)
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

    def state_dict(self) -> dict[str, Any]:
        """What was seen since the last :meth:`reset` (CPU tensors): a run resumed mid-epoch continues the tally."""
        return {"site_module": dict(self._site_module), "site_kind": dict(self._site_kind),
                "fired": {k: v.cpu() for k, v in self._fired.items()},
                "saturated": {k: v.cpu() for k, v in self._saturated.items()}, "positions": dict(self._positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the tally of :meth:`state_dict` (the tensors go to the model's device)."""
        self.reset()
        device = next(self.model.parameters(), torch.empty(0)).device
        self._site_module.update(state.get("site_module", {}))
        self._site_kind.update(state.get("site_kind", {}))
        self._fired.update({k: v.to(device) for k, v in state.get("fired", {}).items()})
        self._saturated.update({k: v.to(device) for k, v in state.get("saturated", {}).items()})
        self._positions.update(state.get("positions", {}))

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
            if watched.kind == "dead":  # per unit: has it fired (> threshold) at least once
                peak = out.amax(dim=reduce_dims) if reduce_dims else out
                tally, value = self._fired, peak > self.threshold
            else:  # per unit: how many of its outputs sat within eps of a bound
                eps = self.saturation_eps
                pinned = (out <= watched.saturation_low + eps) | (out >= watched.saturation_high - eps)
                tally, value = self._saturated, pinned.sum(dim=reduce_dims) if reduce_dims else pinned.long()
            seen = tally.get(site)
            if seen is None:
                self._register_site(site, watched)
                tally[site] = value
            else:
                self._check_units(site, seen, units)
                if seen.dtype == torch.bool:
                    seen |= value
                else:
                    seen += value
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


__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_ACTIVATIONS",
    "DeadUnitReport",
    "DeadUnitTracker",
    "NothingToMonitorError",
    "SiteReport",
    "WatchedModule",
    "check_dead_unit_args",
    "find_watched_modules",
]
