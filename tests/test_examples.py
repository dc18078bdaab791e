import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO

SEARCH_SPACES = {"search.yaml"}  # `lightning-tricks tune --search` files, not fit configs (tests/test_tune_space.py)
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name not in SEARCH_SPACES)


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_parse_and_instantiate(config, tmp_path, monkeypatch):
    """Every YAML example parses and instantiates (classes, callbacks, arguments) without running."""
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(config.read_text())
    assert "model" in data and "trainer" in data
    extra = ["--trainer.strategy=auto", "--trainer.devices=1"] if "ddp" in config.name else []
    cli = build_cli(["--config", str(config), *extra], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.slow
def test_add_to_existing_project_script_trains(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "add_to_existing_project.py"), "--epochs", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(proc.stdout.strip().splitlines()[-1].split(":")[1])
    assert accuracy > 0.9


@pytest.mark.slow
def test_main_job_reaches_95_percent(tmp_path):
    """The README's main job, as a newcomer runs it."""
    from tests.helpers import run_cli

    proc = run_cli(["fit", "--config", str(REPO / "examples" / "digits.yaml"), "--trainer.enable_progress_bar=false"],
                   cwd=tmp_path)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("Final validation accuracy:")][-1]
    assert float(line.split(":")[1]) >= 0.95
