"""Dead units on digits: the shipped sane and huge-learning-rate configs over seeds, with their heat maps.

Runs ``examples/monitoring.yaml`` (lr 0.02) and ``examples/monitoring_dead.yaml`` (lr 0.25) through the
``lightning-tricks`` CLI in this process, once per seed, and records what ``DeadUnitMonitor`` reports
(overall dead fraction per epoch, last-epoch per-layer fractions, whether it warned), the median
update/weight ratio of ``UpdateRatioMonitor``, the first loss of ``InitialLossCheck`` and the final
validation accuracy. Writes the ``monitoring-effect`` section of ``benchmarks/RESULTS.md`` and the
seed-0 heat maps to ``docs/img/dead_units_sane.png`` and ``docs/img/dead_units_dead.png``.

Example:
    ``python -m benchmarks monitoring_effect --seeds 0 1 2``
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._cli import BenchmarkParser, publish

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sane": ROOT / "examples" / "monitoring.yaml", "dead": ROOT / "examples" / "monitoring_dead.yaml"}
IMAGES = ROOT / "docs" / "img"


def run_config(config: Path, seed: int, workdir: Path) -> dict[str, Any]:
    """One fit of ``config`` with ``seed``; returns the monitors' figures."""
    from lightning_tricks import DeadUnitMonitor, InitialLossCheck, UpdateRatioMonitor
    from lightning_tricks.cli import build_cli

    args = ["fit", "--config", str(config), f"--seed_everything={seed}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(args)
    callbacks = cli.trainer.callbacks
    dead = next(c for c in callbacks if isinstance(c, DeadUnitMonitor))
    ratio = next(c for c in callbacks if isinstance(c, UpdateRatioMonitor))
    check = next(c for c in callbacks if isinstance(c, InitialLossCheck))
    records = dead.history["train"]
    return {
        "dead_per_epoch": [r["overall"] for r in records],
        "layers_last": records[-1]["dead"],
        "dead_warned": any("DeadUnitMonitor:" in str(w.message) and "are dead" in str(w.message) for w in caught),
        "ratio_warned": any("UpdateRatioMonitor:" in str(w.message) for w in caught),
        "ratio_medians": [r["median"] for r in ratio.history],
        "initial_loss": check.observed,
        "val_acc": float(cli.trainer.callback_metrics["val_acc"]),
        "monitor": dead,
    }


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("monitoring_effect", __doc__, section="monitoring-effect")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run both configs over the seeds, print and write the table, save the heat maps."""
    args = _parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        import os

        cwd = os.getcwd()
        os.chdir(tmp)  # the configs write runs/ relative to the working directory
        try:
            for seed in args.seeds:
                for name, config in CONFIGS.items():
                    result = run_config(config, seed, Path(tmp))
                    results[name].append(result)
                    print(f"{name} seed {seed}: dead {' '.join(f'{d:.3f}' for d in result['dead_per_epoch'])}, "
                          f"val_acc {result['val_acc']:.4f}", flush=True)
        finally:
            os.chdir(cwd)

    rows = ["| config | lr | dead units, last epoch (per seed) | mean | max over epochs (mean) | DeadUnitMonitor warned "
            "| median update ratio, last | UpdateRatioMonitor warned | first loss | val acc (mean) |",
            "|---|---:|---|---:|---:|---|---:|---|---:|---:|"]
    for name, runs in results.items():
        last = [r["dead_per_epoch"][-1] for r in runs]
        peak = [max(r["dead_per_epoch"]) for r in runs]
        lr = "0.02" if name == "sane" else "0.25"
        rows.append(
            f"| `{CONFIGS[name].relative_to(ROOT)}` | {lr} | {', '.join(f'{100 * v:.1f}%' for v in last)} | "
            f"{100 * statistics.mean(last):.1f}% | {100 * statistics.mean(peak):.1f}% | "
            f"{sum(r['dead_warned'] for r in runs)}/{len(runs)} | "
            f"{statistics.mean(r['ratio_medians'][-1] for r in runs):.1e} | {sum(r['ratio_warned'] for r in runs)}/{len(runs)} | "
            f"{statistics.mean(r['initial_loss'] for r in runs):.3f} | {statistics.mean(r['val_acc'] for r in runs):.4f} |"
        )
    per_epoch = ["| epoch | " + " | ".join(f"{name} (seed {args.seeds[0]})" for name in results) + " |",
                 "|---:|" + "---:|" * len(results)]
    for epoch in range(len(results["sane"][0]["dead_per_epoch"])):
        per_epoch.append(f"| {epoch} | " + " | ".join(f"{100 * results[n][0]['dead_per_epoch'][epoch]:.1f}%"
                                                       for n in results) + " |")
    publish(args, "dead ReLU units on digits, sane vs huge learning rate", [
        f"Seeds {args.seeds}. The two shipped configs (ImageClassifier `mlp` backbone, 3 hidden layers of 256 ReLU "
        "units, SGD momentum 0.9, constant learning rate, 10 epochs, digits batch 64) differ only in the learning "
        "rate. A unit is dead for an epoch when it never fired on any training example of that epoch.",
        "",
        *rows,
        "",
        "Overall dead fraction per epoch:",
        "",
        *per_epoch,
    ])
    if not args.no_write:
        from lightning_tricks.monitoring.plots import save_figure

        for name, runs in results.items():
            path = save_figure(runs[0]["monitor"].heatmap("train"), IMAGES / f"dead_units_{name}.png")
            print(f"heat map: {path}")
    return 0
