"""The recipe's six steps, each a function of the context that returns its result (a JSON-able dict).

Every step that trains runs a complete ``fit`` config through the same LightningCLI as ``fit`` (the
config files are kept in the step's folder), and every model is scored by one evaluator,
:func:`evaluate`: the `Ensemble` module with the step's members (one member for a single model), so
every step's validation and test accuracy and NLL are measured the same way. A result holds
``val_acc``, ``test_acc``, ``val_loss``, ``test_loss``, ``configs``, ``checkpoints``, ``members`` (the
checkpoints of the models the step's prediction averages) and ``adopted`` (steps 5 and 6 are adopted
only when they beat the step before on the validation set: the test set never chooses).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_tricks.core.validation import ConfigError
from lightning_tricks.recipe import search as rs

STEPS = ("baseline", "babysit", "tune", "final", "ensemble", "tta")
ENSEMBLES = ("top", "snapshot", "none")
TTA_CHOICES = ("auto", "none")


@dataclass
class RecipeContext:
    """What every step reads: the settings, the complete base config and the output folder."""

    config_args: list[str]
    base: dict[str, Any]
    out: Path
    trials: int = 8
    epochs: list[int] | None = None
    max_epochs: int = 10
    time: float | None = None
    ensemble: str = "top"
    members: int = 3
    tta: str = "auto"
    search: str | None = None
    storage: str = ""
    study_name: str = "recipe"
    seed: int = 0
    metric: str = "val_loss"
    direction: str = "minimize"
    metric_option: str | None = None
    patience: int = 5
    keep_going: bool = False
    babysit_args: list[str] = field(default_factory=list)
    verbose: bool = False
    echo: Callable[[str], None] = print

    @property
    def mode(self) -> str:
        return "max" if self.direction == "maximize" else "min"

    @property
    def accelerator(self) -> str:
        return str((self.base.get("trainer") or {}).get("accelerator") or "auto")


def fresh_folder(folder: Path) -> Path:
    """An empty step folder: what a killed run of the step left is removed, so the re-run starts clean."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def redirected(config: dict[str, Any], folder: Path, epochs: int, quiet: bool) -> dict[str, Any]:
    """``config`` with ``max_epochs`` and its logs and checkpoints sent into ``folder`` (``tune``'s trial rule)."""
    from lightning_tricks.tuning.space import SearchSpace
    from lightning_tricks.tuning.study import trial_config

    settings = types.SimpleNamespace(space=SearchSpace({}, {}), quiet=quiet)
    return trial_config(config, settings, {}, epochs, folder)  # type: ignore[arg-type]


def fit(ctx: RecipeContext, config: dict[str, Any], folder: Path) -> Any:
    """Fit ``config`` (written to ``folder/config.yaml``); returns the CLI object (trainer, model, datamodule)."""
    from lightning_tricks.tuning.study import quiet_lightning, run_config

    with quiet_lightning(not ctx.verbose):
        return run_config(config, folder / "config.yaml")


def save_model(cli: Any, path: Path) -> Path:
    """The fitted model's weights (restored ones, if EarlyStopping restored them) as a checkpoint ``load_member`` reads."""
    cli.trainer.save_checkpoint(path, weights_only=True)
    return path


def evaluate(members: Sequence[Any], datamodule: Any, accelerator: str = "auto") -> dict[str, float]:
    """Validation and test accuracy and NLL of the soft vote of ``members`` (one member: the model itself)."""
    import lightning.pytorch as pl

    from lightning_tricks.ensemble import Ensemble
    from lightning_tricks.tuning.study import quiet_lightning

    # every model a step made is measured as it is, diverged or not: the report shows it, nothing is screened out
    ensemble = Ensemble(members=list(members), voting="soft", max_loss_ratio=None)
    out: dict[str, float] = {}
    with quiet_lightning():
        trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        for stage, run in (("val", trainer.validate), ("test", trainer.test)):
            run(ensemble, datamodule=datamodule, verbose=False)
            for name in ("acc", "loss"):
                value = trainer.callback_metrics.get(f"{stage}_{name}")
                out[f"{stage}_{name}"] = float(value) if value is not None else math.nan
    return out


def load(paths: Sequence[str]) -> list[Any]:
    from lightning_tricks.ensemble import load_member

    return [load_member(p) for p in paths]


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``a`` beats ``b`` on the validation set: higher accuracy, or the same and a lower NLL."""
    if a["val_acc"] != b["val_acc"]:
        return a["val_acc"] > b["val_acc"]
    return a["val_loss"] < b["val_loss"]


def _rel(ctx: RecipeContext, paths: Sequence[Path | str]) -> list[str]:
    return [str(Path(p).resolve().relative_to(ctx.out.resolve())) for p in paths]


# -- 1. baseline ----------------------------------------------------------------------------------------------------
def baseline_step(ctx: RecipeContext) -> dict[str, Any]:
    """The user's config trained as given (``--max-epochs`` aside)."""
    folder = fresh_folder(ctx.out / "baseline")
    config = redirected(ctx.base, folder, ctx.max_epochs, not ctx.verbose)
    cli = fit(ctx, config, folder)
    ckpt = save_model(cli, folder / "model.ckpt")
    result = evaluate([cli.model], cli.datamodule, ctx.accelerator)
    return {**result, "configs": _rel(ctx, [folder / "config.yaml"]), "checkpoints": _rel(ctx, [ckpt]),
            "members": _rel(ctx, [ckpt]), "epochs": int(cli.trainer.current_epoch),
            "logged": sorted(cli.trainer.callback_metrics)}


# -- 2. babysit -----------------------------------------------------------------------------------------------------
def babysit_step(ctx: RecipeContext) -> dict[str, Any]:
    """``lightning-tricks babysit`` on the config: initial loss, overfit a sample, the learning rate; its search space."""
    from lightning_tricks.tuning import babysit as bs

    folder = fresh_folder(ctx.out / "babysit")
    args = bs.babysit_parser().parse_args(list(ctx.babysit_args))
    bs.check_babysit_args(args)
    args.run_dir, args.out = str(folder), str(folder / "search.yaml")
    results = bs.babysit(ctx.base, args, echo=ctx.echo)
    import yaml

    return {"passed": all(r.passed for r in results), "stop": must_stop(results),
            "steps": [{"number": r.number, "name": r.name, "passed": r.passed, "measured": r.measured,
                       "diagnosis": r.diagnosis} for r in results],
            "space": yaml.safe_load((folder / "search.yaml").read_text()) or {},
            "configs": _rel(ctx, [folder / "search.yaml"]), "checkpoints": []}


def must_stop(results: Sequence[Any]) -> bool:
    """Whether babysit's verdict stops the recipe: a failed initial loss or overfit check (a broken set-up that no
    search fixes), or a learning rate at which the loss explodes. A loss that goes down, only less than
    babysit's threshold in its ~100 iterations, is reported and left to the search, whose job is the learning rate
    (MNIST-1D's paper CNN at its own rate: 2.30 -> 1.24 in 100 iterations, 94% after training). A loss that
    stays above 0.9x its first value at the config's rate stops the recipe too."""
    for r in results:
        if r.passed:
            continue
        if r.number in (1, 2) or r.diagnosis.startswith("loss explodes"):
            return True
        own = next((t for t in r.details.get("tried", []) if math.isclose(t["lr"], r.details.get("own_lr") or 0)), None)
        if own is None or not math.isfinite(own["last"]) or own["last"] > 0.9 * own["first"]:
            return True  # the loss did not go down at the config's rate (or we cannot tell): stop
    return False


# -- 3. tune --------------------------------------------------------------------------------------------------------
def tune_step(ctx: RecipeContext, space: dict[str, Any], budget_left: Callable[[Any], bool]) -> dict[str, Any]:
    """A 2-stage study (coarse, then fine around the best) in the recipe's database; ``tune``'s report files."""
    from lightning_tricks.tuning.cli import report
    from lightning_tricks.tuning.study import quiet_lightning

    base = rs.with_recipe_checkpoint(ctx.base, ctx.metric, ctx.mode)
    settings = rs.tune_settings(ctx, space, base)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    study, finished = rs.run_search(ctx, settings, base, budget_left)
    with quiet_lightning():
        report(study, settings, base)
    ranked = rs.ranked_trials(study)
    if not ranked:
        raise ConfigError(f"no trial of the search completed (see {settings.run_dir / 'trials.csv'}): every trial "
                          "was pruned or failed; widen the search space or check the config with babysit.")
    best = ranked[0]
    positions = {t.number: i for i, t in enumerate(sorted((t for t in study.get_trials(deepcopy=False)
                                                          if t.state.name != "FAIL"), key=lambda t: t.number))}
    trials = [{"position": positions[t.number], "stage": t.user_attrs.get("stage"), "value": t.value,
               "params": dict(t.params)} for t in ranked]
    return {"val_metric": best.value, "metric": ctx.metric, "best_params": dict(best.params),
            "best_stage": best.user_attrs.get("stage"), "finished": finished, "trials": trials,
            "stage_epochs": list(settings.stage_epochs), "space": space,
            "top_checkpoints": _rel(ctx, [c for c in (rs.trial_checkpoint(t) for t in ranked[1:]
                                                      if t.user_attrs.get("stage") == settings.stages) if c]),
            "configs": _rel(ctx, [settings.run_dir / "best.yaml"]), "checkpoints": []}


def final_config(ctx: RecipeContext, tuned: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The best trial's config trained for ``max_epochs``, with restore-best EarlyStopping and a best checkpoint."""
    from lightning_tricks.tuning.space import load_search_space, resolve_space
    from lightning_tricks.tuning.study import trial_config

    base = rs.with_recipe_checkpoint(ctx.base, ctx.metric, ctx.mode)
    settings = types.SimpleNamespace(space=resolve_space(base, load_search_space(tuned["space"])),
                                     quiet=not ctx.verbose)
    config = trial_config(base, settings, tuned["best_params"], ctx.max_epochs, folder)  # type: ignore[arg-type]
    return rs.with_restoring_early_stopping(config, ctx.metric, ctx.mode, ctx.patience)


# -- 4. final -------------------------------------------------------------------------------------------------------
def final_step(ctx: RecipeContext, tuned: dict[str, Any]) -> dict[str, Any]:
    folder = fresh_folder(ctx.out / "final")
    cli = fit(ctx, final_config(ctx, tuned, folder), folder)
    ckpt = save_model(cli, folder / "model.ckpt")
    result = evaluate([cli.model], cli.datamodule, ctx.accelerator)
    best = folder / "checkpoints" / f"{rs.RECIPE_CHECKPOINT}.ckpt"
    return {**result, "configs": _rel(ctx, [folder / "config.yaml"]),
            "checkpoints": _rel(ctx, [ckpt] + ([best] if best.is_file() else [])), "members": _rel(ctx, [ckpt]),
            "epochs": int(cli.trainer.current_epoch), "adopted": True}


def datamodule_of(ctx: RecipeContext, step: str) -> Any:
    """The datamodule of a step's saved config (built, not run)."""
    from lightning_tricks.tuning.study import quiet_build_cli, quiet_lightning

    with quiet_lightning():
        return quiet_build_cli(["--config", str(ctx.out / step / "config.yaml")]).datamodule


def _link(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (a copy where the file system has no hard links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


# -- 5. ensemble ----------------------------------------------------------------------------------------------------
def ensemble_step(ctx: RecipeContext, tuned: dict[str, Any], final: dict[str, Any],
                  name: str = "ensemble") -> dict[str, Any]:
    """``top``: the final model and the next best trials of the search; ``snapshot``: one more run of the final config
    with SnapshotEnsemble's cyclic learning rate, its snapshots as members (written under ``OUT/name``)."""
    folder = fresh_folder(ctx.out / name)
    made: list[Path] = []
    configs: list[str] = []
    if ctx.ensemble == "top":
        extra = [ctx.out / p for p in tuned["top_checkpoints"][: ctx.members - 1]]
        # linked under the ensemble's folder by rank: a trial's folder number depends on trials a kill failed
        paths = [str(_link(source, folder / "members" / f"member-{i}.ckpt"))
                 for i, source in enumerate([ctx.out / final["members"][0], *extra])]
        made = [Path(p) for p in paths]
        datamodule = datamodule_of(ctx, "final")
        note = f"the final model and the next {len(extra)} best trials of the search's last stage"
    else:
        from lightning_tricks.ensemble import SnapshotEnsemble

        config = rs.without_callbacks(final_config(ctx, tuned, folder), {"EarlyStopping"})
        config["trainer"]["callbacks"].append({"class_path": "lightning_tricks.SnapshotEnsemble",
                                               "init_args": {"cycles": ctx.members,
                                                             "dirpath": str(folder / "snapshots")}})
        cli = fit(ctx, config, folder)
        snap = next(c for c in cli.trainer.callbacks if isinstance(c, SnapshotEnsemble))
        paths, datamodule = list(snap.snapshot_paths), cli.datamodule
        made, configs = [Path(p) for p in paths], _rel(ctx, [folder / "config.yaml"])
        note = f"{len(paths)} snapshots of one run of the final config ({ctx.members} cosine cycles)"
    if len(paths) < 2:
        return {"skipped": f"only {len(paths)} member available (no other completed trial with a checkpoint)",
                "adopted": False, "configs": configs, "checkpoints": _rel(ctx, made), "members": final["members"]}
    result = evaluate(load(paths), datamodule, ctx.accelerator)
    adopted = better(result, final)
    return {**result, "kind": ctx.ensemble, "note": note, "adopted": adopted, "configs": configs,
            "checkpoints": _rel(ctx, made), "members": _rel(ctx, paths) if adopted else final["members"],
            "ensemble_members": _rel(ctx, paths)}


# -- 6. TTA ---------------------------------------------------------------------------------------------------------
def tta_candidates(x: Any, model: Any = None) -> list[dict[str, Any]]:
    """View sets to try for a batch ``x`` of ``model``: a one-pixel shift for images; for sequences (``[N, C, L]``
    inputs of a model with 1D conv/pool or recurrent layers, :func:`lightning_tricks.core.layout.input_layout`)
    shifts along the length by 1 and 2 steps (MNIST-1D's TTA card: +1.6..2.6 points; 8 steps hurt).

    Flips are left out: they change the label of digits, text and signs (the TTA card's table).
    """
    from lightning_tricks.core.layout import input_layout
    from lightning_tricks.errors import LayoutError

    if x.ndim < 3:
        return []
    try:
        layout = input_layout(x, model)
    except LayoutError:  # a 3D input of a model that tells neither: no view set is safe to guess
        return []
    if layout == "sequence":
        return [{"views": ["translate"], "translate": t} for t in (1, 2)]
    return [{"views": ["translate"], "translate": 1}]


def tta_step(ctx: RecipeContext, current: dict[str, Any], step: str) -> dict[str, Any]:
    """Test-time augmentation on the adopted prediction (each member wrapped in TTAWrapper, then soft-voted); adopted
    when it beats the prediction without it on the validation set."""
    from lightning_tricks.core.batch import read_images
    from lightning_tricks.tta import TTAWrapper

    datamodule = datamodule_of(ctx, step)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    x = read_images(batch, None, "recipe (tta step)", 2)[1]  # the package's one batch accessor: tuple, list or dict
    model = load([str(ctx.out / current["members"][0])])[0] if current.get("members") else None
    candidates = tta_candidates(x, model) if ctx.tta == "auto" else []
    tried: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for kwargs in candidates:
        try:
            members = [TTAWrapper(m.eval(), **copy.deepcopy(kwargs)) for m in load(
                [str(ctx.out / p) for p in current["members"]])]
            result = {**evaluate(members, datamodule, ctx.accelerator), "views": kwargs}
        except Exception as err:  # a view set this input cannot take: recorded, not fatal
            tried.append({"views": kwargs, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            continue
        tried.append(result)
        if best is None or better(result, best):
            best = result
    if best is None:
        reason = tried[-1]["error"] if tried else f"no view set for inputs shaped {tuple(x.shape)}"
        return {"skipped": reason, "tried": tried, "adopted": False, "configs": [], "checkpoints": [],
                "members": current["members"]}
    adopted = better(best, current)
    return {**best, "tried": tried, "adopted": adopted, "configs": [], "checkpoints": [],
            "members": current["members"]}


__all__ = ["ENSEMBLES", "STEPS", "TTA_CHOICES", "RecipeContext", "babysit_step", "baseline_step", "better",
           "ensemble_step", "evaluate", "final_step", "tta_step", "tune_step"]
