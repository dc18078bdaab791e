"""Random vs grid search with the same budget on digits or MNIST-1D: one important hyperparameter, one unimportant.

Bergstra & Bengio (2012), quoted by the CS231n notes: with a budget of B trials over one important
and one unimportant parameter, a 3x3 grid tries only 3 values of the important one, random search B.
This benchmark runs both through ``lightning-tricks tune``'s own machinery (the trial objective of
:mod:`lightning_tricks.tuning.study`, in-memory studies) on ``examples/digits.yaml``: the important
parameter is the learning rate (log-uniform 1e-3..1), the unimportant one the weight decay
(log-uniform 1e-7..1e-5, too small to matter in a short run). The grid is the square grid of
``sqrt(B)`` log-spaced values per parameter (Optuna's ``GridSampler``); random is Optuna's
``RandomSampler``. Each seed changes the sampler and the training seed of both methods. Reported:
the best validation accuracy each method found, per seed and the median, and how many distinct
learning rates each tried.

``--data mnist1d`` (section ``tune-search-mnist1d``): the same on ``examples/mnist1d.yaml`` (the paper's CNN
with Adam; validation on 500 of the 4,000 training signals, every epoch), the learning rate log-uniform in
1e-5..1: a wide range a user might set, whose 3-value grid (1e-5, 3.2e-3, 1) does not
happen to hold the paper's learning rate (1e-2).

Example:
    ``python -m benchmarks tune_search --seeds 0 1 2 3 4 --budget 9 --epochs 1`` (``--data mnist1d``)
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._cli import BenchmarkParser, publish

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"model.init_args.lr": {"log_uniform": [1.0e-3, 1.0]},
         "model.init_args.weight_decay": {"log_uniform": [1.0e-7, 1.0e-5]}}
SPACES = {"digits": SPACE, "mnist1d": {**SPACE, "model.init_args.lr": {"log_uniform": [1.0e-5, 1.0]}}}
CONFIGS = {"digits": ROOT / "examples" / "digits.yaml", "mnist1d": ROOT / "examples" / "mnist1d.yaml"}


def run_study(method: str, seed: int, budget: int, epochs: int, workdir: Path, data: str = "digits") -> dict[str, Any]:
    """One study of ``budget`` trials with ``method`` ('random' or 'grid'); returns its best value and lrs."""
    import optuna

    from lightning_tricks.tuning.cli import load_config
    from lightning_tricks.tuning.space import grid_values, load_search_space, resolve_space
    from lightning_tricks.tuning.study import TuneSettings, run_worker

    base = load_config(["--config", str(CONFIGS[data]), f"--seed_everything={seed}", "--trainer.logger=false",
                        "--trainer.check_val_every_n_epoch=1"])
    base["trainer"]["callbacks"] = [c for c in base["trainer"].get("callbacks") or []
                                    if not c["class_path"].endswith("ModelCheckpoint")]
    base["trainer"]["enable_checkpointing"] = False
    space = resolve_space(base, load_search_space(SPACES[data]))
    settings = TuneSettings(config_args=[], space=space, trials=budget, stages=1, stage_epochs=[epochs],
                            stage_trials=[budget], metric="val_acc", direction="maximize", pruner="none",
                            run_dir=workdir / f"{method}-{seed}")
    if method == "grid":
        side = round(math.sqrt(budget))
        grid = {n: grid_values(d, side) for n, d in space.params.items()}
        sampler: Any = optuna.samplers.GridSampler(grid, seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    with contextlib.redirect_stdout(io.StringIO()):
        run_worker(settings, study, base)
    done = [t for t in study.trials if t.value is not None]
    return {"best": max(t.value for t in done), "lrs": len({t.params["model.init_args.lr"] for t in done}),
            "best_lr": study.best_params["model.init_args.lr"], "trials": len(done)}


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("tune_search", __doc__, quick="smoke run: 2 seeds, budget 4", section="tune-search",
                        threads=1)  # one thread: the models are tiny
    p.add_data_option()
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4 (0 1 with --quick)")
    p.add_quick_default("--budget", 9, 4, "trials per study (a square for the grid)")
    p.add_data_default("--epochs", {"digits": 1, "mnist1d": 3}, "epochs per trial")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run both methods per seed, print the table, write the ``tune-search`` section of RESULTS.md."""
    args = _parser().parse_args(argv)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    budget = args.budget
    results: dict[str, list[dict[str, Any]]] = {"random": [], "grid": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method in ("grid", "random"):  # interleaved per seed
                results[method].append(run_study(method, seed, budget, args.epochs, Path(tmp), args.data))
    rows = ["| seed | grid: best val_acc | grid: distinct lr | random: best val_acc | random: distinct lr |",
            "|---:|---:|---:|---:|---:|"]
    for i, seed in enumerate(seeds):
        g, r = results["grid"][i], results["random"][i]
        rows.append(f"| {seed} | {g['best']:.4f} (lr {g['best_lr']:.3g}) | {g['lrs']} | "
                    f"{r['best']:.4f} (lr {r['best_lr']:.3g}) | {r['lrs']} |")
    med = {m: statistics.median(x["best"] for x in results[m]) for m in results}
    wins = sum(r["best"] > g["best"] for r, g in zip(results["random"], results["grid"], strict=True))
    ties = sum(r["best"] == g["best"] for r, g in zip(results["random"], results["grid"], strict=True))
    low = SPACES[args.data]["model.init_args.lr"]["log_uniform"][0]
    publish(args, f"random vs grid search, same budget{' (MNIST-1D)' if args.data == 'mnist1d' else ''}", [
        f"`examples/{CONFIGS[args.data].name}`, {budget} trials of {args.epochs} epoch(s) per study; important: "
        f"learning rate log-uniform [{low:g}, 1]; unimportant: weight decay log-uniform [1e-7, 1e-5]. Grid: "
        f"{round(math.sqrt(budget))} log-spaced values per parameter; random: Optuna's RandomSampler. The seed sets "
        "the sampler and the training seed.",
        "",
        *rows,
        "",
        f"Median best val_acc: grid {med['grid']:.4f}, random {med['random']:.4f}; random better on {wins} of "
        f"{len(seeds)} seeds, tied on {ties}.",
    ])
    return 0

