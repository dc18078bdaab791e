r"""DropConnect (Wan et al. 2013): drop individual weights, not activations, in training.

In training a layer computes with :math:`\tilde W = (M \odot W) / (1 - p)`, :math:`M_{ij} \sim
\mathrm{Bernoulli}(1 - p)`; in eval it uses :math:`W` unchanged. The inverted scaling makes the expected
pre-activation in training equal to the eval pre-activation. Masks are drawn per training step (the
whole batch shares one mask; default) or, for ``Linear`` layers, per sample (the paper's semantics, one
mask per example, computed with a batched matmul).

The layers are the model's own ``nn.Linear`` / ``nn.Conv{1,2,3}d`` objects with their class swapped
(see :mod:`lightning_tricks.core.surgery`): parameter names are unchanged and ``p=0`` is the plain layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.core.callback import StructuralCallback
from lightning_tricks.core.deprecation import register_renames, renamed_argument
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.selection import check_patterns, name_matches
from lightning_tricks.core.surgery import (
    CanWrap,
    ModelNotSupportedError,
    Predicate,
    SurgeryReport,
    SwappableMixin,
    keys_unchanged,
    register_derived_class,
    select_modules,
    swap_class,
)
from lightning_tricks.core.validation import InvalidArgumentError, check_bool, check_choice, check_probability

register_renames("DropConnect", {"layers": "include"})

MODES = ("step", "sample")
"""``step``: one mask per training step for the whole batch; ``sample``: one mask per example (Linear only)."""
LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
"""Layer types DropConnect converts (exact types: subclasses may bypass ``forward``, e.g. attention projections)."""


def check_dropconnect_args(p: float = 0.5, mode: str = "step", include: Sequence[str] | None = None,
                           layer_types: Sequence[str] = ("Linear",), exclude: Sequence[str] | None = None, *,
                           layers: Sequence[str] | None = None) -> tuple[list[str] | None, list[str] | None]:
    """The one validator of DropConnect's arguments (layers, functional core, callback); returns
    ``(include, exclude)`` (``layers`` is the deprecated name of ``include``)."""
    include = renamed_argument("DropConnect", "layers", "include", layers, include, None)
    check_probability("p", p, allow_one=False)
    check_choice("mode", mode, MODES)
    if isinstance(layer_types, str) or not layer_types:
        raise InvalidArgumentError(f"`layer_types`={layer_types!r} is invalid: expected a non-empty list of "
                                   + ", ".join(LAYER_TYPES) + ".")
    for name in layer_types:
        check_choice("layer_types", name, LAYER_TYPES)
    return check_patterns("include", include), check_patterns("exclude", exclude, allow_empty=True)


def dropconnect_weight(weight: torch.Tensor, p: float, generator: torch.Generator | None = None,
                       samples: int | None = None) -> torch.Tensor:
    """``weight * mask / (1 - p)`` with ``mask ~ Bernoulli(1 - p)``, one mask (or ``samples`` masks, stacked).

    Args:
        weight: the weight (or bias) tensor.
        p: drop probability in [0, 1).
        generator: the generator of the mask (on ``weight``'s device); torch's default one when ``None``.
        samples: draw this many masks and return shape ``(samples, *weight.shape)``.

    Examples:
        >>> w = torch.ones(2, 3)
        >>> sorted(dropconnect_weight(w, 0.5, torch.Generator().manual_seed(0)).unique().tolist())
        [0.0, 2.0]
    """
    check_probability("p", p, allow_one=False)
    if p == 0:
        return weight if samples is None else weight.expand(samples, *weight.shape)
    shape = weight.shape if samples is None else (samples, *weight.shape)
    keep = 1.0 - p
    mask = torch.empty(shape, device=weight.device, dtype=weight.dtype).bernoulli_(keep, generator=generator)
    return weight * mask.div_(keep)


class _DropConnectMixin(SwappableMixin):
    """Adds DropConnect to a Linear or ConvNd layer without renaming its parameters."""

    lt_stochastic_eval = False
    """While True (set by :func:`lightning_tricks.core.stochastic.stochastic_eval`), eval draws masks too (MC DropConnect)."""

    def _lt_configure(self, p: float, mode: str, drop_bias: bool, randomness: LayerRandomness | None,
                      index: int) -> None:
        check_dropconnect_args(p, mode)
        if mode == "sample" and not isinstance(self, nn.Linear):
            raise InvalidArgumentError(f"`mode`='sample' is invalid for {type(self).__lt_base__.__name__}: "
                                       "expected 'step' (per-sample masks are for Linear layers).")
        self.p, self.mode, self.drop_bias = float(p), mode, bool(drop_bias)
        self.lt_randomness = randomness if randomness is not None else LayerRandomness(0)
        self.lt_index = index
        self.lt_stochastic_eval = False

    def _lt_active(self) -> bool:
        return self.p > 0 and (self.training or self.lt_stochastic_eval)  # type: ignore[attr-defined]

    def _lt_generator(self) -> torch.Generator:
        return self.lt_randomness.generator(self.weight.device, self.lt_index, self.training)  # type: ignore[attr-defined]

    def _lt_bias(self, generator: torch.Generator, samples: int | None = None) -> torch.Tensor | None:
        bias = self.bias  # type: ignore[attr-defined]
        if bias is None or not self.drop_bias:
            return bias if samples is None or bias is None else bias.expand(samples, *bias.shape)
        return dropconnect_weight(bias, self.p, generator, samples)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropconnect_p={self.p}, mode={self.mode!r}, drop_bias={self.drop_bias}"  # type: ignore[misc]


class DropConnectLinear(_DropConnectMixin, nn.Linear):
    """``nn.Linear`` with DropConnect: a Bernoulli(1-p) weight mask scaled by 1/(1-p) in training.

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        p: drop probability of each weight, in [0, 1).
        mode: ``step`` (one mask per forward in training) or ``sample`` (one mask per example, batched matmul).
        drop_bias: also drop bias entries (with the same p and scaling).
        randomness: the generators to draw from (a callback shares one among its layers); a private one
            seeded with 0 when ``None``.

    Examples:
        >>> layer = DropConnectLinear(4, 3, p=0.5)
        >>> x = torch.ones(2, 4)
        >>> torch.equal(layer.eval()(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5, mode: str = "step",
                 drop_bias: bool = False, randomness: LayerRandomness | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self._lt_configure(p, mode, drop_bias, randomness, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lt_active():
            return F.linear(x, self.weight, self.bias)
        generator = self._lt_generator()
        if self.mode == "step":
            return F.linear(x, dropconnect_weight(self.weight, self.p, generator), self._lt_bias(generator))
        unbatched = x.dim() == 1
        xb = x.unsqueeze(0) if unbatched else x
        n = xb.shape[0]
        weights = dropconnect_weight(self.weight, self.p, generator, samples=n)  # (N, out, in)
        flat = xb.reshape(n, -1, self.in_features)  # (N, T, in)
        bias = self._lt_bias(generator, samples=n)
        if bias is None:
            out = torch.bmm(flat, weights.transpose(1, 2))
        else:
            out = torch.baddbmm(bias.unsqueeze(1), flat, weights.transpose(1, 2))
        out = out.reshape(*xb.shape[:-1], self.out_features)
        return out.squeeze(0) if unbatched else out


class _DropConnectConvMixin(_DropConnectMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lt_active():
            return super().forward(x)  # type: ignore[misc]
        generator = self._lt_generator()
        return self._conv_forward(x, dropconnect_weight(self.weight, self.p, generator),  # type: ignore[attr-defined]
                                  self._lt_bias(generator))


class DropConnectConv2d(_DropConnectConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with DropConnect (one mask per forward in training; eval uses the plain weights).

    Args:
        in_channels: as ``nn.Conv2d``.
        out_channels: as ``nn.Conv2d``.
        kernel_size: as ``nn.Conv2d``.
        p: drop probability of each weight, in [0, 1).
        drop_bias: also drop bias entries.
        randomness: the generators to draw from; a private one seeded with 0 when ``None``.
        **kwargs: the other ``nn.Conv2d`` arguments (stride, padding, ...).

    Examples:
        >>> conv = DropConnectConv2d(3, 8, 3, p=0.2, padding=1)
        >>> conv(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, p: float = 0.5,
                 drop_bias: bool = False, randomness: LayerRandomness | None = None, **kwargs: object) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)  # type: ignore[arg-type]
        self._lt_configure(p, "step", drop_bias, randomness, 0)


register_derived_class(_DropConnectMixin, nn.Linear, DropConnectLinear)
register_derived_class(_DropConnectConvMixin, nn.Conv2d, DropConnectConv2d)


def _mixin_for(module: nn.Module) -> type:
    return _DropConnectMixin if isinstance(module, nn.Linear) else _DropConnectConvMixin


def _can_wrap(types: tuple[type, ...]) -> CanWrap:
    def can_wrap(module: nn.Module) -> str | None:
        if isinstance(module, _DropConnectMixin):
            return None
        if type(module) in types:
            return None
        if isinstance(module, tuple(LAYER_TYPES.values())):
            if type(module) in LAYER_TYPES.values():
                return f"its type is not in `layer_types` ({', '.join(t.__name__ for t in types)})"
            return ("a subclass of a layer type; its owner may use its weight without calling forward "
                    "(e.g. attention projections), so DropConnect converts exact types only")
        return "DropConnect converts " + ", ".join(LAYER_TYPES)
    return can_wrap


def classifier_head(model: nn.Module) -> str | None:
    """The name of the last ``nn.Linear`` in ``named_modules()`` order: by our convention, the classifier head."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def apply_dropconnect(
    model: nn.Module,
    p: float = 0.5,
    *,
    include: Sequence[str] | None = None,
    layer_types: Sequence[str] = ("Linear",),
    mode: str = "step",
    drop_bias: bool = False,
    randomness: LayerRandomness | None = None,
    predicate: Predicate | None = None,
    exclude: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> SurgeryReport:
    """Convert layers of ``model`` to DropConnect in place (idempotent; parameter names unchanged).

    Args:
        model: any module.
        p: drop probability in [0, 1); 0 converts nothing (the plain model is the exact identity).
        include: glob patterns on qualified module names (a pattern also selects the layers inside a
            match); ``None`` selects every layer of ``layer_types`` except the classifier head (the last
            ``nn.Linear`` in ``named_modules()`` order).
        layer_types: names from :data:`LAYER_TYPES`.
        mode: ``step`` or ``sample`` (Linear only).
        drop_bias: also drop bias entries.
        randomness: shared generators (the callback passes its own); a private one seeded with 0 when ``None``.
        predicate: extra filter ``(name, module) -> bool``.
        exclude: glob patterns of layers (or of modules whose layers) to leave as they are.
        layers: deprecated: use ``include``.

    Returns:
        What was converted.

    Raises:
        InvalidArgumentError: a bad argument, or a pattern that matches nothing convertible.
        ModelNotSupportedError: the default rule finds no layer (e.g. a model whose only Linear is the head).

    Examples:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> apply_dropconnect(net, 0.3).converted
        ['0']
    """
    include, exclude = check_dropconnect_args(p, mode, include, layer_types, exclude, layers=layers)
    report = SurgeryReport("DropConnect", detail=f"p={p}, mode={mode!r}, drop_bias={drop_bias}")
    if p == 0:
        return report
    types = tuple(LAYER_TYPES[n] for n in layer_types)
    head = classifier_head(model)
    default = None
    if include is None:
        def default(name: str, module: nn.Module) -> bool:
            return name != head
    chosen = select_modules(model, include, can_wrap=_can_wrap(types), arg_name="include", trick="DropConnect",
                            default=default, predicate=predicate, exclude=exclude)
    if not chosen:
        where = f"besides the classifier head {head!r}" if head is not None else "(it has no Linear classifier head)"
        add_conv = "" if "Conv2d" in layer_types else ", or add 'Conv2d' to `layer_types`"
        raise ModelNotSupportedError(
            f"DropConnect found no {'/'.join(layer_types)} layer in {type(model).__name__} {where}: pass `include` "
            f"(glob patterns on module names, e.g. ['*fc*']) to choose layers, the head included{add_conv}."
        )
    if mode == "sample":
        convs = [n for n, m in chosen if not isinstance(m, nn.Linear)]
        if convs:
            raise InvalidArgumentError(f"`mode`='sample' is invalid for the convolutions {convs[:4]}: expected "
                                       "'step' (per-sample masks are for Linear layers), or select Linear layers only.")
    if include is None and head is not None and head not in dict(chosen) and not any(
            name_matches(head, pattern) for pattern in exclude or ()):
        report.skipped.append((head, "the classifier head (last Linear); select it with `include` to include it"))
    before = list(model.state_dict().keys())
    shared = randomness if randomness is not None else LayerRandomness(0)
    for index, (name, module) in enumerate(chosen):
        (report.converted if swap_class(module, _mixin_for(module)) else report.already).append(name)
        module._lt_configure(p, mode, drop_bias, shared, index)  # type: ignore[attr-defined]
    keys_unchanged(before, model, "DropConnect")
    return report


class DropConnect(StructuralCallback):
    """DropConnect on an unmodified LightningModule: Linear (and optionally Conv) weights dropped in training.

    At ``setup`` (before checkpoint restore and DDP wrapping) the chosen layers become DropConnect layers
    in place; parameter names do not change, so checkpoints load with or without the callback. In
    training each layer computes with ``W * M / (1 - p)``, ``M ~ Bernoulli(1 - p)``, a fresh mask every
    training step (``mode='step'``) or every example (``mode='sample'``, Linear only); eval uses ``W``.
    Masks come from the callback's own generator keyed by (seed, rank, step, layer): ranks draw
    different masks (they see different data), and a resumed run draws what the uninterrupted one would.

    Default layers: every ``nn.Linear`` except the classifier head, which we define as the last
    ``nn.Linear`` in ``named_modules()`` order (dropping logit weights perturbs the outputs directly; the
    paper applies DropConnect to the hidden fully connected layer). ``include`` overrides it.

    Args:
        p: drop probability of each weight, in [0, 1). 0 converts nothing (exact identity, no extra kernels).
        include: glob patterns on qualified module names of the LightningModule (e.g. ``["model.head.1"]``,
            ``["*fc*"]``); a pattern also selects the layers inside a match (``["model.head"]``); each must
            select a layer of ``layer_types``.
        layer_types: which layer types to convert: ``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``.
        mode: ``step`` (default) or ``sample`` (per-example masks via batched matmul; Linear only; memory
            ``batch x out x in`` per layer).
        drop_bias: also drop bias entries.
        seed: seed of the masks; ``None`` uses the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        exclude: glob patterns of layers to leave as they are (applied after ``include`` or the default rule).
        log: log ``dropconnect/p``, the drop probability applied, at every training batch (``pl_module.log``,
            so ``EarlyStopping``/``ModelCheckpoint`` can monitor it); ``False`` logs nothing.
        layers: deprecated: use ``include``.

    Raises:
        InvalidArgumentError: a bad argument, or an ``include``/``exclude`` pattern that matches nothing convertible.
        ModelNotSupportedError: (at setup) no layer found by the default rule.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DropConnect(p=0.5)], logger=False)  # doctest: +SKIP
    """

    converts = "layers"

    def __init__(self, p: float = 0.5, include: list[str] | None = None, layer_types: list[str] | None = None,
                 mode: str = "step", drop_bias: bool = False, seed: int | None = None,
                 exclude: list[str] | None = None, log: bool = True, layers: list[str] | None = None) -> None:
        super().__init__(seed)
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        layer_types = ["Linear"] if layer_types is None else list(layer_types)
        include, exclude = check_dropconnect_args(p, mode, include, layer_types, exclude, layers=layers)
        self.p, self.include, self.exclude, self.layer_types = p, include, exclude, layer_types
        self.mode, self.drop_bias = mode, drop_bias

    @property
    def state_key(self) -> str:
        # `layers`: include's name in the first release, so its checkpoints resume
        return self.selection_state_key(p=self.p, layers=self.include, mode=self.mode)

    def init_args(self) -> dict[str, Any]:
        return {"p": self.p, "include": self.include, "exclude": self.exclude, "layer_types": self.layer_types,
                "mode": self.mode, "drop_bias": self.drop_bias, "seed": self.randomness.seed}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.log_enabled and self.report is not None and self.report.total:
            pl_module.log("dropconnect/p", self.p, on_step=True, on_epoch=False)

    def convert(self, model: nn.Module, randomness: LayerRandomness, modules: list[str] | None = None
                ) -> SurgeryReport:
        # eval uses the plain weights (inverted scaling): nothing to record in checkpoints
        return apply_dropconnect(model, self.p, include=self.include if modules is None else modules,
                                 exclude=self.exclude if modules is None else None,
                                 layer_types=self.layer_types, mode=self.mode, drop_bias=self.drop_bias,
                                 randomness=randomness)


__all__ = ["DropConnect", "DropConnectConv2d", "DropConnectLinear", "apply_dropconnect", "classifier_head",
           "dropconnect_weight"]
