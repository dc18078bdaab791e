"""The public API is complete: every callback exported, listed in --help, constructible by short name."""

import inspect

import pytest
from lightning.pytorch.callbacks import Callback

import lightning_tricks
from lightning_tricks.cli import build_cli

EXPORTED_CALLBACKS = sorted(
    name for name in lightning_tricks.__all__
    if inspect.isclass(obj := getattr(lightning_tricks, name)) and issubclass(obj, Callback)
)


def test_callbacks_list_matches_exports():
    assert sorted(lightning_tricks.CALLBACKS) == EXPORTED_CALLBACKS


def test_all_names_resolve():
    for name in lightning_tricks.__all__:
        assert hasattr(lightning_tricks, name), name


@pytest.mark.parametrize("name", EXPORTED_CALLBACKS or ["(none yet)"])
def test_callback_by_short_name_on_the_command_line(name, tmp_path, monkeypatch):
    if name == "(none yet)":
        assert lightning_tricks.CALLBACKS == ()
        return
    monkeypatch.chdir(tmp_path)
    cli = build_cli([f"--trainer.callbacks+={name}", "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False)
    assert any(type(c) is getattr(lightning_tricks, name) for c in cli.trainer.callbacks)


@pytest.mark.parametrize("name", EXPORTED_CALLBACKS or ["(none yet)"])
def test_public_callbacks_are_documented(name):
    if name == "(none yet)":
        return
    cls = getattr(lightning_tricks, name)
    doc = inspect.getdoc(cls) or ""
    assert "Example" in doc and "Args" in doc, f"{name} needs a Google-style docstring with Args and Example"
