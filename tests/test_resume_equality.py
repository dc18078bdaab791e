"""Kill-and-resume equals uninterrupted, for every trick with state or randomness.

For each trick (``tests/reliability_tricks.py``), on CPU with deterministic algorithms and
``seed_everything(0)`` at the start of each process (what a user's script does, before and after a crash):

* the **uninterrupted run** trains 3 epochs of 4 batches (12 steps) and validates after each epoch, with a
  ``ModelCheckpoint(every_n_train_steps=6)``: the checkpoint of step 6 is what a run killed in the middle of
  epoch 1 (after its 2nd batch) leaves behind. Nothing of that run's objects is reused afterwards;
* the **resumed run** builds a fresh model, fresh callbacks and a fresh datamodule, and calls
  ``fit(ckpt_path=<step 6>)``.

Both runs must end with bit-identical weights (every ``state_dict`` tensor, ``torch.equal``) and log
bit-identical metrics at every step after the resume point (an in-memory logger records every
``log_metrics`` call, ``log_every_n_steps=1``), validation metrics included.

What is fair to compare, given Lightning's own mid-epoch resume semantics:

* **The data position.** Lightning restores its loop counters (the resumed epoch continues at batch 2 and
  ends after batch 3) but restarts a plain DataLoader from its first batch (it warns "your dataloader is not
  resumable"). A resumable loader (``torchdata``'s ``StatefulDataLoader``, or any loader with
  ``state_dict``/``load_state_dict``) continues where it was. The test gives the resumed run the loader a
  resumable one is: its first epoch starts at batch 2 (``ResumeSampler``); later epochs are whole. Data are
  not shuffled, so the order owes nothing to torch's global generator.
* **Torch's global generator** is not in a Lightning checkpoint: a trick that drew from it would continue
  from ``seed_everything``'s state, not from step 6's. Our tricks draw only from their own generators,
  keyed by counters that are checkpointed, so this is exactly what the test checks (the models used here have
  no dropout; the ``baseline`` case shows the harness itself is exact).
* **Epoch-level training aggregates of the interrupted epoch** (``train_acc``, a torchmetrics metric logged
  ``on_epoch``) cover only the batches the resumed process saw: Lightning does not checkpoint metric states
  mid-epoch. That one value (epoch 1's ``train_acc``) is left out; every other logged value is compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from tests.reliability_tricks import BATCHES_PER_EPOCH, TRICKS, TinyData, make_model, trainer

STOP_STEP = 6  # mid-epoch 1: after its 2nd of 4 batches
INTERRUPTED_EPOCH = STOP_STEP // BATCHES_PER_EPOCH


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, as ``(step, {name: float})``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.append((int(step if step is not None else -1), {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _comparable(rows: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """The rows logged after the resume point, without the interrupted epoch's training aggregate."""
    kept = []
    for step, metrics in rows:
        if step < STOP_STEP:
            continue
        if metrics.get("epoch") == INTERRUPTED_EPOCH:
            metrics = {k: v for k, v in metrics.items() if k != "train_acc"}
        kept.append((step, metrics))
    return kept


@pytest.fixture
def deterministic(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled()
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them: restored after the test
        monkeypatch.setenv(name, "0")
    yield
    torch.use_deterministic_algorithms(before)


def _run(name: str, tmp_path: Path, ckpt_path: str | None = None) -> tuple[dict[str, torch.Tensor], list, Path]:
    make, backbone, _ = TRICKS[name]
    seed_everything(0, verbose=False)
    logger = MemoryLogger()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="{step}", every_n_train_steps=STOP_STEP,
                                  save_top_k=-1)
    model = make_model(backbone)
    start = STOP_STEP % BATCHES_PER_EPOCH if ckpt_path else 0
    fit = trainer(tmp_path, [*make(tmp_path / "trick"), checkpoints], logger=logger, log_every_n_steps=1,
                  enable_checkpointing=True, max_epochs=3)
    fit.fit(model, datamodule=TinyData(start_batch=start), ckpt_path=ckpt_path)
    assert fit.global_step == 3 * BATCHES_PER_EPOCH or fit.should_stop
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, logger.rows, tmp_path / "checkpoints" / f"step={STOP_STEP}.ckpt"


@pytest.mark.parametrize("name", list(TRICKS))
def test_resumed_run_equals_the_uninterrupted_one(name, tmp_path, deterministic):
    weights, rows, checkpoint = _run(name, tmp_path)
    assert checkpoint.exists()
    assert any(step > STOP_STEP for step, _ in rows)  # the comparison covers steps after the resume point
    resumed_weights, resumed_rows, _ = _run(name, tmp_path, ckpt_path=str(checkpoint))
    assert resumed_weights.keys() == weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], resumed_weights[k])]
    assert not different, f"{name}: resumed weights differ in {different[:6]}"
    expected, got = _comparable(rows), _comparable(resumed_rows)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (step, want), (_, have) in zip(expected, got, strict=True):
        assert have == want, f"{name}: logged metrics differ at step {step}: {have} != {want}"
