"""Finetune: head discovery, freezing (bit-identical frozen weights and BatchNorm statistics), units, learning
rates per group, unfreeze schedule and resume, local weights files, DDP, errors."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import Finetune
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.transfer import (
    WeightsMismatchError,
    backbone_units,
    find_head,
    freeze,
    load_weights,
    param_groups,
    replace_head,
)
from lightning_tricks.zoo import ImageClassifier, build_backbone
from tests.helpers import cpu_trainer, run_ddp


def loader(n=32, classes=4, channels=3, size=16, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def classifier(backbone, classes=4, **kwargs):
    kwargs = {"schedule": "none", "lr": 0.05, **kwargs}
    return ImageClassifier(backbone, num_classes=classes, in_channels=3, image_size=16, **kwargs)


class WithLoader(ImageClassifier):
    """A module with its own dataloader, as public projects write them."""

    def train_dataloader(self):
        return loader(n=64)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("timm:resnet18", "fc"), ("resnet20", "fc"),
                                       ("simple_cnn", "head.4"), ("mobilenet_v3_small", "classifier.3"),
                                       ("timm:vit_tiny_patch16_224", "head")])
def test_head_is_found_and_units_cover_every_parameter(name, head):
    model = build_backbone(name, num_classes=10)
    assert find_head(model) == head
    units = backbone_units(model, head)
    ids = [id(p) for u in units for p in u.params] + [id(p) for p in model.get_submodule(head).parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_resnet_units_are_the_residual_blocks():
    units = backbone_units(build_backbone("resnet18"), "fc")
    assert [u.name for u in units] == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in units[0].modules)  # bn1 joined the stem conv


def test_replace_head_keeps_the_name_and_changes_the_outputs():
    model = build_backbone("resnet20", num_classes=10)
    keys = list(model.state_dict())
    assert replace_head(model, num_classes=3) == "fc"
    assert list(model.state_dict()) == keys
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_functional_freeze_and_groups():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = freeze(net, "last:1")
    assert [p.requires_grad for p in net.parameters()] == [False] * 4 + [True] * 4
    assert not net[1].training and net[3].training
    groups = param_groups(plan, lr=0.1, backbone_lr_factor=0.5)
    assert [g["lr"] for g in groups] == [0.1, 0.05]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net[5].parameters()}
    assert len(groups[1]["params"]) == 6


def frozen_keys(model, trained_prefixes):
    return [k for k in model.state_dict() if not any(k.startswith(p) for p in trained_prefixes)]


@pytest.mark.parametrize("backbone,train,trained,optimizer", [
    ("resnet18", "head", ["model.fc."], "sgd"),
    ("timm:resnet18", "head", ["model.fc."], "adamw"),
    ("resnet20", "head", ["model.fc."], "adam"),
    ("resnet18", "last:2", ["model.fc.", "model.layer4."], "sgd"),
    ("timm:resnet18", "last:1", ["model.fc.", "model.layer4.1."], "sgd"),
    ("resnet20", "last:1", ["model.fc.", "model.layer3.2."], "adamw"),
])
def test_only_the_trained_part_changes(tmp_path, backbone, train, trained, optimizer):
    """Frozen parameters and BatchNorm running statistics are bit-identical after a fit (weight decay on)."""
    seed_everything(0)
    model = classifier(backbone, optimizer=optimizer, weight_decay=0.01)
    before = snapshot(model)
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[Finetune(train=train)])
    trainer.fit(model, train_dataloaders=loader())
    after = model.state_dict()
    frozen = frozen_keys(model, trained)
    assert any("running_mean" in k for k in frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    for key in after:
        if key not in frozen and after[key].is_floating_point():
            assert not torch.equal(before[key], after[key]), f"{key} should have trained"


def test_learning_rates_per_group_follow_the_users_schedule(tmp_path):
    seed_everything(0)
    model = classifier("resnet20", schedule="cosine", lr=0.1)
    callback = Finetune(train="last:3", backbone_lr_factor=0.25)
    trainer = cpu_trainer(tmp_path, max_epochs=4, callbacks=[callback])
    lrs = []

    class Spy(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    trainer.callbacks.append(Spy())
    trainer.fit(model, train_dataloaders=loader())
    head_ids = {id(p) for p in model.model.fc.parameters()}
    groups = trainer.optimizers[0].param_groups
    assert [{id(p) for p in g["params"]} == head_ids for g in groups] == [True, False]
    for epoch, (head_lr, backbone_lr) in enumerate(lrs):
        cosine = 0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2
        assert head_lr == pytest.approx(cosine, rel=1e-9)
        assert backbone_lr == pytest.approx(0.25 * cosine, rel=1e-9)


def test_resume_keeps_the_frozen_state_and_continues_exactly(tmp_path):
    """Head for epoch 0, last block from epoch 1 on: a run resumed after epoch 1 ends where the whole run ends."""
    def run(max_epochs, ckpt_path=None, save=None):
        seed_everything(0)
        model = classifier("resnet20", momentum=0.9)
        callback = Finetune(train="head", unfreeze={1: "last:1", 2: "all"}, backbone_lr_factor=0.5)
        trainer = cpu_trainer(tmp_path, max_epochs=max_epochs, callbacks=[callback])
        trainer.fit(model, train_dataloaders=loader(), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return model, callback

    full, _ = run(3)
    run(2, save=tmp_path / "two.ckpt")
    resumed, callback = run(3, ckpt_path=str(tmp_path / "two.ckpt"))
    assert callback.stage == 2
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_resumed_stage_is_applied_before_training(tmp_path):
    seed_everything(0)
    model = classifier("resnet20")
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[Finetune(train="head", unfreeze={1: "last:1"})])
    trainer.fit(model, train_dataloaders=loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    fresh = classifier("resnet20")
    seen = {}

    class Probe(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["grad"] = {n: p.requires_grad for n, p in pl_module.named_parameters()}

    trainer = cpu_trainer(tmp_path, max_epochs=3, callbacks=[Finetune(train="head", unfreeze={1: "last:1"}), Probe()])
    trainer.fit(fresh, train_dataloaders=loader(), ckpt_path=str(tmp_path / "a.ckpt"))
    assert seen["grad"]["model.layer3.2.conv1.weight"] and not seen["grad"]["model.layer3.1.conv1.weight"]
    assert seen["grad"]["model.fc.weight"]


def test_batchnorm_of_frozen_units_stays_in_eval_mode_during_training(tmp_path):
    modes = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.bn1.training, pl_module.model.layer3[2].bn2.training))

    seed_everything(0)
    trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=1,
                          callbacks=[Finetune(train="last:1"), Probe()])
    trainer.fit(classifier("resnet20"), train_dataloaders=loader(), val_dataloaders=loader())
    assert modes and set(modes) == {(False, True)}


def save_resnet18_state(path, classes=10):
    torch.manual_seed(1)
    model = build_backbone("resnet18", num_classes=classes)
    torch.save(model.state_dict(), path)
    return model


def test_torchvision_state_dict_of_another_head_size_loads_with_the_head_replaced(tmp_path):
    source = save_resnet18_state(tmp_path / "resnet18.pth", classes=10)
    target = classifier("resnet18", classes=4)
    report = load_weights(target, tmp_path / "resnet18.pth")
    assert (report.file_prefix, report.model_prefix) == ("", "model.")
    assert report.skipped_head == ["fc.weight", "fc.bias"]
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(target.model.state_dict()[key], value), key
    assert target.model.fc.out_features == 4


def test_lightning_checkpoint_loads_through_the_callback(tmp_path):
    seed_everything(0)
    pretrained = classifier("resnet20", classes=4)
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(pretrained, train_dataloaders=loader())
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    target = classifier("resnet20", classes=3)
    callback = Finetune(weights=str(tmp_path / "pre.ckpt"), num_classes=3)
    trainer = cpu_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    data = loader(classes=3)
    trainer.fit(target, train_dataloaders=data)
    for key, value in pretrained.state_dict().items():  # train="head": the backbone is the checkpoint's
        if not key.startswith("model.fc."):
            assert torch.equal(target.state_dict()[key], value), key
    assert target.model.fc.out_features == 3
    trainer.fit(target, train_dataloaders=data)  # a second fit neither reloads nor replaces the trained head
    assert not torch.equal(target.model.fc.weight, target.model.fc.weight.new_zeros(()))


def test_mismatched_keys_fail_with_one_message_listing_them(tmp_path):
    state = build_backbone("resnet18").state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["layer2.0.bn1.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(classifier("resnet18"), tmp_path / "bad.pth")
    message = str(err.value)
    assert "\n" not in message
    assert "model.layer1.0.conv1.weight" in message and "extra.weight" in message
    assert "model.layer2.0.bn1.bias (7,) vs (128,)" in message
    report = load_weights(classifier("resnet18"), tmp_path / "bad.pth", strict=False)
    assert report.loaded == len(state) - 2 - 2  # minus the bogus key, the bad shape and the head's 2


@pytest.mark.parametrize("kwargs,fragment", [
    ({"train": "last:0"}, "`train`='last:0'"),
    ({"train": "backbone"}, "`train`='backbone'"),
    ({"backbone_lr_factor": 0.0}, "`backbone_lr_factor`=0.0"),
    ({"num_classes": 0}, "`num_classes`=0"),
    ({"train": "last:2", "unfreeze": {3: "last:1"}}, "`unfreeze[3]`='last:1'"),
])
def test_bad_arguments_fail_in_one_line(kwargs, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        Finetune(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_head_that_does_not_exist_fails_in_one_line(tmp_path):
    trainer = cpu_trainer(tmp_path, callbacks=[Finetune(head="model.classifier")])
    with pytest.raises(InvalidArgumentError, match=r"`head`='model.classifier' is invalid: .*'model.fc'") as err:
        trainer.fit(classifier("resnet20"), train_dataloaders=loader())
    assert "\n" not in str(err.value)


def test_too_many_units_fails_in_one_line(tmp_path):
    trainer = cpu_trainer(tmp_path, callbacks=[Finetune(train="last:11")])
    with pytest.raises(InvalidArgumentError, match="has 10 backbone units"):
        trainer.fit(classifier("resnet20"), train_dataloaders=loader())


@pytest.mark.slow
def test_ddp_two_processes_frozen_layers_and_late_unfreezing(tmp_path):
    """Frozen layers raise no unused-parameter error; layers unfrozen after DDP wrapped the model stay equal
    on both ranks (their gradients are averaged by the callback)."""
    seed_everything(0)
    model = WithLoader("resnet20", num_classes=4, in_channels=3, image_size=16, schedule="none")
    before = snapshot(model)

    def probe(trainer, pl_module):
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    params = {n for n, _ in model.named_parameters()}

    rank0, rank1 = run_ddp(model, tmp_path=tmp_path, probe=probe, max_epochs=2,
                           callbacks=[Finetune(train="head", unfreeze={1: "last:1"})])
    for key in params:  # (running statistics of trained BatchNorms are per rank, as in any DDP run)
        assert torch.equal(rank0[key], rank1[key]), key
    for key in frozen_keys(model, ["model.fc.", "model.layer3.2."]):
        assert torch.equal(rank0[key], before[key]), key
    assert not torch.equal(rank0["model.layer3.2.conv1.weight"], before["model.layer3.2.conv1.weight"])


class PublicStyleModule(pl.LightningModule):
    """Written the way public projects write them: nll_loss on log_softmax, self.model(x), OneCycleLR per step,
    and the optimizer built on trainable parameters only (as Lightning's BaseFinetuning asks)."""

    def __init__(self, schedule="onecycle"):
        super().__init__()
        self.schedule = schedule
        self.model = build_backbone("resnet20", num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(F.log_softmax(self.model(x), dim=1), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)
        if self.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=12)
        else:  # linear warm-up then a per-step lambda decay: per-group lists inside a SequentialLR
            lr = torch.optim.lr_scheduler
            scheduler = lr.SequentialLR(optimizer, [lr.LinearLR(optimizer, 0.1, total_iters=3),
                                                    lr.LambdaLR(optimizer, lambda step: 0.9 ** step)], milestones=[3])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("schedule", ["onecycle", "sequential"])
def test_public_style_module_with_schedulers_and_a_filtered_optimizer(tmp_path, schedule):
    ratios = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            head, backbone = (g["lr"] for g in trainer.optimizers[0].param_groups)
            ratios.append(backbone / head)

    seed_everything(0)
    net = PublicStyleModule(schedule)
    before = snapshot(net)
    trainer = cpu_trainer(tmp_path, max_epochs=3,
                          callbacks=[Finetune(train="head", unfreeze={1: "last:1", 2: "all"}, backbone_lr_factor=0.2),
                                     Spy()])
    trainer.fit(net, train_dataloaders=loader())
    assert ratios == pytest.approx([0.2] * 12)
    after = net.state_dict()
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert "model.conv1.weight" in changed and "model.layer1.0.conv1.weight" in changed  # unfrozen at epoch 2


def test_fine_tuned_checkpoint_tests_and_resumes_without_the_weights_file(tmp_path):
    """`test`/resume with ckpt_path: the head is resized so the checkpoint loads; the weights file is not needed."""
    seed_everything(0)
    torch.save(classifier("resnet20", classes=4).state_dict(), tmp_path / "pre.pt")
    tuned = classifier("resnet20", classes=3)
    trainer = cpu_trainer(tmp_path, max_epochs=1, callbacks=[Finetune(weights=str(tmp_path / "pre.pt"))])
    data = loader(classes=3)
    trainer.fit(tuned, train_dataloaders=data)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    (tmp_path / "pre.pt").unlink()
    fresh = classifier("resnet20", classes=4)  # built for the pretraining task: its head is resized
    trainer = cpu_trainer(tmp_path, callbacks=[Finetune(weights=str(tmp_path / "pre.pt"), num_classes=3)])
    predictions = trainer.predict(fresh, dataloaders=data, ckpt_path=str(tmp_path / "tuned.ckpt"))
    assert predictions[0].shape == (8, 3)
    assert torch.equal(fresh.model.fc.weight, tuned.model.fc.weight)
    same_size = classifier("resnet20", classes=3)
    trainer = cpu_trainer(tmp_path, callbacks=[Finetune(weights=str(tmp_path / "pre.pt"))])
    trainer.validate(same_size, dataloaders=data, ckpt_path=str(tmp_path / "tuned.ckpt"), verbose=False)
    assert torch.equal(same_size.model.fc.weight, tuned.model.fc.weight)
    resumed = classifier("resnet20", classes=3)
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[Finetune(weights=str(tmp_path / "pre.pt"))])
    trainer.fit(resumed, train_dataloaders=data, ckpt_path=str(tmp_path / "tuned.ckpt"))
    assert trainer.current_epoch == 2


def test_a_missing_weights_file_fails_when_not_resuming(tmp_path):
    trainer = cpu_trainer(tmp_path, callbacks=[Finetune(weights=str(tmp_path / "nowhere.pth"))])
    with pytest.raises(FileNotFoundError, match="nowhere.pth' does not exist"):
        trainer.fit(classifier("resnet20"), train_dataloaders=loader())


def test_timm_safetensors_and_ddp_prefixed_files_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = build_backbone("timm:resnet18", num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "timm.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pt")
    for name in ("timm.safetensors", "ddp.pt"):
        target = classifier("timm:resnet18", classes=4)
        report = load_weights(target, tmp_path / name)
        assert report.model_prefix == "model." and len(report.skipped_head) == 2
        for key, value in source.state_dict().items():
            if not key.startswith("fc."):
                assert torch.equal(target.model.state_dict()[key], value), (name, key)


def test_a_gan_with_two_optimizers_is_refused_in_one_line_before_any_surgery(tmp_path):
    from lightning_tricks.core.validation import ConfigError
    from tests.training_style_modules import ToyGAN

    gan = ToyGAN()
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        cpu_trainer(tmp_path, callbacks=[Finetune(train="head", num_classes=3)]).fit(gan)
    assert str(err.value) == (
        "Finetune serves a classifier trained with one optimizer, but ToyGAN uses 2 (manual optimization, e.g. a GAN's "
        "generator and discriminator): it has no classifier head. Apply it to a classifier, or fine-tune "
        "the part you mean by hand (requires_grad_, param groups).")
    after = gan.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in gan.parameters())  # nothing frozen, no head replaced

    class LateOptimizers(ToyGAN):  # configure_optimizers needs what configure_model builds: counted at fit start
        def configure_model(self):
            self.ready = True

        def configure_optimizers(self):
            assert getattr(self, "ready", False)
            return super().configure_optimizers()

    late = LateOptimizers()
    with pytest.raises(ConfigError, match="but LateOptimizers uses 2 "):
        cpu_trainer(tmp_path, callbacks=[Finetune(train="head")]).fit(late)
    assert late.batches_seen == 0  # refused before any training step


def test_old_module_path_lightning_tricks_finetune_warns_and_gives_the_same_class(monkeypatch):
    import importlib
    import sys

    import lightning_tricks.transfer as transfer

    monkeypatch.delitem(sys.modules, "lightning_tricks.finetune", raising=False)
    with pytest.warns(DeprecationWarning, match="lightning_tricks.transfer.finetune"):
        old = importlib.import_module("lightning_tricks.finetune")
    assert old.Finetune is Finetune is transfer.Finetune
    assert old.check_finetune_args is transfer.check_finetune_args


@pytest.mark.parametrize("kind", ["onecycle", "sequential_lambda", "plateau"])
def test_split_groups_remap_every_scheduler_list_through_its_state_dict(kind):
    """After one group becomes head + backbone (x0.2), every per-group list and get_last_lr() follow, and a step
    keeps the 1 : 0.2 ratio (reference: the same scheduler built on two groups from the start)."""
    from lightning_tricks.transfer.finetune import _remap_scheduler, _split_groups

    lr = torch.optim.lr_scheduler

    def build(groups):
        optimizer = torch.optim.SGD(groups, lr=0.1)
        if kind == "onecycle":
            return optimizer, lr.OneCycleLR(optimizer, max_lr=[g.get("lr", 0.1) for g in optimizer.param_groups],
                                            total_steps=10)
        if kind == "plateau":
            return optimizer, lr.ReduceLROnPlateau(optimizer)
        return optimizer, lr.SequentialLR(optimizer, [lr.LinearLR(optimizer, 0.5, total_iters=2),
                                                      lr.LambdaLR(optimizer, lambda step: 0.9 ** step)], milestones=[2])

    head, body = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer, scheduler = build([{"params": [head, body]}])
    _remap_scheduler(scheduler, _split_groups(optimizer, {id(head)}, 0.2, []))
    ref_optimizer, reference = build([{"params": [head]}, {"params": [body], "lr": 0.02}])
    assert len(scheduler.get_last_lr()) == 2
    assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
    for _ in range(4):
        optimizer.step()
        ref_optimizer.step()
        scheduler.step(1.0) if kind == "plateau" else scheduler.step()
        reference.step(1.0) if kind == "plateau" else reference.step()
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr"] for g in ref_optimizer.param_groups])
        assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
