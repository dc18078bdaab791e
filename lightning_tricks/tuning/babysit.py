"""``lightning-tricks babysit``: the lectures' first three steps on the user's config, each pass or fail with a number.

CS231n, lecture 6 ("Training Neural Networks", training dynamics), for a new model:

1. **Check the initial loss** with regularization off: a C-class softmax starts at about log C
   (:class:`~lightning_tricks.monitoring.InitialLossCheck`).
2. **Overfit a small sample** (a few minibatches) to ~100% training accuracy
   (:func:`~lightning_tricks.monitoring.overfit_check`). "Loss not going down? LR too low, bad
   initialization. Loss explodes to inf or NaN? LR too high, bad initialization."
3. **Find a learning rate that makes the loss drop significantly within ~100 iterations**, with all
   the data and a small weight decay: the lectures' grid 1e-1, 1e-2, 1e-3, 1e-4, or Lightning's
   range test (``Tuner.lr_find``). The check itself is on the config's own learning rate: does it make
   the loss drop without blowing up (the notes' "3x the original cost" rule)? The update/weight
   ratio (:class:`~lightning_tricks.monitoring.UpdateRatioMonitor`, ~1e-3) is reported at the
   learning rate found.

It ends by writing a search space for ``lightning-tricks tune`` around what it found (step 4).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_tricks.core.validation import ConfigError

REGULARIZERS = frozenset({"Cutout", "Mixup", "WeightPenalty", "DropConnect", "StochasticDepth",
                          "FractionalMaxPooling"})
"""Callbacks babysitting switches off: the checks are about the model, the loss and the learning rate."""
LR_KEYS = ("lr", "learning_rate")
DECAY_KEYS = ("weight_decay",)
LECTURE_GRID = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass
class StepResult:
    """One step's outcome: ``number`` (1-3), ``name``, ``passed``, the ``measured`` line and the ``diagnosis``."""

    number: int
    name: str
    passed: bool
    measured: str
    diagnosis: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = f"step {self.number} {self.name}: {verdict}  {self.measured}"
        return text + (f"\n    diagnosis: {self.diagnosis}" if self.diagnosis else "")


# -- the config, stripped for the checks ----------------------------------------------------------
def find_init_arg(config: dict[str, Any], names: Sequence[str]) -> str | None:
    """The name of the first of ``names`` among the model's init arguments, or None."""
    args = (config.get("model") or {}).get("init_args") or {}
    return next((n for n in names if n in args), None)


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` for the checks: no regularizers, no monitoring callbacks, no logger or checkpoints."""
    config = _copy(config)
    trainer = config.setdefault("trainer", {})
    keep = []
    for cb in trainer.get("callbacks") or []:
        name = cb.get("class_path", "").rsplit(".", 1)[-1] if isinstance(cb, dict) else ""
        if name in REGULARIZERS or name == "ModelCheckpoint" or "monitor" in (cb.get("init_args") or {}):
            continue
        keep.append(cb)
    trainer.update(callbacks=keep, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return config


def set_model_arg(config: dict[str, Any], name: str | None, value: Any) -> dict[str, Any]:
    if name is not None:
        config["model"]["init_args"][name] = value
    return config


def _build(config: dict[str, Any], folder: Path, name: str) -> Any:
    from lightning_tricks.tuning.study import build_from_config

    return build_from_config(config, folder / f"{name}.yaml")


# -- step 1 ---------------------------------------------------------------------------------------
def initial_loss_step(config: dict[str, Any], folder: Path, tolerance: float) -> StepResult:
    """Step 1: the first training loss (weight decay 0, no regularizer callbacks) against log C."""
    from lightning_tricks.monitoring import InitialLossCheck

    config = set_model_arg(_copy(config), find_init_arg(config, DECAY_KEYS), 0.0)
    config["trainer"].update(max_steps=1, max_epochs=1)
    cli = _build(config, folder, "step1")
    check = InitialLossCheck(tolerance=tolerance)
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    measured = f"initial loss {check.observed:.4f} vs log(C) = {check.expected:.4f} (tolerance {tolerance:.0%})"
    diagnosis = "" if check.passed else (
        f"the first loss {check.observed:.4f} is far from log(C) = {check.expected:.4f}: the logits are badly "
        "scaled at initialization (a too-large last layer or init scale), or the loss is not a mean softmax "
        "cross-entropy, or the inputs are not normalized.")
    return StepResult(1, "initial loss", bool(check.passed), measured, diagnosis,
                      {"observed": check.observed, "expected": check.expected})


# -- step 2 ---------------------------------------------------------------------------------------
def overfit_step(config: dict[str, Any], folder: Path, num_batches: int, max_epochs: int,
                 target: float, input_key: str | int | None = None, target_key: str | int | None = None) -> StepResult:
    """Step 2: train a copy on ``num_batches`` minibatches (weight decay 0) and read the accuracy on them
    (tuple, list or dict batches; ``input_key``/``target_key`` as :func:`~lightning_tricks.monitoring.overfit_check`)."""
    from lightning_tricks.monitoring import overfit_check
    from lightning_tricks.tuning.pruning import CurveRecorder

    config = set_model_arg(_copy(config), find_init_arg(config, DECAY_KEYS), 0.0)
    config["trainer"].update(max_epochs=max_epochs)
    cli = _build(config, folder, "step2")
    recorder = CurveRecorder("train_loss")
    report = overfit_check(cli.model, datamodule=cli.datamodule, num_batches=num_batches, max_epochs=max_epochs,
                           target_accuracy=target, input_key=input_key, target_key=target_key,
                           callbacks=[*_user_callbacks(cli), recorder],
                           accelerator=config["trainer"].get("accelerator") or "auto", default_root_dir=str(folder))
    measured = (f"training accuracy {report.accuracy:.3f} on {report.num_samples} samples ({num_batches} batches) "
                f"after {report.epochs} epochs; loss {report.initial_loss:.4f} -> {report.final_loss:.4f}")
    diagnosis = ""
    if not report.passed:
        losses = [v for _, v in recorder.train_loss]
        exploded = any(not math.isfinite(v) or v > 3 * losses[0] for v in losses) if losses else False
        if exploded or not math.isfinite(report.final_loss) or report.final_loss > report.initial_loss:
            diagnosis = "loss explodes (inf/NaN or above its start): learning rate too high, or bad initialization."
        elif report.final_loss > 0.9 * report.initial_loss:
            diagnosis = "loss not going down: learning rate too low, or bad initialization (or a bug in the loss)."
        else:
            diagnosis = (f"loss goes down but the sample is not memorized (target {target:.0%}): train longer "
                         "(--overfit-epochs), raise the learning rate, or check that the model has the capacity.")
    return StepResult(2, "overfit a small sample", report.passed, measured, diagnosis,
                      {"accuracy": report.accuracy, "initial_loss": report.initial_loss,
                       "final_loss": report.final_loss})


def _user_callbacks(cli: Any) -> list[Any]:
    """The config's own callbacks (init schemes etc.), without the ones Lightning adds by default."""
    from lightning_tricks.core.lightning_classes import lightning_types

    defaults = lightning_types("callbacks.ProgressBar") + lightning_types("callbacks.ModelSummary")
    return [c for c in cli.trainer.callbacks if not isinstance(c, defaults)]


def _copy(config: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(config)


# -- step 3 ---------------------------------------------------------------------------------------
@dataclass
class LRTrial:
    """The first ``steps`` iterations at one learning rate: losses, whether they dropped or blew up, update ratio."""

    lr: float
    first: float
    last: float
    blew_up: bool
    dropped: bool
    update_ratio: float


def train_at_lr(config: dict[str, Any], folder: Path, lr_key: str, lr: float, steps: int, drop: float,
                factor: float) -> LRTrial:
    """Train ``steps`` iterations on all the data at ``lr``; the loss dropped if the mean of the last 10 is below
    ``drop`` x the first loss; it blew up if a loss was not finite or above ``factor`` x the first."""
    from lightning_tricks.monitoring import UpdateRatioMonitor
    from lightning_tricks.tuning.pruning import CurveRecorder

    config = set_model_arg(_copy(config), lr_key, lr)
    config["trainer"].update(max_steps=steps, max_epochs=10**6)
    # a schedule over max_epochs would decay the rate within the 100 iterations: keep it constant
    if "schedule" in config["model"].get("init_args", {}):
        config["model"]["init_args"]["schedule"] = "none"
    cli = _build(config, folder, f"step3-lr{lr:g}")
    recorder, monitor = CurveRecorder("train_loss"), UpdateRatioMonitor(every_n_steps=10, log_per_tensor=False,
                                                                        warn_below=1e-12, warn_above=1e12)
    cli.trainer.callbacks.extend([recorder, monitor])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = [v for _, v in recorder.train_loss]
    first = losses[0] if losses else math.nan
    blew_up = not losses or any(not math.isfinite(v) or v > factor * first for v in losses)
    tail = losses[-10:]
    last = statistics.fmean(tail) if tail and all(math.isfinite(v) for v in tail) else math.nan
    dropped = not blew_up and math.isfinite(last) and last < drop * first
    medians = [h["median"] for h in monitor.history if math.isfinite(h["median"])]
    ratio = statistics.median(medians) if medians else math.nan
    return LRTrial(lr, first, last, blew_up, dropped, ratio)


def lr_range_test(config: dict[str, Any], folder: Path, lr_key: str, steps: int) -> list[float]:
    """Lightning's learning-rate range test (``Tuner.lr_find``, 1e-6 to 1): candidates to train at.

    Its suggestion (the steepest descent of the loss), the rate at the lowest loss of the sweep (where
    the loss turns up: the edge of blowing up) and a tenth of it (Smith's rule of thumb).
    """
    import importlib

    from lightning_tricks.core.lightning_classes import package_of

    config = _copy(config)
    config["trainer"].update(max_epochs=10**6)
    if "schedule" in config["model"].get("init_args", {}):
        config["model"]["init_args"]["schedule"] = "none"
    cli = _build(config, folder, "step3-range-test")
    Tuner = importlib.import_module(f"{package_of(cli.trainer)}.tuner").Tuner  # the Trainer's own package's
    finder = Tuner(cli.trainer).lr_find(cli.model, datamodule=cli.datamodule, num_training=steps, min_lr=1e-6,
                                        max_lr=1.0, attr_name=lr_key, update_attr=False)
    if finder is None:
        return []
    # skip the sweep's first 10 points and its last, as Lightning's suggestion does (its smoothing starts biased)
    lrs, losses = finder.results["lr"][10:-1], finder.results["loss"][10:-1]
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=False) if math.isfinite(loss)]
    candidates = [finder.suggestion()]
    if finite:
        at_min = min(finite)[1]
        candidates += [at_min, at_min / 10]
    return sorted({float(f"{c:.3g}") for c in candidates if c}, reverse=True)


def lr_step(config: dict[str, Any], folder: Path, lrs: Sequence[float], steps: int, drop: float, factor: float,
            method: str, small_decay: float) -> StepResult:
    """Step 3: the largest learning rate that makes the loss drop in ``steps`` iterations, and the config's own."""
    lr_key = find_init_arg(config, LR_KEYS)
    if lr_key is None:
        raise ConfigError("babysit step 3 needs the model's learning rate as an init argument named `lr` or "
                          "`learning_rate`; the model has neither.")
    config = set_model_arg(_copy(config), find_init_arg(config, DECAY_KEYS), small_decay)
    own_lr = float(config["model"]["init_args"][lr_key])
    candidates = sorted(set(lrs), reverse=True)
    if method == "range_test":
        candidates = lr_range_test(config, folder, lr_key, steps)
    tried = [train_at_lr(config, folder, lr_key, lr, steps, drop, factor) for lr in candidates]
    good = [t for t in tried if t.dropped]
    best = max(good, key=lambda t: t.lr) if good else None
    own = next((t for t in tried if math.isclose(t.lr, own_lr)), None) or \
        train_at_lr(config, folder, lr_key, own_lr, steps, drop, factor)
    table = "; ".join(f"lr {t.lr:g}: loss {t.first:.3g} -> {t.last:.3g}" + (" (blew up)" if t.blew_up else "")
                      for t in tried)
    found = (f"largest good lr {best.lr:g} (update/weight ratio {best.update_ratio:.1e}, about 1e-3 is healthy)"
             if best else "no learning rate tried made the loss drop")
    measured = (f"config lr {own_lr:g}: loss {own.first:.3g} -> {own.last:.3g} in {steps} iterations"
                f"{' (blew up)' if own.blew_up else ''}; {found}. Tried: {table}")
    diagnosis = ""
    if own.blew_up:
        diagnosis = (f"loss explodes (inf/NaN or above {factor:g}x its first value) at the config's lr {own_lr:g}: "
                     "learning rate too high" + (f"; try {best.lr:g} or below." if best else "."))
    elif not own.dropped:
        diagnosis = (f"loss barely changes at the config's lr {own_lr:g}: learning rate too low"
                     + (f"; try {best.lr:g}." if best else "."))
    return StepResult(3, "learning rate", own.dropped, measured, diagnosis,
                      {"lr_key": lr_key, "best_lr": best.lr if best else None, "own_lr": own_lr,
                       "update_ratio": best.update_ratio if best else None,
                       "tried": [vars(t) for t in tried]})


def suggested_space(config: dict[str, Any], step3: StepResult) -> dict[str, Any]:
    """Step 4's coarse search around step 3: learning rate log-uniform in [lr/10, lr], weight decay {0, 1e-5, 1e-4}."""
    space: dict[str, Any] = {}
    lr = step3.details.get("best_lr") or step3.details.get("own_lr")
    key = step3.details.get("lr_key")
    if lr and key:
        space[f"model.init_args.{key}"] = {"log_uniform": [float(f"{lr / 10:.3g}"), float(f"{lr:.3g}")]}
    decay = find_init_arg(config, DECAY_KEYS)
    if decay:
        space[f"model.init_args.{decay}"] = {"choice": [0, 1.0e-5, 1.0e-4]}
    return space


# -- command --------------------------------------------------------------------------------------
def babysit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-tricks babysit", description=(
        "CS231n's babysitting steps 1-3 on a fit config: initial loss vs log C, overfit a few batches, a "
        "learning-rate search; then a suggested search space for `lightning-tricks tune`."),
        epilog="Any other argument is a fit config argument (--config, --model.init_args.lr=...).")
    p.add_argument("--tolerance", type=float, default=0.25, help="step 1: allowed relative distance to log C")
    p.add_argument("--overfit-batches", type=int, default=5, help="step 2: minibatches to overfit (default 5)")
    p.add_argument("--overfit-epochs", type=int, default=60, help="step 2: passes over them (default 60)")
    p.add_argument("--overfit-target", type=float, default=0.99, help="step 2: accuracy that passes (default 0.99)")
    p.add_argument("--input-key", type=_key, default=None,
                   help="step 2: where a batch holds the inputs (a dict key or a position; default: image, x, ...)")
    p.add_argument("--target-key", type=_key, default=None,
                   help="step 2: where a batch holds the targets (default: label, y, ..., or the item after the inputs)")
    p.add_argument("--lr-search", choices=("grid", "range_test"), default="grid",
                   help="step 3: the lectures' grid (default) or Lightning's range test (Tuner.lr_find)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LECTURE_GRID), help="step 3: the grid")
    p.add_argument("--lr-steps", type=int, default=100, help="step 3: iterations per learning rate (default 100)")
    p.add_argument("--drop", type=float, default=0.5,
                   help="step 3: the loss dropped when its last 10 iterations average below DROP x the first loss")
    p.add_argument("--factor", type=float, default=3.0, help="step 3: blew up above FACTOR x the first loss")
    p.add_argument("--small-decay", type=float, default=1e-4, help="step 3: weight decay during the search")
    p.add_argument("--run-dir", default="runs/babysit", help="where the step configs and the search file go")
    p.add_argument("--out", default=None, help="the suggested search space (default RUN_DIR/search.yaml)")
    return p


def _key(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def check_babysit_args(args: argparse.Namespace) -> None:
    for name in ("overfit_batches", "overfit_epochs", "lr_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"`--{name.replace('_', '-')}`={getattr(args, name)} is invalid: expected an integer >= 1.")
    if min(args.lrs) <= 0:
        raise ConfigError(f"`--lrs`={args.lrs} is invalid: expected learning rates > 0.")
    if not 0 < args.drop < 1 or args.factor <= 1 or args.tolerance <= 0 or not 0 <= args.overfit_target <= 1:
        raise ConfigError("`--drop` must be in (0, 1), `--factor` > 1, `--tolerance` > 0, `--overfit-target` in [0, 1].")


def babysit(config: dict[str, Any], args: argparse.Namespace, echo: Any = print) -> list[StepResult]:
    """Run steps 1-3 on a complete config dict and write the suggested search space; returns the results."""
    from lightning_tricks.tuning.study import quiet_lightning

    with quiet_lightning():
        folder = Path(args.run_dir).resolve()
        checks = check_config(config)
        results = [initial_loss_step(checks, folder, args.tolerance)]
        echo(results[-1].line())
        results.append(overfit_step(checks, folder, args.overfit_batches, args.overfit_epochs, args.overfit_target,
                                    getattr(args, "input_key", None), getattr(args, "target_key", None)))
        echo(results[-1].line())
        results.append(lr_step(checks, folder, args.lrs, args.lr_steps, args.drop, args.factor, args.lr_search,
                               args.small_decay))
        echo(results[-1].line())
        space = suggested_space(config, results[-1])
        out = Path(args.out) if args.out else folder / "search.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# suggested by lightning-tricks babysit (step 4: coarse search around step 3)\n"
                       + yaml.safe_dump(space, sort_keys=False))
        passed = sum(r.passed for r in results)
        echo(f"{passed}/3 steps passed. Suggested search space: {out}\n"
             f"next (step 4): lightning-tricks tune --config YOUR_CONFIG --search {out}")
        return results


def babysit_main(argv: Sequence[str]) -> int:
    """``lightning-tricks babysit``: exit status 0 when every step passed, 1 otherwise."""
    from lightning_tricks.tuning.study import load_config

    args, config_args = babysit_parser().parse_known_args(list(argv))
    check_babysit_args(args)
    results = babysit(load_config(config_args), args)
    return 0 if all(r.passed for r in results) else 1


__all__ = ["LECTURE_GRID", "StepResult", "babysit", "babysit_main", "babysit_parser", "check_babysit_args", "initial_loss_step", "lr_step",
           "overfit_step", "suggested_space", "train_at_lr"]
