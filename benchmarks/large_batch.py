"""Measured effect of the linear scaling rule and warm-up on digits or MNIST-1D: batch 32 vs 512, same epochs.

Goyal et al. (2017): multiply the learning rate by k when the batch grows k-fold, and ramp it up over
the first epochs. Here the global batch of 512 is what 16 GPUs with 32 images each would compute,
simulated on one process by gradient accumulation over 16 batches of 32 (``accumulate_grad_batches=16``;
BatchNorm statistics are per 32 images, as on 16 devices). Four runs per seed, all with the zoo
``simple_cnn``, SGD (momentum 0.9, weight decay 5e-4), the user's cosine schedule and the same number
of epochs:

* ``batch 32``: the reference (learning rate ``lr``);
* ``batch 512, no scaling``: the same ``lr``;
* ``batch 512, scaling``: ``LargeBatchScaling(warmup_epochs=0)`` (``lr x 16`` from the first step);
* ``batch 512, scaling + warm-up``: ``LargeBatchScaling()`` (the defaults: x16 after a 5-epoch ramp from ``lr``).

Test accuracy on the held-out digits (270 images), mean ± std over seeds.

``--data mnist1d`` (section ``large_batch-mnist1d``): the same four runs with the paper's CNN
(``mnist1d_cnn``) on MNIST-1D's 4,000 training signals, tested on its 1,000 test signals, with the same
SGD recipe (the rule is stated for SGD; the paper's own recipe is Adam).

Example:
    ``python -m benchmarks large_batch --epochs 20 --seeds 0 1 2`` (``--data mnist1d``)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from benchmarks._cli import BenchmarkParser, cached_seed, publish
from benchmarks._digits import top1_accuracy
from benchmarks.harness import mean_std
from lightning_tricks import LargeBatchScaling
from lightning_tricks.zoo import DigitsDataModule, ImageClassifier


def run(accumulate: int, callbacks: list, epochs: int, lr: float, seed: int, data: str = "digits") -> float:
    import lightning.pytorch as pl

    if data == "mnist1d":
        from benchmarks._mnist1d import test_accuracy, train_mnist1d

        model, datamodule, _ = train_mnist1d("mnist1d_cnn", callbacks, seed, epochs, batch_size=32,
                                             accumulate=accumulate, optimizer="sgd", lr=lr, weight_decay=5e-4)
        return test_accuracy(model, datamodule)

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier("simple_cnn", num_classes=10, in_channels=1, lr=lr, schedule="cosine")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=accumulate,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                         default_root_dir="/tmp")
    trainer.fit(model, datamodule=data)
    return top1_accuracy(model.eval(), data.test_dataloader())


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("large_batch", __doc__, threads=1)  # one thread: the models are tiny
    parser.add_data_option()
    parser.add_seed_cache()
    parser.add_data_default("--epochs", {"digits": 20, "mnist1d": 15}, "epochs of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05, help="the learning rate for batch 32 (the zoo default)")
    parser.add_argument("--accumulate", type=int, default=16, help="global batch = 32 x this")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    big = 32 * args.accumulate
    configs = {
        "batch 32": (1, lambda: []),
        f"batch {big}, no scaling": (args.accumulate, lambda: []),
        f"batch {big}, scaling": (args.accumulate, lambda: [LargeBatchScaling(warmup_epochs=0)]),
        f"batch {big}, scaling + warm-up": (args.accumulate, lambda: [LargeBatchScaling()]),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    def measure(seed: int) -> dict[str, float]:
        accuracies = {}
        for name, (accumulate, callbacks) in configs.items():
            accuracies[name] = run(accumulate, callbacks(), args.epochs, args.lr, seed, args.data)
            print(f"seed {seed} {name}: {accuracies[name]:.4f}", flush=True)
        return accuracies

    for seed in args.seeds:
        for name, accuracy in cached_seed(args, seed, lambda: measure(seed)).items():  # noqa: B023
            results[name].append(accuracy)
    table = ["| run | learning rate | test accuracy % (mean ± std) | per seed % |", "|---|---|---:|---|"]
    lrs = {"batch 32": f"{args.lr}", f"batch {big}, no scaling": f"{args.lr}",
           f"batch {big}, scaling": f"{args.lr * args.accumulate:g}",
           f"batch {big}, scaling + warm-up": f"{args.lr} -> {args.lr * args.accumulate:g} over 5 epochs"}
    for name, values in results.items():
        table.append(f"| {name} | {lrs[name]} | {mean_std(values)} | {', '.join(f'{100 * v:.2f}' for v in values)} |")
    n_train = 4000 if args.data == "mnist1d" else 1257
    setup = ("The paper's CNN (`mnist1d_cnn`) on MNIST-1D (train 4000 / test 1000 signals)" if args.data == "mnist1d"
             else "Zoo `simple_cnn` on scikit-learn digits 8x8 (train 1257 / test 270 images)")
    lines = [
        f"{setup}, SGD momentum 0.9, weight decay "
        f"5e-4, cosine schedule over {args.epochs} epochs (the user's, run unchanged under the scaling), seeds "
        f"{args.seeds}, torch threads {torch.get_num_threads()}. Global batch {big} = 32 x "
        f"`accumulate_grad_batches={args.accumulate}` (what {args.accumulate} devices with 32 images each compute). "
        f"Batch 32 makes {-(-n_train // 32)} optimizer steps per epoch, batch {big} makes {-(-n_train // big)}.",
        "",
        *table,
    ]
    publish(args, f"linear scaling rule and warm-up, batch 32 vs {big} ({args.data.replace('mnist1d', 'MNIST-1D')})",
            lines)
    return 0
