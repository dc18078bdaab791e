"""EMAMembers: the EMA and the raw weights of one run as two members, from the callback and from checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lightning_tricks import EMAMembers, Ensemble
from lightning_tricks.ensemble import CheckpointError
from tests.ensemble_modules import PlainNet, digits, save_member
from tests.helpers import cpu_trainer, run_ddp


def test_ema_and_raw_weights_as_two_members(tmp_path):
    pl.seed_everything(0)
    ema = EMAMembers(decay=0.7)
    regular = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="last-epoch", save_top_k=1)
    model = PlainNet()
    cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[ema, regular],
                enable_checkpointing=True).fit(model, datamodule=digits())
    ema_member, raw_member = ema.members()
    for name, value in model.state_dict().items():  # after fit the model holds the EMA weights
        assert torch.equal(ema_member.state_dict()[name], value)
        assert torch.equal(raw_member.state_dict()[name], ema.raw_state[name])
    assert not torch.equal(ema_member.net[1].weight, raw_member.net[1].weight)
    metrics = cpu_trainer(tmp_path).test(ema.ensemble(), datamodule=digits(), verbose=False)[0]
    assert {"test_acc", "test_acc_member_0", "test_acc_member_1"} <= set(metrics)

    # from a checkpoint written during fit (plain Lightning EMAWeightAveraging writes the same layout)
    path = tmp_path / "ckpts" / "last-epoch.ckpt"
    saved = torch.load(path, weights_only=True)
    both = Ensemble(checkpoints=[str(path)], member_class=PlainNet, ema_members="both")
    members = both.load_members()
    assert both.member_names == ["last-epoch.ckpt[ema]", "last-epoch.ckpt[raw]"]
    assert torch.equal(members[0].net[1].weight, saved["state_dict"]["net.1.weight"])
    assert torch.equal(members[1].net[1].weight, saved["current_model_state"]["net.1.weight"])
    (raw,) = Ensemble(checkpoints=[str(path)], member_class=PlainNet, ema_members="raw").load_members()
    assert torch.equal(raw.net[1].weight, saved["current_model_state"]["net.1.weight"])
    plain = save_member(model, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="no 'current_model_state'.*EMAWeightAveraging"):
        Ensemble(checkpoints=[str(plain)], member_class=PlainNet, ema_members="both").load_members()
    assert issubclass(EMAMembers, EMAWeightAveraging)


def test_ema_members_ddp_ranks_agree(tmp_path):
    def probe(trainer, module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMAMembers))
        return [m.net[1].weight.detach().clone() for m in ema.members()]

    ranks = run_ddp(PlainNet(), digits(), tmp_path=tmp_path, fn="fit", probe=probe, max_epochs=1,
                    limit_train_batches=4, limit_val_batches=0, callbacks=[EMAMembers(decay=0.5)])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0], ranks[1], strict=True))
    assert not torch.equal(ranks[0][0], ranks[0][1])  # the EMA and the raw weights differ
