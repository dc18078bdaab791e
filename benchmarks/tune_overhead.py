"""Per-trial cost of ``lightning-tricks tune``'s machinery against a plain ``fit`` of the same config.

Both cases run ``examples/digits.yaml`` (``--epochs`` epochs, no logger or checkpoint files) in this
process, interleaved, median of the repeats:

* ``fit``: ``build_cli(["fit", "--config", ...])``, what ``lightning-tricks fit`` does after start-up;
* ``tune_trial``: one trial of a study in a SQLite file (``study.optimize(objective, n_trials=1)``):
  asking Optuna for the trial in the database, the position/stage claim, drawing the values, writing
  the trial's config, building it with the same CLI, the pruning report per epoch, the curve recorder,
  the 3x-loss break-out, and recording the result. The values drawn are fixed to the config's own
  (a choice of one), so both cases train the same network the same way.

The ratio ``tune_trial / fit`` is the overhead per trial (target <= 1.05).

Example:
    ``python -m benchmarks tune_overhead --repeats 5 --epochs 2``
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def make_cases(workdir: Path, epochs: int) -> dict[str, Any]:
    """The two cases, sharing one config file."""
    import optuna

    from lightning_tricks.cli import build_cli
    from lightning_tricks.tuning.cli import load_config
    from lightning_tricks.tuning.space import load_search_space, resolve_space
    from lightning_tricks.tuning.study import (
        Objective,
        TuneSettings,
        load_or_create_study,
        open_storage,
        quiet_lightning,
    )

    quiet_lightning()
    base = load_config(["--config", str(ROOT / "examples" / "digits.yaml"), f"--trainer.max_epochs={epochs}", *QUIET])
    base["trainer"]["callbacks"] = [c for c in base["trainer"]["callbacks"]
                                    if not c["class_path"].endswith("ModelCheckpoint")]
    base["trainer"]["enable_checkpointing"] = False
    base["trainer"]["default_root_dir"] = str(workdir)  # fit saves its config.yaml there, not in the cwd
    config = workdir / "fit.yaml"
    config.write_text(yaml.safe_dump(base, sort_keys=False))
    lr = base["model"]["init_args"]["lr"]
    space = resolve_space(base, load_search_space({"model.init_args.lr": {"choice": [lr]}}))
    settings = TuneSettings(config_args=[], space=space, trials=10**6, stages=1, stage_epochs=[epochs],
                            stage_trials=[10**6], metric="val_acc", direction="maximize", pruner="median",
                            study_name="overhead", storage=f"sqlite:///{workdir / 'study.db'}", run_dir=workdir)
    study = load_or_create_study(settings, open_storage(settings.storage))
    objective = Objective(settings, base, echo=lambda _: None)
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def fit() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            build_cli(["fit", "--config", str(config)])

    def tune_trial() -> None:
        study.optimize(objective, n_trials=1)

    return {"fit": fit, "tune_trial": tune_trial}


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("tune_overhead", __doc__, quick="smoke run: 1 epoch, 3 repeats", repeats=7,
                        section="tune-overhead")
    p.add_quick_default("--epochs", 2, 1, "epochs per fit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the ``tune-overhead`` section of RESULTS.md."""
    args = _parser().parse_args(argv)
    repeats, epochs = args.repeats, args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        samples = interleaved(make_cases(Path(tmp), epochs), repeats=repeats, quick=args.quick)
    meds = medians(samples)
    publish(args, "tune's cost per trial vs a plain fit", [
        f"`examples/digits.yaml`, {epochs} epoch(s), no logger or checkpoint files. `fit`: the CLI's fit in this "
        "process; `tune_trial`: one trial of a SQLite study (ask, claim, config file, same CLI build, pruning "
        f"report, curve recorder, 3x-loss break-out, tell). {repeats} interleaved repeats after 1 warm-up, medians.",
        "",
        format_table(samples, "fit", scale=1.0, unit="s"),
        "",
        f"Overhead per trial: {meds['tune_trial'] / meds['fit'] - 1:+.1%} "
        f"({meds['tune_trial'] - meds['fit']:+.3f} s on a {meds['fit']:.2f} s fit); target <= +5%.",
    ])
    return 0

