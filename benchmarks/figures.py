"""Method-card figures drawn from the tables of ``benchmarks/RESULTS.md`` (no training, a few seconds).

Each figure reads one RESULTS.md section, plots its table and writes ``docs/img/<name>.png`` with the
hash of the numbers it plotted in the PNG's ``Source`` text field; ``tests/test_figures.py`` fails when
a section's numbers change and the figure was not redrawn, so a card's figure cannot drift from its
included table.

Example:
    ``python -m benchmarks figures``            (all figures)
    ``python -m benchmarks figures --check``    (exit 1 naming the stale figures; writes nothing)
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_PATH, section_markers

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"
_MEAN_STD = re.compile(r"^\s*([-+]?[\d.]+)\s*±\s*([\d.]+)")
_PAREN_DELTA = re.compile(r"\(([-+][\d.]+)\)")


def section_text(section: str, path: str | Path = RESULTS_PATH) -> str:
    """The markdown between ``section``'s markers in the results file.

    Raises:
        KeyError: the file has no such section.
    """
    start, end = section_markers(section)
    text = Path(path).read_text()
    if start not in text or end not in text:
        raise KeyError(f"section {section!r} is not in {path}: run its benchmark first.")
    return text.split(start, 1)[1].split(end, 1)[0]


def first_table(markdown: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``markdown``, as header -> cell text.

    Raises:
        ValueError: there is no table.
    """
    lines = [line.strip() for line in markdown.splitlines()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1]):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True)))
            return rows
    raise ValueError("no markdown table found.")


def mean_std(cell: str) -> tuple[float, float]:
    """``'97.8 ± 0.4'`` (anything may follow) -> ``(97.8, 0.4)``."""
    match = _MEAN_STD.match(cell)
    if match is None:
        raise ValueError(f"{cell!r} is not 'mean ± std'.")
    return float(match.group(1)), float(match.group(2))


def _bars(ax: Any, labels: Sequence[str], groups: dict[str, tuple[list[float], list[float] | None]]) -> None:
    width = 0.8 / len(groups)
    for k, (name, (values, errors)) in enumerate(groups.items()):
        positions = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(positions, values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.legend(fontsize=8)


def regularization_effect(rows: list[dict[str, str]], ax: Any) -> None:
    labels = [row["configuration"] for row in rows]
    groups = {}
    for column, name in (("val accuracy % (mean ± std)", "validation"), ("test accuracy % (mean ± std)", "test")):
        pairs = [mean_std(row[column]) for row in rows]
        groups[name] = ([m for m, _ in pairs], [s for _, s in pairs])
    _bars(ax, labels, groups)
    low = min(m - s for values, errs in groups.values() for m, s in zip(values, errs or [], strict=True))
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set_ylabel("accuracy % (mean ± std over seeds)")
    ax.set_title("Cutout and Mixup, digits with 300 training images", fontsize=10)


def tta_effect(rows: list[dict[str, str]], ax: Any) -> None:
    labels = [row["views"] for row in rows]
    columns = [c for c in rows[0] if c != "views"]
    height = 0.8 / len(columns)
    for k, column in enumerate(columns):
        deltas = []
        for row in rows:
            match = _PAREN_DELTA.search(row[column])
            if match is None:
                raise ValueError(f"{row[column]!r} has no '(+change)'.")
            deltas.append(float(match.group(1)))
        ax.barh([i + (k - (len(columns) - 1) / 2) * height for i in range(len(rows))], deltas, height, label=column)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_xlabel("test accuracy change vs no TTA (points, mean over seeds)")
    ax.set_title("Test-time augmentation on digits 32x32", fontsize=10)


def ensemble_effect(rows: list[dict[str, str]], ax: Any) -> None:
    rows = [row for row in rows if row["seed"] not in ("mean", "std")]
    columns = ["mean member", "best member", "soft voting", "snapshot ensemble"]
    _bars(ax, [f"seed {row['seed']}" for row in rows],
          {column: ([float(row[column]) for row in rows], None) for column in columns})
    low = min(float(row[column]) for row in rows for column in columns)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy %")
    ax.set_title("Members vs ensembles, digits with 100 training images", fontsize=10)


def activation_dead_units(rows: list[dict[str, str]], ax: Any) -> None:
    activations = list(dict.fromkeys(row["activation"] for row in rows))
    rates = list(dict.fromkeys(row["lr"] for row in rows))
    cell = {(row["lr"], row["activation"]): row for row in rows}
    groups = {f"lr {lr}": ([float(cell[lr, a]["val acc (mean)"]) for a in activations], None) for lr in rates}
    _bars(ax, activations, groups)
    width = 0.8 / len(rates)
    for k, lr in enumerate(rates):
        for i, activation in enumerate(activations):
            row = cell[lr, activation]
            ax.annotate(f"dead {row['mean']}\ndiverged {row['diverged (loss NaN)']}",
                        (i + (k - (len(rates) - 1) / 2) * width, float(row["val acc (mean)"])),
                        ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(rates))
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title("Activation swapped into the dead-ReLU MLP, digits", fontsize=10)


def _seed_bars(ax: Any, labels: Sequence[str], rows: list[dict[str, str]], mean_column: str, seeds_column: str,
               low: float | None = None) -> None:
    """Horizontal bars of ``mean ± std`` cells with each seed's value as a dot; x from ``low`` (default 0) to 100."""
    pairs = [mean_std(row[mean_column]) for row in rows]
    ax.barh(range(len(rows)), [m for m, _ in pairs], xerr=[s for _, s in pairs], capsize=3)
    for i, row in enumerate(rows):
        seeds = [float(v) for v in row[seeds_column].split(",")]
        ax.plot(seeds, [i] * len(seeds), "k.", markersize=5)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0 if low is None else low, 100)
    ax.set_xlabel("test accuracy % (bars: mean ± std over seeds; dots: one seed each)")


def large_batch_effect(rows: list[dict[str, str]], ax: Any) -> None:
    _seed_bars(ax, [row["run"] for row in rows], rows, "test accuracy % (mean ± std)", "per seed %")
    ax.set_title("Linear scaling rule and warm-up on digits", fontsize=10)


def stochastic_depth_effect(rows: list[dict[str, str]], ax: Any) -> None:
    labels = [row["model"].replace("StochasticDepth(0.5), ", "").replace(" + ", "\n+ ") for row in rows]
    _seed_bars(ax, labels, rows, "test accuracy % (mean ± std)", "per seed %")
    ax.set_title("StochasticDepth(0.5) on ResNet-20, digits 32x32, short schedule", fontsize=10)


def fractional_pooling_effect(rows: list[dict[str, str]], ax: Any) -> None:
    labels = [f"{row['model / test procedure'].replace(' (', chr(10) + '(')}\ntest NLL {row['test NLL (mean)']}"
              for row in rows]
    low = min(float(v) for row in rows for v in row["per seed accuracy %"].split(","))
    _seed_bars(ax, labels, rows, "test accuracy % (mean ± std)", "per seed accuracy %", low=max(0.0, low - 2))
    ax.set_title("Fractional max pooling on digits, test procedures", fontsize=10)


def tune_search(rows: list[dict[str, str]], ax: Any) -> None:
    columns = {"grid": "grid: best val_acc", "random": "random: best val_acc"}
    groups = {name: ([float(row[column].split()[0]) for row in rows], None) for name, column in columns.items()}
    _bars(ax, [f"seed {row['seed']}" for row in rows], groups)
    low = min(v for values, _ in groups.values() for v in values)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("best validation accuracy of the study")
    ax.set_title("Random vs grid search, same budget of trials, digits", fontsize=10)


@dataclass(frozen=True)
class Figure:
    """One card figure: the RESULTS.md section it plots and how."""

    name: str
    section: str
    draw: Callable[[list[dict[str, str]], Any], None]
    size: tuple[float, float] = (6.4, 3.6)

    @property
    def path(self) -> Path:
        return IMAGES / f"{self.name}.png"


FIGURES = (
    Figure("regularization_effect", "regularization-effect", regularization_effect),
    Figure("tta_effect", "tta-effect", tta_effect, (7.2, 4.2)),
    Figure("ensemble_effect", "ensemble-effect", ensemble_effect),
    Figure("activation_dead_units", "activations-effect", activation_dead_units, (7.2, 4.2)),
    Figure("large_batch_effect", "large_batch", large_batch_effect),
    Figure("stochastic_depth_effect", "stochastic_depth_effect", stochastic_depth_effect, (7.6, 3.6)),
    Figure("fractional_pooling_effect", "fractional_pooling_effect", fractional_pooling_effect, (7.6, 3.6)),
    Figure("tune_search", "tune-search", tune_search),
)


def source_tag(figure: Figure, results: str | Path = RESULTS_PATH) -> str:
    """What a current PNG of ``figure`` carries in its ``Source`` field: the section and a hash of its table."""
    rows = first_table(section_text(figure.section, results))
    digest = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
    return f"benchmarks/RESULTS.md section {figure.section}, table sha256 {digest}"


def draw(figure: Figure, out: Path, results: str | Path = RESULTS_PATH) -> Path:
    """Plot ``figure`` from the results file into ``out`` (PNG, with :func:`source_tag` in its metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figure.size)
    figure.draw(first_table(section_text(figure.section, results)), ax)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, metadata={"Source": source_tag(figure, results)})
    plt.close(fig)
    return out


def stale(figure: Figure, results: str | Path = RESULTS_PATH, png: Path | None = None) -> bool:
    """Whether ``figure``'s PNG (``png``, default its ``docs/img`` file) is missing or was drawn from
    other numbers than the results file's."""
    from PIL import Image

    png = figure.path if png is None else png
    if not png.exists():
        return True
    with Image.open(png) as image:
        return image.text.get("Source") != source_tag(figure, results)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks figures", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"figures to draw (default all: {', '.join(f.name for f in FIGURES)})")
    p.add_argument("--check", action="store_true", help="only report stale figures; exit 1 if any")
    args = p.parse_args(argv)
    known = {f.name: f for f in FIGURES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] or list(FIGURES)
    if args.check:
        old = [f.name for f in chosen if stale(f)]
        print(f"stale: {', '.join(old)} (run python -m benchmarks figures)" if old else "all figures current")
        return 1 if old else 0
    for figure in chosen:
        print(f"wrote {draw(figure, figure.path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
