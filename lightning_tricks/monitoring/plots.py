"""Plots for the monitors: the dead-unit heat map (layers x epochs), and sending figures to loggers.

Figures are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, no global backend
switch, no display needed), so plotting is safe on headless training nodes and inside DDP workers.

Examples:
    >>> fig = dead_unit_heatmap({"fc1": [0.0, 0.2], "fc2": [0.1, 0.5]}, epochs=[0, 1])
    >>> figure_to_array(fig).shape[-1]
    3
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported lazily: only runs that draw pay for the import
    from matplotlib.figure import Figure

MAX_ANNOTATED_CELLS = 400
"""Heat maps with at most this many cells get their percentages written in the cells."""


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def dead_unit_heatmap(
    fractions: Mapping[str, Sequence[float]],
    epochs: Sequence[int],
    title: str = "Dead units per layer",
    colorbar_label: str = "fraction of units dead",
) -> Figure:
    """A layers x epochs heat map of per-layer fractions (rows in the mapping's order, first layer on top).

    Args:
        fractions: layer name -> one fraction in [0, 1] per epoch (NaN where the layer was not seen).
        epochs: the epoch numbers of the columns.
        title: figure title.
        colorbar_label: label of the color scale.

    Returns:
        A matplotlib ``Figure`` attached to an Agg canvas (save it with :func:`save_figure`).

    Raises:
        ValueError: no layers, or a row whose length differs from ``epochs``.
    """
    names = list(fractions)
    if not names:
        raise ValueError("`fractions` is empty: there is no layer to draw.")
    for name in names:
        if len(fractions[name]) != len(epochs):
            raise ValueError(f"layer {name!r} has {len(fractions[name])} values for {len(epochs)} epochs.")
    data = np.array([[float(v) for v in fractions[n]] for n in names], dtype=float).reshape(len(names), len(epochs))
    label_width = max(len(n) for n in names)
    width = min(4.0 + 0.07 * label_width + 0.45 * len(epochs), 24.0)
    height = min(1.6 + 0.28 * len(names), 40.0)
    figure = _new_figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    axes.set_yticks(range(len(names)), names, fontsize=8)
    step = max(1, math.ceil(len(epochs) / 20))
    axes.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs][::step])
    axes.set_xlabel("epoch")
    axes.set_title(title)
    if data.size <= MAX_ANNOTATED_CELLS:
        for (row, col), value in np.ndenumerate(data):
            if np.isfinite(value):
                axes.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axes, label=colorbar_label)
    return figure


def update_ratio_plot(steps: Sequence[int], medians: Sequence[float], low: float = 1e-4, high: float = 1e-2,
                      title: str = "Update / weight ratio (median over parameter tensors)") -> Figure:
    """The median update/weight ratio over steps, on a log scale, with the healthy band shaded.

    Args:
        steps: optimizer steps of the measurements.
        medians: the median ratio at each of them.
        low: lower edge of the band (the warning threshold below).
        high: upper edge of the band.
        title: figure title.
    """
    figure = _new_figure(6.0, 3.2)
    axes = figure.add_subplot()
    axes.axhspan(low, high, color="tab:green", alpha=0.15, label=f"[{low:g}, {high:g}]")
    axes.axhline(1e-3, color="tab:green", lw=0.8, ls="--", label="1e-3 (CS231n)")
    axes.plot(list(steps), list(medians), marker="o", ms=3, color="tab:blue", label="median ratio")
    axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("||dW|| / ||W||")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 RGB array (what image loggers take)."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(loggers: Iterable[Any], tag: str, figure: Figure, step: int) -> list[str]:
    """Send ``figure`` to every logger that takes images; returns the names of those that took it.

    A logger takes images when it has a ``log_image(key, images, step)`` method (Weights & Biases
    style) or when its ``experiment`` has ``add_image(tag, array, step, dataformats)`` (TensorBoard
    style). Call it on rank zero only: a logger's ``experiment`` is a no-op stand-in on other ranks.
    """
    taken: list[str] = []
    array: np.ndarray | None = None
    for logger in loggers:
        if array is None:
            array = figure_to_array(figure)
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[array], step=step)
        elif callable(getattr(experiment, "add_image", None)):
            experiment.add_image(tag, array, step, dataformats="HWC")
        else:
            continue
        taken.append(type(logger).__name__)
    return taken


__all__ = ["dead_unit_heatmap", "figure_to_array", "log_figure", "save_figure", "update_ratio_plot"]
