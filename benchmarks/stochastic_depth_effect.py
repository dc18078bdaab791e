"""Measured effect of stochastic depth on digits resized to 32x32 (ResNet-20) or MNIST-1D (ResNet1d-20): test accuracy.

For each seed, the zoo ``resnet20`` is trained on scikit-learn's digits (bilinearly resized to 32x32)
(or, with ``--data mnist1d``, the zoo ``resnet1d`` on MNIST-1D's 4,000 training signals, batch 100)
once per case: plain, with ``StochasticDepth(0.5, mode="batch")`` and the paper's test-time scaling
(``scaling="test"``), with inverted scaling (``scaling="train"``, as timm's drop_path), inverted in ``row``
mode (timm's recipe: per example, every branch computed), and inverted with the drop-rate warm-up (the
default, ``warmup_fraction=0.1``, and a longer one, ``--long-warmup``); the cases without ``warmup`` in their
name run with ``warmup_fraction=0``. Test accuracy on
the held-out split (270 images; MNIST-1D: 1,000 signals) is reported as trained and, for the stochastic-depth models, after
``recalibrate_batch_norm`` (batch-norm statistics recomputed with every block on, one pass over the
training split), with the training wall time. Few epochs on a small dataset, far from the paper's
500-epoch CIFAR runs: read the spread, not a verdict on the method.

Example:
    ``python -m benchmarks stochastic_depth_effect --epochs 10 --seeds 0 1 2``
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks._digits import top1_accuracy, train_digits
from benchmarks._mnist1d import train_mnist1d
from benchmarks.harness import mean_std
from lightning_tricks import StochasticDepth
from lightning_tricks.regularization.stochastic_depth import DEFAULT_WARMUP_FRACTION, recalibrate_batch_norm

CASES = ["plain", "test", "train", "train-row", "train-warmup", "train-warmup-long"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("stochastic_depth_effect", __doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=None, choices=CASES,
                        help="run only these models (default: all)")
    parser.add_data_option()  # digits 32x32 with resnet20, or MNIST-1D with resnet1d (batch 100)
    parser.add_argument("--dataset", dest="data", choices=["digits", "mnist1d"], default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # its old name, in RESULTS.md's commands
    parser.add_argument("--long-warmup", type=float, default=0.25, help="warmup_fraction of `train-warmup-long`")
    args = parser.parse_args(argv)
    p, w = args.drop_rate, DEFAULT_WARMUP_FRACTION
    plain = "plain ResNet-20" if args.data == "digits" else "plain ResNet1d-20"
    cases = {
        "plain": (plain, lambda seed: []),
        "test": (f"StochasticDepth({p}), paper's test-time scaling", lambda seed: [
            StochasticDepth(p, scaling="test", warmup_fraction=0, seed=seed)]),
        "train": (f"StochasticDepth({p}), inverted scaling", lambda seed: [
            StochasticDepth(p, scaling="train", warmup_fraction=0, seed=seed)]),
        "train-row": (f"StochasticDepth({p}), inverted scaling, row mode", lambda seed: [
            StochasticDepth(p, mode="row", scaling="train", warmup_fraction=0, seed=seed)]),
        "train-warmup": (f"StochasticDepth({p}), inverted scaling, warm-up {w:g} (default)", lambda seed: [
            StochasticDepth(p, scaling="train", warmup_fraction=w, seed=seed)]),
        "train-warmup-long": (f"StochasticDepth({p}), inverted scaling, warm-up {args.long_warmup:g}", lambda seed: [
            StochasticDepth(p, scaling="train", warmup_fraction=args.long_warmup, seed=seed)]),
    }
    configs = dict(value for key, value in cases.items() if args.cases is None or key in args.cases)
    rows = [*configs] + [f"{name} + BN recalibrated" for name in configs if name != plain]
    accuracy: dict[str, list[float]] = {k: [] for k in rows}
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    for seed in args.seeds:
        for name, callbacks in configs.items():
            if args.data == "digits":
                model, data, secs = train_digits("resnet20", callbacks(seed), seed, args.epochs, args.lr,
                                                 resize_to=args.image_size)
            else:
                model, data, secs = train_mnist1d("resnet1d", callbacks(seed), seed, args.epochs, optimizer="sgd",
                                                  lr=args.lr, weight_decay=5e-4)
                data.setup("test")
            accuracy[name].append(top1_accuracy(model, data.test_dataloader()))
            seconds[name].append(secs)
            print(f"seed {seed} {name}: test acc {accuracy[name][-1]:.4f}, {secs:.0f} s", flush=True)
            if name != plain:
                recalibrate_batch_norm(model, data.train_dataloader())
                accuracy[f"{name} + BN recalibrated"].append(top1_accuracy(model.eval(), data.test_dataloader()))
                print(f"  recalibrated: {accuracy[f'{name} + BN recalibrated'][-1]:.4f}", flush=True)
    table = ["| model | test accuracy % (mean ± std) | per seed % | training time (median s) |", "|---|---:|---|---:|"]
    for name in rows:
        secs = f"{statistics.median(seconds[name]):.0f}" if name in seconds else "same model"
        table.append(f"| {name} | {mean_std(accuracy[name])} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in accuracy[name])} | {secs} |")
    if args.data == "digits":
        setup = (f"Zoo `resnet20` on scikit-learn digits resized to {args.image_size}x{args.image_size} (train 1257 / "
                 "test 270 images), batch 64")
        title = "test accuracy, stochastic depth vs plain ResNet-20 (digits 32x32)"
    else:
        setup = ("Zoo `resnet1d` (ResNet1d-20, BasicBlock1d) on MNIST-1D (`MNIST1DDataModule(val_size=0)`: train 4,000 / "
                 "test 1,000 signals), batch 100")
        title = "test accuracy, stochastic depth vs plain ResNet1d-20 (MNIST-1D)"
    lines = [
        f"{setup}, SGD lr {args.lr} momentum 0.9 weight decay 5e-4, cosine schedule, {args.epochs} epochs, "
        f"seeds {args.seeds}, torch threads {torch.get_num_threads()}; StochasticDepth with drop_rate "
        f"{args.drop_rate}, linear rule, batch mode unless row mode is named, no drop-rate warm-up unless named "
        "(a warm-up ramps every block's drop probability linearly from 0 over that fraction of the training "
        "batches). Training times are wall clock on a shared machine (noisy); the step-time ratio is in the "
        "`stochastic_depth` section.",
        "",
        *table,
    ]
    publish(args, title, lines)
    return 0
