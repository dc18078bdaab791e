"""Ensembles: voting against brute force, member loading, fast path vs loop, the Ensemble module, CLI, DDP.

SnapshotEnsemble and EMAMembers have their own files (test_ensemble_snapshot.py, test_ensemble_ema.py)."""

from __future__ import annotations

import itertools
import json
import types
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_tricks import Ensemble
from lightning_tricks.cli import build_cli, main
from lightning_tricks.core.validation import DataNotFoundError, InvalidArgumentError
from lightning_tricks.ensemble import (
    CheckpointError,
    UnsafeCheckpointError,
    fit_vote_weights,
    hard_vote,
    load_member,
    soft_vote,
    vote_shares,
)
from lightning_tricks.zoo import DigitsDataModule, ImageClassifier, build_backbone
from tests.ensemble_modules import ImageNetStyle, PlainNet, digits, randomize_norm_stats, save_member
from tests.helpers import REPO, cpu_trainer, run_cli, run_ddp

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.accelerator=cpu"]


class RankMetricsReport(Callback):
    """Writes each rank's synced test metrics (for the CLI DDP test)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_test_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"world_size": trainer.world_size, "metrics": metrics}))


@pytest.fixture(scope="module")
def zoo_checkpoints(tmp_path_factory) -> list[str]:
    """Two checkpoints of different zoo architectures, written by the CLI (so they record `_class_path`)."""
    root = tmp_path_factory.mktemp("members")
    paths = []
    for backbone in ("simple_cnn", "mlp"):
        build_cli(["fit", "--model=ImageClassifier", f"--model.backbone={backbone}", "--model.schedule=none",
                   "--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=0",
                   f"--trainer.default_root_dir={root / backbone}", *QUIET])
        (path,) = (root / backbone).rglob("*.ckpt")
        paths.append(str(path))
    return paths



# ------------------------------------------------------------------------------------------------------------
# voting: the functional core against brute force


def test_soft_vote_is_the_mean_of_member_softmax_and_equal_weights_are_soft():
    logits = torch.randn(4, 32, 7, generator=torch.Generator().manual_seed(0)) * 3
    one_by_one = sum(F.softmax(logits[m], dim=-1) for m in range(4)) / 4
    torch.testing.assert_close(soft_vote(logits), one_by_one, rtol=0, atol=1e-7)
    torch.testing.assert_close(soft_vote(logits, [2.0, 2.0, 2.0, 2.0]), soft_vote(logits), rtol=0, atol=1e-7)
    weighted = (3 * F.softmax(logits[0], -1) + F.softmax(logits[1], -1)) / 4
    torch.testing.assert_close(soft_vote(logits, [3, 1, 0, 0]), weighted, rtol=0, atol=1e-7)


def test_hard_vote_is_the_per_sample_majority_with_documented_ties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 200, 3, generator=g)  # 4 members, 3 classes: many 2-2 and 2-1-1 ties
    got = hard_vote(logits)
    probs = F.softmax(logits, -1).mean(0)
    for n in range(logits.shape[1]):
        counts = Counter(logits[:, n].argmax(-1).tolist())
        top = max(counts.values())
        tied = sorted(c for c, k in counts.items() if k == top)
        expected = max(tied, key=lambda c: (probs[n, c].item(), -c))
        assert got[n].item() == expected
    shares = vote_shares(logits)
    assert torch.allclose(shares.sum(-1), torch.ones(200)) and set(shares.unique().tolist()) <= {0, .25, .5, .75, 1}


def test_weighted_hard_vote_and_all_tied_sample():
    # member 0 says class 2, members 1 and 2 say class 0: weight 3 outvotes 1 + 1
    logits = torch.tensor([[[0.0, 0.0, 5.0]], [[5.0, 0.0, 0.0]], [[4.0, 0.0, 1.0]]])
    assert hard_vote(logits).item() == 0
    assert hard_vote(logits, [3.0, 1.0, 1.0]).item() == 2
    # three members, three different classes: the class with the highest mean probability wins
    tie = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]], [[0.0, 1.9, 2.0]]])
    assert hard_vote(tie).item() == 1


def test_fit_vote_weights_reaches_the_likelihood_optimum():
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 5, (300,), generator=g)
    truth = F.one_hot(targets, 5).float()
    members = torch.stack([3 * truth + torch.randn(300, 5, generator=g) * s for s in (1.5, 1.8, 2.1)])
    weights = fit_vote_weights(members, targets)
    assert weights.shape == (3,) and abs(weights.sum().item() - 1) < 1e-9 and (weights >= 0).all()
    likelihood = members.double().softmax(-1).gather(-1, targets.view(1, -1, 1).expand(3, -1, 1)).squeeze(-1)
    grid = torch.tensor([(a / 50, b / 50, 1 - (a + b) / 50) for a, b in itertools.product(range(51), repeat=2)
                         if a + b <= 50], dtype=torch.float64)
    grid_nll = -(grid @ likelihood).log().mean(dim=1)
    fitted_nll = -(weights @ likelihood).log().mean()
    assert fitted_nll <= grid_nll.min() + 1e-6 and (weights > 0.01).all()  # an interior optimum
    noise = torch.randn(300, 5, generator=g) * 0.01  # a member that knows nothing gets (almost) no weight
    assert fit_vote_weights(torch.stack([members[0], noise]), targets)[1] < 0.05


@pytest.mark.parametrize("weights,message", [
    ([1.0], "expected 2 weights, one per member"),
    ([1.0, -0.5], "expected finite non-negative numbers"),
    ([0.0, 0.0], "expected at least one positive weight"),
    ([1.0, float("nan")], "expected finite non-negative numbers"),
])
def test_bad_weights_are_clear_errors(weights, message):
    with pytest.raises(InvalidArgumentError, match=message):
        soft_vote(torch.zeros(2, 3, 4), weights)
    with pytest.raises(InvalidArgumentError, match=message):
        Ensemble(checkpoints=["a.ckpt", "b.ckpt"], voting="weighted", weights=weights)


@pytest.mark.parametrize("kwargs,message", [
    ({"checkpoints": []}, "`checkpoints`=[] is invalid: expected at least one checkpoint"),
    ({}, "`checkpoints`=[] is invalid"),
    ({"checkpoints": "a.ckpt"}, "expected a list of .ckpt paths"),
    ({"checkpoints": ["a.ckpt"], "voting": "median"}, "`voting`='median' is invalid: expected one of 'soft'"),
    ({"checkpoints": ["a.ckpt"], "fast_path": "gpu"}, "`fast_path`='gpu' is invalid"),
    ({"checkpoints": ["a.ckpt"], "weights": [1.0]}, "use voting='weighted'"),
    ({"checkpoints": ["a.ckpt"], "ema_members": "both", "voting": "weighted", "weights": [1.0]},
     "expected 2 weights"),
    ({"checkpoints": ["a.ckpt", "b.ckpt"], "member_class": ["x.Y"]}, "a list of 2, one per checkpoint"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgumentError) as err:
        Ensemble(**kwargs)
    assert message in str(err.value)

# ------------------------------------------------------------------------------------------------------------
# fast path


def test_fast_path_equals_loop_with_batchnorm_in_eval_and_mixed_architectures():
    torch.manual_seed(0)
    cnns = [randomize_norm_stats(ImageClassifier("simple_cnn", in_channels=1, backbone_kwargs={"width": 8}), s)
            for s in range(3)]
    others = [ImageClassifier("mlp", in_channels=1, image_size=8).eval(),
              randomize_norm_stats(ImageClassifier("resnet20", in_channels=1, backbone_kwargs={"width": 4}), 9)]
    x = torch.randn(16, 1, 8, 8)
    fast = Ensemble(members=[*cnns[:2], *others, cnns[2]], fast_path="vmap")
    loop = Ensemble(members=[*cnns[:2], *others, cnns[2]], fast_path="loop")
    fast_logits, loop_logits = fast.member_logits(x), loop.member_logits(x)
    assert fast.execution_plan() == ["vmap", "vmap", "loop", "loop", "vmap"]
    assert loop.execution_plan() == ["loop"] * 5
    torch.testing.assert_close(fast_logits, loop_logits, rtol=0, atol=1e-5)
    one_by_one = torch.stack([m(x) for m in [*cnns[:2], *others, cnns[2]]])
    torch.testing.assert_close(loop_logits, one_by_one, rtol=0, atol=0)
    torch.testing.assert_close(loop(x), soft_vote(one_by_one), rtol=0, atol=0)
    equal_weights = Ensemble(members=[*cnns[:2], *others, cnns[2]], voting="weighted", weights=[0.5] * 5)
    torch.testing.assert_close(equal_weights(x), loop(x), rtol=0, atol=1e-7)
    # weights changed in place after stacking reach the vectorized path; replaced tensors are re-stacked
    with torch.no_grad():
        cnns[0].model.head[-1].bias.add_(1.0)
        cnns[1].model.head[-1].weight = nn.Parameter(cnns[1].model.head[-1].weight * 2)
    torch.testing.assert_close(fast.member_logits(x), torch.stack([m(x) for m in [*cnns[:2], *others, cnns[2]]]),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tv:resnet18", "timm:test_resnet"])
def test_fast_path_equals_loop_for_torchvision_and_timm(backbone):
    torch.manual_seed(0)
    members = [randomize_norm_stats(build_backbone(backbone, num_classes=10, in_channels=3), s) for s in range(2)]
    x = torch.randn(2, 3, 32, 32)
    fast = Ensemble(members=members, fast_path="vmap", num_classes=10)
    torch.testing.assert_close(fast.member_logits(x), torch.stack([m(x) for m in members]), rtol=1e-5, atol=1e-5)
    assert fast.execution_plan() == ["vmap", "vmap"]


class Scaled(nn.Module):
    """Same parameters as its siblings but a Python setting (not in extra_repr) that changes the output."""

    def __init__(self, scale: float, data_dependent: bool = False) -> None:
        super().__init__()
        self.linear, self.scale, self.data_dependent = nn.Linear(4, 3), scale, data_dependent

    def forward(self, x):
        if self.data_dependent and self.linear.weight.sum().item() > -1e9:  # .item() of a batched tensor: not vmap-able
            return self.linear(x)
        return self.linear(x) * self.scale


def test_probe_falls_back_to_the_loop_when_vmap_cannot_serve_and_vmap_says_why():
    x = torch.randn(5, 4)
    torch.manual_seed(0)
    different = [Scaled(1.0), Scaled(3.0)]
    with pytest.warns(UserWarning, match="outputs differ"):
        auto = Ensemble(members=different, num_classes=3, fast_path="probe")
        torch.testing.assert_close(auto.member_logits(x), torch.stack([m(x) for m in different]))
    assert auto.execution_plan() == ["loop", "loop"]
    with pytest.raises(InvalidArgumentError, match="`fast_path`='vmap' cannot serve members .* outputs differ"):
        Ensemble(members=different, fast_path="vmap", num_classes=3).member_logits(x)
    dynamic = [Scaled(1.0, data_dependent=True), Scaled(1.0, data_dependent=True)]
    with pytest.raises(InvalidArgumentError, match="vmap cannot run it"):
        Ensemble(members=dynamic, fast_path="vmap", num_classes=3).member_logits(x)
    with pytest.warns(UserWarning, match="vmap cannot run it"):
        assert Ensemble(members=dynamic, num_classes=3, fast_path="probe").member_logits(x).shape == (2, 5, 3)


class ProbeClock:
    """A clock for the probe that advances only when a member says what its call cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costed(nn.Module):
    """A member whose cost is known: ``loop_ms`` per call one by one, ``vmap_ms`` per vectorized call (when
    ``functional_call`` has swapped in the stacked parameters), charged to a ``ProbeClock``."""

    def __init__(self, clock: ProbeClock, loop_ms: float, vmap_ms: float) -> None:
        super().__init__()
        self.linear, self.clock, self.loop_ms, self.vmap_ms = nn.Linear(4, 3), clock, loop_ms, vmap_ms
        self.own_weight = [self.linear.weight]  # a list, so that it is not a registered parameter

    def extra_repr(self) -> str:
        return f"loop_ms={self.loop_ms}, vmap_ms={self.vmap_ms}"

    def forward(self, x):
        vectorized = self.linear.weight is not self.own_weight[0]
        self.clock.now += (self.vmap_ms if vectorized else self.loop_ms) / 1000
        return self.linear(x)


@pytest.mark.parametrize("loop_ms,vmap_ms,expected", [(10, 10, "vmap"), (2, 30, "loop")])
def test_probe_picks_the_faster_path(loop_ms, vmap_ms, expected, monkeypatch):
    from lightning_tricks.ensemble import _vmap

    clock = ProbeClock()
    monkeypatch.setattr(_vmap, "clock", clock)
    members = [Costed(clock, loop_ms, vmap_ms) for _ in range(3)]  # loop: 3 calls; vmap: 1 call
    auto = Ensemble(members=members, num_classes=3, fast_path="probe")
    x = torch.randn(5, 4)
    torch.testing.assert_close(auto.member_logits(x), torch.stack([m(x) for m in members]), rtol=0, atol=1e-6)
    assert auto.execution_plan() == [expected] * 3


def test_probe_decides_once_and_auto_is_the_loop_on_cpu():
    torch.manual_seed(0)
    members = [randomize_norm_stats(ImageClassifier("simple_cnn", in_channels=1, backbone_kwargs={"width": 8}), s)
               for s in range(3)]
    probe, auto = Ensemble(members=members, fast_path="probe"), Ensemble(members=members)
    x = torch.randn(32, 1, 8, 8)
    assert probe.execution_plan() == auto.execution_plan() == ["undecided"] * 3
    out = probe.member_logits(x)
    plan = probe.execution_plan()
    assert plan in (["vmap"] * 3, ["loop"] * 3)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), rtol=0, atol=1e-5)
    probe.member_logits(x)
    assert probe.execution_plan() == plan
    torch.testing.assert_close(auto.member_logits(x), torch.stack([m(x) for m in members]), rtol=0, atol=0)
    assert auto.execution_plan() == ["loop"] * 3 and auto._stacks == {}


# ------------------------------------------------------------------------------------------------------------
# checkpoints: CLI, safe loading, classes


def _member_outputs(paths: list[str], datamodule: DigitsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule.setup("test")
    x, y = datamodule.test_set.tensors
    with torch.no_grad():
        return torch.stack([load_member(p)(x) for p in paths]), y


def test_cli_ensemble_of_two_zoo_architectures_logs_members_side_by_side(zoo_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["test", "--model=Ensemble", f"--model.checkpoints=[{', '.join(zoo_checkpoints)}]",
                     "--data=DigitsDataModule", "--data.eval_batch_size=45", *QUIET])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    logits, y = _member_outputs(zoo_checkpoints, DigitsDataModule())
    member_acc = [(logits[i].argmax(-1) == y).float().mean().item() for i in range(2)]
    assert metrics["test_acc"] == pytest.approx((soft_vote(logits).argmax(-1) == y).float().mean().item(), abs=1e-6)
    assert metrics["test_acc_member_0"] == pytest.approx(member_acc[0], abs=1e-6)
    assert metrics["test_acc_member_1"] == pytest.approx(member_acc[1], abs=1e-6)
    assert metrics["test_acc_member_mean"] == pytest.approx(sum(member_acc) / 2, abs=1e-6)
    nll = F.nll_loss(soft_vote(logits).log(), y).item()
    assert metrics["test_loss"] == pytest.approx(nll, abs=1e-5)
    assert metrics["test_loss_member_1"] == pytest.approx(F.cross_entropy(logits[1], y).item(), abs=1e-5)
    assert [type(m.model).__name__ for m in cli.model.members] == ["SimpleCNN", "MLP"]


@pytest.mark.parametrize("voting", ["hard", "weighted"])
def test_hard_and_fitted_weighted_voting_through_the_trainer(zoo_checkpoints, voting, tmp_path):
    dm = digits()
    ensemble = Ensemble(checkpoints=zoo_checkpoints, voting=voting)
    metrics = cpu_trainer(tmp_path).test(ensemble, datamodule=dm, verbose=False)[0]
    logits, y = _member_outputs(zoo_checkpoints, dm)
    if voting == "hard":
        expected = hard_vote(logits)
        assert "test_loss" not in metrics
    else:
        x_val, y_val = dm.val_set.tensors
        with torch.no_grad():
            val_logits = torch.stack([load_member(p)(x_val) for p in zoo_checkpoints])
        weights = fit_vote_weights(val_logits, y_val).float()
        torch.testing.assert_close(ensemble.vote_weights, weights, rtol=0, atol=1e-6)
        expected = soft_vote(logits, weights).argmax(-1)
    assert metrics["test_acc"] == pytest.approx((expected == y).float().mean().item(), abs=1e-6)
    out = cpu_trainer(tmp_path).predict(ensemble, dataloaders=dm.test_dataloader())
    preds = torch.cat([batch["preds"] for batch in out])
    assert torch.equal(preds, expected) and out[0]["probs"].shape == (45, 10)


class PayloadNote:
    """An arbitrary object whose unpickling runs code (creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_an_arbitrary_pickled_object_is_refused_by_default(zoo_checkpoints, tmp_path):
    checkpoint = torch.load(zoo_checkpoints[1], weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["hyper_parameters"]["note"] = PayloadNote(marker)  # not an __init__ argument: dropped when built
    path = tmp_path / "payload.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        Ensemble(checkpoints=[str(path)]).load_members()
    message = str(err.value)
    assert "`checkpoints`[0]=" in message and "open" in message and "arbitrary code" in message
    assert "trust_checkpoints=True" in message and "`trust_checkpoints: true`" in message
    assert not marker.exists(), "refusing must happen before any unpickling code runs"
    trusted = Ensemble(checkpoints=[str(path)], trust_checkpoints=True)
    assert len(trusted.load_members()) == 1 and marker.exists()  # the opt-in runs the file's code: the risk


def test_class_resolution_missing_files_and_mismatched_classes(tmp_path):
    model = PlainNet()
    plain = save_member(model, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="does not record its LightningModule class.*member_class="):
        Ensemble(checkpoints=[str(plain)]).load_members()
    for spec in ("tests.ensemble_modules.PlainNet", PlainNet):
        (member,) = Ensemble(checkpoints=[str(plain)], member_class=spec).load_members()
        assert type(member) is PlainNet and torch.equal(member.net[1].weight, model.net[1].weight)
    unimported = save_member(model, tmp_path / "named.ckpt", class_path="some_unimported_package.Net")
    with pytest.raises(CheckpointError, match="whose module is not imported; importing a module named by a file"):
        Ensemble(checkpoints=[str(unimported)]).load_members()
    with pytest.raises(DataNotFoundError, match=r"`checkpoints`\[1\]='.*nope.ckpt' does not exist"):
        Ensemble(checkpoints=[str(plain), str(tmp_path / "nope.ckpt")], member_class=PlainNet).load_members()
    five = save_member(PlainNet(num_classes=5), tmp_path / "five.ckpt")
    with pytest.raises(InvalidArgumentError, match="different numbers of classes .*plain.ckpt: 10, five.ckpt: 5"):
        Ensemble(checkpoints=[str(plain), str(five)], member_class=PlainNet).load_members()
    zoo = save_member(ImageClassifier("mlp", num_classes=5), tmp_path / "zoo5.ckpt", "lightning_tricks.ImageClassifier")
    with pytest.raises(InvalidArgumentError, match="members predict 5 classes but the datamodule has num_classes=10"):
        cpu_trainer(tmp_path).test(Ensemble(checkpoints=[str(zoo)]), datamodule=digits())


def test_member_kwargs_build_a_module_whose_constructor_needs_more_than_its_hparams(tmp_path):
    pl.seed_everything(0)
    trainer = cpu_trainer(tmp_path, limit_train_batches=3, limit_val_batches=0)
    model = ImageNetStyle(data_path=str(tmp_path / "imagenet"))
    trainer.fit(model, datamodule=digits())
    path = tmp_path / "imagenet.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing 1 required positional argument: 'data_path'.*member_kwargs="):
        Ensemble(checkpoints=[str(path)], member_class=ImageNetStyle).load_members()
    kwargs = {"data_path": "/elsewhere/imagenet"}
    ensemble = Ensemble(checkpoints=[str(path), str(path)], member_class=ImageNetStyle, member_kwargs=kwargs)
    members = ensemble.load_members()
    assert [m.data_path for m in members] == ["/elsewhere/imagenet"] * 2
    assert all(torch.equal(m.model[1].weight, model.model[1].weight) for m in members)
    assert load_member(path, ImageNetStyle, member_kwargs=kwargs).data_path == "/elsewhere/imagenet"
    dm = digits()
    metrics = cpu_trainer(tmp_path).test(ensemble, datamodule=dm, verbose=False)[0]
    x, y = dm.test_set.tensors
    with torch.no_grad():
        expected = (model.eval()(x).argmax(-1) == y).float().mean().item()
    assert metrics["test_acc"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InvalidArgumentError, match="`member_kwargs`=.* expected a dict"):
        Ensemble(checkpoints=[str(path)], member_kwargs=["data_path"])


def test_a_checkpoint_of_an_old_lightning_version_is_migrated_and_loads(tmp_path, caplog):
    model = PlainNet()
    path = save_member(model, tmp_path / "old.ckpt", epoch=3, global_step=40)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["pytorch-lightning_version"] = "1.5.0"
    torch.save(checkpoint, path)
    with caplog.at_level("INFO"):
        (member,) = Ensemble(checkpoints=[str(path)], member_class=PlainNet).load_members()
    assert "upgraded your loaded checkpoint from v1.5.0" in caplog.text  # Lightning's own migration ran
    assert torch.equal(member.net[1].weight, model.net[1].weight)


def test_missing_path_fails_at_construction_in_one_line(tmp_path):
    plain = save_member(PlainNet(), tmp_path / "plain.ckpt")
    missing = tmp_path / "runs" / "nope.ckpt"
    with pytest.raises(DataNotFoundError) as err:
        Ensemble(checkpoints=[str(plain), str(missing)], member_class=PlainNet)
    assert str(err.value) == (f"`checkpoints`[1]={str(missing)!r} does not exist: expected a Lightning checkpoint "
                              "file (.ckpt).")


@pytest.mark.parametrize("content", [bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                                         dtype=torch.uint8).tolist()),
                                     b"", b"\x80\x02 a pickle, not a torch file", b"epoch,loss\n1,0.5\n"],
                         ids=["random", "empty", "pickle-like", "text"])
def test_a_file_that_is_not_a_checkpoint_says_so(content, tmp_path):
    path = tmp_path / "member.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:  # when the Ensemble is built, not at test time
        Ensemble(checkpoints=[str(path)], member_class=PlainNet)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert "is not a PyTorch checkpoint" in str(err.value) and "trust_checkpoints" not in str(err.value)
    assert str(path) in str(err.value)


def test_every_member_gets_the_tricks_its_checkpoint_records_before_its_weights_load(tmp_path, monkeypatch):
    import lightning_tricks.ensemble.loading as loading

    def apply_marker_trick(module, checkpoint):  # like a structural trick: converts and adds a marker buffer
        calls.append((module, checkpoint))
        if checkpoint.get("tricks") and not hasattr(module.net[1], "marker"):
            module.net[1].register_buffer("marker", torch.ones(1))
        return ["Marker"] if checkpoint.get("tricks") else []

    calls: list = []
    monkeypatch.setattr(loading, "apply_recorded_tricks", apply_marker_trick)
    model = PlainNet()
    path = save_member(model, tmp_path / "plain.ckpt", current_model_state=PlainNet().state_dict())
    members = Ensemble(checkpoints=[str(path)], member_class=PlainNet, ema_members="both").load_members()
    assert len(calls) == 1 and calls[0][0] is members[0]  # the raw member is a copy made after it
    assert torch.equal(calls[0][1]["state_dict"]["net.1.weight"], model.net[1].weight)
    assert load_member(path, PlainNet) is calls[1][0] and len(calls) == 2
    # a checkpoint whose converted modules hold a buffer the plain module lacks: a strict load works only
    # if the trick is applied first
    model.net[1].register_buffer("marker", torch.full((1,), 7.0))
    converted = save_member(model, tmp_path / "converted.ckpt", tricks=["Marker"])
    (member,) = Ensemble(checkpoints=[str(converted)], member_class=PlainNet).load_members()
    assert torch.equal(member.net[1].marker, torch.full((1,), 7.0))
    assert "on_load_checkpoint" not in PlainNet.__dict__  # the class is left as it was


def test_undeclared_class_counts_fail_at_the_first_batch_before_any_metric(tmp_path):
    members = [nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()), nn.Sequential(nn.Conv2d(1, 7, 8), nn.Flatten())]
    ensemble = Ensemble(members=members)  # a convolution head: the class count shows at the first output
    with pytest.raises(InvalidArgumentError, match=r"output different numbers of classes \(members\[0\]"):
        cpu_trainer(tmp_path).test(ensemble, datamodule=digits())
    assert ensemble._metrics == {}


def test_cli_bad_input_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in [(["--model.checkpoints=[]"], "`checkpoints`=[] is invalid"),
                          (["--model.checkpoints=[missing.ckpt]"], "`checkpoints`[0]='missing.ckpt' does not exist")]:
        with pytest.raises(SystemExit) as exc:
            main(["test", "--model=Ensemble", *args, *QUIET])
        assert exc.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("lightning-tricks: error: ") and message in last


# ------------------------------------------------------------------------------------------------------------
# DDP


def test_ddp_metrics_equal_single_process(zoo_checkpoints, tmp_path):
    single = cpu_trainer(tmp_path).test(Ensemble(checkpoints=zoo_checkpoints, fast_path="loop"), datamodule=digits(),
                                        verbose=False)[0]
    ranks = run_ddp(Ensemble(checkpoints=zoo_checkpoints, fast_path="loop"), digits(), tmp_path=tmp_path, fn="test",
                    probe=lambda trainer, module: {k: float(v) for k, v in trainer.callback_metrics.items()})
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == set(single) and len(single) == 8
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-6), key


def test_ddp_metrics_exact_on_a_set_that_would_be_padded(zoo_checkpoints, tmp_path):
    from lightning_tricks.zoo import SyntheticDataModule

    def data():  # 45 test images: DistributedSampler would pad them to 46
        return SyntheticDataModule(num_samples=180, num_classes=10, image_shape=[1, 8, 8], batch_size=4, seed=1)

    single = cpu_trainer(tmp_path).test(Ensemble(checkpoints=zoo_checkpoints, fast_path="loop"), datamodule=data(),
                                        verbose=False)[0]
    ranks = run_ddp(Ensemble(checkpoints=zoo_checkpoints, fast_path="loop"), data(), tmp_path=tmp_path, fn="test",
                    probe=lambda trainer, module: {k: float(v) for k, v in trainer.callback_metrics.items()})
    assert ranks[0] == ranks[1]
    for key, value in single.items():
        if "acc" in key:
            assert ranks[0][key] == pytest.approx(value, abs=1e-6), key


def test_padded_distributed_evaluation_is_announced():
    dataset = torch.utils.data.TensorDataset(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, sampler=torch.utils.data.DistributedSampler(dataset, 2, 0))
    ensemble = Ensemble(members=[PlainNet()])
    ensemble._trainer = types.SimpleNamespace(world_size=2)
    with pytest.warns(UserWarning, match="pads the 5 evaluation samples with 1 duplicates"):
        ensemble._warn_padding([loader])
    even = torch.utils.data.Subset(dataset, range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble._warn_padding(torch.utils.data.DataLoader(even, sampler=torch.utils.data.DistributedSampler(even, 2, 0)))

# ------------------------------------------------------------------------------------------------------------
# the example config through the CLI under DDP (one subprocess)


@pytest.mark.slow
def test_example_config_cli_ddp_equals_single_process(zoo_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints = f"--model.checkpoints=[{', '.join(zoo_checkpoints)}]"
    single = build_cli(["test", "--config", str(REPO / "examples" / "ensemble.yaml"), checkpoints,
                        "--data.eval_batch_size=45", "--trainer.logger=false"])
    expected = {k: float(v) for k, v in single.trainer.callback_metrics.items()}
    out = tmp_path / "ranks"
    proc = run_cli(["test", "--config", str(REPO / "examples" / "ensemble.yaml"), checkpoints,
                    "--data.eval_batch_size=45", "--trainer.logger=false", "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--trainer.callbacks+=tests.test_ensemble.RankMetricsReport",
                    f"--trainer.callbacks.out_dir={out}"], cwd=tmp_path)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in reports)
    for key, value in expected.items():
        assert reports[0]["metrics"][key] == reports[1]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert "Test accuracy:" in proc.stdout
