"""SnapshotEnsemble: the paper's schedule, snapshots, resume mid-cycle, DDP, members that are copies of the
trained module (hyper-parameters holding an nn.Module), the peak learning rate under OneCycleLR."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_tricks import Ensemble, SnapshotEnsemble
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.ensemble import CheckpointError, UnsafeCheckpointError, snapshot_lr, soft_vote
from tests.ensemble_modules import ImageNetStyle, LrRecorder, PlainNet, digits
from tests.helpers import cpu_trainer, run_ddp


def test_snapshot_lr_is_the_papers_formula():
    total, cycles, lr = 100, 3, 0.2
    length = math.ceil(total / cycles)
    for t in range(1, total + 1):
        expected = lr / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)
        assert snapshot_lr(t, total, cycles, lr) == pytest.approx(expected, abs=1e-15)
    assert [snapshot_lr(t, total, cycles, lr) for t in (1, length + 1, 2 * length + 1)] == [lr] * 3



def _snapshot_trainer(tmp_path, callbacks, **kwargs):
    return cpu_trainer(tmp_path, max_epochs=6, limit_train_batches=4, limit_val_batches=0, callbacks=callbacks,
                       enable_checkpointing=True, **kwargs)


def test_snapshot_schedule_snapshots_ensemble_and_resume_mid_cycle(tmp_path):
    pl.seed_everything(0)
    snap_dir, ckpt_dir = tmp_path / "snapshots", tmp_path / "ckpts"
    snapshots, recorder = SnapshotEnsemble(cycles=3, dirpath=str(snap_dir)), LrRecorder()
    regular = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    model = PlainNet(lr=0.1)
    with pytest.warns(UserWarning, match="removing the scheduler.*StepLR"):
        _snapshot_trainer(tmp_path, [snapshots, recorder, regular]).fit(model, datamodule=digits())
    total, length = 24, 8  # 6 epochs x 4 batches, 3 cycles
    assert snapshots.total_steps == total and snapshots.cycle_length == length
    assert recorder.lrs == {t: pytest.approx(snapshot_lr(t, total, 3, 0.1), abs=1e-15) for t in range(1, total + 1)}
    assert snapshots.snapshot_steps == [8, 16, 24]
    assert [Path(p).name for p in snapshots.snapshot_paths] == [
        "snapshot-cycle=1-step=8.ckpt", "snapshot-cycle=2-step=16.ckpt", "snapshot-cycle=3-step=24.ckpt"]
    assert all(Path(p).is_file() for p in snapshots.snapshot_paths)
    config = yaml.safe_load((snap_dir / "ensemble.yaml").read_text())
    assert config["model"]["init_args"] == {"checkpoints": snapshots.snapshot_paths,
                                            "member_class": "tests.ensemble_modules.PlainNet"}
    ensemble = snapshots.ensemble()
    members = ensemble.load_members()
    assert len(members) == 3 and torch.equal(members[2].net[1].weight, model.net[1].weight)
    assert not torch.equal(members[0].net[1].weight, members[2].net[1].weight)
    assert cpu_trainer(tmp_path).test(ensemble, datamodule=digits(), verbose=False)[0]["test_acc"] > 0.5

    # resume from the end of epoch 3 = step 12, the middle of cycle 2
    resumed, recorder2 = SnapshotEnsemble(cycles=3, dirpath=str(snap_dir)), LrRecorder()
    _snapshot_trainer(tmp_path, [resumed, recorder2]).fit(PlainNet(lr=0.1), datamodule=digits(),
                                                          ckpt_path=str(ckpt_dir / "epoch=2.ckpt"))
    assert sorted(recorder2.lrs) == list(range(13, total + 1))
    assert recorder2.lrs == {t: recorder.lrs[t] for t in range(13, total + 1)}
    assert resumed.snapshot_paths == snapshots.snapshot_paths and resumed.snapshot_steps == [8, 16, 24]


@pytest.mark.parametrize("cycles,max_epochs,message", [
    (0, 6, "`cycles`=0 is invalid: expected an integer in [1, inf]"),
    (25, 6, "`cycles`=25 is invalid: expected at most the number of training steps (24 steps in 6 epochs)"),
    (4, 1.5, "cycles of ceil(6/4)=2 steps make only 3"),
])
def test_snapshot_bad_cycles(cycles, max_epochs, message, tmp_path):
    if cycles < 1:
        with pytest.raises(InvalidArgumentError) as err:
            SnapshotEnsemble(cycles=cycles)
    else:
        kwargs = {"max_epochs": 6} if max_epochs == 6 else {"max_epochs": -1, "max_steps": 6}
        trainer = cpu_trainer(tmp_path, limit_train_batches=4, limit_val_batches=0,
                              callbacks=[SnapshotEnsemble(cycles=cycles, dirpath=str(tmp_path))], **kwargs)
        with pytest.raises(InvalidArgumentError) as err:
            trainer.fit(PlainNet(), datamodule=digits())
    assert message in str(err.value)


def test_snapshot_uneven_budget_warns_and_snapshots_the_last_step(tmp_path):
    snapshots, recorder = SnapshotEnsemble(cycles=3, lr=0.2, dirpath=str(tmp_path / "s")), LrRecorder()
    trainer = cpu_trainer(tmp_path, max_epochs=-1, max_steps=10, limit_train_batches=4, limit_val_batches=0,
                          callbacks=[snapshots, recorder])
    with pytest.warns(UserWarning, match="last cycle is cut to 2 of 4 steps"):
        trainer.fit(PlainNet(), datamodule=digits())
    assert snapshots.snapshot_steps == [4, 8, 10]  # cycles of ceil(10/3) = 4 steps, the last one cut
    assert recorder.lrs == {t: pytest.approx(snapshot_lr(t, 10, 3, 0.2), abs=1e-15) for t in range(1, 11)}


class NetInHparams(pl.LightningModule):
    """Written like a popular project template: the network is a constructor argument saved with the other
    hyper-parameters (``save_hyperparameters()`` pickles the ``nn.Module``); OneCycleLR stepped per batch."""

    def __init__(self, net: nn.Module, lr: float = 0.1, one_cycle: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(F.log_softmax(self.forward(x), dim=1), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if not self.hparams.one_cycle:
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr,
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_snapshot_ensemble_of_a_module_whose_hparams_hold_an_nn_module(tmp_path):
    pl.seed_everything(0)
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snaps"))
    model = NetInHparams(_small_net(), lr=0.05)
    cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0,
                callbacks=[snapshots]).fit(model, datamodule=digits())
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoints=True"):  # a stranger's file would be refused
        Ensemble(checkpoints=snapshots.snapshot_paths, member_class=NetInHparams).load_members()
    ensemble = snapshots.ensemble()
    members = ensemble.load_members()
    for member, path in zip(members, snapshots.snapshot_paths, strict=True):
        saved = torch.load(path, weights_only=False)["state_dict"]
        assert member is not model and type(member) is NetInHparams
        assert all(torch.equal(member.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(members[1].net[1].weight, model.net[1].weight)
    assert not torch.equal(members[0].net[1].weight, members[1].net[1].weight)
    dm = digits()
    test_acc = cpu_trainer(tmp_path).test(ensemble, datamodule=dm, verbose=False)[0]["test_acc"]
    x, y = dm.test_set.tensors
    with torch.no_grad():
        expected = soft_vote(torch.stack([m(x) for m in members])).argmax(-1)
    assert test_acc == pytest.approx((expected == y).float().mean().item(), abs=1e-6)
    # a snapshot replaced on disk is no longer "ours": it is not unpickled
    torch.save(torch.load(snapshots.snapshot_paths[0], weights_only=False), snapshots.snapshot_paths[0])
    with pytest.raises(CheckpointError, match="changed on disk since SnapshotEnsemble wrote it"):
        snapshots.ensemble()


def test_snapshot_ensemble_of_a_module_whose_constructor_needs_more_than_its_hparams(tmp_path):
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snaps"))
    model = ImageNetStyle(data_path=str(tmp_path / "imagenet"))
    cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                callbacks=[snapshots]).fit(model, datamodule=digits())
    copies = snapshots.ensemble().load_members()  # copies of the trained module: nothing to rebuild
    assert [m.data_path for m in copies] == [model.data_path] * 2
    assert torch.equal(copies[1].model[1].weight, model.model[1].weight)
    restored = SnapshotEnsemble(cycles=2)  # in another process: no trained module, so the snapshots are rebuilt
    restored.load_state_dict(snapshots.state_dict())
    rebuilt = restored.ensemble(member_kwargs={"data_path": "/elsewhere"}).load_members()
    assert [m.data_path for m in rebuilt] == ["/elsewhere"] * 2
    assert all(torch.equal(a.model[1].weight, b.model[1].weight) for a, b in zip(copies, rebuilt, strict=True))


def test_snapshot_peak_is_the_configured_lr_not_one_cycles_starting_lr(tmp_path):
    snapshots, recorder = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "s")), LrRecorder()
    model = NetInHparams(_small_net(), lr=0.2, one_cycle=True)
    with pytest.warns(UserWarning, match="removing the scheduler.*OneCycleLR"):
        cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0,
                    callbacks=[snapshots, recorder]).fit(model, datamodule=digits())
    assert snapshots.base_lrs == [[pytest.approx(0.2)]]  # OneCycleLR had set lr = 0.2 / 25 at construction
    assert recorder.lrs == {t: pytest.approx(snapshot_lr(t, 8, 2, 0.2), abs=1e-12) for t in range(1, 9)}
    from lightning_tricks.ensemble.snapshot import configured_lr

    assert configured_lr({"lr": 0.008, "initial_lr": 0.008, "max_lr": 0.2}) == 0.2
    assert configured_lr({"lr": 0.05, "initial_lr": 0.1}) == 0.1  # e.g. a warm-up LambdaLR at its first step
    assert configured_lr({"lr": 0.3}) == 0.3


def test_snapshot_ddp_ranks_share_the_schedule_and_snapshots(tmp_path):
    def probe(trainer, module):
        snap = next(c for c in trainer.callbacks if isinstance(c, SnapshotEnsemble))
        rec = next(c for c in trainer.callbacks if isinstance(c, LrRecorder))
        return {"lrs": rec.lrs, "paths": snap.snapshot_paths, "weight": module.net[1].weight.detach().clone()}

    ranks = run_ddp(PlainNet(lr=0.1), digits(), tmp_path=tmp_path, fn="fit", probe=probe, max_epochs=2,
                    limit_train_batches=4, limit_val_batches=0,
                    callbacks=[SnapshotEnsemble(cycles=2, lr=0.05, dirpath=str(tmp_path / "snaps")), LrRecorder()])
    assert ranks[0]["lrs"] == ranks[1]["lrs"] == {t: pytest.approx(snapshot_lr(t, 8, 2, 0.05)) for t in range(1, 9)}
    assert ranks[0]["paths"] == ranks[1]["paths"] and len(ranks[0]["paths"]) == 2
    assert all(Path(p).is_file() for p in ranks[0]["paths"])
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    members = Ensemble(checkpoints=ranks[0]["paths"], member_class=PlainNet).load_members()
    assert torch.equal(members[1].net[1].weight, ranks[0]["weight"])


# ------------------------------------------------------------------------------------------------------------
# training styles: manual optimization with two optimizers (a GAN), OneCycleLR's peak


class BatchLrRecorder(pl.Callback):
    """Every optimizer's first-group learning rate at each training batch, in batch order."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])


def test_gan_with_two_optimizers_counts_training_batches_not_every_optimizers_steps(tmp_path):
    from tests.training_style_modules import ToyGAN

    snapshots, recorder = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "s")), BatchLrRecorder()
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[snapshots, recorder])
    trainer.fit(ToyGAN(lr=0.0002, batches=8))
    batches = 16  # 2 epochs x 8 batches; global_step counts both optimizers: 32
    assert trainer.global_step == 32 and snapshots.total_steps == batches and snapshots.batches_done == batches
    assert snapshots.snapshot_steps == [8, 16] and len(snapshots.snapshot_paths) == 2
    expected = [[pytest.approx(snapshot_lr(t, batches, 2, 0.0002), abs=1e-15)] * 2 for t in range(1, batches + 1)]
    assert recorder.lrs == expected
    assert recorder.lrs[8][0] == pytest.approx(0.0002)  # the second cycle restarts at the peak
    # a budget in max_steps counts every optimizer's steps: refused in one line
    trainer = cpu_trainer(tmp_path, max_epochs=-1, max_steps=20, callbacks=[SnapshotEnsemble(cycles=2)])
    with pytest.raises(InvalidArgumentError) as err:
        trainer.fit(ToyGAN())
    assert str(err.value) == ("SnapshotEnsemble with manual optimization and 2 optimizers places its cycles in "
                              "training batches, but trainer.max_steps=20 counts every optimizer's steps: bound the "
                              "run with max_epochs (and limit_train_batches) instead.")


def test_gan_snapshot_schedule_resumes_mid_cycle_from_the_batch_count(tmp_path):
    from tests.training_style_modules import ToyGAN

    pl.seed_everything(0)
    ckpts, recorder = tmp_path / "ckpts", BatchLrRecorder()
    every_epoch = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    snapshots = SnapshotEnsemble(cycles=3, dirpath=str(tmp_path / "s"))
    cpu_trainer(tmp_path, max_epochs=3, callbacks=[snapshots, recorder, every_epoch],
                enable_checkpointing=True).fit(ToyGAN(batches=4))
    resumed, recorder2 = SnapshotEnsemble(cycles=3, dirpath=str(tmp_path / "s")), BatchLrRecorder()
    cpu_trainer(tmp_path, max_epochs=3, callbacks=[resumed, recorder2]).fit(
        ToyGAN(batches=4), ckpt_path=str(ckpts / "epoch=0.ckpt"))
    assert recorder2.lrs == recorder.lrs[4:] and resumed.snapshot_steps == snapshots.snapshot_steps == [4, 8, 12]


def test_one_cycle_lr_cycles_restart_at_the_optimizers_own_lr_not_max_lr(tmp_path):
    from tests.step_style_modules import LitResnetStyle  # SGD lr=0.05, OneCycleLR max_lr=0.1

    snapshots, recorder = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "s")), LrRecorder()
    trainer = cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0,
                          callbacks=[snapshots, recorder])
    with pytest.warns(UserWarning) as caught:
        trainer.fit(LitResnetStyle(lr=0.05), train_dataloaders=_four_class_loader())
    lines = [str(w.message) for w in caught if "OneCycleLR reaches" in str(w.message)]
    assert lines == ["SnapshotEnsemble: OneCycleLR reaches max_lr only after its warm-up and a snapshot cycle "
                     "restarts without one, so each cycle starts at the optimizer's own lr (max_lr=0.1 -> 0.05); "
                     "pass lr= to choose the peak."]
    assert snapshots.base_lrs == [[0.05]]
    assert recorder.lrs == {t: pytest.approx(snapshot_lr(t, 8, 2, 0.05), abs=1e-15) for t in range(1, 9)}
    chosen = SnapshotEnsemble(cycles=2, lr=0.1, dirpath=str(tmp_path / "s2"))  # an explicit peak is kept, silently
    cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[chosen]).fit(
        LitResnetStyle(lr=0.05), train_dataloaders=_four_class_loader())
    assert chosen.base_lrs == [[0.1]]


def _four_class_loader():
    from torch.utils.data import DataLoader, TensorDataset

    from tests.training_style_modules import synthetic

    x, y = synthetic(64)
    return DataLoader(TensorDataset(x, y), batch_size=16)
