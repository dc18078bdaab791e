"""Measured effect of fractional max pooling on digits: test accuracy of 12 averaged pooling draws vs 1 draw.

For each seed, the zoo ``simple_cnn`` is trained on scikit-learn's 8x8 digits twice: with its two
``MaxPool2d(2)`` layers (plain) and with ``FractionalMaxPooling()`` (ratio 1/sqrt(2), overlapping
regions). The fractional model is then evaluated on the held-out test split (270 images) four ways:
fixed regions (our deterministic eval), one random draw (the mean over ``--samples`` independent
single draws), and the average of ``--samples`` draws (the paper's test procedure, 12 in its MNIST
table), in accuracy and negative log-likelihood. Few epochs on a small dataset: read the spread.

Example:
    ``python -m benchmarks fractional_pooling_effect --epochs 15 --seeds 0 1 2``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks._cli import BenchmarkParser, publish
from benchmarks._digits import train_digits
from benchmarks.harness import mean_std
from lightning_tricks import FractionalMaxPooling
from lightning_tricks.regularization.fractional_pooling import average_pooling_draws, fractional_pools


def _test_split(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(data.test_dataloader()), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _scores(log_probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    return (log_probs.argmax(1) == y).float().mean().item(), F.nll_loss(log_probs, y).item()


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("fractional_pooling_effect", __doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=12, help="pooling draws averaged at test (default 12)")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("plain", "fixed", "one", "average")}
    for seed in args.seeds:
        model, data, _ = train_digits("simple_cnn", [], seed, args.epochs, args.lr)
        x, y = _test_split(data)
        with torch.no_grad():
            rows["plain"].append(_scores(model(x).log_softmax(1), y))
        callback = FractionalMaxPooling(seed=seed)
        model, data, _ = train_digits("simple_cnn", [callback], seed, args.epochs, args.lr)
        assert len(fractional_pools(model)) == 2
        with torch.no_grad():
            rows["fixed"].append(_scores(model(x).log_softmax(1), y))
            callback.randomness.reset_eval()
            singles = [_scores(average_pooling_draws(model, x, 1), y) for _ in range(args.samples)]
            rows["one"].append((sum(a for a, _ in singles) / len(singles), sum(n for _, n in singles) / len(singles)))
            rows["average"].append(_scores(average_pooling_draws(model, x, args.samples), y))
        print(f"seed {seed}: " + ", ".join(f"{k} acc {v[-1][0]:.4f} nll {v[-1][1]:.4f}" for k, v in rows.items()),
              flush=True)
    labels = {"plain": "MaxPool2d (plain simple_cnn)", "fixed": "fractional, fixed regions (deterministic eval)",
              "one": "fractional, 1 random draw", "average": f"fractional, {args.samples} draws averaged"}
    table = ["| model / test procedure | test accuracy % (mean ± std) | test NLL (mean) | per seed accuracy % |",
             "|---|---:|---:|---|"]
    for key, label in labels.items():
        accs = [a for a, _ in rows[key]]
        nll = sum(n for _, n in rows[key]) / len(rows[key])
        table.append(f"| {label} | {mean_std(accs)} | {nll:.4f} | {', '.join(f'{100 * a:.2f}' for a in accs)} |")
    lines = [
        f"Zoo `simple_cnn` on scikit-learn digits 8x8 (train 1257 / test 270 images), SGD lr {args.lr} momentum 0.9, "
        f"cosine schedule, batch 64, {args.epochs} epochs, seeds {args.seeds}, torch threads {torch.get_num_threads()}. "
        f"'1 random draw' is the mean over {args.samples} independent single draws.",
        "",
        *table,
    ]
    publish(args, "test accuracy, fractional pooling with k-draw averaging (digits)", lines)
    return 0
