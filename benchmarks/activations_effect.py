"""Activation functions on digits (dead units, saturation) and on MNIST-1D (test accuracy per activation).

Two of the lectures' claims, measured on our data and reported as they come out:

1. **Dead ReLUs.** ``examples/activations.yaml`` (the ``monitoring_dead`` net: ImageClassifier ``mlp``, 3 hidden
   layers of 256, SGD momentum 0.9 at the huge learning rate 0.25, 10 epochs, digits batch 64) with
   ``ActivationSwap(to=...)`` set to relu (baseline), leaky_relu, prelu and elu, over seeds. ``DeadUnitMonitor``
   gives the dead fraction of the last epoch (for Leaky ReLU/PReLU/ELU: units that never left the negative
   region); the final validation accuracy comes from the CLI run.
2. **Saturation.** A 10-layer MLP (width 128, PyTorch's default init) on one digits batch of 256 at
   initialization, with ReLU swapped for sigmoid and tanh: the norm of each layer's weight gradient, median over
   seeds. Drawn to ``docs/img/activation_saturation.png``.

``--data mnist1d`` (section ``activations-effect-mnist1d``) asks the everyday question instead: at the paper's
recipe (Adam, lr 1e-2, batch 100, here with a cosine schedule over ``--epochs``), does swapping ReLU for
another activation change the test accuracy of the paper's CNN and MLP on MNIST-1D? ``ActivationSwap(to=...)``
on ``mnist1d_cnn`` and ``mnist1d_mlp``, all 4,000 training signals, the 1,000 test signals, over seeds.

Example:
    ``python -m benchmarks activations_effect --seeds 0 1 2`` (``--quick``: 1 seed, 3 epochs; ``--data mnist1d``)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._cli import BenchmarkParser, publish

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "activations.yaml"
FIGURE = ROOT / "docs" / "img" / "activation_saturation.png"
TARGETS = ("relu", "leaky_relu", "prelu", "elu")
SEQUENCE_TARGETS = ("relu", "leaky_relu", "prelu", "elu", "gelu", "tanh")
SEQUENCE_BACKBONES = ("mnist1d_cnn", "mnist1d_mlp")


def run_dead(to: str, seed: int, epochs: int, lr: float, workdir: Path) -> dict[str, Any]:
    """One fit of the activations example with ``to``; returns the dead fractions and the accuracy."""
    from lightning_tricks import DeadUnitMonitor
    from lightning_tricks.cli import build_cli

    config = yaml.safe_load(CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ActivationSwap"):
            callback["init_args"] = {"to": to}
        if callback["class_path"].endswith("DeadUnitMonitor"):
            callback["init_args"]["plot"] = False
    path = workdir / f"activations_{to}.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_cli(["fit", "--config", str(path), f"--seed_everything={seed}", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false", f"--trainer.max_epochs={epochs}",
                         f"--model.init_args.lr={lr}"])
    dead = next(c for c in cli.trainer.callbacks if isinstance(c, DeadUnitMonitor))
    records = dead.history["train"]
    return {"dead_last": records[-1]["overall"], "dead_peak": max(r["overall"] for r in records),
            "val_acc": float(cli.trainer.callback_metrics["val_acc"]),
            "diverged": not math.isfinite(float(cli.trainer.callback_metrics.get("train_loss", math.nan)))}


def gradient_norms(activation: str, seed: int, matched_init: bool, depth: int = 10, width: int = 128) -> list[float]:
    """Per-layer weight-gradient norms (input layer first) of a deep MLP at init on one digits batch.

    ``matched_init``: ``init_weights(model, "kaiming_normal")`` after the swap, whose gain then follows the
    swapped-in activation (relu sqrt(2), tanh 5/3, sigmoid 1); otherwise PyTorch's default init.
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    from lightning_tricks import swap_activations
    from lightning_tricks.init import init_weights

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data[:256], dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(digits.target[:256])
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    if activation != "relu":
        swap_activations(model, activation)
    if matched_init:
        init_weights(model, "kaiming_normal", generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(model(x), y).backward()
    return [m.weight.grad.norm().item() for m in model if isinstance(m, nn.Linear)]


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("activations_effect", __doc__, quick="smoke run: first seed only, 3 epochs",
                        section="activations-effect", threads=1)  # one thread: the models are tiny
    p.add_data_option()
    p.add_data_default("--seeds", {"digits": [0, 1], "mnist1d": [0, 1, 2]}, "seeds", nargs="+")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.25, 0.1],
                   help="learning rates of the digits dead-unit runs (0.25: monitoring_dead's)")
    p.add_data_default("--epochs", {"digits": (10, 3), "mnist1d": (10, 1)}, "epochs of each run")
    return p


def main_mnist1d(args: argparse.Namespace) -> int:
    """Test accuracy per activation and backbone on MNIST-1D; writes the ``activations-effect-mnist1d`` section."""
    from benchmarks._mnist1d import test_accuracy, train_mnist1d
    from benchmarks.harness import mean_std
    from lightning_tricks import ActivationSwap

    seeds = args.seeds[:1] if args.quick else args.seeds
    results = {(b, to): [] for b in SEQUENCE_BACKBONES for to in SEQUENCE_TARGETS}
    for seed in seeds:
        for backbone, to in results:
            model, data, _ = train_mnist1d(backbone, [] if to == "relu" else [ActivationSwap(to=to)], seed, args.epochs)
            results[backbone, to].append(test_accuracy(model, data))
            print(f"seed {seed} {backbone} {to}: {results[backbone, to][-1]:.4f}", flush=True)
    rows = ["| activation | " + " | ".join(f"`{b}`: test acc % (mean ± std) | per seed | vs relu" for b in
                                           SEQUENCE_BACKBONES) + " |", "|---|" + "---:|---|---:|" * len(SEQUENCE_BACKBONES)]
    for to in SEQUENCE_TARGETS:
        cells = []
        for b in SEQUENCE_BACKBONES:
            accs, base = results[b, to], results[b, "relu"]
            delta = 100 * statistics.mean(a - r for a, r in zip(accs, base, strict=True))
            cells.append(f"{mean_std(accs, 1)} | {', '.join(f'{100 * a:.1f}' for a in accs)} | {delta:+.1f}")
        rows.append(f"| {to} | " + " | ".join(cells) + " |")
    publish(args, "test accuracy by activation on MNIST-1D", [
        f"The paper's CNN and MLP on MNIST-1D (all 4,000 training signals, 1,000 test signals), Adam lr 0.01, no "
        f"weight decay, cosine over {args.epochs} epochs, batch 100, seeds {seeds}; every ReLU module swapped by "
        "`ActivationSwap(to=...)` (defaults: leaky_relu slope 0.01, prelu initial 0.25, elu alpha 1), PyTorch's "
        "default init for all. `vs relu`: mean change in points against ReLU, same seeds.",
        "",
        *rows,
    ])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run both experiments, print and write the section, draw the saturation figure."""
    args = _parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.data == "mnist1d":
        return main_mnist1d(args)
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = args.epochs
    dead: dict[tuple[float, str], list[dict[str, Any]]] = {(lr, to): [] for lr in args.lrs for to in TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the config writes runs/ relative to the working directory
        try:
            for seed in seeds:
                for lr, to in dead:
                    result = run_dead(to, seed, epochs, lr, Path(tmp))
                    dead[lr, to].append(result)
                    print(f"lr {lr} {to} seed {seed}: dead {result['dead_last']:.3f}, val_acc {result['val_acc']:.4f}, "
                          f"diverged {result['diverged']}", flush=True)
        finally:
            os.chdir(cwd)
    kinds = ("relu", "tanh", "sigmoid")
    inits = {"default init": False, "gain-matched init": True}
    norms = {(kind, init): [gradient_norms(kind, seed, matched) for seed in range(5)]
             for init, matched in inits.items() for kind in kinds}
    median_norms = {kind: [statistics.median(layer) for layer in zip(*runs, strict=True)] for kind, runs in norms.items()}

    rows = ["| lr | activation | dead units, last epoch (per seed) | mean | max over epochs (mean) | val acc (per seed) | "
            "val acc (mean) | diverged (loss NaN) |", "|---:|---|---|---:|---:|---|---:|---:|"]
    for (lr, to), runs in dead.items():
        last = [r["dead_last"] for r in runs]
        accs = [r["val_acc"] for r in runs]
        peak = statistics.mean(r["dead_peak"] for r in runs)
        rows.append(f"| {lr} | {to} | {', '.join(f'{100 * v:.1f}%' for v in last)} | {100 * statistics.mean(last):.1f}% | "
                    f"{100 * peak:.1f}% | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.4f} | "
                    f"{sum(r['diverged'] for r in runs)}/{len(runs)} |")
    depth = len(median_norms["relu", "default init"])
    grad_rows = ["| layer | " + " | ".join(f"{k}, {i}" for k, i in median_norms) + " |",
                 "|---:|" + "---:|" * len(median_norms)]
    for layer in range(depth):
        grad_rows.append(f"| {layer + 1}{' (input)' if layer == 0 else ' (output)' if layer == depth - 1 else ''} | "
                         + " | ".join(f"{values[layer]:.2e}" for values in median_norms.values()) + " |")
    ratio = {key: values[0] / values[-2] for key, values in median_norms.items()}
    publish(args, "dead units and saturation by activation", [
        f"Seeds {seeds}. **Dead units** (`examples/activations.yaml`, {epochs} epochs; 0.25 is `monitoring_dead`'s "
        "learning rate), by the activation ActivationSwap put in the 3-hidden-layer MLP. For leaky_relu/prelu/elu a "
        "dead unit never left the negative region (it still passes a gradient); a run whose loss became NaN counts "
        "every unit dead.",
        "",
        *rows,
        "",
        "**Saturation**: weight-gradient norm per layer of a 10-layer MLP (width 128) at initialization, one digits "
        "batch of 256, median of 5 seeds; PyTorch's default init, and `kaiming_normal` whose gain follows the "
        "swapped-in activation (WeightInit's rule). Input layer over last hidden layer: "
        + ", ".join(f"{k} ({i}) {r:.2g}" for (k, i), r in ratio.items()) + ".",
        "",
        *grad_rows,
    ])
    if not args.no_write and not args.quick:
        _draw(median_norms)
    return 0


def _draw(median_norms: dict[tuple[str, str], list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, init in zip(axes, ("default init", "gain-matched init"), strict=True):
        for (kind, which), values in median_norms.items():
            if which == init:
                ax.semilogy(range(1, len(values) + 1), values, marker="o", label=kind)
        ax.set_xlabel("layer (1 = input)")
        ax.set_title(f"10-layer MLP at init, {init}")
        ax.legend()
    axes[0].set_ylabel("||dL/dW|| (median of 5 seeds)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)
    print(f"figure: {FIGURE}")


if __name__ == "__main__":
    raise SystemExit(main())
