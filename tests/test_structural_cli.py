"""The three structural tricks together through the CLI under 2-process DDP (strategy=ddp relaunches the script).

StochasticDepth's batch mode skips blocks, so DDP must look for unused parameters: the public strategy name
``ddp_find_unused_parameters_true`` says so (with plain ``ddp`` the callback stops before the first step)."""

import json

import pytest

from tests.helpers import REPO, run_cli


@pytest.mark.slow
def test_cli_ddp_two_processes_all_structural_tricks_train_without_hang(tmp_path):
    out = tmp_path / "ranks"
    proc = run_cli([
        "fit", "--config", str(REPO / "examples" / "stochastic_depth.yaml"),
        "--model", "tests.structural_user_module.TinyResNet",
        "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.devices=2", "--trainer.max_epochs=2", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=DropConnect", "--trainer.callbacks.p=0.5",
        "--trainer.callbacks+=FractionalMaxPooling", "--trainer.callbacks.test_samples=4",
        "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.out_dir={out}",
    ], cwd=tmp_path, timeout=300)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" for r in reports)
    assert reports[0]["train_batches"] == reports[1]["train_batches"] == 2 * 10  # 1257 images / 2 ranks / 64
    assert reports[0]["first_weight"] == reports[1]["first_weight"]  # the parameters stayed in sync
    for trick in ("StochasticDepth: 2 residual blocks", "DropConnect: 1 layer", "FractionalMaxPooling: 1 max-pooling"):
        assert proc.stdout.count(trick) + proc.stderr.count(trick) == 1, trick  # logged once, by rank 0
    assert "Final validation accuracy:" in proc.stdout
