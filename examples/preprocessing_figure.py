"""The lectures' preprocessing figure from our functional core: original, zero-centered, normalized,
decorrelated (PCA) and whitened versions of correlated 2-D data.

    python examples/preprocessing_figure.py [--out docs/img/preprocessing.png] [--fast]

Each panel is ``fit_statistics(batches, mode).apply(x)`` with the mode named in its title, computed in one
streaming pass over batches of the data, as the ``Standardize`` callback does over a training loader.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_tricks.setup.preprocessing import fit_statistics


def panels(n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """The five versions of the data, by title."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.tensor([[2.0, 0.9], [0.0, 0.6]],
                                                                              dtype=torch.float64)
    x = x + torch.tensor([4.0, 2.0], dtype=torch.float64)
    out = {"original": x}
    for title, mode in (("zero-centered", "center"), ("normalized", "feature"), ("decorrelated (pca)", "pca"),
                        ("whitened", "whiten")):
        stats = fit_statistics(x.split(128), mode)
        out[title] = stats.to("cpu", torch.float64).apply(x)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/preprocessing.png")
    parser.add_argument("--fast", action="store_true", help="200 points instead of 1000 (a smoke test)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = panels(200 if args.fast else 1000)
    fig, axes = plt.subplots(1, len(data), figsize=(3 * len(data), 3.2))
    for ax, (title, x) in zip(axes, data.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5)
        ax.axhline(0, color="gray", lw=0.5)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xlim(-7, 9)
        ax.set_ylim(-7, 9)
        ax.set_aspect("equal")
        cov = torch.cov(x.T)
        ax.set_title(f"{title}\ncov [[{cov[0, 0]:.2f}, {cov[0, 1]:.2f}], [.., {cov[1, 1]:.2f}]]", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
