"""LargeBatchScaling: the learning rate the optimizer sees equals eta(t) = s(t) * m(t) at every step, with 1 and 2
processes, accumulation, a cosine schedule, SnapshotEnsemble, EarlyStopping, resume; errors."""

import math

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import EarlyStopping, LargeBatchScaling, SnapshotEnsemble
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.ensemble import snapshot_lr
from lightning_tricks.large_batch import lr_multiplier, scaling_factor
from lightning_tricks.zoo import ImageClassifier
from tests.helpers import cpu_trainer, run_ddp


def loader(n=32, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch, shuffle=False)


class WithLoader(ImageClassifier):
    def train_dataloader(self):
        return loader()


def model(cls=ImageClassifier, **kwargs):
    kwargs = {"schedule": "none", "lr": 0.05, **kwargs}
    return cls("mlp", num_classes=3, in_channels=1, image_size=8, backbone_kwargs={"width": 16, "depth": 1}, **kwargs)


class SeenLearningRates(Callback):
    """Records, inside every optimizer step, (global step, learning rate of group 0) as the optimizer sees it."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        # registered after LargeBatchScaling's hook (callback order), so it sees the scaled value
        trainer.optimizers[0].register_step_pre_hook(
            lambda opt, args, kwargs: self.seen.append((trainer.global_step, opt.param_groups[0]["lr"])))


def test_formula():
    assert scaling_factor(4, 64) == 4.0
    assert scaling_factor(2, 32, 4, reference_batch_size=64) == 4.0
    assert [lr_multiplier(t, 3.0, 4) for t in range(6)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert lr_multiplier(0, 0.5, 10) == 0.5  # smaller batch than the reference: scaled down, no warm-up
    assert lr_multiplier(5, 4.0, 0) == 4.0


def check(seen, expected_lr):
    assert seen, "no optimizer step was recorded"
    assert [t for t, _ in seen] == list(range(len(seen)))
    for t, lr in seen:
        assert lr == pytest.approx(expected_lr(t), rel=1e-12, abs=1e-15), t


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_single_process_reference_and_warmup_steps(tmp_path, precision):
    seen = SeenLearningRates()
    net = model()
    trainer = cpu_trainer(tmp_path, max_epochs=2, precision=precision, callbacks=[LargeBatchScaling(reference_batch_size=4, warmup_steps=3),
                                                             seen])
    trainer.fit(net, train_dataloaders=loader())
    check(seen.seen, lambda t: 0.05 * lr_multiplier(t, 2.0, 3))  # k = 8 / 4
    assert len(seen.seen) == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05  # the user's value is back after every step


class LoggedScale(Callback):
    """Reads ``large_batch/lr_scale`` from ``trainer.callback_metrics`` after each batch (the next batch's start)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "large_batch/lr_scale" in trainer.callback_metrics:
            self.seen.append(float(trainer.callback_metrics["large_batch/lr_scale"]))


def test_logs_large_batch_lr_scale_through_pl_module_log(tmp_path):
    logged = LoggedScale()
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[LargeBatchScaling(reference_batch_size=4, warmup_steps=6),
                                                             logged])
    trainer.fit(model(), train_dataloaders=loader())
    # m(t) of steps 0..6 (read at the start of the next batch), then the last step's in callback_metrics
    assert logged.seen == pytest.approx([lr_multiplier(t, 2.0, 6) for t in range(7)])
    assert float(trainer.callback_metrics["large_batch/lr_scale"]) == pytest.approx(lr_multiplier(7, 2.0, 6))
    assert "lr_scale" not in trainer.callback_metrics


def test_log_false_logs_nothing(tmp_path):
    # Lightning sets every callback's `.log` to pl_module.log, so the flag cannot live in `self.log`
    trainer = cpu_trainer(tmp_path, max_epochs=1, callbacks=[LargeBatchScaling(reference_batch_size=4, log=False)])
    trainer.fit(model(), train_dataloaders=loader())
    assert not any(key.startswith("large_batch/") for key in trainer.callback_metrics)


def test_accumulation_and_cosine_schedule(tmp_path):
    """accumulate 2 at batch 8 (k = 2 with the default reference), 1-epoch warm-up = 2 optimizer steps; the user's
    epoch-wise cosine runs on its own values."""
    seen = SeenLearningRates()
    callback = LargeBatchScaling(warmup_epochs=1)
    trainer = cpu_trainer(tmp_path, max_epochs=3, accumulate_grad_batches=2, callbacks=[callback, seen])
    trainer.fit(model(schedule="cosine"), train_dataloaders=loader())
    assert (callback.factor, callback.total_warmup_steps, callback.global_batch_size) == (2.0, 2, 16)

    def expected(t):
        cosine = 0.05 * (1 + math.cos(math.pi * (t // 2) / 3)) / 2
        return cosine * lr_multiplier(t, 2.0, 2)

    check(seen.seen, expected)
    assert len(seen.seen) == 6


def test_resume_continues_the_formula(tmp_path):
    def run(epochs, ckpt=None):
        seen = SeenLearningRates()
        trainer = cpu_trainer(tmp_path, max_epochs=epochs, callbacks=[LargeBatchScaling(warmup_steps=6), seen])
        trainer.fit(model(), train_dataloaders=loader(), ckpt_path=ckpt)
        return trainer, seen.seen

    trainer, _ = run(1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    _, seen = run(2, str(tmp_path / "one.ckpt"))
    assert [t for t, _ in seen] == [4, 5, 6, 7]
    assert [lr for _, lr in seen] == pytest.approx([0.05 * lr_multiplier(t, 1.0, 6) for t in range(4, 8)])


def test_composes_with_snapshot_ensemble(tmp_path):
    seen = SeenLearningRates()
    trainer = cpu_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2,
                          callbacks=[SnapshotEnsemble(cycles=2, lr=0.1, dirpath=str(tmp_path / "snap")),
                                     LargeBatchScaling(warmup_steps=2), seen])
    trainer.fit(model(), train_dataloaders=loader())
    check(seen.seen, lambda t: snapshot_lr(t + 1, 4, 2, 0.1) * lr_multiplier(t, 2.0, 2))


def test_composes_with_early_stopping_restore(tmp_path):
    weights = {}

    class Keep(Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    seed_everything(0)
    seen = SeenLearningRates()
    stopping = EarlyStopping(monitor="val_loss", patience=1)
    net = model(lr=2.0)  # too large once scaled by 4: the loss gets worse and training stops
    trainer = cpu_trainer(tmp_path, max_epochs=12, callbacks=[LargeBatchScaling(warmup_steps=4, batch_size=8,
                                                                                reference_batch_size=2),
                                                              stopping, Keep(), seen])
    trainer.fit(net, train_dataloaders=loader(), val_dataloaders=loader())
    check(seen.seen, lambda t: 2.0 * lr_multiplier(t, 4.0, 4))
    assert stopping.restored_epoch is not None and trainer.current_epoch < 12
    for key, value in weights[stopping.restored_epoch].items():
        assert torch.equal(net.state_dict()[key], value), key


@pytest.mark.slow
def test_ddp_two_processes_with_accumulation(tmp_path):
    """2 processes x batch 8 x accumulation 2 with the default reference (8): k = 4; each rank has 2 batches per
    epoch, so 1 optimizer step per epoch and a 2-epoch warm-up is 2 steps."""
    def probe(trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, SeenLearningRates))
        return callback.seen

    seen = run_ddp(model(WithLoader), tmp_path=tmp_path, probe=probe, max_epochs=4, accumulate_grad_batches=2,
                   callbacks=[LargeBatchScaling(warmup_epochs=2), SeenLearningRates()])
    for rank_seen in seen:
        check(rank_seen, lambda t: 0.05 * lr_multiplier(t, 4.0, 2))
        assert [lr for _, lr in rank_seen] == pytest.approx([0.05, 0.125, 0.2, 0.2])


@pytest.mark.parametrize("kwargs,fragment", [
    ({"reference_batch_size": 0}, "`reference_batch_size`=0"),
    ({"warmup_epochs": -1}, "`warmup_epochs`=-1"),
    ({"warmup_steps": -2}, "`warmup_steps`=-2"),
    ({"warmup_epochs": 1, "warmup_steps": 2}, "are both set"),
])
def test_bad_arguments_fail_in_one_line(kwargs, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        LargeBatchScaling(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_short_name_with_defaults(tmp_path, monkeypatch):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--trainer.callbacks+=LargeBatchScaling", "--trainer.logger=false"], run=False)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LargeBatchScaling))
    assert (callback.reference_batch_size, callback.warmup_epochs, callback.warmup_steps) == (None, None, None)


@pytest.mark.slow
def test_cli_two_processes_through_the_example(tmp_path):
    """`strategy: ddp` relaunches the script: the example config scales by the 2 processes."""
    from tests.helpers import REPO, run_cli

    proc = run_cli(["fit", "--config", str(REPO / "examples" / "large_batch_ddp.yaml"), "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false"], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert "LargeBatchScaling: global batch 64 = 2 x 32 x 1; learning rates x2 after a warm-up of 8 optimizer steps" \
        in output
    assert "Final validation accuracy:" in proc.stdout
