"""Measured effect of ensembling on digits: 5 independent CNNs vs their mean member; a snapshot ensemble vs its last snapshot.

Small-data regime, so that single members score roughly 85-95%: ``DigitsDataModule(train_subset=...)``.
For each seed (which fixes the data split, the training subset and every initialization):

* ``--members`` zoo ``simple_cnn`` classifiers are trained independently (seeds differ, same recipe:
  SGD with momentum, cosine schedule over ``--epochs``); the ``Ensemble`` of their checkpoints is
  tested with soft and hard voting, and its test accuracy is compared with the mean (and the best)
  member's, all read from the Ensemble's own side-by-side metrics;
* one more model of the same recipe is trained for ``--snapshot-epochs`` (default: the members'
  total, so the snapshot run costs what the independent ensemble costs) with ``SnapshotEnsemble``
  (``--cycles`` cycles, alpha0 = ``--snapshot-lr``); the ensemble of its snapshots is compared with
  its last snapshot (the model a plain run would keep) and with a single model trained for the same
  number of epochs with the members' cosine schedule.

Accuracies are on the test split (270 images). Prints a markdown table and writes it to the
``ensemble-effect`` section of ``benchmarks/RESULTS.md``.

``--data mnist1d``: the same on MNIST-1D with the paper's CNN (``mnist1d_cnn``) and optimizer (Adam, lr
1e-2, batch 100), all 4,000 training signals and the 1,000 test signals (section ``ensemble-effect-mnist1d``).

Example:
    ``python -m benchmarks ensemble_effect`` (``--data mnist1d``)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks._cli import BenchmarkParser, cached_seed, publish
from lightning_tricks import Ensemble, SnapshotEnsemble
from lightning_tricks.zoo import DigitsDataModule, ImageClassifier, MNIST1DDataModule


def _trainer(root: Path, epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(root), callbacks=callbacks, deterministic=True)


def _data(args: argparse.Namespace, seed: int) -> DigitsDataModule | MNIST1DDataModule:
    if args.data == "mnist1d":
        return MNIST1DDataModule(batch_size=args.batch_size, val_size=0, split_seed=seed, eval_batch_size=1000,
                                 train_subset=args.subset if args.subset < MNIST1DDataModule.total_train else None)
    return DigitsDataModule(batch_size=args.batch_size, train_subset=args.subset, split_seed=seed)


def _model(args: argparse.Namespace, schedule: str) -> ImageClassifier:
    if args.data == "mnist1d":  # the paper's CNN and optimizer
        return ImageClassifier("mnist1d_cnn", num_classes=10, in_channels=1, optimizer="adam", lr=args.lr,
                               weight_decay=0.0, schedule=schedule)
    return ImageClassifier("simple_cnn", num_classes=10, in_channels=1, lr=args.lr, schedule=schedule,
                           backbone_kwargs={"width": args.width})


def _test(ensemble: Ensemble, datamodule: DigitsDataModule | MNIST1DDataModule, root: Path) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    return trainer.test(ensemble, datamodule=datamodule, verbose=False)[0]


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> dict[str, float]:
    """Train and test one seed's members and snapshot run; returns accuracies in percent."""
    paths = []
    for m in range(args.members):
        pl.seed_everything(1000 * seed + m, verbose=False)
        checkpoint = ModelCheckpoint(dirpath=root / f"seed{seed}" / f"member{m}", filename="last")
        _trainer(root, args.epochs, [checkpoint]).fit(_model(args, "cosine"), datamodule=_data(args, seed))
        paths.append(checkpoint.best_model_path or str(root / f"seed{seed}" / f"member{m}" / "last.ckpt"))
    result: dict[str, float] = {}
    for voting in ("soft", "hard"):
        metrics = _test(Ensemble(checkpoints=paths, member_class=ImageClassifier, voting=voting, fast_path="loop"),
                        _data(args, seed), root)
        result[voting] = 100 * metrics["test_acc"]
        if voting == "soft":
            members = [100 * metrics[f"test_acc_member_{i}"] for i in range(args.members)]
            result["mean_member"], result["best_member"] = statistics.mean(members), max(members)
            result["min_member"] = min(members)

    pl.seed_everything(1000 * seed + 999, verbose=False)
    snapshots = SnapshotEnsemble(cycles=args.cycles, lr=args.snapshot_lr, dirpath=str(root / f"seed{seed}" / "snaps"))
    _trainer(root, args.snapshot_epochs, [snapshots]).fit(_model(args, "none"), datamodule=_data(args, seed))
    metrics = _test(snapshots.ensemble(fast_path="loop"), _data(args, seed), root)
    result["snapshot_ensemble"] = 100 * metrics["test_acc"]
    result["last_snapshot"] = 100 * metrics[f"test_acc_member_{args.cycles - 1}"]
    result["snapshot_mean"] = 100 * metrics["test_acc_member_mean"]

    pl.seed_everything(1000 * seed + 998, verbose=False)
    single = _model(args, "cosine")
    _trainer(root, args.snapshot_epochs, []).fit(single, datamodule=_data(args, seed))
    result["single_long"] = 100 * _trainer(root, 1, []).test(single, datamodule=_data(args, seed), verbose=False)[0][
        "test_acc"]
    return result


def _parser() -> BenchmarkParser:
    # one thread: tiny models gain nothing from more, and on a shared machine extra threads are very slow
    p = BenchmarkParser("ensemble_effect", __doc__, threads=1, section="ensemble-effect")
    p.add_data_option()
    p.add_seed_cache()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--members", type=int, default=5)
    p.add_data_default("--subset", {"digits": 100, "mnist1d": 4000}, "training examples kept (stratified)")
    p.add_data_default("--epochs", {"digits": 30, "mnist1d": 5}, "epochs per independent member")
    p.add_argument("--width", type=int, default=16, help="simple_cnn width (digits)")
    p.add_data_default("--lr", {"digits": 0.05, "mnist1d": 0.01}, "learning rate (SGD on digits, Adam on mnist1d)")
    p.add_data_default("--batch-size", {"digits": 32, "mnist1d": 100}, "training batch size")
    p.add_argument("--cycles", type=int, default=5, help="snapshot cycles (M)")
    p.add_argument("--snapshot-epochs", type=int, default=None,
                   help="epochs of the snapshot run (default: members x epochs, the independent ensemble's cost)")
    p.add_data_default("--snapshot-lr", {"digits": 0.05, "mnist1d": 0.01}, "alpha0 of the snapshot cycles")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train, test, print the table and write the RESULTS.md section."""
    args = _parser().parse_args(argv)
    args.snapshot_epochs = args.snapshot_epochs or args.members * args.epochs
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows[seed] = cached_seed(args, seed, lambda: run_seed(args, seed, Path(tmp)))  # noqa: B023
            r = rows[seed]
            print(f"seed {seed}: members {r['min_member']:.1f}-{r['best_member']:.1f} (mean {r['mean_member']:.1f}), "
                  f"soft {r['soft']:.1f}, hard {r['hard']:.1f}; snapshots: last {r['last_snapshot']:.1f}, "
                  f"ensemble {r['snapshot_ensemble']:.1f}; single model, same budget {r['single_long']:.1f}", flush=True)

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in rows.values())

    def std(key: str) -> str:
        values = [r[key] for r in rows.values()]
        return f"± {statistics.stdev(values):.1f}" if len(values) > 1 else ""

    lines = [
        "| seed | members min-max | mean member | best member | soft voting | gain vs mean | hard voting | "
        "last snapshot | snapshot ensemble | gain vs last | single model, snapshot budget |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in rows.items():
        lines.append(f"| {seed} | {r['min_member']:.1f}-{r['best_member']:.1f} | {r['mean_member']:.1f} | "
                     f"{r['best_member']:.1f} | {r['soft']:.1f} | {r['soft'] - r['mean_member']:+.1f} | {r['hard']:.1f} | "
                     f"{r['last_snapshot']:.1f} | {r['snapshot_ensemble']:.1f} | "
                     f"{r['snapshot_ensemble'] - r['last_snapshot']:+.1f} | {r['single_long']:.1f} |")
    lines.append(f"| mean | | {mean('mean_member'):.1f} | {mean('best_member'):.1f} | {mean('soft'):.1f} | "
                 f"{mean('soft') - mean('mean_member'):+.1f} | {mean('hard'):.1f} | {mean('last_snapshot'):.1f} | "
                 f"{mean('snapshot_ensemble'):.1f} | {mean('snapshot_ensemble') - mean('last_snapshot'):+.1f} | "
                 f"{mean('single_long'):.1f} |")
    for key in ("soft", "snapshot_ensemble"):  # the std of the gains, over seeds
        for r in rows.values():
            r[f"{key}_gain"] = r[key] - r["mean_member" if key == "soft" else "last_snapshot"]
    lines.append(f"| std | | {std('mean_member')} | {std('best_member')} | {std('soft')} | {std('soft_gain')} | "
                 f"{std('hard')} | {std('last_snapshot')} | {std('snapshot_ensemble')} | {std('snapshot_ensemble_gain')} | "
                 f"{std('single_long')} |")
    gains = [r["soft"] - r["mean_member"] for r in rows.values()]
    if args.data == "mnist1d":
        setup = (f"MNIST-1D with {args.subset} training signals (the seed fixes the data order and all "
                 f"initializations), 1,000 test signals. Members: {args.members} x the paper's CNN (`mnist1d_cnn`), "
                 f"Adam, lr {args.lr}, no weight decay, cosine over {args.epochs} epochs, batch {args.batch_size}, "
                 "trained independently.")
    else:
        setup = (f"Digits with {args.subset} training images (stratified subset; the split, the subset and all "
                 f"initializations are fixed by the seed), 270 test images. Members: {args.members} x `simple_cnn` "
                 f"(width {args.width}), SGD momentum 0.9, lr {args.lr}, cosine over {args.epochs} epochs, batch "
                 f"{args.batch_size}, trained independently.")
    publish(args, f"ensembles on {'MNIST-1D' if args.data == 'mnist1d' else 'digits'}, test accuracy (%)", [
        f"{setup} Snapshot run: the same model, {args.snapshot_epochs} epochs, "
        f"SnapshotEnsemble(cycles={args.cycles}, lr={args.snapshot_lr}); the single model of the last column is "
        f"trained like a member but for {args.snapshot_epochs} epochs. Soft-voting gain over the mean member: "
        f"{', '.join(f'{g:+.1f}' for g in gains)} points (target: >= +1 on every seed).",
        "",
        *lines,
    ])
    return 0
