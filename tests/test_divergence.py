"""DivergenceStop: stops at the first non-finite loss or the first loss above factor x the first one."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import CALLBACKS, DivergenceStop
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from tests.helpers import cpu_trainer, run_ddp


class ScriptedLoss(pl.LightningModule):
    """Returns ``losses[global_step]`` (per rank when ``rank_losses`` is given), with a gradient path."""

    def __init__(self, losses: list[float], rank_losses: dict[int, list[float]] | None = None,
                 as_dict: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.losses, self.rank_losses, self.as_dict = losses, rank_losses or {}, as_dict
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.global_step)
        table = self.rank_losses.get(self.global_rank, self.losses)
        loss = self.w.sum() * 0 + torch.tensor(table[self.global_step])
        return {"loss": loss, "extra": 1} if self.as_dict else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(len(self.losses), 1)), batch_size=1)


def _fit(tmp_path, module, stop, **kwargs):
    trainer = cpu_trainer(tmp_path, callbacks=[stop], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    return trainer, [str(w.message) for w in caught if "DivergenceStop" in str(w.message)]


@pytest.mark.parametrize("bad,shown", [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "inf")])
def test_stops_at_the_first_non_finite_loss_with_one_line(tmp_path, bad, shown):
    losses = [2.3, 2.2, 2.1, bad, 2.0, 2.0, 2.0, 2.0]
    module = ScriptedLoss(losses)
    stop = DivergenceStop(factor=None)
    trainer, messages = _fit(tmp_path, module, stop, max_epochs=1)
    assert module.seen == [0, 1, 2, 3] and trainer.global_step == 4
    assert stop.stopped_step == 3 and stop.stopped_epoch == 0
    assert stop.stopping_reason == (f"DivergenceStop: training loss {shown} at step 3 (epoch 0): the lectures' "
                                    "diagnosis: learning rate too high or bad initialization.")
    assert messages == [stop.stopping_reason] and "\n" not in stop.stopping_reason


def test_factor_rule_uses_the_first_loss_and_a_dict_output(tmp_path):
    # 3 x 2.0 = 6.0: 6.0 itself is allowed, 6.5 stops
    module = ScriptedLoss([2.0, 5.0, 6.0, 1.0, 6.5, 9.0, 1.0], as_dict=True)
    stop = DivergenceStop(factor=3.0)
    trainer, messages = _fit(tmp_path, module, stop, max_epochs=1)
    assert stop.first_loss == 2.0 and stop.stopped_step == 4 and module.seen == [0, 1, 2, 3, 4]
    assert stop.stopping_reason.startswith("DivergenceStop: training loss 6.5 at step 4 (epoch 0) exceeds 3 x the "
                                           "first loss 2:")
    assert len(messages) == 1


def test_no_stop_when_within_the_rules_and_check_finite_off_lets_nan_pass(tmp_path):
    module = ScriptedLoss([2.0, 5.9, math.nan, 3.0])
    stop = DivergenceStop(factor=3.0, check_finite=False)
    trainer, messages = _fit(tmp_path, module, stop, max_epochs=1)
    assert module.seen == [0, 1, 2, 3] and stop.stopping_reason is None and stop.stopped_step is None
    assert messages == []


def test_accumulated_gradients_compare_the_undivided_loss(tmp_path):
    module = ScriptedLoss([2.0] * 4 + [7.0] * 4)
    module.training_step = lambda batch, batch_idx: module.w.sum() * 0 + torch.tensor(  # noqa: E731
        module.losses[batch_idx])
    stop = DivergenceStop(factor=3.0)
    trainer, _ = _fit(tmp_path, module, stop, max_epochs=1, accumulate_grad_batches=2)
    assert stop.first_loss == pytest.approx(2.0)
    assert stop.stopped_step == 2 and "training loss 7 at step 2" in stop.stopping_reason


def test_first_loss_not_positive_skips_the_factor_rule_with_a_warning(tmp_path):
    module = ScriptedLoss([-1.0, 5.0, math.nan])
    stop = DivergenceStop(factor=3.0)
    _, messages = _fit(tmp_path, module, stop, max_epochs=1)
    assert stop.stopped_step == 2
    assert any("is -1 (not positive)" in m for m in messages)


def test_first_non_finite_loss_is_no_reference_the_next_finite_one_is(tmp_path):
    module = ScriptedLoss([math.nan, 2.0, 6.5, 7.0])
    stop = DivergenceStop(factor=3.0, check_finite=False)
    _fit(tmp_path, module, stop, max_epochs=1)
    assert stop.first_loss == 2.0 and stop.stopped_step == 2


def test_resume_keeps_the_first_loss_and_a_new_fit_starts_afresh(tmp_path):
    losses = [2.0, 3.0, 4.0, 4.0, 3.0, 6.5, 2.0, 2.0]
    module = ScriptedLoss(losses[:4])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = cpu_trainer(tmp_path, callbacks=[DivergenceStop(), checkpoint], max_epochs=1,
                          enable_checkpointing=True)
    trainer.fit(module)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert [v for k, v in saved.items() if k.startswith("DivergenceStop")] == [{"first_loss": 2.0}]
    # resumed: the losses of steps 4.. are compared with the first run's first loss (2.0), so 6.5 stops
    resumed = ScriptedLoss(losses)
    resumed.train_dataloader = lambda: DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)
    stop = DivergenceStop()
    trainer = cpu_trainer(tmp_path, callbacks=[stop], max_epochs=2)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert stop.first_loss == 2.0 and stop.stopped_step == 5 and stop.stopped_epoch == 1
    # the same object in a new fit: its own first loss, no leftover reason
    fresh = ScriptedLoss([10.0, 25.0, 29.0])
    cpu_trainer(tmp_path, callbacks=[stop], max_epochs=1).fit(fresh)
    assert stop.first_loss == 10.0 and stop.stopping_reason is None and fresh.seen == [0, 1, 2]


@pytest.mark.parametrize("build,message", [
    (lambda: DivergenceStop(factor=1.0), "`factor`=1.0 is invalid: expected a number in (1.0, inf)"),
    (lambda: DivergenceStop(factor=float("nan")), "`factor`=nan is invalid: expected a number"),
    (lambda: DivergenceStop(factor=None, check_finite=False), "expected at least one rule switched on"),
])
def test_bad_arguments_are_clear(build, message):
    with pytest.raises(InvalidArgumentError) as err:
        build()
    assert message in str(err.value)


def test_listed_among_the_callbacks():
    assert "DivergenceStop" in CALLBACKS


def _probe(trainer, module):
    stop = next(c for c in trainer.callbacks if isinstance(c, DivergenceStop))
    return {"seen": module.seen, "step": stop.stopped_step, "reason": stop.stopping_reason,
            "first": stop.first_loss, "global_step": trainer.global_step}


@pytest.mark.slow
def test_ddp_one_rank_sees_nan_and_both_stop_at_the_same_step(tmp_path):
    module = ScriptedLoss([2.0] * 8, rank_losses={0: [2.0] * 8, 1: [4.0, 4.0, 4.0, math.nan] + [4.0] * 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rank0, rank1 = run_ddp(module, tmp_path=tmp_path, probe=_probe, callbacks=[DivergenceStop()],
                               max_epochs=1, use_distributed_sampler=False)
    assert rank0["seen"] == rank1["seen"] == [0, 1, 2, 3]
    assert rank0["step"] == rank1["step"] == 3 and rank0["global_step"] == rank1["global_step"] == 4
    assert rank0["first"] == rank1["first"] == 3.0  # mean of the ranks' first losses
    assert rank0["reason"] == rank1["reason"] == (
        "DivergenceStop: training loss nan at step 3 (epoch 0): the lectures' diagnosis: learning rate too high "
        "or bad initialization.")


# ------------------------------------------------------------------------------------------------------------
# manual optimization (a GAN: two optimizers, training_step returns nothing, the losses are logged)


class ScriptedManual(pl.LightningModule):
    """Manual optimization with two optimizers; logs ``g_loss``/``d_loss`` = the tables' values of the batch."""

    def __init__(self, g: list[float], d: list[float] | None = None, rank_g: dict[int, list[float]] | None = None,
                 val_loss: float | None = None, log: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.g, self.d, self.rank_g = g, d or [0.5] * len(g), rank_g or {}
        self.val_loss, self.log_losses = val_loss, log
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_idx)
        for opt, param in zip(self.optimizers(), (self.a, self.b), strict=True):
            opt.zero_grad()
            self.manual_backward((self.a + self.b).sum() * (2.0 if param is self.a else 1.0))
            opt.step()
        if self.log_losses:
            self.log("g_loss", self.rank_g.get(self.global_rank, self.g)[batch_idx])
            self.log("d_loss", self.d[batch_idx])
            self.log("accuracy", float("nan"))  # not a loss: never watched

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.val_loss)

    def configure_optimizers(self):
        return [torch.optim.SGD([self.a], lr=0.1), torch.optim.SGD([self.b], lr=0.1)]

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(len(self.g), 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


def test_manual_optimization_watches_the_logged_losses_and_stops_at_the_first_nan(tmp_path):
    module = ScriptedManual(g=[0.7, 0.9, 2.5, 9.0, 0.8, 0.8], d=[0.7, 0.6, 0.5, 0.4, math.nan, 0.3])
    stop = DivergenceStop()  # factor 3 does not apply to adversarial losses: 9.0 > 3 x 0.7 does not stop
    trainer, messages = _fit(tmp_path, module, stop, max_epochs=1, limit_val_batches=0)
    assert stop.watched == ["d_loss", "g_loss"] and stop.first_loss is None
    assert module.seen == [0, 1, 2, 3, 4]
    # global_step counts both optimizers' steps: batch 4 starts at step 8
    assert stop.stopped_step == 8 and trainer.global_step == 10
    assert stop.stopping_reason == ("DivergenceStop: training loss 'd_loss' nan at step 8 (epoch 0): the lectures' "
                                    "diagnosis: learning rate too high or bad initialization.")
    assert messages == [stop.stopping_reason]


def test_a_real_gan_that_goes_to_nan_is_stopped_by_the_clis_default_rule(tmp_path):
    from tests.training_style_modules import ToyGAN

    module = ToyGAN(nan_at_batch=3, batches=8)
    stop = DivergenceStop(factor=None)  # what the CLI adds
    trainer, messages = _fit(tmp_path, module, stop, max_epochs=2)
    assert module.batches_seen == 4 and stop.stopped_step == 6 and stop.stopped_epoch == 0
    assert stop.stopping_reason.startswith("DivergenceStop: training loss 'd_loss' nan at step 6 (epoch 0)")


def test_stale_validation_losses_are_not_training_losses(tmp_path):
    # callback_metrics keeps the last validation epoch's val_loss (NaN here) during training: not watched
    module = ScriptedManual(g=[0.7] * 6, val_loss=math.nan)
    stop = DivergenceStop(factor=None)
    _fit(tmp_path, module, stop, max_epochs=2, val_check_interval=2, num_sanity_val_steps=0)
    assert stop.stopping_reason is None and module.seen == [0, 1, 2, 3, 4, 5] * 2


def test_monitor_applies_both_rules_to_the_named_logged_loss(tmp_path):
    module = ScriptedManual(g=[2.0, 5.0, 6.0, 6.5, 1.0], d=[1.0, 9.0, 9.0, 9.0, 9.0])
    stop = DivergenceStop(factor=3.0, monitor="g_loss")
    _, messages = _fit(tmp_path, module, stop, max_epochs=1, limit_val_batches=0)
    assert stop.first_loss == 2.0 and stop.watched == ["g_loss"] and stop.stopped_step == 6
    assert stop.stopping_reason.startswith("DivergenceStop: training loss 'g_loss' 6.5 at step 6 (epoch 0) exceeds "
                                           "3 x the first loss 2:")
    assert "monitor" in stop.state_key and "monitor" not in DivergenceStop().state_key  # old checkpoints still load


def test_monitor_also_serves_automatic_optimization(tmp_path):
    module = ScriptedLoss([1.0] * 6)
    step = module.training_step

    def logging_step(batch, batch_idx):
        module.log("other_loss", [1.0, 1.0, math.inf, 1.0, 1.0, 1.0][batch_idx])
        return step(batch, batch_idx)

    module.training_step = logging_step
    stop = DivergenceStop(monitor="other_loss")
    _fit(tmp_path, module, stop, max_epochs=1)
    assert stop.stopped_step == 2 and "training loss 'other_loss' inf at step 2" in stop.stopping_reason


def test_a_monitor_the_step_does_not_log_is_one_line_listing_what_it_logs(tmp_path):
    stop = DivergenceStop(monitor="loss_G")
    with pytest.raises(ConfigError) as err:
        cpu_trainer(tmp_path, callbacks=[stop], limit_val_batches=0).fit(ScriptedManual(g=[0.7] * 3))
    assert str(err.value) == ("DivergenceStop: `monitor`='loss_G' was not logged by the first training step, which "
                              "logged accuracy, d_loss, g_loss: log it with self.log('loss_G', loss) in training_step "
                              "(on_step=True), or name one of those.")
    with pytest.raises(InvalidArgumentError, match="`monitor`='' is invalid"):
        DivergenceStop(monitor="")


def test_nothing_to_watch_warns_once_in_one_line_saying_what_to_pass(tmp_path):
    module = ScriptedManual(g=[0.7] * 5, log=False)
    stop = DivergenceStop(factor=None)
    _, messages = _fit(tmp_path, module, stop, max_epochs=1, limit_val_batches=0)
    assert messages == ["DivergenceStop watches nothing: the first training step returned no loss and logged no "
                        "value named '*loss*' (with on_step=True); return the loss, log it with "
                        "self.log('train_loss', loss), or pass monitor='<a name your step logs>'."]
    assert stop.watched == [] and module.seen == [0, 1, 2, 3, 4]


def test_cli_default_divergence_stop_serves_a_gan_that_logs_its_losses(tmp_path, monkeypatch):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(["fit", "--model=tests.training_style_modules.ToyGAN", "--model.nan_at_batch=2",
                         "--trainer.max_epochs=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"])
    (stop,) = [c for c in cli.trainer.callbacks if isinstance(c, DivergenceStop)]
    assert stop.factor is None and cli.model.batches_seen == 3 and stop.stopped_step == 4
    assert any(str(w.message) == stop.stopping_reason for w in caught)


def _manual_probe(trainer, module):
    stop = next(c for c in trainer.callbacks if isinstance(c, DivergenceStop))
    return {"seen": module.seen, "step": stop.stopped_step, "reason": stop.stopping_reason,
            "global_step": trainer.global_step}


@pytest.mark.slow
def test_ddp_manual_optimization_one_rank_logs_nan_and_both_stop_at_the_same_step(tmp_path):
    module = ScriptedManual(g=[0.7] * 6, rank_g={1: [0.7, 0.7, math.nan, 0.7, 0.7, 0.7]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rank0, rank1 = run_ddp(module, tmp_path=tmp_path, probe=_manual_probe, callbacks=[DivergenceStop(factor=None)],
                               max_epochs=1, limit_val_batches=0, use_distributed_sampler=False)
    assert rank0["seen"] == rank1["seen"] == [0, 1, 2]
    assert rank0["step"] == rank1["step"] == 4 and rank0["global_step"] == rank1["global_step"] == 6
    assert rank0["reason"] == rank1["reason"] == (
        "DivergenceStop: training loss 'g_loss' nan at step 4 (epoch 0): the lectures' diagnosis: learning rate "
        "too high or bad initialization.")


def test_manual_optimization_also_reads_losses_returned_in_a_dict(tmp_path):
    module = ScriptedManual(g=[0.7, 0.7, 0.7, 0.7], log=False)
    step = module.training_step

    def returning_step(batch, batch_idx):
        step(batch, batch_idx)
        return {"g_loss": torch.tensor([0.7, math.inf, 0.7, 0.7][batch_idx]), "images": torch.zeros(2, 3)}

    module.training_step = returning_step
    stop = DivergenceStop(factor=None)
    _fit(tmp_path, module, stop, max_epochs=1, limit_val_batches=0)
    assert stop.watched == ["g_loss"] and stop.stopped_step == 2 and "'g_loss' inf at step 2" in stop.stopping_reason
