"""Swap a model's activation functions by kind or by name, keeping every module name.

CS231n: "use ReLU; try Leaky ReLU / PReLU / ELU / SELU / GELU for the last 0.1%; never sigmoid". Trying
that on a model you did not write means finding its activation modules and replacing them without
breaking its checkpoints. :func:`swap_activations` does that on any ``nn.Module`` (zoo, torchvision,
timm, your own) and :class:`ActivationSwap` is the Lightning callback.

* **Names kept.** An activation module is replaced at the same qualified name, so ``state_dict`` keys
  are unchanged, apart from the new learnable slopes of ``prelu`` (``<name>.weight``), which are trained
  and saved like any other parameter.
* **Functional calls are reported.** A model that calls ``F.relu`` in ``forward`` has no module to
  replace. :func:`find_functional_activations` runs one forward pass under a ``TorchFunctionMode`` and
  lists the functional calls of the requested kinds made outside activation modules, with the
  ``forward`` that made them; the callback fails (nothing to swap) or warns (some calls stay) in one line.
* **Init follows.** A replacement module records the gain its activation needs (``init_gain``:
  leaky_relu/prelu -> leaky ReLU gain with the slope, ELU/GELU/SiLU -> ReLU's, SELU -> gain 1, i.e.
  LeCun normal), which :class:`~lightning_tricks.WeightInit` uses when its ``nonlinearity`` is not given.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_tricks._validation import (
    ConfigError,
    InvalidArgumentError,
    check_choice,
    check_range,
)
from lightning_tricks.init.schemes import _GAIN_SCHEMES  # which schemes have a gain
from lightning_tricks.regularization._batch import find_slot, get_item
from lightning_tricks.surgery import ModelNotSupportedError, SurgeryReport, check_patterns, select_modules

TARGETS = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid")
"""Activations a model can be given (``to``); relu, tanh and sigmoid serve the lectures' comparisons."""

KINDS: dict[str, tuple[tuple[type[nn.Module], ...], frozenset[str]]] = {
    "relu": ((nn.ReLU,), frozenset()),
    "relu6": ((nn.ReLU6,), frozenset()),
    "leaky_relu": ((nn.LeakyReLU,), frozenset()),
    "prelu": ((nn.PReLU,), frozenset()),
    "elu": ((nn.ELU,), frozenset()),
    "selu": ((nn.SELU,), frozenset()),
    "gelu": ((nn.GELU,), frozenset({"GELU", "GELUTanh", "QuickGELU"})),
    "silu": ((nn.SiLU,), frozenset({"SiLU", "Swish"})),
    "sigmoid": ((nn.Sigmoid,), frozenset({"Sigmoid"})),
    "tanh": ((nn.Tanh,), frozenset({"Tanh"})),
}
"""Activation kinds that can be replaced (``replace``) -> (module classes, class names, for timm's own)."""

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

_SLOPE_TARGETS = ("leaky_relu", "prelu")
_DEFAULT_SLOPE = {"leaky_relu": 0.01, "prelu": 0.25}
_INPLACE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.ReLU6)
_TORCH_DIR = os.path.dirname(torch.__file__)



@dataclass(frozen=True)
class SwapSpec:
    """A validated swap request: what to replace, with what, where. Built by :func:`resolve_swap`."""

    to: str
    replace: tuple[str, ...]
    slope: float
    alpha: float
    layers: tuple[str, ...] | None

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
        return f"{'/'.join(self.replace)} -> {self.to}{extra}"


def resolve_swap(to: str, replace: Sequence[str] | None = None, slope: float | None = None,
                 alpha: float | None = None, layers: Sequence[str] | None = None) -> SwapSpec:
    """Validate the arguments of :func:`swap_activations` / :class:`ActivationSwap` (one line per error).

    Raises:
        InvalidArgumentError: an unknown activation name, a slope outside [0, 1) or given to an activation
            without one, ``alpha <= 0`` or given to another activation than ELU, an empty pattern list.
    """
    check_choice("to", to, TARGETS)
    kinds = ["relu"] if replace is None else replace
    if isinstance(kinds, str) or not kinds:
        raise InvalidArgumentError(f"`replace`={replace!r} is invalid: expected a non-empty list of activation kinds "
                                   f"from {', '.join(KINDS)}.")
    for kind in kinds:
        check_choice("replace", kind, KINDS)
    if slope is not None and to not in _SLOPE_TARGETS:
        raise InvalidArgumentError(f"`slope`={slope!r} is invalid with to={to!r}: only leaky_relu and prelu have a "
                                   "slope; remove it.")
    if to in _SLOPE_TARGETS:
        slope = check_range("slope", _DEFAULT_SLOPE[to] if slope is None else slope, 0.0, 1.0, high_inclusive=False)
    if alpha is not None and to != "elu":
        raise InvalidArgumentError(f"`alpha`={alpha!r} is invalid with to={to!r}: only elu has an alpha; remove it.")
    alpha = check_range("alpha", 1.0 if alpha is None else alpha, 0.0, None, low_inclusive=False)
    patterns = check_patterns("layers", layers)
    return SwapSpec(to, tuple(dict.fromkeys(kinds)), float(slope or 0.0), float(alpha),
                    None if patterns is None else tuple(patterns))


def activation_kind(module: nn.Module) -> str | None:
    """The kind (a key of :data:`KINDS`) of an activation module, or None."""
    for kind, (classes, names) in KINDS.items():
        if isinstance(module, classes) or type(module).__name__ in names:
            return kind
    return None


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


# --------------------------------------------------------------------------------------------- tracing


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
        check_choice("replace", kind, KINDS)
    return trace_forward(model, example, kinds).functional


# --------------------------------------------------------------------------------------------- swapping


def _not_found(model: nn.Module, spec: SwapSpec, trace: ForwardTrace | None) -> ModelNotSupportedError:
    present = sorted({type(m).__name__ for m in model.modules() if activation_kind(m) is not None})
    calls = trace.functional_summary() if trace is not None else ""
    seen = f"; one forward pass found {calls}" if calls else ""
    return ModelNotSupportedError(
        f"ActivationSwap found no {'/'.join(spec.replace)} activation module in {type(model).__name__} "
        f"(its activation modules: {', '.join(present) or 'none'}){seen}: a forward that calls torch.nn.functional "
        "activations cannot be swapped; use modules (self.act = nn.ReLU()) or set `replace` to the kinds it has."
    )


def swap_activations(
    model: nn.Module,
    to: str = "leaky_relu",
    *,
    replace: Sequence[str] | None = None,
    slope: float | None = None,
    alpha: float | None = None,
    layers: Sequence[str] | None = None,
    example_input: Any = None,
) -> SurgeryReport:
    """Replace ``model``'s activation modules in place, at the same names.

    Args:
        model: any ``nn.Module``.
        to: the new activation: one of :data:`TARGETS`.
        replace: the kinds to replace (keys of :data:`KINDS`); default ``["relu"]``.
        slope: negative slope in [0, 1) for ``leaky_relu`` (default 0.01) and the initial one of ``prelu``
            (default 0.25).
        alpha: ELU's alpha > 0 (default 1).
        layers: glob patterns on module names (``"layer4.*"``) restricting the swap; default: every module of
            the ``replace`` kinds.
        example_input: one input batch (or a tuple of forward arguments). With it, one forward pass sizes
            ``prelu`` per channel (a module used at several widths gets one shared slope) and functional
            calls are listed in the report (``skipped``). Without it, ``prelu`` has one slope per module.

    Returns:
        The :class:`~lightning_tricks.surgery.SurgeryReport` (converted names; functional calls left).

    Raises:
        InvalidArgumentError: see :func:`resolve_swap`; a ``layers`` pattern that matches no activation.
        ModelNotSupportedError: no activation module of the ``replace`` kinds (a model calling ``F.relu``).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> swap_activations(model, "elu").converted, type(model[1]).__name__
        (['1'], 'ELU')
    """
    spec = resolve_swap(to, replace, slope, alpha, layers)
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
            trace = trace_forward(model, example_input, spec.replace)
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward only loses the trace
            if not trace_optional:
                raise
            note = f"no trace ({type(err).__name__} in forward): functional calls not checked"
    report = SurgeryReport("ActivationSwap", detail=spec.describe())
    report.already = [n for n, m in model.named_modules() if getattr(m, "init_gain", None) == spec.init_gain
                      and activation_kind(m) == spec.to and (spec.layers is None or any(
                          fnmatch.fnmatchcase(n, p) for p in spec.layers))]

    already = {id(m) for n, m in model.named_modules() if n in report.already}

    def can_wrap(module: nn.Module) -> str | None:
        if id(module) in already:
            return None  # swapped by an earlier call: selected, then counted as already converted
        kind = activation_kind(module)
        return None if kind in spec.replace else f"not a {'/'.join(spec.replace)} activation"

    chosen = select_modules(model, spec.layers, can_wrap=can_wrap, arg_name="layers", trick="ActivationSwap")
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
        if spec.to == "prelu":
            param = next(model.parameters(), None)
            if param is not None:
                new.to(device=param.device, dtype=param.dtype)
        for alias in aliases.get(id(old), [name]):  # a module registered under several names stays shared
            model.set_submodule(alias, new)
        report.converted.append(name)
    if trace is not None and trace.functional:
        report.skipped.append(("forward", f"{trace.functional_summary()} not swapped (functional)"))
    if note is not None:
        report.skipped.append(("trace", note))
    return report


# --------------------------------------------------------------------------------------------- callback


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """A small model input for the trace, from public places only; None when none is at hand yet.

    ``example_input_array`` first, then the first images (two rows) of the datamodule's (set up before
    ``Callback.setup``) or the module's own ``train_dataloader``. Iterating a shuffling loader draws from the
    global RNG: it is forked, so the run's randomness is the same with and without the swap.
    """
    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        return example
    for source in (getattr(trainer, "datamodule", None), pl_module):
        if source is None or not is_overridden("train_dataloader", source):
            continue
        try:
            with torch.random.fork_rng(devices=[]):
                batch = next(iter(source.train_dataloader()))
            images = get_item(batch, find_slot(batch, None, "images", "ActivationSwap"))
        except Exception:  # noqa: BLE001 - a loader that needs the module's own setup first, an odd batch
            return None
        return images[:2] if isinstance(images, torch.Tensor) else None
    return None


class ActivationSwap(Callback):
    """Replace the model's activation modules when a stage starts (``setup``), keeping module names.

    Runs in ``Callback.setup`` of every stage, before the strategy moves and wraps the model and before a
    checkpoint is restored, so every rank swaps alike, a resumed run (``ckpt_path``) loads its PReLU slopes
    into swapped modules, and validate/test/predict of a checkpoint see the network it was trained as.
    Idempotent: a second ``fit`` finds the modules already swapped.

    Put it **before** ``WeightInit`` in ``trainer.callbacks`` (setups run in list order): WeightInit then
    uses the new activation's gain; the other order is an error at setup when the gain would differ.

    One training batch (``example_input_array``, else the datamodule's first) is run forward once to size
    PReLU per channel and to find functional calls (``F.relu(x)`` in a ``forward``) that no module swap
    can reach: none of the requested modules at all is an error; some calls left is one warning line
    (an error with ``strict``).

    Args:
        to: the new activation: ``leaky_relu``, ``prelu`` (learnable, per channel), ``elu``, ``selu``,
            ``gelu``, ``silu``, or ``relu``/``tanh``/``sigmoid`` for comparisons.
        replace: the kinds replaced: ``relu`` (default), ``relu6``, ``leaky_relu``, ``prelu``, ``elu``,
            ``selu``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``.
        slope: negative slope in [0, 1) of ``leaky_relu`` (default 0.01), initial slope of ``prelu`` (0.25).
        alpha: ELU's alpha > 0 (default 1).
        layers: glob patterns on module names (``model.layer4.*``); default every module of those kinds.
        strict: fail when functional calls of the requested kinds remain after the swap.

    Raises:
        InvalidArgumentError: in ``__init__``, an unknown activation name, a slope outside [0, 1), ...;
            at setup, a ``layers`` pattern that matches no activation.
        ModelNotSupportedError: at setup, no activation module of the requested kinds (a model that calls
            ``F.relu`` in ``forward``).

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ActivationSwap(to="prelu")])
    """

    def __init__(self, to: str = "leaky_relu", replace: list[str] | None = None, slope: float | None = None,
                 alpha: float | None = None, layers: list[str] | None = None, strict: bool = False) -> None:
        self.spec = resolve_swap(to, replace, slope, alpha, layers)
        self.strict = bool(strict)
        self.report: SurgeryReport | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(to=self.spec.to, replace=self.spec.replace, layers=self.spec.layers)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_order(trainer)
        self.report = apply_swap(pl_module, self.spec, example_input(trainer, pl_module), trace_optional=True)
        self.report.log("activations")
        functional = [reason for name, reason in self.report.skipped if name == "forward"]
        if functional:
            message = (f"ActivationSwap: {functional[0]}; those stay {'/'.join(self.spec.replace)}: replace them by "
                       "modules in your forward to swap them too.")
            if self.strict:
                raise ModelNotSupportedError(message)
            rank_zero_warn(message)

    def _check_order(self, trainer: pl.Trainer) -> None:
        from lightning_tricks.init import WeightInit

        for callback in trainer.callbacks:
            if callback is self:
                return
            if (isinstance(callback, WeightInit) and callback.initialized_layers and callback.skipped is None
                    and not callback.args.nonlinearity_given and callback.args.scheme in _GAIN_SCHEMES
                    and callback.args.nonlinearity != self.spec.init_gain[0]):
                raise ConfigError(
                    f"ActivationSwap comes after WeightInit in trainer.callbacks, so WeightInit used the "
                    f"{callback.args.nonlinearity} gain before the swap to {self.spec.to}: put ActivationSwap first "
                    "(WeightInit then follows the new activation) or give WeightInit a `nonlinearity`.")

    def state_dict(self) -> dict[str, Any]:
        """What a loader needs to rebuild the swapped model: the request and the names it swapped."""
        spec = self.spec
        return {"to": spec.to, "replace": list(spec.replace), "slope": spec.slope, "alpha": spec.alpha,
                "layers": None if spec.layers is None else list(spec.layers),
                "swapped": list(self.report.converted + self.report.already) if self.report else []}


__all__ = [
    "ActivationSwap",
    "KINDS",
    "TARGETS",
    "ForwardTrace",
    "SwapSpec",
    "activation_kind",
    "apply_swap",
    "find_functional_activations",
    "make_activation",
    "resolve_swap",
    "swap_activations",
    "trace_forward",
]
