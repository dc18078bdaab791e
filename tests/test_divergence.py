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
from lightning_tricks._validation import InvalidArgumentError
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
