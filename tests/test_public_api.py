"""The public API is complete: every callback exported, listed in --help, constructible by short name."""

import inspect

import docstring_parser
import lightning.pytorch.callbacks
import pytest
from lightning.pytorch.callbacks import Callback

import lightning_tricks
from lightning_tricks.cli import build_cli

EXPORTED_CALLBACKS = sorted(
    name for name in lightning_tricks.__all__
    if inspect.isclass(obj := getattr(lightning_tricks, name)) and issubclass(obj, Callback)
)


# values for arguments a callback requires (as Lightning's EarlyStopping requires `monitor`)
REQUIRED_EXAMPLES = {"monitor": "val_loss"}


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
    # a name Lightning also exports (EarlyStopping) is ambiguous as a short name: use the full path
    ambiguous = hasattr(lightning.pytorch.callbacks, name)
    spec = f"lightning_tricks.{name}" if ambiguous else name
    required = [p.name for p in inspect.signature(getattr(lightning_tricks, name)).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert set(required) <= set(REQUIRED_EXAMPLES), f"add an example value for {required} to REQUIRED_EXAMPLES"
    values = [f"--trainer.callbacks.{arg}={REQUIRED_EXAMPLES[arg]}" for arg in required]
    cli = build_cli([f"--trainer.callbacks+={spec}", *values, "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False)
    assert any(type(c) is getattr(lightning_tricks, name) for c in cli.trainer.callbacks)


PUBLIC_CALLABLES = sorted(
    name for name in lightning_tricks.__all__
    if inspect.isclass(obj := getattr(lightning_tricks, name)) or inspect.isfunction(obj)
)


def _documented_arguments(doc: str) -> set[str]:
    return {p.arg_name.split()[0].lstrip("*") for p in docstring_parser.parse(doc).params}


@pytest.mark.parametrize("name", PUBLIC_CALLABLES)
def test_public_api_is_documented(name):
    """Every argument is in the Google-style Args (or Attributes) section, and there is a doctest Example."""
    obj = getattr(lightning_tricks, name)
    doc = inspect.getdoc(obj) or ""
    documented = _documented_arguments(doc)
    if inspect.isclass(obj):
        documented |= _documented_arguments(inspect.getdoc(obj.__init__) or "")
        signature = inspect.signature(obj.__init__)
    else:
        signature = inspect.signature(obj)
    arguments = [n for n, p in signature.parameters.items()
                 if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    undocumented = [n for n in arguments if n not in documented]
    assert not undocumented, f"{name}: arguments {undocumented} are not in its docstring's Args section"
    examples = docstring_parser.parse(doc).examples
    assert examples and any(">>>" in (e.description or "") + (e.snippet or "") for e in examples), \
        f"{name} needs an Example section with a >>> line"
