"""Measured effect of transfer learning on digits or MNIST-1D: pretrain on 0-4, transfer to 5-9 with few examples.

The lectures' table as an experiment. For each seed, the zoo ``simple_cnn`` is pretrained on every
training image of digits 0-4 and saved as a Lightning checkpoint. Digits 5-9 are split once into a pool
and a fixed test set; for each shot count (images per class) and seed a stratified sample of the pool
is the training set, and four models are trained on it with the same optimizer and number of steps:

* ``scratch``: random initialization, everything trained;
* ``linear probe``: ``Finetune(train="head", weights=ckpt, num_classes=5)`` (new last layer only);
* ``fine-tune last``: ``Finetune(train="last:2", ...)`` (the head, the hidden Linear and the last conv);
* ``fine-tune all``: ``Finetune(train="all", ...)``, the backbone at 0.1 x the head's learning rate;
* ``probe on random features`` (a control): ``Finetune(train="head")`` on the randomly initialized network,
  which tells how much of the linear probe's accuracy the pretrained features add.

Test accuracy on the held-out 5-9 images is reported (mean ± std over seeds) and drawn as a figure
(``docs/img/transfer.png``). Small data, small network, few seeds: read it as the lectures' advice
tested once on our data, not as a general law.

``--data mnist1d`` runs the same experiment on MNIST-1D with the paper's CNN (``mnist1d_cnn``): pretrained
on every training signal of classes 0-4, transferred to classes 5-9 with a stratified sample of their
training signals, tested on the test split's 5-9 signals; it writes the ``transfer-mnist1d`` section and
``docs/img/transfer-mnist1d.png``.

Example:
    ``python -m benchmarks transfer --seeds 0 1 2 --shots 5 20 100`` (``--data mnist1d``)
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import mean_std
from lightning_tricks import Finetune
from lightning_tricks.zoo import ImageClassifier

METHODS = {"scratch": None, "linear probe": "head", "fine-tune last": "last:2", "fine-tune all": "all",
           "probe on random features": "random"}
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "transfer.png"
BACKBONES = {"digits": "simple_cnn", "mnist1d": "mnist1d_cnn"}


def digits_tasks(test_fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """Digits 0-4 (all, for pretraining) and 5-9 (relabelled 0-4: a pool and a fixed test set), normalized with the
    pretraining images' mean and std (the pretrained network's preprocessing)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target)
    source, target = y < 5, y >= 5
    mean, std = x[source].mean(), x[source].std()
    x = (x - mean) / std
    idx = np.flatnonzero(target.numpy())
    pool, test = train_test_split(idx, test_size=test_fraction, stratify=y[idx].numpy(), random_state=0)
    return {"source_x": x[source], "source_y": y[source], "pool_x": x[pool], "pool_y": y[pool] - 5,
            "test_x": x[test], "test_y": y[test] - 5}


def mnist1d_tasks() -> dict[str, torch.Tensor]:
    """MNIST-1D classes 0-4 (every training signal, for pretraining) and 5-9 (relabelled 0-4): the pool is their
    training signals, the test set the test split's; standardized by the zoo's datamodule (training statistics)."""
    from benchmarks._mnist1d import mnist1d_data

    data = mnist1d_data()
    x, y = data.tensors("train")
    test_x, test_y = data.tensors("test")
    source, target, test = y < 5, y >= 5, test_y >= 5
    return {"source_x": x[source], "source_y": y[source], "pool_x": x[target], "pool_y": y[target] - 5,
            "test_x": test_x[test], "test_y": test_y[test] - 5}


def sample(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chosen = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
              for c in range(int(y.max()) + 1)]
    idx = torch.cat(chosen)
    return x[idx], y[idx]


def fit(x: torch.Tensor, y: torch.Tensor, callbacks: list, steps: int, lr: float, seed: int,
        save: Path | None = None, backbone: str = "simple_cnn") -> ImageClassifier:
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(backbone, num_classes=5, in_channels=1, image_size=x.shape[-1], optimizer="adam", lr=lr,
                            weight_decay=0.0, schedule="none")
    batch = min(64, len(y))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=str(save.parent if save else "."))
    trainer.fit(model, train_dataloaders=loader)
    if save is not None:
        trainer.save_checkpoint(save)
    return model


def accuracy(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def draw(results: dict[str, dict[int, list[float]]], shots: list[int], path: Path, data: str = "digits") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for name, by_shot in results.items():
        if METHODS[name] == "random":  # the control is in the table; the figure shows the lectures' four
            continue
        means = [100 * statistics.mean(by_shot[s]) for s in shots]
        stds = [100 * statistics.pstdev(by_shot[s]) for s in shots]
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    what = "signals per class (MNIST-1D 5-9)" if data == "mnist1d" else "images per class (digits 5-9)"
    ax.set_xlabel(f"training {what}")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Transfer from {'MNIST-1D' if data == 'mnist1d' else 'digits'} 0-4 to 5-9 ({BACKBONES[data]})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("transfer", __doc__, threads=1)  # one thread: the models are tiny
    parser.add_data_option()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 20, 100], help="training images per class")
    parser.add_data_default("--pretrain-steps", {"digits": 400, "mnist1d": 1500}, "Adam steps of pretraining")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every transfer run")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (the head's)")
    parser.add_argument("--no-figure", action="store_true", help="leave the figure alone")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = mnist1d_tasks() if args.data == "mnist1d" else digits_tasks()
    backbone = BACKBONES[args.data]
    figure = FIGURE.with_name(f"transfer-{args.data}.png") if args.data != "digits" else FIGURE
    results: dict[str, dict[int, list[float]]] = {m: {s: [] for s in args.shots} for m in METHODS}
    source_acc = []
    with TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ckpt = Path(tmp) / f"pretrained{seed}.ckpt"
            pre = fit(data["source_x"], data["source_y"], [], args.pretrain_steps, args.lr, seed, save=ckpt,
                      backbone=backbone)
            source_acc.append(accuracy(pre, data["source_x"], data["source_y"]))
            for shot in args.shots:
                x, y = sample(data["pool_x"], data["pool_y"], shot, seed)
                for name, train in METHODS.items():
                    if train is None:
                        callbacks = []
                    elif train == "random":
                        callbacks = [Finetune(train="head", num_classes=5)]
                    else:
                        callbacks = [Finetune(train=train, weights=str(ckpt), num_classes=5)]
                    model = fit(x, y, callbacks, args.steps, args.lr, seed, backbone=backbone)
                    results[name][shot].append(accuracy(model, data["test_x"], data["test_y"]))
                    print(f"seed {seed} shots {shot} {name}: {results[name][shot][-1]:.4f}", flush=True)
    header = f"| {'signals' if args.data == 'mnist1d' else 'images'} per class | " + " | ".join(METHODS) + " |"
    table = [header, "|---:|" + "---:|" * len(METHODS)]
    for shot in args.shots:
        table.append(f"| {shot} | " + " | ".join(mean_std(results[m][shot]) for m in METHODS) + " |")
    if not (args.no_figure or args.no_write):
        draw(results, args.shots, figure, args.data)
    what = "MNIST-1D, paper's CNN, 40-step signals" if args.data == "mnist1d" else "8x8 digits"
    digit = "signals of classes" if args.data == "mnist1d" else "images of digits"
    lines = [
        f"Zoo `{backbone}` ({what}). Pretraining: {digit} 0-4, all {len(data['source_y'])} training ones, "
        f"{args.pretrain_steps} Adam steps (lr {args.lr}, batch 64; training accuracy "
        f"{mean_std(source_acc)}). Transfer: {digit} 5-9 relabelled, {len(data['test_y'])} fixed test ones; per "
        f"seed a stratified sample of the other {len(data['pool_y'])}; every run {args.steps} Adam steps at "
        f"lr {args.lr}, batch min(64, n), no augmentation; Finetune's `backbone_lr_factor` 0.1; seeds {args.seeds}; "
        f"torch threads {torch.get_num_threads()}. Test accuracy %, mean ± std over seeds:",
        "",
        *table,
        "",
        f"Figure: `docs/img/{figure.name}`.",
    ]
    name = "MNIST-1D classes" if args.data == "mnist1d" else "digits"
    publish(args, f"pretrain on {name} 0-4, transfer to 5-9 (scratch / linear probe / fine-tune)", lines)
    return 0
