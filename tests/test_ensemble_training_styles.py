"""Ensembles and the ways real projects train: Standardize-trained members, diverged snapshots, dict batches, GANs,
and every member checked when the Ensemble is built (issue 20 points 3 and 5, issue 23 point 5)."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import Ensemble, SnapshotEnsemble, Standardize
from lightning_tricks.checkpoint import recorded_input_statistics
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.ensemble import CheckpointError, soft_vote
from lightning_tricks.ensemble.screening import exclusions
from lightning_tricks.regularization import BatchFormatError
from lightning_tricks.zoo import ImageClassifier
from tests.ensemble_modules import PlainNet, digits, save_member
from tests.helpers import cpu_trainer
from tests.training_style_modules import DictBatchNet, ToyGAN, dict_loader, synthetic


def _quiet_test(tmp_path, module, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = cpu_trainer(tmp_path, **kwargs.pop("trainer", {})).test(module, verbose=False, **kwargs)[0]
    return metrics, [str(w.message) for w in caught if str(w.message).startswith("Ensemble")]


def _loader(seed: int, n: int = 96, shuffle: bool = False) -> DataLoader:
    x, y = synthetic(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle)


def _by_formula(member: nn.Module, train_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The member's logits on ``x`` standardized per channel with the training set's mean and population std."""
    mean, std = train_x.double().mean(), train_x.double().std(unbiased=False)
    with torch.no_grad():
        return member.eval()(((x.double() - mean) / std).float())


# ------------------------------------------------------------------------------------------------------------
# Standardize-trained members


@pytest.fixture(scope="module")
def standardized(tmp_path_factory):
    """A PlainNet trained with Standardize on inputs of mean ~5: its full checkpoint and its snapshots."""
    root = tmp_path_factory.mktemp("standardized")
    pl.seed_everything(0)
    snapshots = SnapshotEnsemble(cycles=2, lr=0.05, dirpath=str(root / "snaps"))
    last = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    trainer = cpu_trainer(root, max_epochs=4, enable_checkpointing=True, callbacks=[Standardize(), snapshots, last])
    model = PlainNet(num_classes=4, lr=0.05)
    trainer.fit(model, train_dataloaders=_loader(0, shuffle=True))
    return {"trainer": trainer, "model": model, "snapshots": snapshots, "last": str(root / "ckpt" / "last.ckpt"),
            "train_x": synthetic(96, 0)[0]}


def test_an_ensemble_of_one_standardize_trained_member_equals_the_member_with_standardize(standardized, tmp_path):
    x, y = synthetic(96, 1)
    member = PlainNet.load_from_checkpoint(standardized["last"])
    logits = _by_formula(member, standardized["train_x"], x)
    expected_loss = F.cross_entropy(logits, y).item()
    with torch.no_grad():  # the trap: on raw inputs the member computes something else
        assert (member(x) - logits).abs().max() > 1.0
    ensemble = Ensemble(checkpoints=[standardized["last"]], member_class=PlainNet)
    metrics, _ = _quiet_test(tmp_path, ensemble, dataloaders=_loader(1))
    assert metrics["test_loss_member_0"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert metrics["test_acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=1e-6)
    torch.testing.assert_close(ensemble(x), F.softmax(logits, -1), atol=1e-5, rtol=1e-4)  # plain Python too
    # a trainer that holds a Standardize (no statistics: a new run) neither fails nor normalizes twice
    again, _ = _quiet_test(tmp_path, ensemble, dataloaders=_loader(1), trainer={"callbacks": [Standardize()]})
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


def test_snapshots_record_standardize_and_every_way_to_build_their_ensemble_agrees(standardized, tmp_path):
    snapshots = standardized["snapshots"]
    x, y = synthetic(96, 1)
    for path in snapshots.snapshot_paths:  # weights-only files, with our record of the statistics
        saved = torch.load(path, weights_only=True)
        assert "callbacks" not in saved and len(saved["lightning_tricks"]["inputs"]) == 1
        (stats,) = recorded_input_statistics(saved)
        assert stats.mean.item() == pytest.approx(standardized["train_x"].double().mean().item(), rel=1e-9)
    members = [PlainNet.load_from_checkpoint(p) for p in snapshots.snapshot_paths]
    expected = soft_vote(torch.stack([_by_formula(m, standardized["train_x"], x) for m in members]))
    from_files = Ensemble(checkpoints=snapshots.snapshot_paths, member_class=PlainNet)  # what ensemble.yaml builds
    in_process = snapshots.ensemble()  # copies of the trained module
    for ensemble in (from_files, in_process):
        torch.testing.assert_close(ensemble(x), expected, atol=1e-5, rtol=1e-4)
    # evaluated by the trainer that trained them (its Standardize holds the statistics): no double normalization
    trainer = standardized["trainer"]
    metrics = trainer.test(in_process, dataloaders=_loader(1), verbose=False)[0]
    assert metrics["test_loss"] == pytest.approx(F.nll_loss(expected.log(), y).item(), rel=1e-4)


def test_members_without_records_take_the_trainers_statistics(standardized, tmp_path):
    # a Python member has no checkpoint: the trainer that trained it (with its Standardize) supplies them
    x, y = synthetic(96, 1)
    member = copy.deepcopy(standardized["model"])
    metrics = standardized["trainer"].test(Ensemble(members=[member]), dataloaders=_loader(1), verbose=False)[0]
    expected = F.cross_entropy(_by_formula(member, standardized["train_x"], x), y).item()
    assert metrics["test_loss_member_0"] == pytest.approx(expected, rel=1e-5)
    # a trainer whose Standardize has no statistics: one warning line, the inputs as they come
    _, messages = _quiet_test(tmp_path, Ensemble(members=[member], max_loss_ratio=None), dataloaders=_loader(1),
                              trainer={"callbacks": [Standardize()]})
    assert [m for m in messages if "Standardize" in m] == [
        "Ensemble: members members[0]:PlainNet record no Standardize statistics and the trainer's Standardize has none "
        "(it computes them when fit starts), so those members get the inputs as they come; remove Standardize from "
        "this trainer if they were trained without it, else give checkpoints saved with their callbacks' state (not "
        "weights-only)."]


# ------------------------------------------------------------------------------------------------------------
# members whose loss diverged are not voted


@pytest.fixture(scope="module")
def trained_pair():
    pl.seed_everything(1)
    dm = digits()
    members = []
    for seed in (1, 2):
        pl.seed_everything(seed)
        model = PlainNet(lr=0.1)
        cpu_trainer("/tmp", max_epochs=2, limit_val_batches=0).fit(model, datamodule=dm)
        members.append(model.eval())
    return members


def _diverged(model: nn.Module, scale: float) -> nn.Module:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.net[3].weight.mul_(scale)
        bad.net[3].bias.normal_(generator=torch.Generator().manual_seed(0)).mul_(scale)
    return bad


def _val_loss(model: nn.Module, dm) -> float:
    dm.setup("validate")
    x, y = dm.val_dataloader().dataset.tensors
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_the_exclusion_rule_against_hand_computed_cases():
    assert exclusions(["a", "b"], [2.1, 1784.0], 10, 10.0) == {
        1: "b (validation loss 1784 > 10 x 2.1, the median of the other members)"}
    # both diverged (the 1784 and 55362): no comparison among them catches the first; log(C) does
    assert exclusions(["a", "b"], [1784.0, 55362.0], 10, 10.0) == {
        0: "a (validation loss 1784 > 10 x log(10) = 2.303, a uniform guess)",
        1: "b (validation loss 5.536e+04 > 10 x 1784, the median of the other members)"}
    assert exclusions(["a", "b", "c"], [0.5, math.nan, 0.6], 10, 10.0) == {1: "b (validation loss nan, not finite)"}
    assert exclusions(["a", "b", "c"], [0.02, 0.03, 0.24], 10, 10.0) == {}  # 0.24 < 10 x median(0.02, 0.03)
    assert exclusions(["a"], [23.1], 10, 10.0) == {0: "a (validation loss 23.1 > 10 x log(10) = 2.303, a uniform guess)"}


def test_a_diverged_member_is_excluded_with_one_line_and_the_vote_equals_the_others(trained_pair, tmp_path):
    good_a, good_b = trained_pair
    bad = _diverged(good_a, 1e3)
    dm = digits()
    bad_loss, good_losses = _val_loss(bad, dm), [_val_loss(m, dm) for m in trained_pair]
    ensemble = Ensemble(members=[good_a, good_b, bad])
    metrics, messages = _quiet_test(tmp_path, ensemble, datamodule=digits())
    median = (good_losses[0] + good_losses[1]) / 2
    assert messages == [f"Ensemble: excluded from the vote: members[2]:PlainNet (validation loss {bad_loss:.4g} > 10 x "
                        f"{median:.4g}, the median of the other members); 2 of 3 members vote (max_loss_ratio=None "
                        "keeps every member)."]
    reference, _ = _quiet_test(tmp_path, Ensemble(members=[good_a, good_b]), datamodule=digits())
    assert metrics["test_acc"] == pytest.approx(reference["test_acc"], abs=1e-7)
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    assert metrics["test_loss_member_2"] > 100 * metrics["test_loss_member_0"]  # still reported, side by side
    assert ensemble.voters == [0, 1]
    # max_loss_ratio=None: every member votes, silently, as asked
    everyone, messages = _quiet_test(tmp_path, Ensemble(members=[good_a, good_b, bad], max_loss_ratio=None),
                                     datamodule=digits())
    assert messages == [] and everyone["test_loss"] > reference["test_loss"]


def test_non_finite_members_fitted_weights_and_no_member_left(trained_pair, tmp_path):
    good_a, good_b = trained_pair
    nan_member = _diverged(good_b, math.nan)
    ensemble = Ensemble(members=[good_a, nan_member, good_b], voting="weighted")
    metrics, messages = _quiet_test(tmp_path, ensemble, datamodule=digits())
    assert messages == ["Ensemble: excluded from the vote: members[1]:PlainNet (validation loss nan, not finite); 2 of "
                        "3 members vote (max_loss_ratio=None keeps every member)."]
    assert ensemble.vote_weights[1] == 0 and ensemble.vote_weights.sum().item() == pytest.approx(1.0)
    assert math.isfinite(metrics["test_loss"])
    everyone_bad = Ensemble(members=[_diverged(good_a, 1e4), _diverged(good_b, 1e5)])
    with pytest.raises(ConfigError) as err:
        cpu_trainer(tmp_path).test(everyone_bad, datamodule=digits(), verbose=False)
    message = str(err.value)
    assert message.startswith("Ensemble: no member can vote: members[0]:PlainNet (validation loss ")
    assert "a uniform guess)" in message and message.endswith(
        "Retrain them (a lower learning rate, a shorter cycle peak), or set max_loss_ratio=None to vote them anyway.")
    assert "\n" not in message
    with pytest.raises(InvalidArgumentError, match="`max_loss_ratio`=1 is invalid: expected a number > 1"):
        Ensemble(members=[good_a], max_loss_ratio=1)


def test_predict_screens_on_the_validation_set_or_says_it_cannot(trained_pair, tmp_path):
    good_a, _ = trained_pair
    ensemble = Ensemble(members=[good_a, _diverged(good_a, 1e3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path).predict(ensemble, datamodule=digits())
    assert ensemble.voters == [0] and any("excluded from the vote" in str(w.message) for w in caught)
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8)), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path).predict(ensemble, dataloaders=loader)
    assert ensemble.voters is None
    assert [str(w.message) for w in caught if str(w.message).startswith("Ensemble")] == [
        "Ensemble: predict has no labelled data to check the members on (no datamodule validation set), so every "
        "member votes, even one whose loss diverged; give a datamodule with val_dataloader(), or set "
        "max_loss_ratio=None to say you vouch for them."]


# ------------------------------------------------------------------------------------------------------------
# dict batches


@pytest.fixture(scope="module")
def dict_member():
    pl.seed_everything(3)
    model = DictBatchNet(lr=0.05)
    cpu_trainer("/tmp", max_epochs=4).fit(model, train_dataloaders=dict_loader(seed=0))
    return model.eval()


def test_dict_batches_evaluate_with_the_usual_keys_or_the_named_ones(dict_member, tmp_path):
    x, y = synthetic(96, 1)
    with torch.no_grad():
        logits = dict_member((x - 5) / 3)
    expected_acc = (logits.argmax(-1) == y).float().mean().item()
    metrics, _ = _quiet_test(tmp_path, Ensemble(members=[dict_member]), dataloaders=dict_loader(seed=1))
    assert metrics["test_acc"] == pytest.approx(expected_acc, abs=1e-7)
    assert metrics["test_loss_member_0"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    odd = dict_loader(seed=1, image_key="pixels", label_key="digit")
    named, _ = _quiet_test(tmp_path, Ensemble(members=[dict_member], input_key="pixels", target_key="digit"),
                           dataloaders=odd)
    assert named["test_acc"] == pytest.approx(expected_acc, abs=1e-7)
    with pytest.raises(BatchFormatError) as err:
        cpu_trainer(tmp_path).test(Ensemble(members=[dict_member]), dataloaders=odd, verbose=False)
    assert str(err.value) == (
        "Ensemble looked for the images under 'image', 'images', 'img', 'imgs', 'input', 'inputs', 'x', "
        "'pixel_values' in a dict with keys ['pixels', 'digit', 'id']; set `input_key` to the key that holds them.")
    predictions = cpu_trainer(tmp_path).predict(Ensemble(members=[dict_member], max_loss_ratio=None),
                                                dataloaders=dict_loader(seed=1))
    preds = torch.cat([p["preds"] for p in predictions])
    assert torch.equal(preds, logits.argmax(-1))


def test_fit_weights_reads_dict_batches(dict_member):
    ensemble = Ensemble(members=[dict_member, copy.deepcopy(dict_member)], voting="weighted")
    weights = ensemble.fit_weights(dict_loader(seed=2))
    assert weights.shape == (2,) and weights.sum().item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------
# every member checked when the Ensemble is built (issue 23 point 5)


class NoHparamsNet(pl.LightningModule):
    """No ``num_classes`` hyper-parameter: the class count comes from its last layer."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.body(x)


def test_every_bad_member_fails_when_the_ensemble_is_built_naming_the_file(tmp_path):
    good = save_member(PlainNet(), tmp_path / "good.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    other_class = save_member(ImageClassifier("simple_cnn"), tmp_path / "zoo.ckpt")
    seven = save_member(NoHparamsNet(7), tmp_path / "seven.ckpt")
    ten = save_member(NoHparamsNet(10), tmp_path / "ten.ckpt")
    gan = ToyGAN()
    gan_trainer = cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    gan_trainer.fit(gan)
    gan_path = tmp_path / "gan.ckpt"
    gan_trainer.save_checkpoint(gan_path)
    cases = [
        ([good, corrupt], PlainNet, CheckpointError, f"`checkpoints`[1]={str(corrupt)!r} is not a PyTorch checkpoint"),
        ([empty], PlainNet, CheckpointError, f"`checkpoints`[0]={str(empty)!r} is not a PyTorch checkpoint"),
        ([good, other_class], PlainNet, CheckpointError, f"`checkpoints`[1]={str(other_class)!r}: its weights do not "
                                                         "fit tests.ensemble_modules.PlainNet"),
        ([ten, seven], NoHparamsNet, InvalidArgumentError, "members predict different numbers of classes (ten.ckpt: 10, "
                                                           "seven.ckpt: 7)"),
        ([good, gan_path], [PlainNet, ToyGAN], CheckpointError, f"`checkpoints`[1]={str(gan_path)!r} was trained with 2 "
                                                                "optimizers (manual optimization, e.g. a GAN's"),
    ]
    for paths, member_class, error, fragment in cases:
        with pytest.raises(error) as err:
            Ensemble(checkpoints=[str(p) for p in paths], member_class=member_class)
        assert fragment in str(err.value) and "\n" not in str(err.value).split(": Error")[0]


def test_a_gan_given_as_a_member_is_refused_when_built_and_a_non_classifier_at_its_first_output(tmp_path):
    with pytest.raises(ConfigError) as err:
        Ensemble(members=[PlainNet(), ToyGAN()])
    assert str(err.value) == (
        "Ensemble (member members[1]:ToyGAN) serves a classifier trained with one optimizer, but ToyGAN uses 2 (manual "
        "optimization, e.g. a GAN's generator and discriminator): it has no classifier head. Give the Ensemble "
        "classifiers.")
    # a GAN's snapshots (weights only: no optimizer states to count in the file) are refused as well
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "gan"))
    cpu_trainer(tmp_path, max_epochs=2, callbacks=[snapshots]).fit(ToyGAN(batches=2))
    with pytest.raises(ConfigError, match=r"Ensemble \(member snapshot-cycle=1-step=2.ckpt\) serves a classifier"):
        Ensemble(checkpoints=snapshots.snapshot_paths, member_class=ToyGAN)
    generator = nn.Sequential(nn.Linear(8, 64), nn.Tanh())  # outputs images, not class scores
    with pytest.raises(InvalidArgumentError) as err:
        cpu_trainer(tmp_path).test(Ensemble(members=[generator]), dataloaders=_loader(1), verbose=False)
    assert str(err.value) == ("Ensemble member members[0]:Sequential returned (32, 1, 8, 64) for a batch of 32: "
                              "expected forward(x) to return (batch, classes) logits.")


def test_members_returning_probabilities_or_log_probabilities_vote_as_their_logits_do():
    from lightning_tricks.ensemble.voting import as_logits, multilabel_vote, soft_vote

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    expected = logits.softmax(-1).mean(0)
    for form in (logits.log_softmax(-1), logits.softmax(-1)):
        converted = torch.stack([as_logits(member) for member in form])
        torch.testing.assert_close(soft_vote(converted), expected)
    # multi-label: the mean of the sigmoids, thresholded at 0.5, from logits or sigmoid probabilities
    sig = torch.stack([as_logits(member, sigmoid=True) for member in logits.sigmoid()])
    probs, preds = multilabel_vote(sig)
    torch.testing.assert_close(probs, logits.sigmoid().mean(0), atol=1e-5, rtol=1e-4)
    assert torch.equal(preds, (logits.sigmoid().mean(0) > 0.5).long())
    # hard: each label's majority of the members' decisions
    shares, hard = multilabel_vote(logits, "hard")
    torch.testing.assert_close(shares, (logits > 0).float().mean(0))
    assert torch.equal(hard, ((logits > 0).float().mean(0) > 0.5).long())


def test_ensemble_refuses_multilabel_metrics_and_a_dense_task_in_one_line():
    from lightning_tricks.errors import TaskNotSupportedError

    with pytest.raises(TaskNotSupportedError, match="Ensemble serves classification, multilabel"):
        Ensemble(members=[torch.nn.Linear(4, 3)], task="dense")
