"""Per-layer activation statistics and the lectures' figure: are the activations well scaled?

The CS231n lectures diagnose an initialization by the distribution of each layer's activations: with
``0.01 * randn`` in a deep tanh net they collapse toward zero, with ``0.05 * randn`` they saturate at
+-1, with Xavier they stay "just right"; in a ReLU net Xavier halves the variance per layer and
Kaiming keeps it flat. :func:`activation_statistics` measures exactly that (mean, std, fraction of
zeros, fraction saturated, histogram) and :func:`plot_activation_statistics` draws the figure;
:func:`deep_network_statistics` runs the lectures' experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_tricks.core.distributed import all_reduce
from lightning_tricks.core.selection import class_names
from lightning_tricks.core.validation import InvalidArgumentError, check_choice, check_int
from lightning_tricks.init._measure import run_with_hooks
from lightning_tricks.init.schemes import init_weights, select_modules

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACTIVATION_TYPES = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
                    "Mish", "Softplus", "Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softsign",
                    "LogSigmoid", "Tanhshrink")
"""Module types whose outputs :func:`activation_statistics` measures by default (``torch.nn`` activations)."""

SATURATION = 0.99
"""A tanh output is saturated when ``|y| > 0.99``; a sigmoid output when ``y < 0.01`` or ``y > 0.99``."""


@dataclass
class LayerStatistics:
    """The distribution of one layer's output over a batch.

    Attributes:
        name: module name (``"net.3"``; a module called k > 1 times in one forward pass gets
            ``"net.3#k"`` for its k-th call).
        kind: the module's class name.
        mean: mean of all output elements.
        std: standard deviation of all output elements.
        zero_fraction: fraction of elements exactly 0 (dead ReLU outputs).
        saturated_fraction: fraction saturated for tanh/sigmoid outputs (see :data:`SATURATION`);
            None for other layers.
        numel: number of elements measured (all ranks).
        histogram: counts over ``bins`` equal bins between ``low`` and ``high`` (empty without bins).
        low: smallest element.
        high: largest element.
    """

    name: str
    kind: str
    mean: float
    std: float
    zero_fraction: float
    saturated_fraction: float | None
    numel: int
    histogram: list[int] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _saturation_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    return None


def _saturated(y: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind == "tanh":
        return (y.abs() > SATURATION).sum(dtype=torch.float64)
    if kind == "sigmoid":
        return ((y < 1 - SATURATION) | (y > SATURATION)).sum(dtype=torch.float64)
    return y.new_zeros((), dtype=torch.float64)


def activation_statistics(
    model: nn.Module,
    inputs: Any,
    *,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bins: int = 50,
) -> list[LayerStatistics]:
    """Mean, std, fraction of zeros, fraction saturated and a histogram of each layer's output.

    The model runs under ``no_grad`` in eval mode with batch norm using the batch's statistics (as in
    training; running statistics are restored), so measuring changes nothing. Under DDP every rank
    must call it: the statistics and histograms are all-reduced, so they describe all ranks' batches
    and are identical everywhere. Histograms take a second forward pass (their common range is
    known only after the first); ``bins=0`` skips them.

    Args:
        model: any ``nn.Module``; ``model(inputs)`` runs the forward pass.
        inputs: the batch the model takes.
        layer_types: whose outputs to measure (default :data:`ACTIVATION_TYPES`: the activations, as
            in the lectures; ``["Conv2d", "Linear"]`` measures pre-activations).
        include: name patterns to restrict the layers to (see ``select_modules``).
        exclude: name patterns to drop.
        bins: histogram bins (0: no histogram).

    Returns:
        One :class:`LayerStatistics` per call of a selected module, in forward order.

    Raises:
        InvalidArgumentError: no selected layer (e.g. a model that applies its activations as
            functions: pass ``layer_types``), or ``bins < 0``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh())
        >>> stats = activation_statistics(net, torch.randn(32, 100), bins=0)
        >>> [s.name for s in stats], 0 < stats[0].std < 1
        (['1', '3'], True)
    """
    check_int("bins", bins, 0)
    if layer_types is None and not any(class_names(m) & set(ACTIVATION_TYPES) for m in model.modules()):
        raise InvalidArgumentError(
            f"activation_statistics found no activation module in {type(model).__name__} (looked for "
            f"{', '.join(ACTIVATION_TYPES[:6])}, ...): it may apply its activations as functions; pass "
            "`layer_types`, e.g. ['Conv2d', 'Linear'] to measure the layers' outputs."
        )
    layers = select_modules(model, layer_types, include, exclude, default_types=ACTIVATION_TYPES,
                            owner="activation_statistics")
    names = {id(m): n for n, m in layers}
    order: list[tuple[str, nn.Module]] = []
    moments: list[torch.Tensor] = []

    def measure(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        calls = sum(1 for _, m in order if m is module)
        order.append((names[id(module)] + (f"#{calls + 1}" if calls else ""), module))
        y = output.detach()
        moments.append(torch.stack([
            torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device), y.sum(dtype=torch.float64),
            y.float().square().sum(dtype=torch.float64), (y == 0).sum(dtype=torch.float64),
            _saturated(y, _saturation_kind(module)), -y.min().double(), y.max().double(),
        ]))

    run_with_hooks(model, inputs, [m for _, m in layers], measure)
    if not moments:
        raise InvalidArgumentError(f"activation_statistics: the forward pass of {type(model).__name__} ran none of the "
                                   f"selected layers ({', '.join(n for n, _ in layers[:5])}).")
    table = torch.stack(moments)
    sums = all_reduce(table[:, :5].clone())
    extremes = all_reduce(table[:, 5:].clone(), op="max")
    lows, highs = (-extremes[:, 0]).tolist(), extremes[:, 1].tolist()
    histograms = _histograms(model, inputs, order, lows, highs, bins) if bins else [[] for _ in order]
    stats = []
    for (name, module), (count, total, squares, zeros, saturated), low, high, hist in zip(
            order, sums.tolist(), lows, highs, histograms, strict=True):
        mean = total / count
        std = max(squares / count - mean * mean, 0.0) ** 0.5
        kind = _saturation_kind(module)
        stats.append(LayerStatistics(name, type(module).__name__, mean, std, zeros / count,
                                     saturated / count if kind else None, int(count), hist, low, high))
    return stats


def _histograms(model: nn.Module, inputs: Any, order: list[tuple[str, nn.Module]], lows: list[float],
                highs: list[float], bins: int) -> list[list[int]]:
    counts: list[torch.Tensor] = []

    def count(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            i = len(counts)
            low, high = lows[i], highs[i]
            if high <= low:
                high = low + 1e-6  # a constant output: one full bin
            counts.append(torch.histc(output.detach().float(), bins, low, high).double())

    run_with_hooks(model, inputs, [m for _, m in order], count)
    return [[round(c) for c in row] for row in all_reduce(torch.stack(counts)).tolist()]


def plot_activation_statistics(stats: Sequence[LayerStatistics], title: str = "") -> Figure:
    """The lectures' figure: mean and std per layer, then one histogram per layer.

    Args:
        stats: what :func:`activation_statistics` returned.
        title: the figure's title.

    Returns:
        A matplotlib ``Figure`` (Agg backend; save it with ``fig.savefig``).
    """
    from matplotlib.figure import Figure

    n = len(stats)
    columns = min(n, 8)
    rows = 1 + (n + columns - 1) // columns
    fig = Figure(figsize=(2.2 * max(columns, 4), 2.0 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, columns)
    half = max(columns // 2, 1)
    axes_mean = fig.add_subplot(grid[0, :half])
    axes_std = fig.add_subplot(grid[0, half:] if columns > 1 else grid[0, :])
    layer_ids = range(1, n + 1)
    axes_mean.plot(layer_ids, [s.mean for s in stats], "o-")
    axes_mean.set_title("mean per layer", fontsize=9)
    axes_std.plot(layer_ids, [s.std for s in stats], "o-", color="tab:orange")
    axes_std.set_title("std per layer", fontsize=9)
    # axes from zero (std) and over +-max std (mean), so that flat looks flat and a mean is read against the spread
    spread = max([s.std for s in stats] + [abs(s.mean) for s in stats] + [1e-12]) * 1.15
    axes_std.set_ylim(0, spread)
    axes_mean.set_ylim(-spread, spread)
    for ax in (axes_mean, axes_std):
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    for i, s in enumerate(stats):
        ax = fig.add_subplot(grid[1 + i // columns, i % columns])
        if s.histogram:
            edges = torch.linspace(s.low, s.high if s.high > s.low else s.low + 1e-6, len(s.histogram) + 1)
            ax.stairs(s.histogram, edges.tolist(), fill=True)
        ax.set_title(f"{s.name}\nmean {s.mean:.3g} std {s.std:.3g}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------- the lectures' experiment

LECTURE_CASES = {
    "tanh, 0.01*randn": ("tanh", "normal", 0.01),
    "tanh, 0.05*randn": ("tanh", "normal", 0.05),
    "tanh, Xavier": ("tanh", "lecun_normal", None),
    "relu, Xavier": ("relu", "lecun_normal", None),
    "relu, Kaiming": ("relu", "kaiming_normal", None),
}
"""The lectures' five cases: label -> (activation, scheme, std). Their "Xavier" is ``lecun_normal``."""


def deep_network_statistics(
    activation: str = "tanh",
    scheme: str = "lecun_normal",
    std: float | None = None,
    dims: Sequence[int] = (4096,) * 7,
    batch_size: int = 16,
    seed: int = 0,
    bins: int = 50,
) -> list[LayerStatistics]:
    """The lectures' experiment: ``x ~ N(0, 1)`` through ``len(dims) - 1`` bias-free layers ``h = f(W h)``.

    ``dims=[4096] * 7``, batch 16 gives the 6-layer net of the slides. The weights are drawn with
    :func:`~lightning_tricks.init.init_weights` (``scheme``, and ``std`` for ``normal``; the gain is 1,
    as in the lectures' code) from a generator seeded by ``seed``; the input from ``seed + 1``.

    Args:
        activation: ``tanh`` or ``relu``.
        scheme: an init scheme (``normal``, ``lecun_normal`` = the lectures' Xavier, ``kaiming_normal``...).
        std: the std of ``normal``.
        dims: layer widths, input first.
        batch_size: rows of ``x``.
        seed: seed of the weights and the input.
        bins: histogram bins.

    Returns:
        The statistics of each layer's activation (after the nonlinearity).

    Examples:
        >>> stats = deep_network_statistics("relu", "kaiming_normal", dims=[256] * 4, batch_size=64, bins=0)
        >>> len(stats), all(0.5 < s.std < 1.0 for s in stats)
        (3, True)
    """
    check_choice("activation", activation, ("tanh", "relu"))
    if len(dims) < 2:
        raise InvalidArgumentError(f"`dims`={list(dims)!r} is invalid: expected at least 2 widths (input and one layer).")
    act = nn.Tanh if activation == "tanh" else nn.ReLU
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=False):
        layers += [nn.Linear(d_in, d_out, bias=False, device="meta").to_empty(device="cpu"), act()]
    net = nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {"std": std} if scheme == "normal" else {}
    init_weights(net, scheme, generator=generator, **kwargs)
    x = torch.randn(batch_size, dims[0], generator=torch.Generator().manual_seed(seed + 1))
    return activation_statistics(net, x, bins=bins)


__all__ = [
    "ACTIVATION_TYPES",
    "LECTURE_CASES",
    "LayerStatistics",
    "SATURATION",
    "activation_statistics",
    "deep_network_statistics",
    "plot_activation_statistics",
]
