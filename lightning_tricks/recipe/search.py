"""The recipe's search step: ``tune``'s study (2 stages, coarse then fine) with values a re-run draws again.

The study, its database, its stages, pruning and divergence break-out are ``lightning-tricks tune``'s
(:mod:`lightning_tricks.tuning.study`). One thing differs: the sampler. Optuna's random sampler draws from
one generator per process, so after a kill the re-run's sampler starts over and draws the first trials'
values again. :class:`PositionSampler` draws each value from a generator seeded by (seed, the trial's
position, the parameter's name): the trial that takes the killed trial's position draws the values the
killed one drew, and the study ends as an uninterrupted one does.
"""

from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path
from typing import Any

from lightning_tricks.core.validation import ConfigError

RECIPE_CHECKPOINT = "recipe-best"
"""The file name (without ``.ckpt``) of the checkpoint the recipe adds to every run: the best validation epoch."""


def _position_sampler_class() -> type:
    import optuna

    class PositionSampler(optuna.samplers.BaseSampler):
        """Random search whose draws depend on (seed, trial position, parameter name) only, not on history."""

        def __init__(self, seed: int = 0) -> None:
            self.seed = int(seed)

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            return {}

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            import numpy as np

            from lightning_tricks.tuning.study import position

            pos = position(study.get_trials(deepcopy=False), trial.number)
            rng = np.random.default_rng([self.seed, pos, zlib.crc32(param_name.encode())])
            return draw(rng, param_distribution)

    return PositionSampler


def draw(rng: Any, dist: Any) -> Any:
    """One value of an Optuna distribution from a numpy generator (log scales drawn log-uniformly)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(rng.integers(len(dist.choices)))]
    if isinstance(dist, FloatDistribution):
        if dist.log:
            value = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
        else:
            value = rng.uniform(dist.low, dist.high)
        if dist.step is not None:
            value = dist.low + round((value - dist.low) / dist.step) * dist.step
        return float(min(max(value, dist.low), dist.high))
    if isinstance(dist, IntDistribution):
        if dist.log:
            value = round(math.exp(rng.uniform(math.log(dist.low - 0.5 if dist.low > 0.5 else dist.low),
                                               math.log(dist.high + 0.5))))
        else:
            value = int(rng.integers(dist.low, dist.high + 1))
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
        return int(min(max(value, dist.low), dist.high))
    raise ConfigError(f"the recipe's sampler cannot draw from {type(dist).__name__}.")


def PositionSampler(seed: int = 0) -> Any:  # noqa: N802 - a class built on first use (Optuna is imported lazily)
    """A sampler whose draws depend on (seed, trial position, parameter name) only (see the module docstring)."""
    return _position_sampler_class()(seed)


# -- the base config of every run the recipe makes ----------------------------------------------------------------
def callback_name(entry: Any) -> str:
    return entry.get("class_path", "").rsplit(".", 1)[-1] if isinstance(entry, dict) else ""


def with_recipe_checkpoint(config: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """A copy of ``config`` with a ModelCheckpoint of the best epoch (by ``metric``) in a folder each run redirects.

    ``tune``'s trial configs send every callback's ``dirpath`` into the trial's folder, so each trial keeps
    ``checkpoints/recipe-best.ckpt``: the members of the "top models of the search" ensemble.
    """
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer["enable_checkpointing"] = True
    callbacks = list(trainer.get("callbacks") or [])
    ours = {"dirpath": "checkpoints", "filename": RECIPE_CHECKPOINT, "save_top_k": 1}
    for entry in callbacks:  # Lightning refuses two ModelCheckpoints with one monitor and mode: take the config's
        args = entry.get("init_args") or {} if isinstance(entry, dict) else {}
        if callback_name(entry) == "ModelCheckpoint" and args.get("monitor") == metric and \
                args.get("mode", "min") == mode:
            args.update(ours)
            break
    else:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {**ours, "monitor": metric, "mode": mode, "save_weights_only": True}})
    trainer["callbacks"] = callbacks
    return config


def with_restoring_early_stopping(config: dict[str, Any], metric: str, mode: str, patience: int) -> dict[str, Any]:
    """A copy of ``config`` whose EarlyStopping restores the best weights (ours replaces Lightning's, same arguments);
    one is added (``metric``, ``patience``) when the config has none."""
    config = copy.deepcopy(config)
    callbacks = config.setdefault("trainer", {}).setdefault("callbacks", []) or []
    for entry in callbacks:
        if callback_name(entry) == "EarlyStopping":
            entry["class_path"] = "lightning_tricks.EarlyStopping"
            entry.setdefault("init_args", {})["restore_best_weights"] = True
            break
    else:
        callbacks.append({"class_path": "lightning_tricks.EarlyStopping",
                          "init_args": {"monitor": metric, "mode": mode, "patience": patience,
                                        "restore_best_weights": True}})
    config["trainer"]["callbacks"] = callbacks
    return config


def without_callbacks(config: dict[str, Any], names: set[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if callback_name(c) not in names]
    return config


# -- the search space -----------------------------------------------------------------------------------------------
def recipe_space(base: dict[str, Any], suggested: dict[str, Any], search: str | None) -> dict[str, Any]:
    """The search space: the ``--search`` file when given, else what babysit suggested (learning rate around the
    largest good one, weight decay {0, 1e-5, 1e-4})."""
    from lightning_tricks.tuning.space import load_search_space

    if search:
        load_search_space(search)  # one-line errors for a malformed file
        import yaml

        return dict(yaml.safe_load(Path(search).read_text()))
    if not suggested:
        raise ConfigError("babysit found no learning rate or weight decay to search in the model's init arguments "
                          "(`lr`/`learning_rate`, `weight_decay`): pass --search FILE with the keys to search.")
    return dict(suggested)


# -- the step -------------------------------------------------------------------------------------------------------
def default_stage_epochs(max_epochs: int, stages: int) -> list[int]:
    """Epochs of the coarse and the fine trials: an eighth, then half of ``max_epochs`` (the final run trains all).

    Examples:
        >>> default_stage_epochs(170, 2), default_stage_epochs(15, 2), default_stage_epochs(3, 1)
        ([21, 85], [2, 8], [2])
    """
    fine = max(1, round(max_epochs / 2))
    return [max(1, round(max_epochs / 8)), fine] if stages == 2 else [fine]


def tune_settings(ctx: Any, space_spec: dict[str, Any], base: dict[str, Any]) -> Any:
    """``tune``'s settings for the recipe's study (2 stages, random search, the recipe's run folder).

    No pruner: with a few trials per stage the median of the others is noise (a fine-stage trial would be cut
    against the one before it), and the fine stage's trials are the "top models" ensemble's members. The
    divergence break-out (3x the first loss) still stops a trial.
    """
    from lightning_tricks.tuning.space import load_search_space, resolve_space
    from lightning_tricks.tuning.study import TuneSettings, split_trials

    space = resolve_space(base, load_search_space(space_spec))
    stages = 2 if ctx.trials >= 2 else 1
    epochs = list(ctx.epochs) if ctx.epochs else default_stage_epochs(ctx.max_epochs, stages)
    return TuneSettings(
        config_args=list(ctx.config_args), space=space, trials=ctx.trials, stages=stages, stage_epochs=epochs,
        stage_trials=split_trials(ctx.trials, stages), metric=ctx.metric, direction=ctx.direction,
        sampler="random", pruner="none", seed=ctx.seed, study_name=ctx.study_name, storage=ctx.storage,
        run_dir=ctx.out / "tune", quiet=not ctx.verbose)


def run_search(ctx: Any, settings: Any, base: dict[str, Any], budget_left: Any) -> tuple[Any, int]:
    """Run the study to ``settings.trials`` finished trials, or fewer when ``budget_left()`` says the time is spent
    (at least one trial). Returns the study and the number of finished trials."""
    import dataclasses

    from lightning_tricks.tuning.study import counts, load_or_create_study, open_storage, run_worker

    storage = open_storage(settings.storage)
    study = load_or_create_study(settings, storage)
    study.sampler = PositionSampler(settings.seed or 0)
    finished, _ = counts(study)
    while finished < settings.trials:
        if finished >= 1 and not budget_left(study):
            ctx.echo(f"recipe: the time budget is spent: the search ends with {finished} of {settings.trials} trials.")
            break
        run_worker(dataclasses.replace(settings, trials=finished + 1), study, base, echo=ctx.echo)
        finished, _ = counts(study)
    return study, finished


def ranked_trials(study: Any) -> list[Any]:
    """Complete trials, best first (ties: the later stage, then the lower number), as ``tune``'s best trial."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    sign = 1.0 if study.direction.name == "MAXIMIZE" else -1.0
    return sorted(done, key=lambda t: (-sign * t.value, -int(t.user_attrs.get("stage", 0)), t.number))


def trial_checkpoint(trial: Any) -> Path | None:
    path = Path(trial.user_attrs.get("dir", "")) / "checkpoints" / f"{RECIPE_CHECKPOINT}.ckpt"
    return path if path.is_file() else None


__all__ = ["RECIPE_CHECKPOINT", "PositionSampler", "default_stage_epochs", "draw", "ranked_trials", "recipe_space", "run_search",
           "trial_checkpoint", "tune_settings", "with_recipe_checkpoint", "with_restoring_early_stopping",
           "without_callbacks"]
