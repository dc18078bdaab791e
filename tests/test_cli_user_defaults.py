"""The CLI never changes a user class's own defaults (issue 20, point 1).

The zoo's ``ImageClassifier`` and ``DigitsDataModule`` are the parser's defaults. jsonargparse keeps every
default value whose name and type a newly chosen class accepts, so ``--model my_pkg.MyNet`` used to train
MyNet with the zoo's ``lr``, ``num_classes``, ``in_channels``... and a datamodule with the digits'
``batch_size``. The user classes below are generated from the zoo's signatures: one parameter for every
parameter of the default classes (same name, same annotation, another default), so a parameter the zoo
gains later is covered too. Each path a config takes is checked against the user's own defaults: the
command line, a YAML ``class_path``, ``fit --print_config``, the config ``tune``/``babysit`` start from, the
configs babysit's steps run, and tune's ``best.yaml``.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_tricks.cli import ZOO_DATA, ZOO_MODEL, _import_class, build_cli, main
from lightning_tricks.tuning.cli import load_config

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]
MODULE = "cli_defaults_user_pkg"


def _other_default(name: str, annotation: str, default: Any) -> Any:
    """A default of the same type as the zoo's, different from it (what a user's class would have)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return round(default * 0.37 + 0.0001, 6)
    if isinstance(default, str):
        return default + "_mine"
    if default is None:
        for kind, value in (("int", 5), ("float", 0.25), ("str", "mine"), ("dict", {"user": 1}), ("list[int]", [2, 3])):
            if annotation.startswith(kind):
                return value
    raise AssertionError(f"teach this test a user default for {name}: {annotation} = {default!r}")


def _zoo_parameters(class_path: str) -> list[tuple[str, str, Any]]:
    signature = inspect.signature(_import_class(class_path).__init__)
    params = [p for p in signature.parameters.values() if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert all(p.default is not p.empty for p in params), "a zoo default class with a required argument"
    return [(p.name, p.annotation if isinstance(p.annotation, str) else p.annotation.__name__, p.default)
            for p in params]


def _class_source(name: str, base: str, params: list[tuple[str, str, Any]]) -> str:
    args = ", ".join(f"{n}: {a} = {_other_default(n, a, d)!r}" for n, a, d in params)
    return (f"class {name}({base}):\n"
            f"    def __init__(self, {args}, width: int = 8) -> None:\n"
            f"        super().__init__()\n"
            f"        self.save_hyperparameters()\n")


BASES = '''
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _TinyModel(pl.LightningModule):
    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TinyData(pl.LightningDataModule):
    def _loader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                          batch_size=8)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()
'''


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Writes the user module; returns each class path's own defaults."""
    folder = tmp_path_factory.mktemp("user_pkg")
    model, data = _zoo_parameters(ZOO_MODEL), _zoo_parameters(ZOO_DATA)
    source = BASES + "\n\n" + _class_source("UserNet", "_TinyModel", model) + "\n\n" + \
        _class_source("UserData", "_TinyData", data)
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(folder))
    own = {f"{MODULE}.UserNet": {n: _other_default(n, a, d) for n, a, d in model} | {"width": 8},
           f"{MODULE}.UserData": {n: _other_default(n, a, d) for n, a, d in data} | {"width": 8}}
    yield own
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _names(own: dict[str, dict[str, Any]]) -> tuple[str, str]:
    model, data = own
    return model, data


def test_the_user_classes_share_every_zoo_argument_name_with_other_defaults(user_pkg):
    model, data = _names(user_pkg)
    shared = set(user_pkg[model]) | set(user_pkg[data])
    assert {"lr", "in_channels", "num_classes", "batch_size"} <= shared  # the cases, among all of them
    zoo = {n: d for n, _, d in _zoo_parameters(ZOO_MODEL) + _zoo_parameters(ZOO_DATA)}
    assert all(user_pkg[model].get(n, user_pkg[data].get(n)) != d for n, d in zoo.items())


def _hparams(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in obj.hparams.items() if not k.startswith("_")}  # LightningCLI adds _class_path


def _write_config(tmp_path: Path, model: str, data: str) -> Path:
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": model}, "data": {"class_path": data}}))
    return path


def _ways(tmp_path: Path, model: str, data: str) -> dict[str, list[str]]:
    return {"flags": ["--model", model, "--data", data],
            "flags=": [f"--model={model}", f"--data={data}"],
            "yaml class_path": ["--config", str(_write_config(tmp_path, model, data))]}


@pytest.mark.parametrize("way", ["flags", "flags=", "yaml class_path"])
def test_fit_print_config_shows_the_users_own_defaults(way, user_pkg, tmp_path, capsys):
    model, data = _names(user_pkg)
    with pytest.raises(SystemExit) as exc:
        main(["fit", *_ways(tmp_path, model, data)[way], "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == {"class_path": model, "init_args": user_pkg[model]}
    assert printed["data"] == {"class_path": data, "init_args": user_pkg[data]}


@pytest.mark.parametrize("way", ["flags", "yaml class_path"])
def test_fit_builds_the_users_classes_with_their_defaults_and_given_values_on_top(way, user_pkg, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = _names(user_pkg)
    cli = build_cli(["fit", *_ways(tmp_path, model, data)[way], "--model.init_args.width=5", "--data.width=6",
                     "--trainer.max_epochs=1", *QUIET])
    assert _hparams(cli.model) == user_pkg[model] | {"width": 5}
    assert _hparams(cli.datamodule) == user_pkg[data] | {"width": 6}
    assert cli.trainer.global_step == 4  # it trained, on the user's data


def test_a_value_given_before_the_class_is_kept_as_jsonargparse_does(user_pkg, tmp_path):
    model, _ = _names(user_pkg)
    config = load_config(["--model.init_args.lr=0.3", "--model", model, "--data", "null"])
    assert config["model"]["init_args"] == user_pkg[model] | {"lr": 0.3}


def _dumped_defaults(class_path: str) -> dict[str, Any]:
    return {n: d for n, _, d in _zoo_parameters(class_path) if d is not None}  # a config dump leaves out nulls


def test_our_other_zoo_classes_start_from_their_own_signature_too(capsys):
    synthetic = _dumped_defaults("lightning_tricks.zoo.SyntheticDataModule")
    config = load_config(["--data", "lightning_tricks.zoo.SyntheticDataModule", "--data.num_samples=32"])
    assert config["data"]["init_args"] == synthetic | {"num_samples": 32}
    with pytest.raises(SystemExit):
        main(["fit", "--model", "lightning_tricks.Ensemble", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["num_classes"] is None  # the Ensemble's own, not the classifier's 10
    # the zoo's default classes keep the zoo's defaults
    plain = load_config([])
    assert plain["model"]["init_args"] == _dumped_defaults(ZOO_MODEL)
    assert plain["data"]["init_args"] == _dumped_defaults(ZOO_DATA)


@pytest.mark.parametrize("way", ["flags", "yaml class_path"])
def test_babysit_starts_and_runs_its_steps_from_the_users_defaults(way, user_pkg, tmp_path, monkeypatch):
    from lightning_tricks.tuning.babysit import check_config
    from lightning_tricks.tuning.study import build_from_config

    monkeypatch.chdir(tmp_path)
    model, data = _names(user_pkg)
    config = load_config([*_ways(tmp_path, model, data)[way], *QUIET])  # what babysit and tune start from
    assert config["model"]["init_args"] == user_pkg[model] and config["data"]["init_args"] == user_pkg[data]
    step = build_from_config(check_config(config), tmp_path / "step.yaml")  # how each babysit step is built
    assert _hparams(step.model) == user_pkg[model] and _hparams(step.datamodule) == user_pkg[data]


@pytest.mark.parametrize("way", ["flags", "yaml class_path"])
def test_tune_best_yaml_keeps_the_users_defaults(way, user_pkg, tmp_path, monkeypatch):
    from lightning_tricks.tuning.cli import main as tuning_main

    monkeypatch.chdir(tmp_path)
    model, data = _names(user_pkg)
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"model.init_args.width": {"choice": [9]}}))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        tuning_main(["tune", *_ways(tmp_path, model, data)[way], *QUIET, "--trainer.max_epochs=1",
                     "--search", str(search), "--trials", "1", "--stages", "1", "--pruner", "none",
                     "--metric", "val_loss", "--run-dir", str(run_dir)])
    assert exc.value.code == 0
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best["model"] == {"class_path": model, "init_args": user_pkg[model] | {"width": 9}}
    assert best["data"] == {"class_path": data, "init_args": user_pkg[data]}
