"""Bad inputs get one clear line and write nothing: damaged or foreign checkpoints, empty loaders, NaN inputs,
a batch of one with BatchNorm, inputs of the wrong shape for each trick.

docs/reliability.md lists each case with the line the user sees; these tests check those lines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tricks as lt
from lightning_tricks.cli import main
from lightning_tricks.core.checkpoint_io import CheckpointError
from lightning_tricks.core.runtime_errors import explain_runtime_error
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.zoo import ImageClassifier
from tests.reliability_tricks import CLASSES, TRICKS, TinyData, make_model, trainer

KINDS = {  # what is wrong with the file -> the words of its one line
    "truncated": "is truncated or corrupt",
    "empty": "is empty (0 bytes)",
    "garbage": "is not a PyTorch checkpoint",
    "not_lightning": "is not a Lightning checkpoint",
    "other_model": "of another model",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    model = make_model()
    fit = trainer(root, [], max_steps=2, max_epochs=1)
    fit.fit(model, datamodule=TinyData())
    fit.save_checkpoint(root / "good.ckpt")
    data = (root / "good.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])  # a save cut short
    (root / "empty.ckpt").write_bytes(b"")
    (root / "garbage.ckpt").write_bytes(bytes(range(7, 256)) * 20)
    torch.save({"weights": torch.ones(3)}, root / "not_lightning.ckpt")
    # the same class's hyperparameters, but the tensors of another network (an MLP)
    checkpoint = torch.load(root / "good.ckpt", weights_only=False)
    other = ImageClassifier("mlp", num_classes=CLASSES, in_channels=1, image_size=8)
    checkpoint["state_dict"] = other.state_dict()
    torch.save(checkpoint, root / "other_model.ckpt")
    return {name: root / f"{name}.ckpt" for name in [*KINDS, "good"]}


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert len(text.strip().splitlines()) == 1, text
    return text


@pytest.mark.parametrize("kind", list(KINDS))
def test_our_load_from_checkpoint_says_what_is_wrong_in_one_line(kind, checkpoints):
    with pytest.raises(CheckpointError) as info:
        lt.load_from_checkpoint(ImageClassifier, checkpoints[kind])
    line = _one_line(info.value)
    assert KINDS[kind] in line and str(checkpoints[kind]) in line
    assert isinstance(info.value, ConfigError)
    if kind == "other_model":  # the message names what does not fit
        assert "missing" in line and "model.features.0.weight" in line
    lt.load_from_checkpoint(ImageClassifier, checkpoints["good"])  # the good one still loads


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage"])
def test_finetune_weights_damaged_file_is_one_line_at_setup(kind, checkpoints, tmp_path):
    fit = trainer(tmp_path / "run", [lt.Finetune(weights=str(checkpoints[kind]), num_classes=CLASSES)], max_steps=1)
    with pytest.raises(ConfigError) as info:
        fit.fit(make_model(), datamodule=TinyData())
    line = _one_line(info.value)
    assert KINDS[kind] in line and line.startswith(f"`weights` '{checkpoints[kind]}'")
    assert fit.global_step == 0 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_cli_ckpt_path_is_checked_before_anything_runs_or_is_written(command, kind, checkpoints, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "out")},
        "model": {"class_path": "lightning_tricks.zoo.ImageClassifier",
                  "init_args": {"backbone": "simple_cnn", "num_classes": CLASSES, "in_channels": 1,
                                "backbone_kwargs": {"width": 4, "hidden": 8}}},
        "data": {"class_path": "tests.reliability_tricks.TinyData"}}))
    with pytest.raises(SystemExit) as info:
        main([command, "--config", str(config), "--ckpt_path", str(checkpoints[kind])])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightning-tricks: error: --ckpt_path "), err
    assert KINDS[kind] in err
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no log folder, no saved config, no checkpoint


def test_empty_training_loader_is_one_line_for_the_tricks_that_need_data(tmp_path):
    class Empty(TinyData):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)

    expected = {"Standardize": "Standardize: no training sample was seen (the training dataloader is empty)",
                "LSUV": "WeightInit(scheme='lsuv'): the train dataloader yielded no batch"}
    for name, words in expected.items():
        with pytest.raises(ConfigError) as info:
            trainer(tmp_path / name, TRICKS[name][0](tmp_path)).fit(make_model(), datamodule=Empty())
        assert words in _one_line(info.value)


class _NaNData(TinyData):
    def __init__(self) -> None:
        super().__init__(nan=True)


@pytest.mark.parametrize("name,words", [
    ("Standardize", "Standardize: the training inputs contain NaN or infinite values"),
    ("LSUV", "LSUV: the input batch has NaN or infinite values"),
    ("ActivationStatistics", "ActivationStatistics: the first training batch has NaN or infinite inputs"),
])
def test_nan_inputs_are_refused_by_the_tricks_that_measure_them(name, words, tmp_path):
    fit = trainer(tmp_path / "run", TRICKS[name][0](tmp_path))
    with pytest.raises(ConfigError) as info:
        fit.fit(make_model(), datamodule=_NaNData())
    assert words in _one_line(info.value)
    assert fit.global_step == 0


def test_nan_inputs_stop_at_the_first_step_with_divergence_stop(tmp_path):
    stop = lt.DivergenceStop()
    fit = trainer(tmp_path, [stop])
    fit.fit(make_model(), datamodule=_NaNData())
    assert fit.global_step == 1 and stop.stopping_reason.startswith("DivergenceStop: training loss nan at step 0")


def test_a_batch_of_one_reaching_batch_norm_is_one_line_with_the_fix(monkeypatch, capsys):
    with pytest.raises(ValueError) as info:  # torch's own error, as training raises it
        nn.BatchNorm1d(8).train()(torch.randn(1, 8))
    line = explain_runtime_error(info.value)
    assert line.startswith("a training batch of one sample reached a BatchNorm layer (Expected more than 1 value")
    assert "drop_last=True" in line
    assert explain_runtime_error(RuntimeError("something else")) is None

    def raising(args=None, run=True):
        raise RuntimeError("wrapped") from info.value

    monkeypatch.setattr("lightning_tricks.cli.build_cli", raising)
    with pytest.raises(SystemExit) as exc:
        main(["fit"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"lightning-tricks: error: {line}\n"


FLAT = {  # a trick given flat (N, 64) inputs, or a model without what it converts -> its one line
    "Cutout": "Cutout: images of shape (8, 64) are invalid: expected (N, C, H, W) or (N, H, W)",
    "Mixup": "Mixup: images of shape (8, 64) are invalid: expected (N, C, H, W) or (N, H, W)",
    "BatchAugment": "BatchAugment: images of shape (8, 64) are invalid: expected (N, C, H, W) or (N, H, W)",
    "TTA": "views ['identity', 'hflip'] need image batches shaped (batch, ..., height, width); got shape (8, 64)",
    "FractionalMaxPooling": "FractionalMaxPooling found no nn.MaxPool2d in ImageClassifier",
    "StochasticDepth": "StochasticDepth found no residual block in ImageClassifier",
}


class _FlatData(TinyData):
    def train_dataloader(self):
        x, y = self.train_set.tensors
        return DataLoader(TensorDataset(x.flatten(1), y), batch_size=8)

    def val_dataloader(self):
        x, y = self.val_set.tensors
        return DataLoader(TensorDataset(x.flatten(1), y), batch_size=8)


@pytest.mark.parametrize("name", list(FLAT))
def test_wrong_input_shape_is_one_line_for_each_trick(name, tmp_path):
    model = ImageClassifier("mlp", num_classes=CLASSES, in_channels=1, image_size=8, backbone_kwargs={"width": 8})
    fit = trainer(tmp_path / "run", TRICKS[name][0](tmp_path), max_epochs=1)
    with pytest.raises(ConfigError) as info:
        fit.fit(model, datamodule=_FlatData())
    assert FLAT[name] in _one_line(info.value)
    assert not (tmp_path / "run").exists()
