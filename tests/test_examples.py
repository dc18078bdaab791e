import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_parse_and_instantiate(config, tmp_path, monkeypatch):
    """Every YAML example parses and instantiates (classes, callbacks, arguments) without running."""
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(config.read_text())
    assert "model" in data and "trainer" in data
    extra = ["--trainer.strategy=auto", "--trainer.devices=1"] if "ddp" in config.name else []
    if data["model"].get("class_path") == "lightning_tricks.Ensemble":  # an Ensemble checks its files exist
        _write_member_checkpoints(data["model"]["init_args"]["checkpoints"])
    cli = build_cli(["--config", str(config), *extra], run=False)
    assert cli.model is not None and cli.datamodule is not None


def _write_member_checkpoints(paths: list[str]) -> None:
    """Small real checkpoints (untrained zoo models) at the paths an Ensemble example names."""
    import lightning
    import torch

    from lightning_tricks.zoo import ImageClassifier

    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        model = ImageClassifier("mlp", in_channels=1, image_size=8)
        hparams = {**model.hparams, "_class_path": "lightning_tricks.zoo.ImageClassifier"}
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                    "pytorch-lightning_version": lightning.__version__}, path)


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
