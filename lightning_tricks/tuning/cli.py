"""``lightning-tricks tune`` and ``lightning-tricks babysit``: argument parsing, workers and the report.

Both take the same config arguments as ``fit`` (``--config FILE``, ``--model.init_args.lr=...``);
their own options are listed by ``--help``. Errors the user fixes (an unknown search key, a
malformed distribution, a negative trial count, an unreachable storage) are one line on stderr and
exit status 2, before anything is written to the study.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_tricks.core.cli_errors import run_command
from lightning_tricks.core.monitor_mode import infer_mode
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.tuning.study import default_metric, load_config  # noqa: F401  (re-exported)

TUNE_DESCRIPTION = """Hyperparameter search on Optuna: random, coarse to fine. Takes the same config as `fit`
plus a search space (--search FILE.yaml mapping config keys to distributions), runs --trials trials
(each a `fit` of the config with the trial's values), stores the study in a database (a SQLite file in
the run folder by default; any Optuna URL lets workers on several machines join), prints the table and
writes trials.csv, best.yaml (run it with `lightning-tricks fit --config best.yaml`) and figures."""


def _tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-tricks tune", description=TUNE_DESCRIPTION,
                                epilog="Any other argument is a fit config argument (--config, --model.init_args.lr=...).")
    p.add_argument("--search", required=True, help="search-space YAML: config key -> {log_uniform|uniform|int|"
                   "log_int: [low, high]} or {choice: [...]}")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study ends with (default 20)")
    p.add_argument("--stages", type=int, default=2, help="1 = one random search; 2 = coarse then fine (default)")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="epochs per stage (default: a quarter of max_epochs, then max_epochs)")
    p.add_argument("--metric", default=None, help="validation metric (default: the config's monitor, else val_loss)")
    p.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                   help="default: inferred from the metric's name (acc -> maximize)")
    p.add_argument("--sampler", default="random", help="random (default), tpe, cmaes, qmc, gp, grid "
                   "(round(trials^(1/d)) values per parameter, log-spaced on log ranges; --stages 1)")
    p.add_argument("--pruner", default="median", help="median (default), successive_halving, hyperband, none")
    p.add_argument("--top", type=float, default=0.25,
                   help="fraction of a stage's trials (at least 2) whose values the next stage's ranges surround")
    p.add_argument("--divergence-factor", type=float, default=3.0,
                   help="stop a trial whose training loss exceeds this x its first loss (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (worker i adds 7919 i)")
    p.add_argument("--study-name", default=None, help="default: the search file's name")
    p.add_argument("--storage", default=None,
                   help="Optuna database URL (default sqlite:///RUN_DIR/study.db); e.g. postgresql://user@host/db")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/tune-STUDY)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--verbose", action="store_true", help="show each trial's progress bar and Lightning's logs")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    return p


def _check_counts(args: argparse.Namespace) -> None:
    from lightning_tricks.tuning.study import PRUNERS, SAMPLERS

    checks = [("--trials", args.trials, 1), ("--stages", args.stages, 1), ("--workers", args.workers, 1)]
    for name, value, low in checks:
        if value < low:
            raise ConfigError(f"`{name}`={value} is invalid: expected an integer >= {low}.")
    if args.stages > args.trials:
        raise ConfigError(f"`--stages`={args.stages} is invalid: expected at most --trials={args.trials}.")
    if args.epochs is not None and (len(args.epochs) != args.stages or min(args.epochs) < 1):
        raise ConfigError(f"`--epochs`={args.epochs} is invalid: expected {args.stages} integers >= 1, one per stage.")
    if not 0 < args.top <= 1:
        raise ConfigError(f"`--top`={args.top} is invalid: expected a number in (0, 1].")
    if args.divergence_factor < 0 or 0 < args.divergence_factor <= 1:
        raise ConfigError(f"`--divergence-factor`={args.divergence_factor} is invalid: expected 0 (off) or > 1.")
    if args.sampler not in SAMPLERS:
        raise ConfigError(f"`--sampler`={args.sampler!r} is invalid: expected one of {', '.join(SAMPLERS)}.")
    if args.sampler == "grid" and args.stages != 1:
        raise ConfigError("`--sampler`='grid' is invalid with --stages > 1: a grid does not narrow; use --stages 1.")
    if args.pruner not in PRUNERS:
        raise ConfigError(f"`--pruner`={args.pruner!r} is invalid: expected one of {', '.join(PRUNERS)}.")


def build_settings(args: argparse.Namespace, config_args: list[str]) -> tuple[Any, dict[str, Any]]:
    """Validate everything (no file written) and return the settings and the base config."""
    from lightning_tricks.tuning.space import load_search_space, resolve_space
    from lightning_tricks.tuning.study import TuneSettings, default_epochs, split_trials

    _check_counts(args)
    params = load_search_space(args.search)
    base = load_config(config_args)
    space = resolve_space(base, params)
    strategy = str((base.get("trainer") or {}).get("strategy") or "auto")
    if strategy.startswith("ddp") and not any(k in strategy for k in ("spawn", "fork", "notebook")):
        raise ConfigError(f"`trainer.strategy`={strategy!r} re-runs the command once per rank, which tune cannot do "
                          "inside a trial: use --trainer.strategy=ddp_spawn (or ddp_fork) for DDP in each trial.")
    metric = args.metric or default_metric(base)
    max_epochs = int((base.get("trainer") or {}).get("max_epochs") or 10)
    study_name = args.study_name or Path(args.search).stem
    run_dir = Path(args.run_dir or Path("runs") / f"tune-{study_name}").resolve()
    settings = TuneSettings(
        config_args=config_args, space=space, trials=args.trials, stages=args.stages,
        stage_epochs=list(args.epochs or default_epochs(max_epochs, args.stages)),
        stage_trials=split_trials(args.trials, args.stages), metric=metric,
        direction=args.direction or ("maximize" if infer_mode(metric) == "max" else "minimize"),
        sampler=args.sampler, pruner=args.pruner, top_fraction=args.top,
        divergence_factor=args.divergence_factor or None, seed=args.seed, study_name=study_name,
        storage=args.storage or f"sqlite:///{run_dir / 'study.db'}", run_dir=run_dir, quiet=not args.verbose,
    )
    return settings, base


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):  # Linux: a worker ends when the tune process ends
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn_workers(argv: Sequence[str], count: int, threads: int) -> list[subprocess.Popen]:
    procs = []
    for index in range(1, count):
        cmd = [sys.executable, "-m", "lightning_tricks", "tune", *argv, "--workers", "1",
               "--worker-index", str(index), "--no-report"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if os.name == "posix" else None))
    return procs


def report(study: Any, settings: Any, base: dict[str, Any]) -> None:
    """Print the table; write trials.csv, best.yaml and the figures into the run folder."""
    from lightning_tricks.tuning import report as rep
    from lightning_tricks.tuning.study import trial_config

    table = rep.rows(study)
    print(rep.format_table(table, settings.metric), flush=True)
    out = settings.run_dir
    written = [rep.write_csv(table, out / "trials.csv", settings.metric)]
    best = rep.best_trial(study)
    if best is not None:
        config = trial_config(base, settings, dict(best.params), int(best.user_attrs.get("epochs")), None)
        header = (f"best trial {best.number} of study {settings.study_name!r} (stage {best.user_attrs.get('stage')}): "
                  f"{settings.metric}={best.value:.4f}\nrun it: lightning-tricks fit --config {out / 'best.yaml'}")
        written.append(rep.write_best(config, out / "best.yaml", header))
        print(f"best: trial {best.number}, {settings.metric}={best.value:.4f}, " +
              ", ".join(f"{k}={v}" for k, v in best.params.items()), flush=True)
    else:
        print("no trial completed: no best.yaml", flush=True)
    written += rep.write_figures(study, out, settings.metric, rep.config_loggers(base, out))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)


def tune_main(argv: Sequence[str]) -> int:
    import torch

    from lightning_tricks.tuning.study import (
        is_storage_error,
        load_or_create_study,
        masked_url,
        open_storage,
        run_worker,
        storage_cause,
        storage_error_line,
    )

    args, config_args = _tune_parser().parse_known_args(list(argv))
    settings, base = build_settings(args, config_args)
    storage = open_storage(settings.storage) if args.storage else None
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = open_storage(settings.storage)
    study = load_or_create_study(settings, storage, args.worker_index)
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) // args.workers)
    if args.workers > 1:
        torch.set_num_threads(threads)
    procs = _spawn_workers(argv, args.workers, threads) if args.workers > 1 else []
    try:
        run_worker(settings, study, base)
        if not args.no_report:
            report(study, settings, base)
    except Exception as err:
        if not is_storage_error(err):
            raise
        # the database went away mid-study: what it holds is safe; this worker's running trial (if any) is left
        # RUNNING there and is marked failed, and run again, by the next start (or any worker after the grace period)
        cause = storage_cause(err) or err  # Optuna may re-raise it as another error (its context keeps the cause)
        raise ConfigError(f"lost the study storage {masked_url(settings.storage)!r} ({storage_error_line(settings.storage, cause)}): "
                          "the finished trials are kept in it; rerun the same command when it is reachable "
                          "again to finish the study.") from err
    finally:
        for proc in procs:
            proc.wait()
    return 0


def main(argv: Sequence[str]) -> None:
    """``lightning-tricks tune|babysit ARGS``: run it; a ConfigError is one line and exit status 2."""
    command, rest = argv[0], list(argv[1:])

    def run() -> int:
        if command == "tune":
            return tune_main(rest)
        from lightning_tricks.tuning.babysit import babysit_main

        return babysit_main(rest)

    run_command(command, run)


__all__ = ["build_settings", "default_metric", "load_config", "main", "report", "tune_main"]
