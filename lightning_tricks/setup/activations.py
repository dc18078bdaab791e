"""Swap a model's activation functions by kind or by name, keeping every module name.

CS231n: "use ReLU; try Leaky ReLU / PReLU / ELU / SELU / GELU for the last 0.1%; never sigmoid". Trying
that on a model you did not write means finding its activation modules and replacing them without
breaking its checkpoints. :func:`swap_activations` does that on any ``nn.Module`` (zoo, torchvision,
timm, your own) and :class:`~lightning_tricks.setup.activation_swap.ActivationSwap` is the Lightning callback.

* **Names kept.** An activation module is replaced at the same qualified name, so ``state_dict`` keys
  are unchanged, apart from the new learnable slopes of ``prelu`` (``<name>.weight``), which are trained
  and saved like any other parameter, and one marker buffer per swapped module (below).
* **Checkpoints carry the swap.** The swapped network evaluates differently from the plain one, so each
  swapped module holds the marker buffer ``lightning_tricks_ActivationSwap`` (target, replaced kind,
  slope, alpha, PReLU channels; :func:`lightning_tricks.core.surgery.mark`) and the callback records itself in
  every checkpoint, as the structural regularizers do (:mod:`lightning_tricks.checkpoint`): our loaders
  rebuild the swap, and a plain strict ``MyModule.load_from_checkpoint`` fails naming the trick instead of
  evaluating ReLUs.
* **Functional calls are reported.** A model that calls ``F.relu`` in ``forward`` has no module to
  replace. :func:`find_functional_activations` runs one forward pass under a ``TorchFunctionMode`` and
  lists the functional calls of the requested kinds made outside activation modules, with the
  ``forward`` that made them; the callback fails (nothing to swap) or warns (some calls stay) in one line.
* **Init follows.** A replacement module records the gain its activation needs (``init_gain``:
  leaky_relu/prelu -> leaky ReLU gain with the slope, ELU/GELU/SiLU -> ReLU's, SELU -> gain 1, i.e.
  LeCun normal), which :class:`~lightning_tricks.WeightInit` uses when its ``nonlinearity`` is not given.

The activation kinds and the forward trace live in :mod:`lightning_tricks.setup.activation_trace` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.deprecation import REMOVED_IN, register_renames, renamed_argument, warn_deprecated
from lightning_tricks.core.selection import check_patterns, name_matches, select
from lightning_tricks.core.surgery import (
    MARKER_PREFIX,
    ModelNotSupportedError,
    SurgeryReport,
    mark,
    marker_values,
)
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_range,
)
from lightning_tricks.setup.activation_trace import (
    KINDS,
    ForwardTrace,
    activation_kind,
    find_functional_activations,
    trace_forward,
)

TARGETS = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid")
"""Activations a model can be given (``to``); relu, tanh and sigmoid serve the lectures' comparisons."""

_SLOPE_TARGETS = ("leaky_relu", "prelu")
_DEFAULT_SLOPE = {"leaky_relu": 0.01, "prelu": 0.25}
_INPLACE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.ReLU6)


@dataclass(frozen=True)
class SwapSpec:
    """A validated swap request: what to replace, with what, where. Built by :func:`resolve_swap`.

    Attributes:
        to: the new activation.
        activations: the kinds replaced (keys of :data:`KINDS`).
        slope: the slope of ``leaky_relu``/``prelu`` (0 otherwise).
        alpha: ELU's alpha.
        include: glob patterns on module names the swap is restricted to (None: every module).
        exclude: patterns of the modules left alone (None: none).
    """

    to: str
    activations: tuple[str, ...]
    slope: float
    alpha: float
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None = None

    @property
    def replace(self) -> tuple[str, ...]:
        """Deprecated: use :attr:`activations`."""
        warn_deprecated("SwapSpec.replace is renamed SwapSpec.activations (the old name is accepted until "
                      f"lightning-tricks {REMOVED_IN}).")
        return self.activations

    @property
    def layers(self) -> tuple[str, ...] | None:
        """Deprecated: use :attr:`include`."""
        warn_deprecated("SwapSpec.layers is renamed SwapSpec.include (the old name is accepted until "
                      f"lightning-tricks {REMOVED_IN}).")
        return self.include

    def selects(self, name: str) -> bool:
        """Whether ``include``/``exclude`` keep the module called ``name`` (the package's selector rule)."""
        return ((self.include is None or any(name_matches(name, p) for p in self.include))
                and not any(name_matches(name, p) for p in self.exclude or ()))

    @property
    def init_gain(self) -> tuple[str, float]:
        """``(nonlinearity, negative_slope)`` for ``torch.nn.init.calculate_gain`` of the new activation."""
        if self.to in _SLOPE_TARGETS:
            return "leaky_relu", self.slope
        if self.to == "selu":
            return "linear", 0.0  # LeCun normal (Klambauer et al. 2017); torch's selu gain 3/4 is for another use
        if self.to in ("tanh", "sigmoid"):
            return self.to, 0.0
        return "relu", 0.0  # relu, and ELU/GELU/SiLU, which are ReLU-like for positive inputs (He init)

    def describe(self) -> str:
        extra = f"(slope {self.slope})" if self.to in _SLOPE_TARGETS else f"(alpha {self.alpha})" if self.to == "elu" else ""
        return f"{'/'.join(self.activations)} -> {self.to}{extra}"


RENAMES = {"replace": "activations", "layers": "include"}
"""The arguments of :class:`ActivationSwap`, :func:`swap_activations` and :func:`resolve_swap` renamed per the
glossary (old name -> new name)."""
for _owner in ("ActivationSwap", "swap_activations", "resolve_swap"):
    register_renames(_owner, RENAMES)


def resolve_swap(to: str, activations: Sequence[str] | None = None, slope: float | None = None,
                 alpha: float | None = None, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, *, replace: Sequence[str] | None = None,
                 layers: Sequence[str] | None = None) -> SwapSpec:
    """Validate the arguments of :func:`swap_activations` / :class:`ActivationSwap` (one line per error).

    ``replace`` and ``layers`` are the deprecated names of ``activations`` and ``include``.

    Raises:
        InvalidArgumentError: an unknown activation name, a slope outside [0, 1) or given to an activation
            without one, ``alpha <= 0`` or given to another activation than ELU, an empty pattern list, or an
            argument given under both its old and its new name.
    """
    activations = renamed_argument("ActivationSwap", "replace", "activations", replace, activations, None)
    include = renamed_argument("ActivationSwap", "layers", "include", layers, include, None)
    check_choice("to", to, TARGETS)
    kinds = ["relu"] if activations is None else activations
    if isinstance(kinds, str) or not kinds:
        raise InvalidArgumentError(f"`activations`={activations!r} is invalid: expected a non-empty list of activation "
                                   f"kinds from {', '.join(KINDS)}.")
    for kind in kinds:
        check_choice("activations", kind, KINDS)
    if slope is not None and to not in _SLOPE_TARGETS:
        raise InvalidArgumentError(f"`slope`={slope!r} is invalid with to={to!r}: only leaky_relu and prelu have a "
                                   "slope; remove it.")
    if to in _SLOPE_TARGETS:
        slope = check_range("slope", _DEFAULT_SLOPE[to] if slope is None else slope, 0.0, 1.0, high_inclusive=False)
    if alpha is not None and to != "elu":
        raise InvalidArgumentError(f"`alpha`={alpha!r} is invalid with to={to!r}: only elu has an alpha; remove it.")
    alpha = check_range("alpha", 1.0 if alpha is None else alpha, 0.0, None, low_inclusive=False)
    patterns = check_patterns("include", include)
    excluded = check_patterns("exclude", exclude, allow_empty=True)
    return SwapSpec(to, tuple(dict.fromkeys(kinds)), float(slope or 0.0), float(alpha),
                    None if patterns is None else tuple(patterns), tuple(excluded) if excluded else None)


def make_activation(spec: SwapSpec, old: nn.Module | None = None, channels: int = 1) -> nn.Module:
    """The replacement module (``inplace`` carried over where both support it), tagged with ``init_gain``."""
    inplace = bool(getattr(old, "inplace", False))
    to = spec.to
    if to == "prelu":
        new: nn.Module = nn.PReLU(num_parameters=channels, init=spec.slope)
    elif to == "leaky_relu":
        new = nn.LeakyReLU(spec.slope, inplace=inplace)
    elif to == "elu":
        new = nn.ELU(spec.alpha, inplace=inplace)
    else:
        cls = {"relu": nn.ReLU, "selu": nn.SELU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid}[to]
        new = cls(inplace=inplace) if issubclass(cls, _INPLACE) else cls()
    # read by WeightInit (lightning_tricks.init.schemes.follow_activations) when its nonlinearity is not given
    new.init_gain = spec.init_gain  # type: ignore[assignment]
    return new


_MARKER = "ActivationSwap"
_MARKER_KINDS = "iiffi"  # target, replaced kind (indices into TARGETS and KINDS), slope, alpha, PReLU channels


def mark_swapped(module: nn.Module, spec: SwapSpec, replaced_kind: str) -> None:
    """Give a swapped-in module the marker buffer ``lightning_tricks_ActivationSwap`` (see :func:`~lightning_tricks.core.surgery.mark`).

    A checkpoint of the swapped model then fails to load strictly into the plain one, naming the trick, and a
    checkpoint without callback records (``save_weights_only``) is rebuilt from the values
    (:func:`swap_marker_values`).

    Args:
        module: the new activation module (from :func:`make_activation`).
        spec: the swap that made it.
        replaced_kind: the kind of the module it replaced (a key of :data:`KINDS`).

    Examples:
        >>> spec = resolve_swap("leaky_relu", slope=0.2)
        >>> act = make_activation(spec)
        >>> mark_swapped(act, spec, "relu")
        >>> swap_marker_values(act.lightning_tricks_ActivationSwap)
        ('leaky_relu', 'relu', 0.2, 1.0, 0)
    """
    mark(module, _MARKER, [TARGETS.index(spec.to), list(KINDS).index(replaced_kind), spec.slope, spec.alpha,
                           int(getattr(module, "num_parameters", 0))])


def swap_marker_values(marker: torch.Tensor) -> tuple[str, str, float, float, int]:
    """``(to, replaced kind, slope, alpha, PReLU channels)`` from a marker written by :func:`mark_swapped`.

    Args:
        marker: the buffer ``lightning_tricks_ActivationSwap`` (from a module or a checkpoint's ``state_dict``).

    Examples:
        >>> spec = resolve_swap("elu", alpha=0.5)
        >>> act = make_activation(spec)
        >>> mark_swapped(act, spec, "gelu")
        >>> swap_marker_values(act.lightning_tricks_ActivationSwap)[:2]
        ('elu', 'gelu')
    """
    to, kind, slope, alpha, channels = marker_values(marker, _MARKER_KINDS)
    return TARGETS[int(to)], list(KINDS)[int(kind)], float(slope), float(alpha), int(channels)


def set_prelu_channels(module: nn.Module, channels: int) -> None:
    """Size a swapped-in PReLU as a checkpoint's (whose slopes then load into it); other modules are left alone.

    Args:
        module: a module marked by :func:`mark_swapped`.
        channels: the number of slopes (``num_parameters``) the checkpoint holds for it.

    Examples:
        >>> spec = resolve_swap("prelu")
        >>> prelu = make_activation(spec)
        >>> mark_swapped(prelu, spec, "relu")
        >>> set_prelu_channels(prelu, 16)
        >>> prelu.weight.shape, swap_marker_values(prelu.lightning_tricks_ActivationSwap)[4]
        (torch.Size([16]), 16)
    """
    if not isinstance(module, nn.PReLU) or module.num_parameters == channels:
        return
    weight = module.weight
    module.weight = nn.Parameter(weight.detach()[:1].expand(channels).clone())
    module.num_parameters = channels
    getattr(module, MARKER_PREFIX + _MARKER)[4] = channels  # the marker's channel count (see mark_swapped)


# --------------------------------------------------------------------------------------------- swapping


def _not_found(model: nn.Module, spec: SwapSpec, trace: ForwardTrace | None) -> ModelNotSupportedError:
    present = sorted({type(m).__name__ for m in model.modules() if activation_kind(m) is not None})
    calls = trace.functional_summary() if trace is not None else ""
    seen = f"; one forward pass found {calls}" if calls else ""
    return ModelNotSupportedError(
        f"ActivationSwap found no {'/'.join(spec.activations)} activation module in {type(model).__name__} "
        f"(its activation modules: {', '.join(present) or 'none'}){seen}: a forward that calls torch.nn.functional "
        "activations cannot be swapped; use modules (self.act = nn.ReLU()) or set `activations` to the kinds it has."
    )


def swap_activations(
    model: nn.Module,
    to: str = "leaky_relu",
    *,
    activations: Sequence[str] | None = None,
    slope: float | None = None,
    alpha: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    example_input: Any = None,
    replace: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> SurgeryReport:
    """Replace ``model``'s activation modules in place, at the same names.

    Args:
        model: any ``nn.Module``.
        to: the new activation: one of :data:`TARGETS`.
        activations: the kinds to replace (keys of :data:`KINDS`); default ``["relu"]``.
        slope: negative slope in [0, 1) for ``leaky_relu`` (default 0.01) and the initial one of ``prelu``
            (default 0.25).
        alpha: ELU's alpha > 0 (default 1).
        include: glob patterns on module names (``"layer4"``, ``"layer*.*.relu"``) restricting the swap; a
            pattern also selects the modules inside a match; default: every module of the ``activations`` kinds.
        exclude: patterns of the same form for the modules left alone.
        example_input: one input batch (or a tuple of forward arguments). With it, one forward pass sizes
            ``prelu`` per channel (a module used at several widths gets one shared slope) and functional
            calls are listed in the report (``skipped``). Without it, ``prelu`` has one slope per module.
        replace: Deprecated: use ``activations``.
        layers: Deprecated: use ``include``.

    Returns:
        The :class:`~lightning_tricks.core.surgery.SurgeryReport` (converted names; functional calls left).

    Raises:
        InvalidArgumentError: see :func:`resolve_swap`; an ``include`` pattern that matches no activation, an
            ``exclude`` pattern that matches no module.
        ModelNotSupportedError: no activation module of the ``activations`` kinds (a model calling ``F.relu``).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> swap_activations(model, "elu").converted, type(model[1]).__name__
        (['1'], 'ELU')
    """
    spec = resolve_swap(to, activations, slope, alpha, include, exclude, replace=replace, layers=layers)
    return apply_swap(model, spec, example_input)


def apply_swap(model: nn.Module, spec: SwapSpec, example_input: Any = None, trace_optional: bool = False
               ) -> SurgeryReport:
    """:func:`swap_activations` with an already validated :class:`SwapSpec`.

    With ``trace_optional``, a forward pass that fails (a LightningModule without ``forward``, an input it does
    not take) is noted in the report and the swap goes on without it (PReLU then has one slope per module).
    """
    trace = None
    note = None
    if example_input is not None:
        try:
            trace = trace_forward(model, example_input, spec.activations)
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward only loses the trace
            if not trace_optional:
                raise
            note = f"no trace ({type(err).__name__} in forward): functional calls not checked"
    report = SurgeryReport("ActivationSwap", detail=spec.describe())
    named = [(n, m) for n, m in model.named_modules() if n]  # the model itself cannot be replaced in place
    report.already = [n for n, m in named if getattr(m, "init_gain", None) == spec.init_gain
                      and activation_kind(m) == spec.to and spec.selects(n)]

    already = {id(m) for n, m in named if n in report.already}

    def can_wrap(module: nn.Module) -> str | None:
        if id(module) in already:
            return None  # swapped by an earlier call: selected, then counted as already converted
        kind = activation_kind(module)
        return None if kind in spec.activations else f"not a {'/'.join(spec.activations)} activation"

    chosen = select(named, include=spec.include, exclude=spec.exclude, why_not=can_wrap, owner="ActivationSwap")
    chosen = [(n, m) for n, m in chosen if n not in report.already]
    aliases: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    if not chosen and not report.already:
        raise _not_found(model, spec, trace)
    for name, old in chosen:
        widths = trace.channels.get(name, set()) if trace is not None else set()
        channels = widths.pop() if len(widths) == 1 else 1
        if spec.to == "prelu" and len(widths) > 1:
            report.skipped.append((name, f"used at widths {sorted(widths | {channels})}: one shared PReLU slope"))
        new = make_activation(spec, old, channels)
        mark_swapped(new, spec, activation_kind(old) or spec.activations[0])
        param = next(model.parameters(), None)
        if param is not None:  # the marker goes with the model; PReLU's slopes also take its dtype
            new.to(device=param.device, dtype=param.dtype if spec.to == "prelu" else None)
        for alias in aliases.get(id(old), [name]):  # a module registered under several names stays shared
            model.set_submodule(alias, new)
        report.converted.append(name)
    if trace is not None and trace.functional:
        report.skipped.append(("forward", f"{trace.functional_summary()} not swapped (functional)"))
    if note is not None:
        report.skipped.append(("trace", note))
    return report


__all__ = [
    "KINDS",
    "TARGETS",
    "ForwardTrace",
    "SwapSpec",
    "activation_kind",
    "apply_swap",
    "find_functional_activations",
    "make_activation",
    "mark_swapped",
    "resolve_swap",
    "set_prelu_channels",
    "swap_activations",
    "swap_marker_values",
    "trace_forward",
]
