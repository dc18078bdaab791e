"""Weight-initialization schemes for any ``nn.Module``, built on ``torch.nn.init``.

The lectures' rule: keep the variance of each layer's output close to the variance of its input.
For a layer with ``fan_in`` inputs per output (``in_channels * k * k`` for a conv), that means

* ``lecun_*``: Var(w) = gain^2 / fan_in. This is what the CS231n lectures call *Xavier*
  (``W = randn(Din, Dout) / sqrt(Din)``); LeCun et al. (1998) proposed it first.
* ``xavier_*``: Var(w) = gain^2 * 2 / (fan_in + fan_out), Glorot & Bengio (2010), as
  ``torch.nn.init.xavier_*`` computes it. The two coincide when fan_in = fan_out.
* ``kaiming_*``: Var(w) = gain^2 / fan with gain^2 = 2 for ReLU (He et al. 2015, "MSRA"); fan is
  fan_in (default: preserves the forward variance) or fan_out (preserves the backward variance).
* ``orthogonal``: the weight, flattened to ``(out, in * k * k)``, is a (semi-)orthogonal matrix times
  gain (Saxe et al. 2014); entries then have mean square gain^2 / max(rows, cols).
* ``normal``: ``std * randn`` ("small random numbers", std 0.01 by default), and ``zeros`` (no
  symmetry breaking: every unit of a layer computes the same function, so they stay equal).

Uniform variants draw from U(-a, a) with a = sqrt(3 Var), so they have the same variance. The gain
of a nonlinearity comes from ``torch.nn.init.calculate_gain`` (relu sqrt(2), leaky_relu
sqrt(2 / (1 + slope^2)), tanh 5/3, selu 3/4, linear and sigmoid 1).

Zero-init residual lives in :mod:`lightning_tricks.init.residual` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.selection import (
    check_layer_types,
    describe_names,
    is_of_types,
    select,
)
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_non_negative,
    check_positive,
    check_range,
)
from lightning_tricks.init.residual import KNOWN_RESIDUAL_BLOCKS, residual_norms, zero_init_residual

SCHEMES = ("default", "zeros", "normal", "xavier_uniform", "xavier_normal", "lecun_uniform", "lecun_normal",
           "kaiming_uniform", "kaiming_normal", "orthogonal", "lsuv")
"""Scheme names: ``default`` leaves the weights as the model built them; ``lsuv`` is data-dependent."""

NONLINEARITIES = ("linear", "relu", "leaky_relu", "tanh", "sigmoid", "selu")
"""Nonlinearities whose gain (``torch.nn.init.calculate_gain``) scales the fan-based schemes."""

FAN_MODES = ("fan_in", "fan_out")

DEFAULT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
"""Layers a scheme initializes unless ``layer_types`` says otherwise (subclasses included)."""

_GAIN_SCHEMES = ("xavier_uniform", "xavier_normal", "lecun_uniform", "lecun_normal", "kaiming_uniform",
                 "kaiming_normal", "orthogonal")
_DEFAULT_NONLINEARITY = {"kaiming_uniform": "relu", "kaiming_normal": "relu"}  # the others: gain 1


@dataclass(frozen=True)
class SchemeArgs:
    """A scheme with its arguments resolved (defaults filled in) and validated.

    Build it with :func:`resolve_scheme`; :func:`init_weights` and the ``WeightInit`` callback share it.
    """

    scheme: str
    nonlinearity: str
    negative_slope: float
    mode: str
    std: float
    bias: float | None
    nonlinearity_given: bool = True
    """False when ``nonlinearity`` is the scheme's default: the gain may then follow the model's activations."""

    @property
    def gain(self) -> float:
        return nn.init.calculate_gain(self.nonlinearity, self.negative_slope)  # type: ignore[arg-type]

    def weight_variance(self, weight: torch.Tensor) -> float:
        """The variance this scheme promises for ``weight`` (``nan`` for ``default``, ``lsuv``)."""
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        if self.scheme == "zeros":
            return 0.0
        if self.scheme == "normal":
            return self.std**2
        if self.scheme.startswith("xavier"):
            return self.gain**2 * 2.0 / (fan_in + fan_out)
        if self.scheme.startswith("lecun"):
            return self.gain**2 / fan_in
        if self.scheme.startswith("kaiming"):
            return self.gain**2 / (fan_in if self.mode == "fan_in" else fan_out)
        if self.scheme == "orthogonal":
            return self.gain**2 / max(weight.shape[0], weight[0].numel())
        return float("nan")


def resolve_scheme(
    scheme: str = "kaiming_normal",
    nonlinearity: str | None = None,
    negative_slope: float | None = None,
    mode: str | None = None,
    std: float | None = None,
    bias: float | None = None,
) -> SchemeArgs:
    """Validate a scheme's arguments and fill in its defaults.

    An argument the scheme does not use is an error rather than silently ignored (``std`` belongs to
    ``normal``; ``nonlinearity`` to the fan-based schemes; ``mode`` to ``kaiming_*``; ``negative_slope``
    to ``nonlinearity='leaky_relu'``).

    Args:
        scheme: one of :data:`SCHEMES`.
        nonlinearity: the activation after the layer, one of :data:`NONLINEARITIES`; its gain scales the
            variance. Default: ``relu`` for ``kaiming_*``, ``linear`` (gain 1) for the others, or the
            activation an ``ActivationSwap`` put in the model (see :func:`follow_activations`).
        negative_slope: leaky ReLU slope for ``nonlinearity='leaky_relu'`` (default 0.01).
        mode: ``fan_in`` (default) or ``fan_out`` for ``kaiming_*``.
        std: standard deviation for ``normal`` (default 0.01).
        bias: constant for the selected layers' biases (e.g. 0 or 0.01); None: 0 for every scheme but
            ``default``, which leaves biases as they are.

    Raises:
        InvalidArgumentError: an unknown scheme, nonlinearity or mode, ``std <= 0``, a negative slope,
            a non-finite bias, or an argument the scheme does not use.

    Examples:
        >>> resolve_scheme("kaiming_normal").nonlinearity
        'relu'
    """
    check_choice("scheme", scheme, SCHEMES)

    def unused(name: str, value: Any, users: str) -> None:
        if value is not None:
            raise InvalidArgumentError(f"`{name}`={value!r} is invalid with scheme={scheme!r}: it is used only by {users}; "
                                       "remove it.")

    nonlinearity_given = nonlinearity is not None
    if scheme in _GAIN_SCHEMES:
        nonlinearity = check_choice("nonlinearity", nonlinearity or _DEFAULT_NONLINEARITY.get(scheme, "linear"),
                                    NONLINEARITIES)
    else:
        unused("nonlinearity", nonlinearity, "the schemes " + ", ".join(_GAIN_SCHEMES))
        nonlinearity = "linear"
    if nonlinearity == "leaky_relu":
        negative_slope = check_non_negative("negative_slope", 0.01 if negative_slope is None else negative_slope)
    else:
        unused("negative_slope", negative_slope, "nonlinearity='leaky_relu'")
    if scheme.startswith("kaiming"):
        mode = check_choice("mode", mode or "fan_in", FAN_MODES)
    else:
        unused("mode", mode, "kaiming_uniform and kaiming_normal")
    if scheme == "normal":
        std = check_positive("std", 0.01 if std is None else std)
    else:
        unused("std", std, "scheme='normal'")
    if bias is None and scheme != "default":
        bias = 0.0
    if bias is not None:
        check_range("bias", bias)
        if abs(bias) == float("inf"):
            raise InvalidArgumentError(f"`bias`={bias!r} is invalid: expected a finite number.")
    return SchemeArgs(scheme, nonlinearity, float(negative_slope or 0.0), mode or "fan_in", float(std or 0.0),
                      None if bias is None else float(bias), nonlinearity_given)


# ---------------------------------------------------------------------------------------------- selection


def select_modules(
    module: nn.Module,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    default_types: Sequence[str] = DEFAULT_LAYER_TYPES,
    *,
    owner: str = "init_weights",
) -> list[tuple[str, nn.Module]]:
    """The layers a scheme acts on: ``(name, module)`` pairs in definition order.

    The package's one selector (:func:`lightning_tricks.core.selection.select`) with the layers of
    ``layer_types`` as the eligible modules.

    Args:
        module: the model (its ``named_modules()`` names are what ``include``/``exclude`` match).
        layer_types: class names (``"Conv2d"``) or qualified names (``"torch.nn.Conv2d"``); a module
            matches when its class or a base class has that name, so ``Conv2d`` also selects timm's
            ``StdConv2d``. Default ``default_types``.
        include: glob patterns; only layers whose name, or an ancestor's name, matches one
            are kept (``"head"`` keeps ``head.0`` and ``head.3``; ``"layer*.*.conv1"`` works too).
        exclude: patterns in the same form; matching layers are dropped.
        default_types: the types used when ``layer_types`` is None (:data:`DEFAULT_LAYER_TYPES`).
        owner: who selects, named at the start of every error.

    Raises:
        InvalidArgumentError: a type given in ``layer_types``, or a pattern, that selects nothing, or
            an empty selection; the message lists what was looked for and names that exist.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [name for name, _ in select_modules(net, exclude=["2"])]
        ['0']
    """
    named = list(module.named_modules())
    types = list(default_types) if layer_types is None else check_layer_types(module, layer_types, owner)
    if not any(is_of_types(m, types) for _, m in named):
        present = sorted({type(m).__name__ for _, m in named})
        raise InvalidArgumentError(
            f"{owner}: no layer of {type(module).__name__} matches layer_types={types}: pass `layer_types` with the names of "
            f"its weight layers (it has {describe_names(present, 12)})."
        )
    wanted = "/".join(t if isinstance(t, str) else t.__name__ for t in types)
    selected = select(named, include=include, exclude=exclude, owner=owner,
                      why_not=lambda m: None if is_of_types(m, types) else f"not a {wanted} layer")
    if not selected:
        raise InvalidArgumentError(f"{owner}: `include`={include!r} and `exclude`={exclude!r} leave no layer of "
                                   f"{type(module).__name__} to initialize.")
    return selected


# ---------------------------------------------------------------------------------------------- schemes


def _draw(weight: torch.Tensor, fill: Callable[..., Any], generator: torch.Generator | None) -> None:
    """Fill ``weight`` with ``fill(tensor, generator=...)``; a generator on another device draws there first.

    Drawing on the generator's device makes the result the same whether the model sits on CPU or GPU.
    """
    if generator is None or generator.device == weight.device:
        fill(weight, generator=generator)
        return
    scratch = torch.empty(weight.shape, dtype=torch.float32, device=generator.device)
    fill(scratch, generator=generator)
    with torch.no_grad():
        weight.copy_(scratch)


def _init_weight(weight: torch.Tensor, args: SchemeArgs, generator: torch.Generator | None) -> None:
    s = args.scheme
    if s == "zeros":
        nn.init.zeros_(weight)
    elif s == "normal":
        _draw(weight, lambda t, generator: nn.init.normal_(t, 0.0, args.std, generator=generator), generator)
    elif s in ("xavier_uniform", "xavier_normal"):
        fill = nn.init.xavier_uniform_ if s == "xavier_uniform" else nn.init.xavier_normal_
        _draw(weight, lambda t, generator: fill(t, gain=args.gain, generator=generator), generator)
    elif s.startswith(("lecun", "kaiming")):
        # lecun_* is kaiming_* over fan_in with the gain of `nonlinearity` (1 for the default 'linear')
        fill = nn.init.kaiming_uniform_ if s.endswith("uniform") else nn.init.kaiming_normal_
        _draw(weight, lambda t, generator: fill(t, a=args.negative_slope, mode=args.mode,  # type: ignore[arg-type]
                                               nonlinearity=args.nonlinearity, generator=generator), generator)
    elif s in ("orthogonal", "lsuv"):
        gain = args.gain if s == "orthogonal" else 1.0
        _draw(weight, lambda t, generator: nn.init.orthogonal_(t, gain=gain, generator=generator), generator)


def init_weights(
    module: nn.Module,
    scheme: str = "kaiming_normal",
    *,
    nonlinearity: str | None = None,
    negative_slope: float | None = None,
    mode: str | None = None,
    std: float | None = None,
    bias: float | None = None,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    zero_init_residual: bool | Sequence[str] = False,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Initialize the weights (and biases) of ``module``'s conv/linear layers in place with a scheme.

    ``scheme='lsuv'`` applies LSUV's orthonormal pre-initialization only: the data-dependent scaling
    needs batches, see :func:`~lightning_tricks.init.lsuv`.

    Args:
        module: any ``nn.Module``.
        scheme: one of :data:`SCHEMES` (see the module docstring for each formula).
        nonlinearity: activation after the layers; its gain scales the fan-based schemes.
        negative_slope: leaky ReLU slope (``nonlinearity='leaky_relu'`` only).
        mode: ``fan_in`` or ``fan_out`` (``kaiming_*`` only).
        std: standard deviation of ``normal``.
        bias: constant for the selected layers' biases; None: 0 (``default`` leaves them).
        layer_types: which layer classes to initialize (see :func:`select_modules`).
        include: name patterns to restrict the selection to.
        exclude: name patterns to remove from the selection.
        zero_init_residual: True zeroes the last normalization gamma of each residual branch of the
            ResNet blocks we know; a list names them (see :func:`zero_init_residual`).
        generator: random generator of the draws (default: torch's global generator).

    Returns:
        The names of the initialized layers.

    Raises:
        InvalidArgumentError: see :func:`resolve_scheme` and :func:`select_modules`; a selected layer
            without a weight of at least 2 dimensions for a fan-based scheme.

    Examples:
        >>> net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        >>> init_weights(net, "kaiming_normal", bias=0.01, generator=torch.Generator().manual_seed(0))
        ['0', '2']
        >>> round(net[0].weight.var().item() * 1024, 2), round(net[0].bias[0].item(), 6)
        (2.0, 0.01)
    """
    args = resolve_scheme(scheme, nonlinearity, negative_slope, mode, std, bias)
    return apply_scheme(module, args, layer_types=layer_types, include=include, exclude=exclude,
                        zero_residual=zero_init_residual, generator=generator)


def apply_scheme(
    module: nn.Module,
    args: SchemeArgs,
    *,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    zero_residual: bool | Sequence[str] = False,
    generator: torch.Generator | None = None,
    owner: str = "init_weights",
) -> list[str]:
    """:func:`init_weights` with already resolved :class:`SchemeArgs` (``zero_residual`` is its ``zero_init_residual``;
    ``owner`` is named in the selector's errors)."""
    args = follow_activations(module, args)
    layers = select_modules(module, layer_types, include, exclude, owner=owner)
    for name, layer in layers:
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
            raise InvalidArgumentError(
                f"layer {name!r} ({type(layer).__name__}) has no initialized `weight` tensor: select weight layers "
                "with `layer_types` (lazy modules need one forward pass first)."
            )
        if args.scheme not in ("default", "zeros", "normal") and weight.dim() < 2:
            raise InvalidArgumentError(
                f"scheme={args.scheme!r} needs fan_in/fan_out, but layer {name!r} ({type(layer).__name__}) has a "
                f"{weight.dim()}-d weight: exclude it or remove its type from `layer_types`."
            )
    if args.scheme == "zeros":
        warnings.warn("scheme='zeros' does not break symmetry: every unit of a layer gets the same gradient and "
                      "they stay identical; use it only to demonstrate that.", UserWarning, stacklevel=2)
    with torch.no_grad():
        for _, layer in layers:
            if args.scheme != "default":
                _init_weight(layer.weight, args, generator)
            layer_bias = getattr(layer, "bias", None)
            if args.bias is not None and isinstance(layer_bias, torch.Tensor):
                nn.init.constant_(layer_bias, args.bias)
    if zero_residual:
        zero_init_residual(module, zero_residual)
    return [name for name, _ in layers]


def follow_activations(module: nn.Module, args: SchemeArgs) -> SchemeArgs:
    """``args`` with the gain of the activation an :class:`~lightning_tricks.ActivationSwap` put in the model.

    A swapped-in activation module carries ``init_gain = (nonlinearity, negative_slope)`` (SELU: ``linear``,
    which makes ``kaiming_normal`` LeCun normal). When ``nonlinearity`` was not given and every such module
    agrees, the fan-based schemes use that gain; an explicit ``nonlinearity`` always wins.
    """
    if args.nonlinearity_given or args.scheme not in _GAIN_SCHEMES:
        return args
    gains = {tuple(g) for m in module.modules() if (g := getattr(m, "init_gain", None)) is not None}
    if len(gains) != 1:
        return args
    nonlinearity, slope = gains.pop()
    return dataclasses.replace(args, nonlinearity=nonlinearity, negative_slope=float(slope))


__all__ = [
    "DEFAULT_LAYER_TYPES",
    "FAN_MODES",
    "KNOWN_RESIDUAL_BLOCKS",
    "NONLINEARITIES",
    "SCHEMES",
    "SchemeArgs",
    "apply_scheme",
    "follow_activations",
    "init_weights",
    "residual_norms",
    "resolve_scheme",
    "select_modules",
    "zero_init_residual",
]
