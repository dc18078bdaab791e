"""Early stopping: the rule against a brute-force reference and Lightning's own, scripted metrics through a
real Trainer (each trigger, restore, ModelCheckpoint, resume), 2-process DDP with unsynced metrics, bad input."""

from __future__ import annotations

import copy
import math
import random
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tricks
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.early_stopping import (
    BEST_WEIGHTS_KEY,
    LIGHTNING_REASON,
    EarlyStopping,
    MonitorNotFoundError,
    StoppingRule,
    WeightSnapshot,
)
from tests.helpers import REPO, cpu_trainer, run_cli, run_ddp

KEY = "val_metric"


# --------------------------------------------------------------------------------------------------
# A module written the way users write one, whose validation logs a scripted value per check
# --------------------------------------------------------------------------------------------------
class ScriptedModule(pl.LightningModule):
    """A tiny classifier (with BatchNorm buffers) trained by plain F.cross_entropy on list batches.

    ``values[i]`` (or ``values[rank][i]``) is logged as ``val_metric`` at the i-th validation; ``None`` logs
    nothing. The weights at every check are recorded in ``snapshots[i]``.
    """

    def __init__(self, values, sync_dist: bool = False, key: str = KEY) -> None:
        super().__init__()
        self.values, self.sync_dist, self.key = values, sync_dist, key
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.checks = 0

    def _value(self):
        values = self.values[self.global_rank] if isinstance(self.values[0], (list, tuple)) else self.values
        return values[self.checks]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.net(x)
        if not self.trainer.sanity_checking and self._value() is not None:
            self.log(self.key, torch.tensor(float(self._value())), sync_dist=self.sync_dist)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.snapshots[self.checks] = copy.deepcopy(self.state_dict())
            self.checks += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)),
                          batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=4)


def fit(tmp_path, values, callbacks, max_epochs=None, seed=0, **trainer_kwargs):
    torch.manual_seed(seed)
    model = ScriptedModule(values)
    kwargs = dict(max_epochs=max_epochs or len(values), num_sanity_val_steps=0, limit_train_batches=2)
    kwargs.update(trainer_kwargs)
    trainer = cpu_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(model)
    return trainer, model


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# --------------------------------------------------------------------------------------------------
# The rule against a brute-force reference written from the documented rules (whole-sequence form)
# --------------------------------------------------------------------------------------------------
def reference_stop(values, mode="min", patience=3, min_delta=0.0, threshold_mode="abs", baseline=None,
                   start_from_epoch=0, worse_for=None, average_window=None, min_average_change=0.0):
    """(stop index or None, best index or None) from the rules as the method card states them."""
    def better(a, b):
        return a < b if mode == "min" else a > b

    def beats(v, ref):
        if math.isinf(ref):
            return better(v, ref)
        margin = min_delta if threshold_mode == "abs" else min_delta * abs(ref)
        return better(v + margin, ref) if mode == "min" else better(v - margin, ref)

    idx = [i for i in range(len(values)) if i >= start_from_epoch]
    best = math.inf if mode == "min" else -math.inf
    improved, resets = {}, {}
    for i in idx:
        improved[i] = beats(values[i], best)
        resets[i] = improved[i] and (baseline is None or beats(values[i], baseline))
        if improved[i]:
            best = values[i]
    best_idx = None
    for pos, i in enumerate(idx):
        if improved[i]:
            best_idx = i
        counted = idx[:pos + 1]
        last_reset = max((p for p, j in enumerate(counted) if resets[j]), default=-1)
        # Keras's baseline: an improving check never stops, even when it did not reset the count
        if not improved[i] and pos - last_reset >= patience:
            return i, best_idx
        if worse_for is not None and pos >= worse_for and all(
                not improved[counted[p]] and better(values[counted[p - 1]], values[counted[p]])
                for p in range(pos - worse_for + 1, pos + 1)):
            return i, best_idx
        if average_window is not None and pos >= average_window:
            window = [values[j] for j in counted[pos - average_window:]]
            if sum(abs(b - a) for a, b in zip(window, window[1:], strict=False)) / average_window < min_average_change:
                return i, best_idx
    return None, best_idx


def run_rule(values, **kwargs):
    rule = StoppingRule(**kwargs)
    for epoch, v in enumerate(values):
        decision = rule.step(torch.tensor(v, dtype=torch.float32), epoch)
        if decision.stop:
            return epoch, (rule.best_epoch if rule.best_epoch >= 0 else None), decision
    return None, (rule.best_epoch if rule.best_epoch >= 0 else None), None


def test_rule_matches_brute_force_reference_on_random_sequences():
    rng = random.Random(0)
    for _ in range(400):
        # multiples of 1/8: exact in float32, with many ties and plateaus to probe the boundaries
        values = [rng.randint(0, 16) / 8 for _ in range(rng.randint(1, 14))]
        kwargs = dict(mode=rng.choice(["min", "max"]), patience=rng.randint(0, 4),
                      min_delta=rng.choice([0.0, 0.125, 0.25]), threshold_mode=rng.choice(["abs", "rel"]),
                      baseline=rng.choice([None, 0.5, 1.5]), start_from_epoch=rng.choice([0, 0, 2]),
                      worse_for=rng.choice([None, 1, 2, 3]))
        if rng.random() < 0.5:
            kwargs.update(average_window=rng.randint(1, 4), min_average_change=rng.choice([0.1, 0.3]))
        if kwargs["patience"] == 0 and rng.random() < 0.7:
            kwargs["patience"] = 20  # let the other triggers speak
        expected = reference_stop(values, **kwargs)
        got = run_rule(values, **kwargs)
        assert got[:2] == expected, (values, kwargs, got)


def test_rule_matches_lightning_on_random_sequences():
    """With our additions off, every step agrees with Lightning's own rule: stop, reason, best score, wait count."""
    rng = random.Random(1)
    for _ in range(300):
        mode = rng.choice(["min", "max"])
        kwargs = dict(mode=mode, patience=rng.randint(0, 3), min_delta=rng.choice([0.0, 0.05, 0.3]),
                      check_finite=rng.random() < 0.7,
                      stopping_threshold=rng.choice([None, None, 0.1 if mode == "min" else 0.9]),
                      divergence_threshold=rng.choice([None, None, 0.95 if mode == "min" else 0.05]))
        values = [rng.random() if rng.random() > 0.1 else rng.choice([math.nan, math.inf]) for _ in range(12)]
        theirs, ours = LightningEarlyStopping(monitor=KEY, **kwargs), StoppingRule(monitor=KEY, **kwargs)
        for epoch, v in enumerate(values):
            current = torch.tensor(v, dtype=torch.float32)
            their_stop, _ = theirs._evaluate_stopping_criteria(current)
            decision = ours.step(current, epoch)
            assert decision.stop == their_stop, (values, kwargs, epoch)
            if their_stop:
                assert LIGHTNING_REASON[decision.trigger] == theirs.stopping_reason
                break
            assert torch.equal(ours.best_score, theirs.best_score) and ours.wait_count == theirs.wait_count


# --------------------------------------------------------------------------------------------------
# Each trigger through a real Trainer, stopping at exactly the epoch its rule says
# --------------------------------------------------------------------------------------------------
TRIGGER_CASES = {
    # name: (values per epoch, arguments, stop epoch, best epoch, trigger), each derived by hand from the rule
    # patience=2: best 0.8 at epoch 1, two checks without improvement -> stop at 3
    "patience": ([1.0, 0.8, 0.9, 0.85, 0.5, 0.4], dict(patience=2), 3, 1, "patience"),
    # min_delta=0.1: 0.95 and 0.91 are not below 1.0 - 0.1 -> stop at 2, the best stays epoch 0
    "abs_min_delta": ([1.0, 0.95, 0.91, 0.5], dict(patience=2, min_delta=0.1), 2, 0, "patience"),
    # rel 10%: 85 < 100 - 10 improves; 80 and 78 are not below 85 - 8.5 -> stop at 3
    "rel_min_delta": ([100.0, 85.0, 80.0, 78.0, 10.0], dict(patience=2, min_delta=0.1, threshold_mode="rel"),
                      3, 1, "patience"),
    # Keras's own case: baseline 0.5, patience 5: 0.9, 0.8, 0.7 improve without beating it, so the count runs
    # on (1, 2, 3); 0.71 and 0.72 do not improve (4, 5) -> stop at 4 after 5 epochs, best epoch 2
    "baseline": ([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], dict(baseline=0.5, patience=5), 4, 2, "baseline"),
    # start_from_epoch=3: the better early values are ignored; best 0.9 at 3, patience 1 -> stop at 4
    "start_from_epoch": ([0.1, 0.1, 0.1, 0.9, 0.95, 0.5], dict(start_from_epoch=3, patience=1), 4, 3, "patience"),
    # worse_for=2: best 0.5 at 1; 0.6 > 0.5 and 0.7 > 0.6, two strictly worse checks in a row -> stop at 3
    "worse_for": ([1.0, 0.5, 0.6, 0.7, 0.8, 0.9], dict(worse_for=2, patience=10), 3, 1, "worse_for"),
    # the plateau 0.6, 0.6 resets the run of worsening checks: 0.7, 0.8 -> stop at 5
    "worse_for_plateau": ([1.0, 0.5, 0.6, 0.6, 0.7, 0.8, 0.9], dict(worse_for=2, patience=10), 5, 1, "worse_for"),
    # changes 0.5, 0.25, 0.125, 0.0625, 0.03125: the mean of the last 3 is below 0.1 first at epoch 5
    "average_change": ([2.0, 1.5, 1.25, 1.125, 1.0625, 1.03125, 1.015625, 1.0],
                       dict(average_window=3, min_average_change=0.1, patience=10), 5, 5, "average_change"),
    "stopping_threshold": ([1.0, 0.5, 0.05, 0.01], dict(stopping_threshold=0.1), 2, 2, "stopping_threshold"),
    "divergence_threshold": ([1.0, 0.5, 3.0, 0.1], dict(divergence_threshold=2.0), 2, 1, "divergence_threshold"),
    # NaN stops at once, and the weights of the best finite check come back
    "non_finite": ([1.0, 0.5, 0.7, math.nan, 0.1], dict(patience=5), 3, 1, "non_finite"),
}


@pytest.mark.parametrize("name", list(TRIGGER_CASES))
def test_each_trigger_stops_at_its_epoch_and_restores_the_best_weights(name, tmp_path):
    values, kwargs, stop_epoch, best_epoch, trigger = TRIGGER_CASES[name]
    if trigger in ("patience", "baseline", "worse_for", "average_change"):
        assert reference_stop(values, **kwargs) == (stop_epoch, best_epoch)
    stopper = EarlyStopping(monitor=KEY, **kwargs)
    trainer, model = fit(tmp_path, values, [stopper])
    assert stopper.stopped_epoch == stop_epoch and trainer.current_epoch == stop_epoch + 1
    assert stopper.stopping_trigger == trigger
    assert stopper.best_epoch == best_epoch == stopper.restored_epoch
    message = stopper.stopping_reason_message
    assert f"({trigger}) at epoch {stop_epoch}:" in message
    assert f"Best val_metric={float(torch.tensor(values[best_epoch])):.6g} at epoch {best_epoch}." in message
    assert same_weights(model.state_dict(), model.snapshots[best_epoch])
    if best_epoch != stop_epoch:
        assert not same_weights(model.state_dict(), model.snapshots[stop_epoch])


def test_restores_best_weights_at_max_epochs_and_equals_model_checkpoint_best(tmp_path):
    """The run ends by max_epochs: the model holds the weights ModelCheckpoint saved at the best epoch; last.ckpt
    holds the last epoch's weights plus our state (with the best weights), loadable with weights_only=True."""
    values = [0.9, 0.4, 0.6, 0.5, 0.45]
    stopper = EarlyStopping(monitor=KEY, patience=10)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor=KEY, save_top_k=1)
    latest = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True)
    trainer, model = fit(tmp_path, values, [stopper, best, latest], enable_checkpointing=True)
    assert stopper.stopped_epoch == 0 and stopper.stopping_trigger is None and trainer.current_epoch == 5
    assert stopper.restored_epoch == 1
    saved_best = torch.load(best.best_model_path, weights_only=True)
    assert saved_best["epoch"] == 1 and same_weights(model.state_dict(), saved_best["state_dict"])
    last = torch.load(latest.last_model_path, weights_only=True)
    assert last["epoch"] == 4 and same_weights(last["state_dict"], model.snapshots[4])
    ours = last["callbacks"][stopper.state_key]
    assert same_weights(last[BEST_WEIGHTS_KEY][stopper.state_key], model.snapshots[1]) and ours["best_epoch"] == 1
    # the callback's own state stays small and comparable: the best score is its only tensor
    assert [k for k, v in ours.items() if isinstance(v, torch.Tensor)] == ["best_score"]


def test_restore_best_weights_false_keeps_the_final_weights(tmp_path):
    stopper = EarlyStopping(monitor=KEY, patience=1, restore_best_weights=False)
    trainer, model = fit(tmp_path, [1.0, 0.5, 0.7, 0.1], [stopper])
    assert stopper.stopped_epoch == 2 and stopper.best_state_dict is None and stopper.restored_epoch is None
    assert same_weights(model.state_dict(), model.snapshots[2])


def test_non_finite_without_any_finite_check_keeps_final_weights(tmp_path):
    stopper = EarlyStopping(monitor=KEY)
    trainer, model = fit(tmp_path, [math.inf, 0.1], [stopper])
    assert stopper.stopping_trigger == "non_finite" and stopper.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert stopper.best_epoch == -1 and stopper.restored_epoch is None
    assert "No best val_metric yet" in stopper.stopping_reason_message


@pytest.mark.parametrize("case", [
    dict(values=[1.0, 0.8, 0.9, 0.85, 0.95, 0.7], kwargs=dict(patience=2)),
    dict(values=[1.0, 0.8, 0.79, 0.785, 0.6], kwargs=dict(patience=2, min_delta=0.02)),
    dict(values=[0.1, 0.5, 0.95, 0.96, 0.97], kwargs=dict(mode="max", stopping_threshold=0.9)),
    dict(values=[1.0, 0.5, math.nan, 0.1, 0.1], kwargs=dict(patience=3)),
    dict(values=[1.0, 0.9, 0.8, 0.7, 0.6], kwargs=dict(patience=0)),
])
def test_same_stop_as_lightning_through_a_trainer(case, tmp_path):
    values, kwargs = case["values"], case["kwargs"]
    theirs = LightningEarlyStopping(monitor=KEY, **kwargs)
    ours = EarlyStopping(monitor=KEY, restore_best_weights=False, **kwargs)
    t1, m1 = fit(tmp_path, values, [theirs])
    t2, m2 = fit(tmp_path, values, [ours])
    assert (t2.current_epoch, ours.stopped_epoch, ours.stopping_reason) == \
           (t1.current_epoch, theirs.stopped_epoch, theirs.stopping_reason)
    assert same_weights(m1.state_dict(), m2.state_dict())


def test_check_on_validation_end_with_two_checks_per_epoch_matches_lightning(tmp_path):
    """val_check_interval=0.5: Lightning checks after every validation; patience counts checks, not epochs."""
    values = [1.0, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
    theirs = LightningEarlyStopping(monitor=KEY, patience=3)
    ours = EarlyStopping(monitor=KEY, patience=3)
    t1, _ = fit(tmp_path, values, [theirs], max_epochs=4, val_check_interval=0.5)
    t2, m2 = fit(tmp_path, values, [ours], max_epochs=4, val_check_interval=0.5)
    assert not ours._check_on_train_epoch_end
    assert (t2.current_epoch, ours.stopped_epoch) == (t1.current_epoch, theirs.stopped_epoch) == (3, 2)
    assert ours.checks == 5 and same_weights(m2.state_dict(), m2.snapshots[1])


def test_lightning_checkpoint_state_loads_and_the_trainer_finds_us():
    theirs = LightningEarlyStopping(monitor=KEY, patience=7)
    theirs._evaluate_stopping_criteria(torch.tensor(0.5))
    theirs._evaluate_stopping_criteria(torch.tensor(0.6))
    ours = EarlyStopping(monitor=KEY, patience=4)
    assert ours.state_key == theirs.state_key
    ours.load_state_dict(theirs.state_dict())
    assert float(ours.best_score) == 0.5 and ours.wait_count == 1 and ours.patience == 4
    back = LightningEarlyStopping(monitor=KEY)
    back.load_state_dict(ours.state_dict())
    assert float(back.best_score) == 0.5 and back.wait_count == 1
    assert isinstance(ours, LightningEarlyStopping)
    assert pl.Trainer(callbacks=[ours], logger=False, enable_checkpointing=False).early_stopping_callback is ours


# --------------------------------------------------------------------------------------------------
# Kill between epochs and resume: same stop epoch, same best weights
# --------------------------------------------------------------------------------------------------
class KillAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated kill")


@pytest.mark.parametrize("kwargs,kill", [
    # best at epoch 1, before the kill: its weights must come from the checkpoint; stops at 5
    (dict(patience=4), 3),
    # the average-change window spans the kill: changes 0.1, 0.02, 0.01 -> mean below 0.05 at epoch 5
    (dict(patience=20, average_window=3, min_average_change=0.05), 4),
    # the run of worsening checks 0.815 (epoch 6), 0.9 (7), 0.95 (8) spans the kill; stops at 8
    (dict(patience=20, worse_for=3), 7),
], ids=["patience", "average_change", "worse_for"])
def test_kill_and_resume_stops_like_the_uninterrupted_run(kwargs, kill, tmp_path):
    values = [1.0, 0.5, 0.9, 0.8, 0.82, 0.81, 0.815, 0.9, 0.95, 1.0, 1.1]

    def checkpoint(folder):
        return ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)

    full_stopper = EarlyStopping(monitor=KEY, **kwargs)
    full, full_model = fit(tmp_path / "full", values, [full_stopper, checkpoint("full")], enable_checkpointing=True)
    assert full_stopper.stopping_trigger is not None and full_stopper.stopped_epoch > kill

    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(tmp_path / "a", values, [EarlyStopping(monitor=KEY, **kwargs), checkpoint("a"), KillAtEpoch(kill)],
            enable_checkpointing=True)
    saved = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == kill - 1

    resumed_stopper = EarlyStopping(monitor=KEY, **kwargs)
    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    model = ScriptedModule(values)
    model.checks = kill  # the scripted sequence continues where the killed run left it
    trainer = cpu_trainer(tmp_path / "b", callbacks=[resumed_stopper, checkpoint("b")], max_epochs=len(values),
                          num_sanity_val_steps=0, limit_train_batches=2, enable_checkpointing=True)
    trainer.fit(model, ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    assert (resumed_stopper.stopped_epoch, resumed_stopper.stopping_trigger, resumed_stopper.best_epoch) == \
           (full_stopper.stopped_epoch, full_stopper.stopping_trigger, full_stopper.best_epoch)
    assert resumed_stopper.stopping_reason_message == full_stopper.stopping_reason_message
    assert trainer.current_epoch == full.current_epoch
    assert same_weights(model.state_dict(), full_model.state_dict())


# --------------------------------------------------------------------------------------------------
# 2-process DDP
# --------------------------------------------------------------------------------------------------
def _ddp_probe(trainer, pl_module):
    stopper = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    return {"stopped_epoch": stopper.stopped_epoch, "current_epoch": trainer.current_epoch,
            "best_epoch": stopper.best_epoch, "trigger": stopper.stopping_trigger,
            "message": stopper.stopping_reason_message, "best_score": float(stopper.best_score),
            "state": state, "snapshots": pl_module.snapshots, "holds_copy": stopper.best_state_dict is not None}


def test_ddp_unsynced_per_rank_metrics_same_stop_and_same_restored_weights(tmp_path):
    # alone, rank 0 would stop at epoch 3 (best 1) and rank 1 at epoch 5 (best 3); their mean
    # 1.0, 0.55, 0.45, 0.55, 0.9 has its best at epoch 2 and, with patience 2, stops at epoch 4
    per_rank = [[1.0, 0.2, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9], [1.0, 0.9, 0.4, 0.2, 0.9, 0.9, 0.9, 0.9]]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_ddp(ScriptedModule(per_rank), tmp_path=tmp_path, probe=_ddp_probe,
                          callbacks=[EarlyStopping(monitor=KEY, patience=2)], max_epochs=8,
                          num_sanity_val_steps=0, limit_train_batches=2)
    for rank, r in enumerate(results):
        assert (r["stopped_epoch"], r["current_epoch"], r["best_epoch"], r["trigger"]) == (4, 5, 2, "patience")
        assert r["best_score"] == pytest.approx(0.45)
        assert r["holds_copy"] == (rank == 0)  # only rank 0 keeps the host copy
        # every rank ends with the weights rank 0 had at epoch 2, buffers included
        assert same_weights(r["state"], results[0]["snapshots"][2])
        # and the parameters are the ones this rank itself trained to at epoch 2
        params = [k for k in r["state"] if "running" not in k and "num_batches" not in k]
        assert all(torch.equal(r["state"][k], r["snapshots"][2][k]) for k in params)
    assert results[0]["message"] == results[1]["message"]


def test_ddp_key_missing_on_one_rank(tmp_path):
    """strict=False: rank 1 never logs the key; every rank uses rank 0's values and nobody hangs."""
    per_rank = [[1.0, 0.5, 0.7, 0.8, 0.9, 0.9], [None] * 6]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_ddp(ScriptedModule(per_rank), tmp_path=tmp_path, probe=_ddp_probe,
                          callbacks=[EarlyStopping(monitor=KEY, patience=2, strict=False)], max_epochs=6,
                          num_sanity_val_steps=0, limit_train_batches=2)
    assert [(r["stopped_epoch"], r["best_epoch"]) for r in results] == [(3, 1), (3, 1)]
    assert same_weights(results[0]["state"], results[1]["state"])


# --------------------------------------------------------------------------------------------------
# Bad input, the functional core on zoo models, the CLI
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="maximum"), "`mode` can be min, max or None (inferred from the monitored name), got maximum."),
    (dict(patience=-1), "`patience`=-1 is invalid: expected an integer in [0, inf]"),
    (dict(patience=2.5), "`patience`=2.5 is invalid: expected an integer"),
    (dict(average_window=-2, min_average_change=0.1), "`average_window`=-2 is invalid: expected an integer in [1, inf]"),
    (dict(worse_for=0), "`worse_for`=0 is invalid: expected an integer in [1, inf]"),
    (dict(average_window=3, min_average_change=-0.1), "`min_average_change`=-0.1 is invalid"),
    (dict(average_window=3), "`min_average_change`=0.0 is invalid with `average_window`=3"),
    (dict(min_average_change=0.1), "`average_window`=None is invalid with `min_average_change`=0.1"),
    (dict(min_delta=-0.01), "`min_delta`=-0.01 is invalid"),
    (dict(threshold_mode="percent"), "`threshold_mode`='percent' is invalid: expected one of 'abs', 'rel'"),
    (dict(start_from_epoch=-1), "`start_from_epoch`=-1 is invalid"),
    (dict(baseline=math.nan), "`baseline`=nan is invalid"),
    (dict(restore_best_weights="yes"), "`restore_best_weights`='yes' is invalid: expected true or false"),
    (dict(monitor=""), "`monitor`='' is invalid"),
])
def test_bad_arguments_are_named(kwargs, message):
    kwargs = {"monitor": KEY, **kwargs}
    with pytest.raises(InvalidArgumentError) as err:
        EarlyStopping(**kwargs)
    assert message in str(err.value)
    # also Lightning's exception type, so `except MisconfigurationException` written for Lightning's class works
    assert isinstance(err.value, MisconfigurationException)


def test_monitor_that_never_appears(tmp_path):
    with pytest.raises(MonitorNotFoundError, match="`val_nope` which is not available.*`val_metric`"):
        fit(tmp_path, [1.0, 0.5], [EarlyStopping(monitor="val_nope")])
    stopper = EarlyStopping(monitor="val_nope", strict=False)
    with pytest.warns(RuntimeWarning, match="counted no check of `val_nope`"):
        trainer, _ = fit(tmp_path, [1.0, 0.5], [stopper])
    assert trainer.current_epoch == 2 and stopper.restored_epoch is None


def test_refuses_weight_averaging_at_setup(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    with pytest.raises(ConfigError, match="cannot be combined with EMAWeightAveraging.*restore_best_weights=False"):
        fit(tmp_path, [1.0, 0.5], [EarlyStopping(monitor=KEY), EMAWeightAveraging()])


@pytest.mark.parametrize("name", ["tv:resnet18", "timm:resnet10t"])
def test_weight_snapshot_restores_torchvision_and_timm_models(name):
    """Integer BN counters and every buffer come back; the second capture reuses the first one's storage."""
    model = lightning_tricks.ImageClassifier(name, num_classes=3, in_channels=3).model.train()
    snapshot = WeightSnapshot()
    snapshot.capture(model)
    storage = {k: v.data_ptr() for k, v in snapshot.state.items()}
    reference = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # train-mode forward: BN running statistics and counters move
        for p in model.parameters():
            p.add_(0.1)
    assert not same_weights(model.state_dict(), reference)
    snapshot.restore(model)
    assert same_weights(model.state_dict(), reference)
    assert any(v.dtype == torch.int64 for v in snapshot.state.values())
    snapshot.capture(model)
    assert {k: v.data_ptr() for k, v in snapshot.state.items()} == storage
    assert snapshot.nbytes == sum(v.numel() * v.element_size() for v in reference.values())


def test_cli_short_name_and_yaml_build_ours(tmp_path, monkeypatch):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(REPO / "examples" / "early_stopping.yaml"), "--trainer.logger=false"], run=False)
    stoppers = [c for c in cli.trainer.callbacks if isinstance(c, LightningEarlyStopping)]
    assert len(stoppers) == 1 and type(stoppers[0]) is EarlyStopping and stoppers[0].restore_best_weights
    assert "EarlyStopping" in lightning_tricks.CALLBACKS and lightning_tricks.EarlyStopping is EarlyStopping


@pytest.mark.slow
def test_example_config_under_two_process_ddp(tmp_path):
    """The example config under real DDP (strategy=ddp relaunches): stops at epoch 1, both ranks end identical."""
    import json

    out = tmp_path / "ranks"
    proc = run_cli(["fit", "--config", str(REPO / "examples" / "early_stopping.yaml"), "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--trainer.max_epochs=4", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks.patience=0",
                    "--trainer.callbacks.min_delta=10", "--trainer.callbacks.worse_for=null",
                    "--trainer.callbacks+=tests.helpers.RankReport", f"--trainer.callbacks.out_dir={out}"],
                   cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "Early stopping (patience) at epoch 1" in text and "Restored the weights of epoch 0" in text
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["first_weight"] == reports[1]["first_weight"]



def test_ddp_strict_key_missing_on_one_rank_raises_on_every_rank(tmp_path):
    """strict=True and rank 1 never logs the key: both ranks raise the same error at the same check (no hang)."""
    per_rank = [[1.0, 0.5, 0.7], [None] * 3]
    with pytest.raises(Exception, match=r"not available on 1 of 2 ranks"):
        run_ddp(ScriptedModule(per_rank), tmp_path=tmp_path, callbacks=[EarlyStopping(monitor=KEY)], max_epochs=3,
                num_sanity_val_steps=0, limit_train_batches=2)


# --------------------------------------------------------------------------------------------------
# Keras's EarlyStopping test cases, ported (keras/src/callbacks/early_stopping_test.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_keras_patience_case(patience):
    """Keras's test_early_stopping_patience: the stop epoch is max(patience, 1) + 2."""
    rule = StoppingRule(monitor="loss", patience=patience)
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    stops = [epoch for epoch, loss in enumerate(losses) if rule.step(loss, epoch).stop]
    assert stops[0] == max(patience, 1) + 2


def test_keras_restore_cases_with_and_without_baseline():
    """Keras's test_early_stopping_final_weights_when_restoring_model_weights, first two cases."""
    def run(losses, **kwargs):
        rule = StoppingRule(monitor="val_loss", **kwargs)
        for epoch, loss in enumerate(losses):
            if rule.step(loss, epoch).stop:
                return epoch + 1, rule.best_epoch
        return len(losses), rule.best_epoch

    assert run([0.2, 0.15, 0.1, 0.11, 0.12], patience=2) == (5, 2)
    # no epoch beats the baseline: 5 epochs trained, the best one (2) restored
    assert run([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], patience=5, baseline=0.5) == (5, 2)


def test_baseline_never_stops_a_run_that_improves_at_every_check(tmp_path):
    """Keras: an improving check never stops training, even while it stays worse than the baseline."""
    values = [0.9, 0.8, 0.7, 0.65, 0.6, 0.58]  # improves every epoch, never below the baseline 0.1
    stopper = EarlyStopping(monitor=KEY, patience=2, baseline=0.1)
    trainer, model = fit(tmp_path, values, [stopper])
    assert stopper.stopped_epoch == 0 and stopper.stopping_trigger is None and trainer.current_epoch == len(values)
    assert stopper.wait_count == len(values)  # the count ran on at every check: no improvement beat the baseline
    assert stopper.restored_epoch == 5 and same_weights(model.state_dict(), model.snapshots[5])
    # one check without improvement now stops it (the count is past patience), as in Keras
    rule = StoppingRule(patience=2, baseline=0.1)
    decisions = [rule.step(v, epoch) for epoch, v in enumerate([*values, 0.59])]
    assert [d.stop for d in decisions] == [False] * len(values) + [True] and decisions[-1].trigger == "baseline"


# --------------------------------------------------------------------------------------------------
# One object for two fits; mode inferred from the monitored name
# --------------------------------------------------------------------------------------------------
class WiderModule(ScriptedModule):
    """Another architecture: the first fit's weights cannot load into it."""

    def __init__(self, values) -> None:
        super().__init__(values)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _second_fit(tmp_path, stopper, values):
    torch.manual_seed(1)
    model = WiderModule(values)
    trainer = cpu_trainer(tmp_path, callbacks=[stopper], max_epochs=len(values), num_sanity_val_steps=0,
                          limit_train_batches=2)
    trainer.fit(model)
    return trainer, model


def test_one_object_for_two_fits_never_loads_the_first_fits_weights(tmp_path):
    """Counters and best score carry over, as Lightning's do (same stop epochs as Lightning's class); weights never."""
    first, second = [1.0, 0.5, 0.7, 0.8], [0.9, 0.4, 0.6, 0.7]
    theirs = LightningEarlyStopping(monitor=KEY, patience=2)
    fit(tmp_path / "l1", first, [theirs])
    _second_fit(tmp_path / "l2", theirs, second)

    stopper = EarlyStopping(monitor=KEY, patience=2)
    fit(tmp_path / "a", first, [stopper])
    assert (stopper.stopped_epoch, stopper.restored_epoch) == (3, 1)
    with pytest.warns(RuntimeWarning, match="or from an earlier fit of this callback"):
        trainer, model = _second_fit(tmp_path / "b", stopper, second)
    # 0.9 is not below the first fit's best 0.5 and the wait count was already 2: stop at once, like Lightning's
    assert stopper.stopped_epoch == theirs.stopped_epoch == 0 and trainer.current_epoch == 1
    assert stopper.restored_epoch is None and same_weights(model.state_dict(), model.snapshots[0])


def test_second_fit_restores_its_own_best(tmp_path):
    stopper = EarlyStopping(monitor=KEY, patience=2)
    fit(tmp_path / "a", [1.0, 0.5, 0.7, 0.8], [stopper])
    trainer, model = _second_fit(tmp_path / "b", stopper, [0.45, 0.3, 0.6, 0.7, 0.8])
    assert (stopper.stopped_epoch, stopper.best_epoch, stopper.restored_epoch) == (3, 1, 1)
    assert same_weights(model.state_dict(), model.snapshots[1])


def test_mode_inferred_from_the_monitored_name_restores_the_best_epoch(tmp_path, caplog):
    values = [0.5, 0.9, 0.7, 0.6, 0.55, 0.95]
    with caplog.at_level("INFO"):
        stopper = EarlyStopping(monitor="val_acc", patience=2)
    assert stopper.mode == "max" and stopper.state_key == "EarlyStopping{'monitor': 'val_acc', 'mode': 'max'}"
    assert sum("mode='max' inferred from monitor='val_acc'" in r.getMessage() for r in caplog.records) == 1
    torch.manual_seed(0)
    model = ScriptedModule(values, key="val_acc")
    trainer = cpu_trainer(tmp_path, callbacks=[stopper], max_epochs=len(values), num_sanity_val_steps=0,
                          limit_train_batches=2)
    trainer.fit(model)
    assert (stopper.stopped_epoch, stopper.restored_epoch) == (3, 1)
    assert same_weights(model.state_dict(), model.snapshots[1])
    # an explicit mode keeps Lightning's meaning, whatever the name says; loss-like names infer min
    assert EarlyStopping(monitor="val_acc", mode="min").mode == "min"
    assert EarlyStopping(monitor="val_loss").mode == "min" and StoppingRule(mode=None, monitor="val/F1").mode == "max"


# --------------------------------------------------------------------------------------------------
# Lightning's contract: what Lightning's own tests (../shared/conformance) rely on
# --------------------------------------------------------------------------------------------------
def test_pickle_round_trip_after_a_fit_keeps_equal_state(tmp_path):
    import pickle

    stopper = EarlyStopping(monitor=KEY, patience=5)
    fit(tmp_path, [1.0, 0.5, 0.7], [stopper])
    assert stopper.best_state_dict is not None
    loaded = pickle.loads(pickle.dumps(stopper))

    def ours(callback):  # the trainer attaches its module's `log`/`log_dict` to every callback: not our state
        return {k: v for k, v in vars(callback).items() if k not in ("log", "log_dict")}

    assert ours(loaded) == ours(stopper)
    assert loaded.state_dict() == stopper.state_dict()


def test_check_outside_fit_with_restore_on():
    """Called on a Trainer that has no model (as Lightning's test_early_stopping_squeezes does): no crash."""
    stopper = EarlyStopping(monitor="foo")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    trainer.callback_metrics["foo"] = torch.tensor([[0.25]])
    stopper._run_early_stopping_check(trainer)
    assert float(stopper.best_score) == 0.25 and stopper.best_epoch == 0 and stopper.best_state_dict is None


def test_a_subclass_overriding_the_decision_is_honoured(tmp_path):
    class StopAtOnce(EarlyStopping):
        def _evaluate_stopping_criteria(self, current):
            return True, "custom reason"

    stopper = StopAtOnce(monitor=KEY, patience=10)
    trainer, _ = fit(tmp_path, [1.0, 0.5, 0.4], [stopper])
    assert trainer.current_epoch == 1 and stopper.stopping_reason_message == "custom reason"


def test_message_keeps_lightnings_wording_then_ours(tmp_path):
    stopper = EarlyStopping(monitor=KEY, patience=2)
    fit(tmp_path, [1.0, 0.8, 0.9, 0.85], [stopper])
    message = stopper.stopping_reason_message
    assert message.startswith("Monitored metric val_metric did not improve in the last 2 records.")
    assert message.endswith("Early stopping (patience) at epoch 3: val_metric did not improve by more than "
                            "min_delta=0 in 2 checks (patience=2). Best val_metric=0.8 at epoch 1.")


def test_checkpoint_of_an_earlier_version_still_restores_its_weights(tmp_path):
    """Versions before the split kept the weights in the callback state as `best_state_dict`."""
    torch.manual_seed(3)
    old = ScriptedModule([0.1]).state_dict()
    legacy = {"wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.1), "patience": 3,
              "best_epoch": 0, "best_state_dict": old}
    stopper = EarlyStopping(monitor=KEY, patience=3)
    stopper.load_state_dict(legacy)
    assert stopper.best_epoch == 0 and same_weights(stopper.best_state_dict, old)
