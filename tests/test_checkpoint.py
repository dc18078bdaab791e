"""Checkpoints evaluate as the trained model did, wherever they are loaded (structural tricks recorded in them).

Acceptance: a LitResnet-style module (tests/checkpoint_user_module.py) trained with StochasticDepth (default
settings, and the paper's test-time scaling), FractionalMaxPooling or ActivationSwap (leaky_relu: no new
parameters; prelu: new slopes) gives the same predictions through ``lightning_tricks.load_from_checkpoint``,
the CLI's ``--ckpt_path`` and the Ensemble as the trained model with its callback; a plain
``LitResnet.load_from_checkpoint`` of an architecture-changing trick fails clearly.
"""

import warnings

import pytest
import torch
from torch import nn

import lightning_tricks
from lightning_tricks import (
    ActivationSwap,
    Ensemble,
    FractionalMaxPooling,
    StochasticDepth,
    apply_recorded_tricks,
)
from lightning_tricks.checkpoint import UnknownTrickError, recorded_tricks
from lightning_tricks.cli import build_cli
from lightning_tricks.regularization.fractional_pooling import DEFAULT_RATIO, SeededFractionalMaxPool2d
from lightning_tricks.regularization.stochastic_depth import stochastic_depth_blocks
from lightning_tricks.zoo import DigitsDataModule
from tests.checkpoint_user_module import LitResnet
from tests.helpers import cpu_trainer
from tests.structural_user_module import digits_loader

TRICKS = {
    "StochasticDepth": lambda: StochasticDepth(),
    "StochasticDepth-test-scaling": lambda: StochasticDepth(scaling="test"),
    "FractionalMaxPooling": lambda: FractionalMaxPooling(),
    "ActivationSwap-leaky_relu": lambda: ActivationSwap(to="leaky_relu"),
    "ActivationSwap-prelu": lambda: ActivationSwap(to="prelu"),
}
RELUS = ["model.relu"] + [f"model.layer{i}.0.relu" for i in range(1, 5)]  # torchvision ResNet's ReLU modules


def _train(tmp_path, name):
    """Fit a few steps with the trick, save the checkpoint; return it with the trained model's predictions."""
    torch.manual_seed(0)
    model, loader = LitResnet(), digits_loader(64, batch_size=32)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[TRICKS[name]()])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    trainer.save_checkpoint(tmp_path / f"{name}-weights.ckpt", weights_only=True)  # no callback hooks run
    reference = torch.cat(trainer.predict(model, dataloaders=loader))  # eval, with the callback, as trained
    return path, loader, reference


def _predict(model, loader):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in loader])


@pytest.fixture(scope="module", params=list(TRICKS))
def trained(request, tmp_path_factory):
    return request.param, *_train(tmp_path_factory.mktemp(request.param), request.param)


def test_load_from_checkpoint_predicts_exactly_as_the_trained_model(trained):
    name, path, loader, reference = trained
    loaded = lightning_tricks.load_from_checkpoint(LitResnet, path)
    assert torch.equal(_predict(loaded, loader), reference)
    checkpoint = torch.load(path, weights_only=True)  # the record is plain data
    records = recorded_tricks(checkpoint)
    if name == "StochasticDepth":  # inverted scaling: the plain network is the evaluated one, nothing recorded
        assert records == [] and not stochastic_depth_blocks(loaded)
        assert torch.equal(_predict(LitResnet.load_from_checkpoint(path), loader), reference)
    elif name == "FractionalMaxPooling":
        assert records == [{"class_path": "lightning_tricks.regularization.fractional_pooling.FractionalMaxPooling",
                            "init_args": {"output_ratio": DEFAULT_RATIO, "kernel_size": 2, "include": None,
                                          "exclude": None, "test_samples": 1, "max_batch": None, "seed": 0},
                            "modules": ["model.maxpool"]}]
        assert isinstance(loaded.model.maxpool, SeededFractionalMaxPool2d)
    elif name == "StochasticDepth-test-scaling":
        assert [r["init_args"]["scaling"] for r in records] == ["test"]
        assert [b.lt_drop_prob for b in stochastic_depth_blocks(loaded)] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    else:
        to = name.split("-")[1]
        expected = {"class_path": "lightning_tricks.setup.activation_swap.ActivationSwap",
                    "init_args": {"to": to, "activations": ["relu"], "slope": {"leaky_relu": 0.01, "prelu": 0.25}[to],
                                  "alpha": None, "include": None, "exclude": None, "strict": False},
                    "modules": RELUS}
        if to == "prelu":  # each PReLU's slopes, one per channel of the map it sees (the stem's, then each stage's)
            expected["channels"] = [64, 64, 128, 256, 512]
        assert records == [expected]
        swapped = [loaded.get_submodule(relu) for relu in RELUS]
        assert [type(m) for m in swapped] == [nn.PReLU if to == "prelu" else nn.LeakyReLU] * 5


def test_a_weights_only_checkpoint_is_rebuilt_from_its_marker_buffers(trained):
    """ModelCheckpoint(save_weights_only=True) skips callback hooks: no record, but the markers suffice."""
    name, path, loader, reference = trained
    weights = path.with_name(f"{name}-weights.ckpt")
    assert "lightning_tricks" not in torch.load(weights, weights_only=True)
    loaded = lightning_tricks.load_from_checkpoint(LitResnet, weights)
    assert torch.equal(_predict(loaded, loader), reference)
    if name.startswith("ActivationSwap"):  # the markers hold everything the callback recorded
        assert recorded_tricks(torch.load(weights, weights_only=True)) == recorded_tricks(
            torch.load(path, weights_only=True))


def test_plain_load_of_a_trick_that_changes_evaluation_fails_naming_it(trained):
    name, path, loader, reference = trained
    if name == "StochasticDepth":
        pytest.skip("inverted scaling: the plain model is the evaluated model (checked above)")
    marker = {"FractionalMaxPooling": "model.maxpool.lightning_tricks_FractionalMaxPooling",
              "StochasticDepth-test-scaling": "model.layer1.0.lightning_tricks_StochasticDepth",
              "ActivationSwap-leaky_relu": "model.relu.lightning_tricks_ActivationSwap",
              "ActivationSwap-prelu": "model.relu.lightning_tricks_ActivationSwap"}[name]
    slopes = '"model.relu.weight", ' if name == "ActivationSwap-prelu" else ""  # PReLU's own new parameter
    with pytest.raises(RuntimeError, match=rf'Unexpected key\(s\) in state_dict: {slopes}"{marker}"'):
        LitResnet.load_from_checkpoint(path)
    plain = LitResnet.load_from_checkpoint(path, strict=False)  # what the error's fix would give: another network
    assert not torch.equal(_predict(plain, loader), reference)


def test_apply_recorded_tricks_before_a_strict_load_is_idempotent_and_refuses_foreign_classes(trained):
    name, path, loader, reference = trained
    checkpoint = torch.load(path, weights_only=True)
    model = LitResnet()
    expected = [] if name == "StochasticDepth" else [name.split("-")[0]]
    assert apply_recorded_tricks(model, checkpoint) == expected
    assert apply_recorded_tricks(model, checkpoint) == expected  # a second time changes nothing
    model.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(_predict(model, loader), reference)
    forged = {"lightning_tricks": {"structural": [{"class_path": "os.system", "init_args": {}, "modules": []}]}}
    with pytest.raises(UnknownTrickError, match="'os.system', which is not a lightning_tricks structural trick"):
        apply_recorded_tricks(nn.Linear(1, 1), forged)


def test_ensemble_of_one_checkpoint_predicts_as_the_trained_model(trained):
    name, path, loader, reference = trained
    ensemble = Ensemble(checkpoints=[str(path)], member_class=LitResnet)
    with torch.no_grad():
        probabilities = torch.cat([ensemble(x) for x, _ in loader])
    assert torch.allclose(probabilities, reference.exp(), atol=1e-6)


CLI_TRICKS = {  # the callback's CLI arguments, and what the model without it must hold after the CLI re-applied it
    "FractionalMaxPooling": (["--trainer.callbacks+=FractionalMaxPooling"],
                             lambda model: isinstance(model.model.maxpool, SeededFractionalMaxPool2d)),
    "ActivationSwap-leaky_relu": (["--trainer.callbacks+=ActivationSwap", "--trainer.callbacks.to=leaky_relu"],
                                  lambda model: type(model.model.layer4[0].relu) is nn.LeakyReLU),
    "ActivationSwap-prelu": (["--trainer.callbacks+=ActivationSwap", "--trainer.callbacks.to=prelu"],
                             lambda model: type(model.model.relu) is nn.PReLU and model.model.relu.num_parameters == 64),
}


@pytest.mark.parametrize("trick,subcommand", [("FractionalMaxPooling", "validate"), ("FractionalMaxPooling", "test"),
                                              ("ActivationSwap-leaky_relu", "test"), ("ActivationSwap-prelu", "test")])
def test_cli_ckpt_path_reapplies_the_recorded_trick(trick, subcommand, tmp_path, monkeypatch):
    """``lightning-tricks test --ckpt_path X`` without the callback scores what the trained model with it scores."""
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    model = ["--model", "tests.checkpoint_user_module.LitResnet", "--data", "DigitsDataModule", "--data.batch_size=64"]
    callback, converted = CLI_TRICKS[trick]
    trained = build_cli(["fit", *model, *quiet, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                         "--trainer.enable_checkpointing=false", *callback])
    path = tmp_path / "trick.ckpt"
    trained.trainer.save_checkpoint(path)
    with_callback = build_cli([subcommand, *model, *quiet, *callback, "--ckpt_path", str(path)])
    without = build_cli([subcommand, *model, *quiet, "--ckpt_path", str(path)])
    stage = "val" if subcommand == "validate" else "test"
    assert converted(without.model)
    for metric in (f"{stage}_loss", f"{stage}_acc"):
        assert float(without.trainer.callback_metrics[metric]) == float(with_callback.trainer.callback_metrics[metric])
    loader = digits_loader(64, batch_size=32)
    assert torch.equal(_predict(without.model, loader), _predict(trained.model, loader))


OLD_NAMES = {"FractionalMaxPooling": {"include": "layers"}, "StochasticDepth": {"p": "drop_rate", "include": "blocks"}}


def test_a_record_written_with_the_old_argument_names_loads_without_warning(trained):
    """Checkpoints written before the renames (layers/blocks -> include, drop_rate -> p) record the old names."""
    name, path, loader, reference = trained
    checkpoint = torch.load(path, weights_only=True)
    records = checkpoint.get("lightning_tricks", {}).get("structural", [])
    trick = name.split("-")[0]
    if trick not in OLD_NAMES or not records:
        pytest.skip("no record with a renamed argument")
    old = OLD_NAMES[trick]
    for record in records:  # as the previous release wrote it: old names, no `exclude`
        record["init_args"] = {old.get(k, k): v for k, v in record["init_args"].items() if k != "exclude"}
    assert set(old.values()) <= set(records[0]["init_args"])
    model = LitResnet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user cannot act on a warning about a file: none is raised
        assert apply_recorded_tricks(model, checkpoint) == [trick]
    model.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(_predict(model, loader), reference)
