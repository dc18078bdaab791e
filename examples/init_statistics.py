"""The lectures' experiment: activation statistics of a 6-layer net for five initializations.

Run:  python examples/init_statistics.py [--out runs/init_statistics.png] [--seed 0] [--fast]

``x ~ N(0, 1)`` (batch 16) goes through 6 bias-free layers of 4096 units, ``h = f(W h)``, with
``f = tanh`` and ``W = 0.01 * randn``, ``0.05 * randn`` or Xavier (``randn / sqrt(Din)``: our
``lecun_normal``), then ``f = relu`` with Xavier and with Kaiming (``randn * sqrt(2 / Din)``). It prints
the std of each layer's activations and the fraction saturated (``|tanh| > 0.99``), and writes one
figure per case (mean and std per layer, one histogram per layer) stacked into one PNG (under
``runs/``, which git ignores). ``--fast`` uses layers of 256 units (a smoke test, same trends).
``python -m benchmarks init_effect`` writes the table to RESULTS.md, which docs/init.md includes.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from lightning_tricks.init import LECTURE_CASES, deep_network_statistics, plot_activation_statistics


def statistics_table(results: dict) -> str:
    """Markdown table of each case's per-layer activation std, last/first ratio and saturated fraction."""
    lines = ["| case | " + " | ".join(f"layer {i}" for i in range(1, 7)) + " | layer 6 / layer 1 | saturated (mean) |",
             "|---|" + "---:|" * 8]
    for label, stats in results.items():
        saturated = [s.saturated_fraction for s in stats if s.saturated_fraction is not None]
        sat = f"{sum(saturated) / len(saturated):.2f}" if saturated else "-"
        lines.append(f"| {label} | " + " | ".join(f"{s.std:.3f}" for s in stats) +
                     f" | {stats[-1].std / stats[0].std:.2f} | {sat} |")
    return "\n".join(lines)


def lecture_statistics(seed: int = 0, width: int = 4096) -> dict:
    """Case label -> per-layer statistics of the lectures' five cases (7 layers of ``width`` units)."""
    return {label: deep_network_statistics(act, scheme, std, dims=(width,) * 7, seed=seed)
            for label, (act, scheme, std) in LECTURE_CASES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/init_statistics.png", help="PNG with the five figures stacked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="layers of 256 units instead of 4096 (a smoke test)")
    args = parser.parse_args()
    start = time.perf_counter()
    width = 256 if args.fast else 4096
    results = lecture_statistics(args.seed, width)

    print(f"std of each layer's activations (dims = [{width}] * 7, batch 16, x ~ N(0, 1)):\n")
    print(statistics_table(results))

    from matplotlib.figure import Figure
    from matplotlib.image import imread

    panels = []
    for label, stats in results.items():
        buffer = io.BytesIO()
        plot_activation_statistics(stats, title=label).savefig(buffer, format="png", dpi=70)
        buffer.seek(0)
        panels.append(imread(buffer))
    height = sum(p.shape[0] for p in panels) / 70
    figure = Figure(figsize=(panels[0].shape[1] / 70, height))
    for i, panel in enumerate(panels):
        ax = figure.add_axes((0, 1 - (i + 1) / len(panels), 1, 1 / len(panels)))
        ax.imshow(panel)
        ax.axis("off")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=70)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
