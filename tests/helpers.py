"""Reusable test helpers: a 2-process CPU DDP runner that lets tests assert inside the workers.

``run_ddp`` builds a Trainer with ``accelerator="cpu", devices=2`` under ``ddp_fork`` (fast: no
re-import) or ``ddp_spawn``, runs ``fit``/``validate``/``test``/``predict``, and calls ``probe(trainer,
pl_module)`` on every rank at the end of that stage. Whatever ``probe`` returns (tensors, numbers,
dicts) is saved per rank and returned to the test as a list indexed by rank, so a test can compare
ranks in the main process; an ``assert`` inside ``probe`` fails the test too. ``probe`` may call
collectives: every rank runs it at the same point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
Probe = Callable[[pl.Trainer, pl.LightningModule], Any]


class _ProbeCallback(Callback):
    def __init__(self, probe: Probe | None, out_dir: Path, fn: str) -> None:
        self.probe, self.out_dir, self.fn = probe, out_dir, fn

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.probe(trainer, pl_module) if self.probe is not None else None
        torch.save({"result": result, "world_size": trainer.world_size},
                   self.out_dir / f"rank{trainer.global_rank}.pt")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fn == "fit":
            self._run(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fn == "validate":
            self._run(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fn == "test":
            self._run(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fn == "predict":
            self._run(trainer, pl_module)


def cpu_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer (no logger, checkpointing, progress bar unless asked)."""
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, default_root_dir=str(tmp_path))
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def run_ddp(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    *,
    tmp_path: Path,
    fn: str = "fit",
    probe: Probe | None = None,
    callbacks: Sequence[Callback] = (),
    strategy: str = "ddp_fork",
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> list[Any]:
    """Run ``trainer.<fn>`` on 2 CPU processes and return ``[probe result of rank 0, of rank 1]``."""
    out_dir = tmp_path / f"ddp_probe_{fn}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.pt"):
        old.unlink()
    trainer = cpu_trainer(tmp_path, devices=2, strategy=strategy,
                          callbacks=[*callbacks, _ProbeCallback(probe, out_dir, fn)], **trainer_kwargs)
    kwargs: dict[str, Any] = {"datamodule": datamodule}
    if ckpt_path is not None:
        kwargs["ckpt_path"] = ckpt_path
    getattr(trainer, fn)(model, **kwargs)
    results = []
    for rank in range(2):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} did not reach the end of {fn}"
        saved = torch.load(path, weights_only=False)
        assert saved["world_size"] == 2
        results.append(saved["result"])
    return results


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m lightning_tricks ARGS`` in a subprocess with the repository on PYTHONPATH."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "lightning_tricks", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


class RankReport(Callback):
    """Writes, per rank, what the rank saw and the synced metrics at the end of fit (for CLI DDP tests)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train_batches = 0
        self.first_indices: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches += 1

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        first_weight = float(next(pl_module.parameters()).detach().flatten()[0])
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size, "train_batches": self.train_batches,
            "metrics": metrics, "first_weight": first_weight, "strategy": type(trainer.strategy).__name__,
        }))
