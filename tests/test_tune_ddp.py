"""TrialPruning under 2-process DDP: rank zero asks the pruner, every rank stops at the same epoch."""

import pytest

from lightning_tricks.tuning.pruning import TrialPruning
from lightning_tricks.zoo import ImageClassifier, SyntheticDataModule
from tests.helpers import run_ddp


class FakeTrial:
    """Stands for an optuna.Trial: records reports; says prune from ``prune_at`` on (only where it is asked)."""

    def __init__(self, prune_at: int) -> None:
        self.prune_at, self.reports, self.asked = prune_at, [], 0
        self.study = type("S", (), {"study_name": "fake"})()

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        self.asked += 1
        return self.reports[-1][0] >= self.prune_at


@pytest.mark.slow
def test_prune_decision_is_rank_zeros_on_every_rank(tmp_path):
    pruning = TrialPruning(FakeTrial(prune_at=1), monitor="val_acc")

    def probe(trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, TrialPruning))
        return {"pruned": cb.pruned, "reason": cb.stopping_reason, "epoch": trainer.current_epoch,
                "step": trainer.global_step, "asked": cb.trial.asked, "reports": list(cb.trial.reports)}

    model = ImageClassifier("mlp", num_classes=4, in_channels=1, image_size=4, schedule="none")
    data = SyntheticDataModule(num_samples=64, num_classes=4, image_shape=[1, 4, 4], batch_size=8)
    rank0, rank1 = run_ddp(model, data, tmp_path=tmp_path, probe=probe, callbacks=[pruning], max_epochs=5,
                           limit_train_batches=2, limit_val_batches=2)
    assert rank0["pruned"] and rank1["pruned"] and rank0["reason"] == rank1["reason"]
    assert rank0["reason"].startswith("pruned by the pruner at epoch 1")
    assert rank0["step"] == rank1["step"] == 4  # 2 epochs of 2 steps, then stopped on both ranks
    assert rank0["asked"] == 2 and rank1["asked"] == 0  # only rank zero talks to the study
    assert [s for s, _ in rank0["reports"]] == [0, 1] and rank1["reports"] == []


@pytest.mark.slow
def test_forked_rank_zero_reports_to_the_study_database_and_every_rank_stops(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="ddp", direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.5))  # any accuracy is below: prune
    trial = study.ask()
    pruning = TrialPruning(trial, monitor="val_acc", storage=storage)

    def probe(trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, TrialPruning))
        return {"pruned": cb.pruned, "step": trainer.global_step}

    model = ImageClassifier("mlp", num_classes=4, in_channels=1, image_size=4, schedule="none")
    data = SyntheticDataModule(num_samples=64, num_classes=4, image_shape=[1, 4, 4], batch_size=8)
    rank0, rank1 = run_ddp(model, data, tmp_path=tmp_path, probe=probe, callbacks=[pruning], max_epochs=5,
                           limit_train_batches=2, limit_val_batches=2)
    assert rank0 == rank1 == {"pruned": True, "step": 2}  # stopped after epoch 0 on both ranks
    reported = optuna.load_study(study_name="ddp", storage=storage).trials[0].intermediate_values
    assert list(reported) == [0] and 0.0 <= reported[0] <= 1.0  # one report, by rank zero, in the database


def test_a_stage_is_pruned_only_against_trials_of_its_own_stage():
    """Stage 2 runs longer: its first epoch must not be cut by the (final, better) epoch-0 values of stage 1."""
    import types

    import optuna
    import torch

    from lightning_tricks.tuning.pruning import STAGE_STEPS

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    for value in (0.95, 0.96, 0.97):  # stage 1: one epoch each, reported at step 0
        trial = study.ask()
        trial.report(value, 0)
        study.tell(trial, value)

    def validate(pruning: TrialPruning, value: float) -> bool:
        trainer = types.SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0, should_stop=False,
                                        callback_metrics={"val_acc": torch.tensor(value)},
                                        strategy=types.SimpleNamespace(broadcast=lambda obj, src=0: obj))
        pruning.on_validation_end(trainer, None)
        return trainer.should_stop

    assert not validate(TrialPruning(study.ask(), "val_acc", step_offset=STAGE_STEPS), 0.5)  # stage 2: no peers yet
    assert validate(TrialPruning(study.ask(), "val_acc"), 0.5)  # the same value among stage-1 trials is pruned


def test_quiet_lightning_restores_the_loggers_it_quieted():
    """tune and babysit quiet Lightning for their many short fits, and leave a host program's logging as it was."""
    import logging

    from lightning_tricks.tuning.study import quiet_lightning

    logger = logging.getLogger("lightning.pytorch")
    before = logger.level
    with quiet_lightning():
        assert logger.level == logging.WARNING
    assert logger.level == before
