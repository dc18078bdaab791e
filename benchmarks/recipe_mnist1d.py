"""The whole course as one command (`lightning-tricks recipe`) on MNIST-1D, over seeds: wall time, test accuracy per step.

Each seed runs ``lightning-tricks recipe --config CONFIG --seed_everything=SEED --seed SEED`` from scratch in a
temporary folder (baseline, babysit, a 2-stage search, the best trial trained to the end, an ensemble, TTA)
and reads its state file. Reported per seed: the wall time of the whole recipe, the test accuracy of the
baseline (the config as given: for ``examples/mnist1d.yaml`` the paper's CNN, 94% in the paper), of the
final run, of the ensemble and TTA steps, and of the recipe's result (the last step adopted on the
validation set); then the mean and standard deviation over seeds against the target (the paper's CNN + 3
points). ``--compare-ensembles`` also builds the other ensemble kind after each recipe (``snapshot`` when
the recipe used ``top``), from the same search and final run, to choose the default by measurement.

Example:
    ``python -m benchmarks recipe_mnist1d --seeds 0 1 2``
    ``python -m benchmarks recipe_mnist1d --config examples/digits.yaml --section recipe-digits --seeds 0``
"""

from __future__ import annotations

import shlex
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import mean_std

ROOT = Path(__file__).resolve().parents[1]
PAPER_CNN = 0.94


def run_seed(config: str, seed: int, recipe_args: Sequence[str], workdir: Path, compare: bool) -> dict[str, Any]:
    """One recipe from scratch; its results, wall seconds and (``compare``) the other ensemble kind's."""
    from lightning_tricks.recipe import report
    from lightning_tricks.recipe.cli import _run, build_context, parser
    from lightning_tricks.recipe.steps import ensemble_step

    argv = ["--out", str(workdir / f"seed-{seed}"), "--seed", str(seed), *recipe_args,
            "--config", config, f"--seed_everything={seed}"]
    start, cpu = time.perf_counter(), time.process_time()
    results = _run(argv, lambda line: None)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    name, final = report.final_result(results)
    # a recipe resumed from --workdir ran partly in an earlier process: its steps' own times add up to the whole
    steps_time = sum(float(r.get("seconds") or 0) for r in results.values() if isinstance(r, dict))
    row = {"wall": max(wall, steps_time), "cpu": cpu, "resumed": steps_time > wall + 1, "result": final["test_acc"], "result_step": name, "results": results, "other": None}
    if compare:
        args, config_args = parser().parse_known_args(argv)
        ctx = build_context(args, config_args, lambda line: None)
        ctx.ensemble = "snapshot" if ctx.ensemble == "top" else "top"
        other_start = time.perf_counter()
        other = ensemble_step(ctx, results["tune"], results["final"], name=f"ensemble-{ctx.ensemble}")
        row["other"] = {**other, "kind": ctx.ensemble, "seconds": time.perf_counter() - other_start}
    return row


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("recipe_mnist1d", __doc__, quick="smoke run: 1 seed, 3 trials, 1/10 of the epochs",
                        section="recipe-mnist1d", threads=1)
    p.add_argument("--config", default=str(ROOT / "examples" / "mnist1d.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    p.add_argument("--recipe-args", default="", help="more recipe options as one string, e.g. \"--trials 12\"")
    p.add_argument("--compare-ensembles", action="store_true", help="also build the other ensemble kind")
    p.add_argument("--workdir", default=None, help="keep every recipe's folder here (default: a temporary folder); "
                   "a recipe found there resumes")
    p.add_argument("--target-points", type=float, default=3.0, help="points above the paper's CNN (94%%) to reach")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe per seed, print the table, write the section of RESULTS.md."""
    args = _parser().parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    recipe_args = shlex.split(args.recipe_args)
    if args.quick:
        recipe_args = ["--trials", "3", "--max-epochs", "17", *recipe_args]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows.append(run_seed(args.config, seed, recipe_args, Path(args.workdir or tmp), args.compare_ensembles))
    steps = ("baseline", "final", "ensemble", "tta")
    other = rows[0]["other"]["kind"] if rows and rows[0]["other"] else None
    header = "| seed | wall (min) | CPU (min) | " + " | ".join(f"{s} test acc (%)" for s in steps)
    header += (f" | {other} ensemble (%) |" if other else " |") + " recipe result (%) | result step |"
    table = [header, "|" + "---:|" * (header.count("|") - 1)]
    for seed, row in zip(seeds, rows, strict=True):
        res = row["results"]
        cells = [f"{seed}", f"{row['wall'] / 60:.1f}", "resumed" if row["resumed"] else f"{row['cpu'] / 60:.1f}"]
        for s in steps:
            note = "" if s in ("baseline", "final") else (" (adopted)" if res[s].get("adopted") else "")
            cells.append(_pct(res[s].get("test_acc")) + note if not res[s].get("skipped") else "skipped")
        if other:
            o = row["other"]
            cells.append("skipped" if o.get("skipped") else f"{_pct(o.get('test_acc'))} (val {_pct(o.get('val_acc'))})")
        cells += [_pct(row["result"]), row["result_step"]]
        table.append("| " + " | ".join(cells) + " |")
    results = [r["result"] for r in rows]
    baselines = [r["results"]["baseline"]["test_acc"] for r in rows]
    mean = statistics.fmean(results)
    walls = [r["wall"] / 60 for r in rows]
    target = PAPER_CNN + args.target_points / 100
    fresh_cpu = ", ".join(f"{r['cpu'] / 60:.1f}" for r in rows if not r["resumed"])
    lines = [
        f"`lightning-tricks recipe --config {Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}"
        + (f" {shlex.join(recipe_args)}" if recipe_args else "") + "` per seed (`--seed_everything` and `--seed` = the "
        "seed), one torch thread; test accuracy of each step (ensemble and TTA are adopted only when "
        "better on the validation set), and of the recipe's result.",
        "",
        *table,
        "",
        f"Mean ± std over {len(seeds)} seed(s): baseline {mean_std(baselines)}%, recipe result {mean_std(results)}% "
        f"({100 * (mean - statistics.fmean(baselines)):+.2f} points over the baseline"
        + (f"; {100 * (mean - PAPER_CNN):+.2f} points over the paper's CNN, 94%: target +{args.target_points:g} "
           f"{'reached' if mean >= target else 'not reached'}" if "mnist1d" in args.config else "")
        + f"). Wall time per recipe: mean {statistics.fmean(walls):.1f} min, "
        f"max {max(walls):.1f} min; CPU time of the recipes run from scratch in one process (one torch thread, so "
        f"about the wall time on a free core): {fresh_cpu or '-'}"
        " min. The machine's cores are shared by other jobs: the wall times are pessimistic.",
    ]
    if other:
        gains = [(r["other"].get("test_acc") or 0) - (r["results"]["ensemble"].get("test_acc") or 0) for r in rows]
        lines += ["", f"{other} ensemble minus the recipe's ensemble, test accuracy: mean {100 * statistics.fmean(gains):+.2f} "
                  f"points; its extra time: mean {statistics.fmean(r['other']['seconds'] for r in rows) / 60:.1f} min."]
    publish(args, "the whole recipe on MNIST-1D" if "mnist1d" in args.config else "the whole recipe", lines)
    return 0
