"""Measured effect of stochastic depth on digits resized to 32x32: test accuracy of ResNet-20 with and without.

For each seed, the zoo ``resnet20`` is trained on scikit-learn's digits (bilinearly resized to 32x32)
four times: plain, with ``StochasticDepth(0.5, mode="batch")`` and the paper's test-time scaling
(``scaling="test"``), with the default inverted scaling (``scaling="train"``, as timm's drop_path), and
inverted in ``row`` mode (timm's recipe: per example, every branch computed). Test accuracy on
the held-out split (270 images) is reported as trained and, for the stochastic-depth models, after
``recalibrate_batch_norm`` (batch-norm statistics recomputed with every block on, one pass over the
training split), with the training wall time. Few epochs on a small dataset, far from the paper's
500-epoch CIFAR runs: read the spread, not a verdict on the method.

Example:
    ``python -m benchmarks stochastic_depth_effect --epochs 10 --seeds 0 1 2``
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks._digits import top1_accuracy, train_digits
from benchmarks.harness import mean_std
from lightning_tricks import StochasticDepth
from lightning_tricks.regularization.stochastic_depth import recalibrate_batch_norm


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("stochastic_depth_effect", __doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=None, choices=["plain", "test", "train", "train-row"],
                        help="run only these models (default: all)")
    args = parser.parse_args(argv)
    cases = {
        "plain": ("plain ResNet-20", lambda seed: []),
        "test": (f"StochasticDepth({args.drop_rate}), paper's test-time scaling", lambda seed: [
            StochasticDepth(args.drop_rate, scaling="test", seed=seed)]),
        "train": (f"StochasticDepth({args.drop_rate}), inverted scaling", lambda seed: [
            StochasticDepth(args.drop_rate, scaling="train", seed=seed)]),
        "train-row": (f"StochasticDepth({args.drop_rate}), inverted scaling, row mode", lambda seed: [
            StochasticDepth(args.drop_rate, mode="row", scaling="train", seed=seed)]),
    }
    configs = dict(value for key, value in cases.items() if args.cases is None or key in args.cases)
    rows = [*configs] + [f"{name} + BN recalibrated" for name in configs if name != "plain ResNet-20"]
    accuracy: dict[str, list[float]] = {k: [] for k in rows}
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    for seed in args.seeds:
        for name, callbacks in configs.items():
            model, data, secs = train_digits("resnet20", callbacks(seed), seed, args.epochs, args.lr,
                                             resize_to=args.image_size)
            accuracy[name].append(top1_accuracy(model, data.test_dataloader()))
            seconds[name].append(secs)
            print(f"seed {seed} {name}: test acc {accuracy[name][-1]:.4f}, {secs:.0f} s", flush=True)
            if name != "plain ResNet-20":
                recalibrate_batch_norm(model, data.train_dataloader())
                accuracy[f"{name} + BN recalibrated"].append(top1_accuracy(model.eval(), data.test_dataloader()))
                print(f"  recalibrated: {accuracy[f'{name} + BN recalibrated'][-1]:.4f}", flush=True)
    table = ["| model | test accuracy % (mean ± std) | per seed % | training time (median s) |", "|---|---:|---|---:|"]
    for name in rows:
        secs = f"{statistics.median(seconds[name]):.0f}" if name in seconds else "same model"
        table.append(f"| {name} | {mean_std(accuracy[name])} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in accuracy[name])} | {secs} |")
    lines = [
        f"Zoo `resnet20` on scikit-learn digits resized to {args.image_size}x{args.image_size} (train 1257 / test 270 "
        f"images), SGD lr {args.lr} momentum 0.9 weight decay 5e-4, cosine schedule, batch 64, {args.epochs} epochs, "
        f"seeds {args.seeds}, torch threads {torch.get_num_threads()}; StochasticDepth with drop_rate "
        f"{args.drop_rate}, linear rule, batch mode unless row mode is named. Training times are wall clock on a shared machine (noisy); the "
        "step-time ratio is in the `stochastic_depth` section.",
        "",
        *table,
    ]
    publish(args, "test accuracy, stochastic depth vs plain ResNet-20 (digits 32x32)", lines)
    return 0
