"""Does the initialization matter for training? A deep plain ReLU MLP on digits, four inits, several seeds.

Run:  python examples/init_training.py [--seeds 3] [--epochs 20] [--depth 12] [--width 128] [--fast]

The network is the zoo's MLP (``depth`` hidden Linear+ReLU layers of ``width`` units, no
normalization, no residuals) trained with SGD (``--lr``, default 0.01; momentum 0.9, cosine schedule) on
scikit-learn's digits; only the ``WeightInit`` callback differs between rows (the first row is
PyTorch's own default init, no callback). It prints a markdown table of the final validation and test
accuracies (mean and min-max over the seeds); ``python -m benchmarks init_effect`` writes it to
RESULTS.md, which docs/init.md includes. The full run trains 12 models and takes several minutes on 2
CPU cores (it prints its own time); ``--fast`` trains each init for a few batches of one seed (a smoke
test of the script, seconds; its accuracies mean nothing).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tricks import DigitsDataModule, ImageClassifier, WeightInit

CASES: dict[str, dict[str, Any] | None] = {
    "PyTorch default (no callback)": None,
    "normal, std 0.01 (0.01*randn)": {"scheme": "normal", "std": 0.01},
    "kaiming_normal (relu)": {"scheme": "kaiming_normal"},
    "lsuv": {"scheme": "lsuv"},
}


def train(init: dict[str, Any] | None, seed: int, epochs: int, depth: int, width: int, lr: float,
          limit_batches: int | None = None) -> tuple[float, float]:
    """Validation and test accuracy after ``epochs`` epochs of one run (``limit_batches`` per loop if given)."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier("mlp", backbone_kwargs={"depth": depth, "width": width}, lr=lr, weight_decay=0.0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[WeightInit(**init)] if init else [],
                         limit_train_batches=limit_batches, limit_val_batches=limit_batches,
                         limit_test_batches=limit_batches)
    datamodule = DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=datamodule)
    val = float(trainer.callback_metrics["val_acc"])
    test = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test_acc"])
    return val, test


def training_table(seeds: int, epochs: int, depth: int, width: int, lr: float,
                   limit_batches: int | None = None) -> str:
    """Markdown table: each init's validation and test accuracy, mean (min-max) over seeds ``0..seeds-1``."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # 0.01*randn drives activations and gradients into subnormal floats, which are much slower on CPU;
    # flushing them to zero changes no accuracy here (they are below 1e-38) and keeps the script short.
    torch.set_flush_denormal(True)
    lines = ["| init | val accuracy, mean (min-max) | test accuracy, mean (min-max) |", "|---|---:|---:|"]
    for label, init in CASES.items():
        runs = [train(init, seed, epochs, depth, width, lr, limit_batches) for seed in range(seeds)]
        cells = []
        for values in zip(*runs, strict=True):
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--fast", action="store_true", help="one seed, one epoch of 3 batches per init")
    args = parser.parse_args()
    limit_batches = None
    if args.fast:
        args.seeds, args.epochs, limit_batches = 1, 1, 3
    start = time.perf_counter()
    print(f"MLP with {args.depth} hidden ReLU layers of {args.width}, digits, {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}\n")
    print(training_table(args.seeds, args.epochs, args.depth, args.width, args.lr, limit_batches))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
