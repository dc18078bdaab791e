"""``lightning-tricks recipe --config X``: the lectures' steps in order on your config, resumable.

1. baseline: the config trained as given; 2. babysit (stops on a failed check unless ``--keep-going``);
3. a 2-stage ``tune`` (coarse, then fine); 4. the best trial trained to the end with restore-best early
stopping and checkpoints; 5. an ensemble (``--ensemble top|snapshot|none``); 6. test-time augmentation.
Writes ``OUT/report.md`` and ``OUT/recipe.png``. Running the same command again resumes after the last
finished step (``OUT/recipe.json``, the study's database, the checkpoints); a step killed midway runs
again from its start (a search keeps its finished trials), so the report is the one an uninterrupted
run writes (with a fixed ``seed_everything``; the recipe fixes it to ``--seed`` when the config leaves
it random).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_tricks.core.cli_errors import run_command
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.errors import RecipeStopped
from lightning_tricks.recipe.steps import ENSEMBLES, STEPS, TTA_CHOICES, RecipeContext

DESCRIPTION = __doc__.split("\n\n")[0] + " " + " ".join(__doc__.split("\n\n")[1].split())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line: the argument, the bad value, the valid choices
        raise ConfigError(message)


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``20m``, ``1h30m`` or ``1.5h``.

    Examples:
        >>> parse_duration("1h30m"), parse_duration("90"), parse_duration("2.5m")
        (5400.0, 90.0, 150.0)
    """
    text = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or parts is None or not any(parts.groups()):
        raise ConfigError(f"`--time`={text!r} is invalid: expected a duration such as 300, 300s, 20m or 1h30m.")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ConfigError(f"`--time`={text!r} is invalid: expected a positive duration.")
    return total


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lightning-tricks recipe", description=DESCRIPTION,
                epilog="Any other argument is a fit config argument (--config, --model.init_args.lr=...).")
    p.add_argument("--out", default=None, help="output folder (default runs/recipe-CONFIG)")
    p.add_argument("--trials", type=int, default=8, help="trials of the search (default 8: 6 coarse, 2 fine)")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="epochs of the coarse and the fine trials (default: an eighth, then half of max epochs)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs of the baseline and the final run (default: the config's trainer.max_epochs)")
    p.add_argument("--time", default=None, help="time budget, e.g. 20m: the search stops starting trials when the "
                   "time left is what the later steps need (estimated from the baseline)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="top",
                   help="top: the final model + the next best trials (no extra training, default); snapshot: one "
                        "more run with SnapshotEnsemble; none")
    p.add_argument("--members", type=int, default=3, help="ensemble members (default 3)")
    p.add_argument("--tta", choices=TTA_CHOICES, default="auto",
                   help="auto: try small shifts at test time, adopted if better on validation (default); none")
    p.add_argument("--search", default=None, help="search-space file (default: CONFIG_search.yaml next to the "
                   "config when there is one, else what babysit suggests)")
    p.add_argument("--storage", default=None, help="Optuna database URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default="recipe", help="the study's name in the storage (default recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (and of seed_everything if unset)")
    p.add_argument("--metric", default=None, help="validation metric of the search and early stopping (default: "
                   "the config's monitor, else val_acc when the baseline logs it, else val_loss)")
    p.add_argument("--patience", type=int, default=5, help="EarlyStopping patience of the final run when the "
                   "config has no EarlyStopping (default 5)")
    p.add_argument("--keep-going", action="store_true", help="go on after a failed babysit check")
    p.add_argument("--babysit", default="", help="babysit options as one string, e.g. \"--lr-steps 50\"")
    p.add_argument("--verbose", action="store_true", help="Lightning's logs of every run")
    return p


def _check(args: argparse.Namespace) -> None:
    for name, low in (("trials", 1), ("members", 2), ("patience", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"`--{name}`={getattr(args, name)} is invalid: expected an integer >= {low}.")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"`--max-epochs`={args.max_epochs} is invalid: expected an integer >= 1.")
    stages = 2 if args.trials >= 2 else 1
    if args.epochs is not None and (len(args.epochs) != stages or min(args.epochs) < 1):
        raise ConfigError(f"`--epochs`={args.epochs} is invalid: expected {stages} integers >= 1 (coarse, fine).")
    if args.search is not None and not Path(args.search).is_file():
        raise ConfigError(f"`--search`={args.search!r} is invalid: the file does not exist.")


def _config_file(config_args: Sequence[str]) -> Path | None:
    for i, arg in enumerate(config_args):
        if arg in ("-c", "--config") and i + 1 < len(config_args):
            return Path(config_args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def companion_search(config_args: Sequence[str]) -> Path | None:
    """The search-space file that comes with the (first) config: ``NAME_search.yaml`` next to ``NAME.yaml``
    (``examples/mnist1d_search.yaml`` for ``examples/mnist1d.yaml``), or None."""
    config = _config_file(config_args)
    if config is None:
        return None
    path = config.with_name(f"{config.stem}_search.yaml")
    return path if path.is_file() else None


def _config_stem(config_args: Sequence[str]) -> str:
    for i, arg in enumerate(config_args):
        if arg in ("-c", "--config") and i + 1 < len(config_args):
            return Path(config_args[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return "config"


def build_context(args: argparse.Namespace, config_args: list[str], echo: Callable[[str], None]) -> RecipeContext:
    from lightning_tricks.core.monitor_mode import infer_mode
    from lightning_tricks.tuning.study import default_metric, load_config

    _check(args)
    if args.search is None and (found := companion_search(config_args)) is not None:
        echo(f"recipe: searching the space of {found} (the config's companion file; --search FILE for another).")
        args.search = str(found)
    time_budget = parse_duration(args.time) if args.time is not None else None
    base = load_config(config_args)
    if not isinstance(base.get("seed_everything"), int) or isinstance(base.get("seed_everything"), bool):
        echo(f"recipe: the config's seed_everything is {base.get('seed_everything')!r}: fixed to --seed {args.seed} "
             "so that every run, and a resumed recipe, is reproducible.")
        base["seed_everything"] = args.seed
    metric = args.metric or _config_monitor(base) or default_metric(base)
    out = Path(args.out or Path("runs") / f"recipe-{_config_stem(config_args)}").resolve()
    max_epochs = args.max_epochs or int((base.get("trainer") or {}).get("max_epochs") or 10)
    return RecipeContext(
        config_args=config_args, base=base, out=out, trials=args.trials, epochs=args.epochs, max_epochs=max_epochs,
        time=time_budget, ensemble=args.ensemble, members=args.members, tta=args.tta, search=args.search,
        storage=args.storage or f"sqlite:///{out / 'study.db'}", study_name=args.study_name, seed=args.seed,
        metric=metric, direction="maximize" if infer_mode(metric) == "max" else "minimize", patience=args.patience,
        metric_option=args.metric, keep_going=args.keep_going, babysit_args=shlex.split(args.babysit), verbose=args.verbose, echo=echo)


def _config_monitor(base: dict[str, Any]) -> str | None:
    from lightning_tricks.tuning.study import default_metric

    return None if default_metric(base) == "val_loss" and not any(
        "monitor" in (c.get("init_args") or {}) for c in (base.get("trainer") or {}).get("callbacks") or []
        if isinstance(c, dict)) else default_metric(base)


def resolve_metric(ctx: RecipeContext, args_metric: str | None, baseline: dict[str, Any]) -> None:
    """No ``--metric`` and no monitor in the config: the search and early stopping select by ``val_acc`` when the
    baseline logged it (the report compares accuracies), else ``val_loss``."""
    from lightning_tricks.core.monitor_mode import infer_mode

    if args_metric or _config_monitor(ctx.base):
        return
    ctx.metric = "val_acc" if "val_acc" in baseline.get("logged", []) else "val_loss"
    ctx.direction = "maximize" if infer_mode(ctx.metric) == "max" else "minimize"


def identity(ctx: RecipeContext) -> dict[str, Any]:
    """What must match for a re-run to resume this output folder."""
    search = Path(ctx.search).read_text() if ctx.search else None
    return {"config_args": ctx.config_args, "trials": ctx.trials, "epochs": ctx.epochs, "max_epochs": ctx.max_epochs,
            "ensemble": ctx.ensemble, "members": ctx.members, "tta": ctx.tta, "search": search,
            "study_name": ctx.study_name, "seed": ctx.seed, "metric": ctx.metric_option, "patience": ctx.patience,
            "babysit": ctx.babysit_args}


def _summary(step: str, result: dict[str, Any]) -> str:
    from lightning_tricks.recipe.report import pct, step_status

    if step == "tune":
        return f"best {result['metric']}={result['val_metric']:.4f} after {result['finished']} trials"
    if step == "babysit":
        return step_status(step, result)
    return (f"{step_status(step, result)}; val acc {pct(result.get('val_acc'))}, test acc {pct(result.get('test_acc'))}"
            f" ({result.get('seconds', 0):.1f} s)")


def run_steps(ctx: RecipeContext, argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Run (or resume) the steps; returns step -> result. Raises :class:`BabysitFailed` on a failed check."""
    from lightning_tricks.recipe import steps as st
    from lightning_tricks.recipe.state import RecipeState

    ctx.out.mkdir(parents=True, exist_ok=True)
    state = RecipeState(ctx.out)
    state.check_settings(identity(ctx))
    state.data["argv"] = list(argv)
    results: dict[str, dict[str, Any]] = {}

    def budget_left(study: Any) -> bool:
        if ctx.time is None:
            return True
        spent = state.seconds_spent() + sum(float(t.user_attrs.get("seconds") or 0) for t in study.get_trials())
        runs_after = 1 + (ctx.ensemble == "snapshot")
        return spent + 1.2 * runs_after * float(results["baseline"].get("seconds") or 0) < ctx.time

    for number, step in enumerate(STEPS, start=1):
        if state.done(step):
            results[step] = state.result(step)
            ctx.echo(f"recipe: step {number}/6 {step}: done before ({_summary(step, results[step])})")
        else:
            ctx.echo(f"recipe: step {number}/6 {step} ...")
            start = time.perf_counter()
            if step == "baseline":
                result = st.baseline_step(ctx)
            elif step == "babysit":
                result = st.babysit_step(ctx)
            elif step == "tune":
                from lightning_tricks.recipe.search import recipe_space

                result = st.tune_step(ctx, recipe_space(ctx.base, results["babysit"]["space"], ctx.search), budget_left)
            elif step == "final":
                result = st.final_step(ctx, results["tune"])
            elif step == "ensemble":
                result = (st.ensemble_step(ctx, results["tune"], results["final"]) if ctx.ensemble != "none" else
                          {"skipped": "--ensemble none", "adopted": False, "members": results["final"]["members"]})
            else:
                from lightning_tricks.recipe.report import final_result

                result = st.tta_step(ctx, final_result(results)[1], "final")
            result["seconds"] = round(time.perf_counter() - start, 2)
            results[step] = result
            state.finish(step, result)
            ctx.echo(f"recipe: step {number}/6 {step}: {_summary(step, result)}")
        if step == "baseline":
            resolve_metric(ctx, ctx.metric_option, results[step])
        if step == "babysit" and not results[step]["passed"]:
            if results[step].get("stop", True) and not ctx.keep_going:
                raise BabysitFailed(results)
            ctx.echo("recipe: babysit: " + "; ".join(f"{s['name']}: {s['diagnosis']}" for s in results[step]["steps"]
                                                     if not s["passed"]) + " -- the search goes on.")
    return results


class BabysitFailed(Exception):
    """A babysit check failed and ``--keep-going`` was not given: the recipe stops with the diagnosis."""

    def __init__(self, results: dict[str, dict[str, Any]]) -> None:
        super().__init__("babysit failed")
        self.results = results


def run_recipe(config: str | Sequence[str], *, echo: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """The Python entry point: ``run_recipe("examples/digits.yaml", trials=4, epochs=[1, 2], out="runs/r")``.

    ``config`` is a config file or a list of ``fit`` arguments (``["--config", "a.yaml", "--model.lr=0.1"]``);
    ``options`` are the command's options with underscores (``max_epochs``, ``ensemble``, ``keep_going``,
    ``babysit="--lr-steps 50"``, ...). Returns step -> result (the state file's results), with ``report``
    and ``figure`` paths.

    Raises:
        ConfigError: a wrong option or config (one line), or a babysit check that failed without ``keep_going``.
    """
    config_args = ["--config", config] if isinstance(config, (str, os.PathLike)) else list(config)
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return _run([*argv, *config_args], echo)


def _run(argv: list[str], echo: Callable[[str], None]) -> dict[str, Any]:
    from lightning_tricks.recipe import report

    args, config_args = parser().parse_known_args(argv)
    ctx = build_context(args, config_args, echo)
    try:
        results = run_steps(ctx, argv)
    except BabysitFailed as failed:
        md, _ = report.write(ctx.out, failed.results, {"argv": argv})
        lines = [f"{s['name']}: {s['diagnosis']}" for s in failed.results["babysit"]["steps"] if not s["passed"]]
        raise RecipeStopped(f"babysit failed, the recipe stops before the search ({'; '.join(lines)}); fix the config, "
                          f"or pass --keep-going to search anyway. Report: {md}") from None
    md, png = report.write(ctx.out, results, {"argv": argv})
    name, final = report.final_result(results)
    echo(f"recipe: test accuracy {report.pct(final.get('test_acc'))} ({name}) vs baseline "
         f"{report.pct(results['baseline'].get('test_acc'))}. Report: {md}  Figure: {png}")
    return {**results, "report": str(md), "figure": str(png)}


def recipe_main(argv: Sequence[str]) -> int:
    """``lightning-tricks recipe ARGS``: 0 when the recipe finished."""
    _run(list(argv), print)
    return 0


def main(argv: Sequence[str]) -> None:
    """The CLI entry: a ConfigError (a wrong option) is one line on stderr, exit status 2; a failed babysit check
    stops it with status 1."""
    run_command("recipe", lambda: recipe_main(argv), stopped=RecipeStopped)


__all__ = ["BabysitFailed", "RecipeStopped", "build_context", "main", "parse_duration", "parser", "recipe_main", "run_recipe",
           "run_steps"]
