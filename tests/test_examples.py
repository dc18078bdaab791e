"""Every example runs quickly, as a newcomer runs it, and writes nothing outside its run folder.

Each YAML config runs its command (fit, or validate for the ensemble) for a couple of batches with its
own logger, in a fresh working directory; afterwards that directory holds only ``runs/`` (the examples'
log folder, which git ignores) and the repository's ``git status`` is what it was. The Python scripts
run in their ``--fast`` mode.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SEARCH_SPACES = {"search.yaml"}  # `lightning-tricks tune --search` files, not fit configs (tests/test_tune_space.py)
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if p.name not in SEARCH_SPACES and not p.stem.endswith("_search"))  # NAME_search.yaml: recipe's
# add_to_existing_project.py is run by its own test below (a short real training run, not --fast)
SCRIPTS = sorted(p for p in (REPO / "examples").glob("*.py") if p.name != "add_to_existing_project.py")
FEW_BATCHES = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
               "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false"]


def _git_status() -> str:
    """``git status --porcelain`` of the repository ("" outside a git checkout, e.g. an unpacked sdist)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True)
    return proc.stdout if proc.returncode == 0 else ""


@pytest.fixture(scope="module")
def status_before() -> str:
    return _git_status()


def _quick_command(config: Path) -> list[str]:
    """The example's own command, cut to a couple of batches."""
    extra = ["--trainer.strategy=auto", "--trainer.devices=1"] if "ddp" in config.name else []
    if config.name == "snapshot.yaml":  # one snapshot per cycle: give each of its cycles a step
        extra += ["--trainer.max_epochs=4", "--trainer.limit_train_batches=1"]
    if config.name == "ensemble.yaml":
        return ["validate", "--config", str(config), *FEW_BATCHES, *extra]
    return ["fit", "--config", str(config), *FEW_BATCHES, *extra]


def _train_ensemble_members() -> None:
    """The two checkpoints examples/ensemble.yaml lists (its step 1), trained for two batches."""
    from lightning_tricks.cli import build_cli

    digits = str(REPO / "examples" / "digits.yaml")
    for name, backbone in (("member_cnn", "simple_cnn"), ("member_mlp", "mlp")):
        build_cli(["fit", "--config", digits, f"--trainer.logger.init_args.name={name}",
                   f"--model.backbone={backbone}", *FEW_BATCHES])


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_every_config_runs_quickly_and_writes_only_its_run_folder(config, tmp_path, monkeypatch, status_before):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    if config.name == "ensemble.yaml":
        _train_ensemble_members()
    cli = build_cli(_quick_command(config))
    assert cli.model is not None and cli.trainer.state.finished
    if cli.subcommand == "fit":
        assert cli.trainer.global_step >= 1
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers in ([], ["runs"]), f"{config.name} wrote {leftovers} into the working directory"
    assert _git_status() == status_before


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_runs_in_its_fast_mode(script, tmp_path, status_before):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), "--fast"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "the script printed nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])
    assert _git_status() == status_before


@pytest.mark.slow
def test_add_to_existing_project_script_trains(tmp_path, status_before):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "add_to_existing_project.py"), "--epochs", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(proc.stdout.strip().splitlines()[-1].split(":")[1])
    assert accuracy > 0.9
    assert "InitialLossCheck: the first training loss is" in proc.stderr + proc.stdout  # the tricks ran
    assert "WeightInit: kaiming_normal on 3 layers." in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == [] and _git_status() == status_before


@pytest.mark.slow
def test_main_job_reaches_95_percent_in_a_few_dozen_lines(tmp_path):
    """The README's main job, as a newcomer runs it, its output piped (not a terminal)."""
    from tests.helpers import run_cli

    proc = run_cli(["fit", "--config", str(REPO / "examples" / "digits.yaml")], cwd=tmp_path)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("Final validation accuracy:")][-1]
    assert float(line.split(":")[1]) >= 0.95
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_every_example_the_docs_and_readme_name_exists():
    """A renamed example (finetune.yaml -> transfer.yaml, named after its card) leaves no dangling reference."""
    import re

    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").iterdir())]
    named = {m for path in texts if path.is_file() and path.suffix in (".md", ".yaml", ".py")
             for m in re.findall(r"examples/([\w-]+\.(?:yaml|py))", path.read_text())}
    assert "transfer.yaml" in named
    assert sorted(n for n in named if not (REPO / "examples" / n).is_file()) == []
