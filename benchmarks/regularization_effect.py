"""Measured effect of Cutout and Mixup on digits (300 training images) or MNIST-1D: accuracy over 3 seeds.

The small-data regime where these regularizers are meant to help (DeVries & Taylor: "works best on
small datasets"). Setup, the same for every configuration: scikit-learn's digits at their native 8x8
(the hole of ``Cutout(length=4)`` covers a quarter of the image, as a 16-pixel hole does on 32x32
CIFAR images; upsampling to 32x32 would add no information and cost 16x the compute), a stratified
300-image training subset (``DigitsDataModule(train_subset=300, split_seed=0)``; validation and test
splits of 270 images each), the zoo's ``ImageClassifier("simple_cnn")`` with SGD (lr 0.05, Nesterov
momentum 0.9, weight decay 5e-4, cosine schedule), batch 32, a fixed number of epochs, no
checkpoint selection: the accuracy after the last epoch is reported. Seeds change the initialization,
the data order and the tricks' draws; the data split stays fixed.

``--data mnist1d`` (section ``regularization-effect-mnist1d``): the paper's CNN (``mnist1d_cnn``, Adam, lr
1e-2, no weight decay, cosine, batch 100) on all 4,000 MNIST-1D training signals, tested on its 1,000 test
signals, with Mixup (mixing whole signals) and Cutout, which on a 1D model zeroes one span of ``length`` steps
per signal, its centre uniform over the signal (clipped at the ends, as its holes in images).

Example:
    ``python -m benchmarks regularization_effect`` (``--epochs``, ``--seeds``, ``--quick``, ``--data mnist1d``)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from benchmarks._cli import BenchmarkParser, cached_seed, publish
from benchmarks.harness import mean_std


def configurations(data: str = "digits") -> dict[str, Callable[[], list[Callback]]]:
    from lightning_tricks import Cutout, Mixup

    if data == "mnist1d":
        return {
            "baseline": lambda: [],
            "Cutout(length=8), a span": lambda: [Cutout(length=8)],
            "Mixup(alpha=1.0)": lambda: [Mixup(alpha=1.0)],
            "Mixup(alpha=0.2)": lambda: [Mixup(alpha=0.2)],
        }
    return {
        "baseline": lambda: [],
        "Cutout(length=4)": lambda: [Cutout(length=4)],
        "Mixup(alpha=1.0)": lambda: [Mixup(alpha=1.0)],
        "Mixup(alpha=0.2)": lambda: [Mixup(alpha=0.2)],
    }


def train_once(callbacks: list[Callback], seed: int, epochs: int, subset: int) -> dict[str, float]:
    """One fit; returns the final validation and test accuracy."""
    from lightning_tricks import DigitsDataModule, ImageClassifier

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=32, train_subset=subset, split_seed=0, eval_batch_size=270)
    model = ImageClassifier("simple_cnn", num_classes=10, in_channels=1, lr=0.05, weight_decay=5e-4,
                            schedule="cosine")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=epochs, callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    val = float(trainer.callback_metrics["val_acc"])
    test = float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])
    return {"val": val, "test": test}


def train_mnist1d_once(callbacks: list[Callback], seed: int, epochs: int) -> dict[str, float]:
    """One fit on MNIST-1D; returns the final test accuracy."""
    from benchmarks._mnist1d import test_accuracy, train_mnist1d

    model, data, _ = train_mnist1d("mnist1d_cnn", callbacks, seed, epochs)
    return {"test": test_accuracy(model, data)}


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("regularization_effect", __doc__, quick="smoke run: 5 epochs, one seed",
                        threads=1, section="regularization-effect")  # one thread: the model is tiny
    p.add_data_option()
    p.add_seed_cache()
    p.add_data_default("--epochs", {"digits": (30, 5), "mnist1d": (20, 2)}, "epochs per fit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=300, help="training images (default 300)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train every configuration for every seed, print the table, write the section of RESULTS.md."""
    args = _parser().parse_args(argv)
    epochs = args.epochs
    seeds = args.seeds[:1] if args.quick else args.seeds
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|GPU available).*")
    configs = configurations(args.data)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    def measure(seed: int) -> dict[str, dict[str, float]]:
        per_config = {}
        for name, make in configs.items():
            if args.data == "mnist1d":
                per_config[name] = train_mnist1d_once(make(), seed, epochs)
            else:
                per_config[name] = train_once(make(), seed, epochs, args.subset)
            print(f"seed {seed} {name}: {per_config[name]}", flush=True)
        return per_config

    for seed in seeds:  # configurations interleaved within each seed
        for name, result in cached_seed(args, seed, lambda: measure(seed)).items():  # noqa: B023
            results[name].append(result)
    if args.data == "mnist1d":
        lines = ["| configuration | test accuracy % (mean ± std) | per seed | change vs baseline (mean) |",
                 "|---|---:|---|---:|"]
        base = [r["test"] for r in results["baseline"]]
        for name, runs in results.items():
            tests = [r["test"] for r in runs]
            delta = 100 * sum(t - b for t, b in zip(tests, base, strict=True)) / len(tests)
            lines.append(f"| {name} | {mean_std(tests, 1)} | {', '.join(f'{100 * v:.1f}' for v in tests)} | "
                         f"{delta:+.1f} |")
        publish(args, "Cutout (spans) and Mixup on MNIST-1D", [
            f"The paper's CNN (`mnist1d_cnn`) on MNIST-1D, all 4,000 training signals, Adam lr 0.01, no weight decay, "
            f"cosine, batch 100, {epochs} epochs, accuracy on the 1,000 test signals after the last epoch; seeds "
            f"{', '.join(map(str, seeds))} (std over seeds). On this 1D model `Cutout(length=8)` zeroes one span of "
            "8 of the 40 steps per signal (centre uniform, clipped at the ends); `Mixup` blends whole signals.",
            "",
            *lines,
        ])
        return 0
    lines = ["| configuration | val accuracy % (mean ± std) | per seed | test accuracy % (mean ± std) |",
             "|---|---:|---|---:|"]
    for name, runs in results.items():
        vals, tests = [r["val"] for r in runs], [r["test"] for r in runs]
        lines.append(f"| {name} | {mean_std(vals, 1)} | {', '.join(f'{100 * v:.1f}' for v in vals)} | {mean_std(tests, 1)} |")
    publish(args, f"Cutout and Mixup on digits with {args.subset} training images", [
        f"`ImageClassifier('simple_cnn')` on 8x8 digits, {args.subset} training images (stratified, split_seed 0), "
        f"270 validation and 270 test images, SGD lr 0.05 + cosine, weight decay 5e-4, batch 32, {epochs} epochs, "
        f"accuracy after the last epoch; seeds {', '.join(map(str, seeds))} (std over seeds).",
        "",
        *lines,
    ])
    return 0
