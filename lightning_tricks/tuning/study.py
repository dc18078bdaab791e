"""The study: random coarse-to-fine search on Optuna, one trial = the ``fit`` config with the trial's values.

A study lives in a database (a SQLite file in the run folder unless ``storage`` names another URL),
so a killed study continues where it stopped and workers on several machines share it. Exact trial
counts without a coordinator: a trial's *position* is the number of trials that did not fail and
have a smaller trial number (Optuna numbers trials atomically in the database). Positions
``0..N-1`` are the study's N trials; positions are cut into stages (e.g. 8 coarse trials, then 4
fine ones); a trial at position N or beyond is surplus (two workers asked at the same time) and is
closed as failed before it runs; a failed trial frees its position for the next one. A stage-k
trial waits until every trial of the stages before it has finished, then draws from ranges
narrowed around the best of stage k-1, computed from the finished trials only (so every worker
computes the same ranges). A trial left ``RUNNING`` by a killed process is failed on the next start
(same host, dead process id) or after Optuna's heartbeat grace period (any host).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_tricks.core.validation import ConfigError
from lightning_tricks.tuning._optuna_internals import set_trial_user_attr
from lightning_tricks.tuning.pruning import STAGE_STEPS, CurveRecorder, TrialPruning
from lightning_tricks.tuning.space import Distribution, SearchSpace, apply_params, grid_values, narrow
from lightning_tricks.tuning.storage import (  # noqa: F401  (re-exported: the storage lived here)
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    SCHEMA_RACE_ATTEMPTS,
    is_storage_error,
    lost_schema_race,
    masked_url,
    open_storage,
    storage_cause,
    storage_error_line,
)

SAMPLERS = ("random", "tpe", "cmaes", "qmc", "gp", "grid")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
POLL_SECONDS = 0.5
MAX_FAILURES_IN_A_ROW = 5
"""A worker stops (one error line) after this many failed trials in a row: the config itself is broken."""


@dataclass
class TuneSettings:
    """Everything that defines a study (checked to be equal when a worker joins an existing one)."""

    config_args: list[str]
    space: SearchSpace
    trials: int
    stages: int
    stage_epochs: list[int]
    stage_trials: list[int]
    metric: str
    direction: str
    sampler: str = "random"
    pruner: str = "median"
    top_fraction: float = 0.25
    divergence_factor: float | None = 3.0
    seed: int | None = None
    study_name: str = "tune"
    storage: str = ""
    run_dir: Path = field(default_factory=lambda: Path("runs/tune"))
    quiet: bool = True

    def identity(self) -> dict[str, Any]:
        """What must match between workers of one study (the trial count may grow between runs)."""
        return {"space": self.space.to_yaml(), "stages": self.stages, "stage_epochs": self.stage_epochs,
                "metric": self.metric, "direction": self.direction}


def split_trials(trials: int, stages: int) -> list[int]:
    """Trials per stage: halving from one stage to the next (2/3 then 1/3 for two stages), each at least 1.

    Examples:
        >>> split_trials(12, 2), split_trials(7, 3), split_trials(5, 1)
        ([8, 4], [4, 2, 1], [5])
    """
    weights = [2 ** (stages - 1 - k) for k in range(stages)]
    counts = [max(1, math.floor(trials * w / sum(weights))) for w in weights]
    counts[0] += trials - sum(counts)
    return counts


def default_epochs(max_epochs: int, stages: int) -> list[int]:
    """Epochs per stage when not given: the config's ``max_epochs`` for the last stage, a quarter per earlier stage."""
    return [max(1, round(max_epochs / 4 ** (stages - 1 - k))) for k in range(stages)]


def make_sampler(name: str, seed: int | None, space: SearchSpace | None = None, trials: int = 1) -> Any:
    """Optuna's sampler of that name; ``grid`` takes round(trials ** (1/d)) values per numeric parameter."""
    import optuna

    if name == "grid":
        assert space is not None
        side = max(1, round(trials ** (1 / max(len(space.params), 1))))
        return optuna.samplers.GridSampler({n: grid_values(d, side) for n, d in space.params.items()}, seed=seed)
    samplers: dict[str, Callable[[], Any]] = {
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    return samplers[name]()


def make_pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def load_or_create_study(settings: TuneSettings, storage: Any, worker_index: int = 0) -> Any:
    """Create the study (recording its settings) or join an existing one with the same settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print one line per trial ourselves
    # numpy-based samplers take seeds below 2**32: wrap a larger one instead of failing
    seed = None if settings.seed is None else (settings.seed + 7919 * worker_index) % 2**32
    study = optuna.create_study(storage=storage, study_name=settings.study_name, direction=settings.direction,
                                sampler=make_sampler(settings.sampler, seed, settings.space, settings.trials),
                                pruner=make_pruner(settings.pruner),
                                load_if_exists=True)
    identity = json.loads(json.dumps(settings.identity()))
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", identity)
    elif recorded != identity:
        diff = [k for k in identity if identity[k] != recorded.get(k)]
        raise ConfigError(f"study {settings.study_name!r} in {masked_url(settings.storage)} was started with other settings "
                          f"({', '.join(diff)} differ): use the same search space, stages, epochs and metric, "
                          "or another --study-name.")
    return study


# -- positions and stages -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that was not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def fail_dead_trials(study: Any) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and whose process is gone; returns their numbers."""
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") != os.getpid() and not _pid_alive(int(worker["pid"])):
            set_trial_user_attr(study, t.number, "reason", "its worker process died (killed?)")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


def fail_abandoned_trials(study: Any, echo: Callable[[str], None] = print) -> None:
    """Fail the RUNNING trials nobody runs any more: a dead process on this host (at once) or, on any host,
    no heartbeat for :data:`GRACE_PERIOD` seconds (Optuna's ``fail_stale_trials``)."""
    import optuna

    for number in fail_dead_trials(study):
        echo(f"trial {number} was left running by a process that is gone: marked failed.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def position(trials: Sequence[Any], number: int) -> int:
    """How many trials that did not fail have a smaller number: a trial's slot in the study."""
    from optuna.trial import TrialState

    return sum(1 for t in trials if t.number < number and t.state != TrialState.FAIL)


def stage_of(pos: int, stage_trials: Sequence[int]) -> int:
    """The stage (1-based) of a position; ``len(stage_trials) + 1`` for a surplus position."""
    edge = 0
    for k, n in enumerate(stage_trials, start=1):
        edge += n
        if pos < edge:
            return k
    return len(stage_trials) + 1


def _slots(trials: Sequence[Any]) -> list[Any]:
    from optuna.trial import TrialState

    return sorted((t for t in trials if t.state != TrialState.FAIL), key=lambda t: t.number)


def stages_before_finished(trials: Sequence[Any], stage: int, stage_trials: Sequence[int]) -> bool:
    """Whether every position of the stages before ``stage`` is taken by a finished trial."""
    need = sum(stage_trials[: stage - 1])
    slots = _slots(trials)[:need]
    return len(slots) == need and all(t.state.is_finished() for t in slots)


def stage_space(trials: Sequence[Any], stage: int, settings: TuneSettings) -> dict[str, Distribution]:
    """The ranges of ``stage``: the file's for stage 1, then each narrowed around the best of the stage before."""
    from optuna.trial import TrialState

    params = dict(settings.space.params)
    slots = _slots(trials)
    start = 0
    for k in range(1, stage):
        members = slots[start:start + settings.stage_trials[k - 1]]
        start += settings.stage_trials[k - 1]
        done = [t for t in members if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
        done.sort(key=lambda t: t.value, reverse=settings.direction == "maximize")
        best = done[: max(2, math.ceil(settings.top_fraction * len(members)))]
        if best:
            params = {n: narrow(d, [t.params[n] for t in best if n in t.params]) for n, d in params.items()}
    return params


# -- one trial ------------------------------------------------------------------------------------
class SurplusTrial(Exception):
    """The study already had its trials when this one was asked for (another worker asked at the same time)."""


def trial_config(base: dict[str, Any], settings: TuneSettings, values: dict[str, Any], epochs: int,
                 trial_dir: Path | None) -> dict[str, Any]:
    """The complete ``fit`` config of a trial: the base config, the trial's values, the stage's epochs.

    With ``trial_dir`` the trial's logs and checkpoints go there (and trials run quietly); without it
    (``best.yaml``) the user's own output settings are kept.
    """
    config = apply_params(base, settings.space, values)
    trainer = config.setdefault("trainer", {})
    trainer["max_epochs"] = epochs
    if trial_dir is None:
        return config
    trainer["default_root_dir"] = str(trial_dir)
    if settings.quiet:
        trainer["enable_progress_bar"] = False
        trainer["enable_model_summary"] = False
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict) and "save_dir" in (lg.get("init_args") or {}):
            lg["init_args"]["save_dir"] = str(trial_dir)
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and (cb.get("init_args") or {}).get("dirpath"):
            cb["init_args"]["dirpath"] = str(trial_dir / "checkpoints")
    return config


def build_from_config(config: dict[str, Any], path: Path) -> Any:
    """Write ``config`` to ``path`` and build it as ``lightning-tricks fit --config path`` would (not run).

    Returns the CLI object (``.trainer``, ``.model``, ``.datamodule``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return quiet_build_cli(["--config", str(path)])


def quiet_build_cli(args: list[str]) -> Any:
    """``build_cli(args, run=False)`` without LightningCLI's warning that ``sys.argv`` holds other arguments."""
    from lightning_tricks.cli import build_cli

    with warnings.catch_warnings():
        # LightningCLI warns when args= is given while sys.argv holds the tune command: intended here
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return build_cli(args, run=False)


@contextlib.contextmanager
def quiet_lightning(quiet: bool = True) -> Iterator[None]:
    """Trials and checks run many short fits: keep Lightning's per-fit banners and tips out of the output.

    A context manager: the loggers' levels and the warning filters are restored on exit, so a ``tune`` or
    ``babysit`` run inside another program (a notebook, a test) leaves its logging as it was.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for logger in loggers:
            logger.setLevel(logging.WARNING if quiet else logging.INFO)
        if quiet:
            warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning 2.6 internal deprecation, per fit
            warnings.filterwarnings("ignore", message=".*overfit but enabled train dataloader shuffling.*")
            warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def run_config(config: dict[str, Any], path: Path, extra_callbacks: Sequence[Any] = ()) -> Any:
    """:func:`build_from_config`, add ``extra_callbacks`` to the Trainer, fit; returns the CLI object."""
    cli = build_from_config(config, path)
    cli.trainer.callbacks.extend(extra_callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def divergence_callback(settings: TuneSettings) -> Any | None:
    """The notes' break-out rule (loss > factor x first loss or not finite), when the library has it."""
    if settings.divergence_factor is None:
        return None
    try:
        from lightning_tricks.monitoring.divergence import DivergenceStop
    except ImportError:
        return None
    return DivergenceStop(factor=settings.divergence_factor, check_finite=True, verbose=False)  # we print the reason


class Objective:
    """The function Optuna calls for one trial (see the module docstring for positions and stages)."""

    def __init__(self, settings: TuneSettings, base_config: dict[str, Any],
                 echo: Callable[[str], None] = print) -> None:
        self.settings, self.base, self.echo = settings, base_config, echo
        self.last_number: int | None = None

    def _claim(self, trial: Any) -> tuple[int, dict[str, Distribution]]:
        s = self.settings
        while True:
            trials = trial.study.get_trials(deepcopy=False)
            stage = stage_of(position(trials, trial.number), s.stage_trials)
            if stage > s.stages:
                trial.set_user_attr("reason", "surplus: the study already had its trials when this one was asked")
                raise SurplusTrial(f"trial {trial.number} is surplus")
            if stage == 1 or stages_before_finished(trials, stage, s.stage_trials):
                return stage, stage_space(trials, stage, s)
            time.sleep(POLL_SECONDS)  # a trial of an earlier stage is still running elsewhere
            fail_abandoned_trials(trial.study, self.echo)  # ... unless its worker died

    def __call__(self, trial: Any) -> float:
        import optuna

        s = self.settings
        self.last_number = trial.number
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        stage, params = self._claim(trial)
        ranges = {n: d.to_yaml() for n, d in params.items()}
        epochs = s.stage_epochs[stage - 1]
        trial_dir = s.run_dir / "trials" / f"trial-{trial.number:04d}"
        for key, value in (("stage", stage), ("ranges", ranges), ("epochs", epochs), ("dir", str(trial_dir))):
            trial.set_user_attr(key, value)
        recorder = CurveRecorder(s.metric)
        pruning = TrialPruning(trial, s.metric, storage=s.storage, step_offset=(stage - 1) * STAGE_STEPS)
        extra: list[Any] = [recorder, pruning]
        divergence = divergence_callback(s)
        if divergence is not None:
            extra.append(divergence)
        start = time.perf_counter()
        values: dict[str, Any] = {}
        cli = None
        try:
            values.update({n: d.suggest(trial, n) for n, d in params.items()})
            cli = run_config(trial_config(self.base, s, values, epochs, trial_dir), trial_dir / "config.yaml", extra)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            trial.set_user_attr("reason", f"{type(err).__name__}: {reason}"[:500])
            trial_dir.mkdir(parents=True, exist_ok=True)
            (trial_dir / "error.txt").write_text(traceback.format_exc())
            self.echo(f"trial {trial.number} (stage {stage}) failed: {type(err).__name__}: {reason}")
            raise
        finally:
            trial.set_user_attr("curves", recorder.curves())
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        diverged = getattr(divergence, "stopping_reason", None) if divergence is not None else None
        if diverged:
            trial.set_user_attr("reason", f"diverged: {diverged}")
            self.echo(f"trial {trial.number} (stage {stage}) pruned: {diverged}")
            raise optuna.TrialPruned(diverged)
        if pruning.pruned:
            trial.set_user_attr("reason", pruning.stopping_reason)
            self.echo(f"trial {trial.number} (stage {stage}) pruned: {pruning.stopping_reason}")
            raise optuna.TrialPruned(pruning.stopping_reason)
        value = recorder.best(s.direction)
        if value is None and cli is not None and s.metric in cli.trainer.callback_metrics:
            value = float(cli.trainer.callback_metrics[s.metric])  # spawned DDP ranks: the final value came back
            value = value if math.isfinite(value) else None
        if value is None:
            raise ConfigError(f"the metric {s.metric!r} was never logged with a finite value during validation; "
                              "pass --metric with a metric your LightningModule logs (e.g. val_loss).")
        shown = ", ".join(f"{n}={_fmt(v)}" for n, v in values.items())
        self.echo(f"trial {trial.number} (stage {stage}, {recorder.epochs} epochs): {s.metric}={value:.4f}  {shown}")
        return value


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def counts(study: Any) -> tuple[int, int]:
    """(finished: COMPLETE + PRUNED, running) trials of the study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


def run_worker(settings: TuneSettings, study: Any, base_config: dict[str, Any],
               echo: Callable[[str], None] = print) -> None:
    """Run trials until the study has ``settings.trials`` finished ones (other workers may add to them)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with quiet_lightning(settings.quiet):
        objective = Objective(settings, base_config, echo)
        failures = 0
        while True:
            fail_abandoned_trials(study, echo)
            finished, running = counts(study)
            if finished >= settings.trials:
                return
            if finished + running >= settings.trials:
                time.sleep(POLL_SECONDS)  # the last trials run elsewhere; one may still fail and free its slot
                continue
            # optimize() keeps the trial's heartbeat and records an exception as a failed trial
            study.optimize(objective, n_trials=1, catch=(Exception,))
            if objective.last_number is None:
                continue
            last = next(t for t in study.get_trials(deepcopy=False) if t.number == objective.last_number)
            failures = failures + 1 if last.state == TrialState.FAIL and "surplus" not in last.user_attrs.get(
                "reason", "") else 0
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise ConfigError(f"{failures} trials failed in a row, the last with: {last.user_attrs.get('reason')} "
                                  f"(tracebacks: {settings.run_dir / 'trials'}/*/error.txt).")


def settings_dict(settings: TuneSettings) -> dict[str, Any]:
    out = asdict(settings)
    out["space"] = settings.space.to_yaml()
    out["run_dir"] = str(settings.run_dir)
    return out



def load_config(config_args: Sequence[str]) -> dict[str, Any]:
    """The complete ``fit`` config (every default filled in) that ``config_args`` describe, as a dict."""
    with quiet_lightning():
        cli = quiet_build_cli(list(config_args))
        return yaml.safe_load(cli.parser.dump(cli.config))


def default_metric(config: dict[str, Any]) -> str:
    """The first ``monitor`` among the config's callbacks, else ``val_loss``."""
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        monitor = (cb.get("init_args") or {}).get("monitor") if isinstance(cb, dict) else None
        if monitor:
            return str(monitor)
    return "val_loss"

__all__ = ["default_metric", "load_config", "PRUNERS", "SAMPLERS", "Objective", "TuneSettings", "counts", "default_epochs", "fail_abandoned_trials",
           "fail_dead_trials",
           "is_storage_error", "load_or_create_study", "masked_url", "open_storage", "storage_cause", "position", "build_from_config", "run_config", "run_worker", "split_trials",
           "stage_of", "stage_space", "trial_config"]
