"""The public error hierarchy: one module defines every error, and each is the type its users catch."""

import importlib
import inspect
import pkgutil

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_tricks
from lightning_tricks import errors


def _package_modules():
    for info in pkgutil.walk_packages(lightning_tricks.__path__, "lightning_tricks."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


# internal control flow, never raised to the user (a worker's surplus trial is skipped quietly)
CONTROL_FLOW = {"lightning_tricks.tuning.study.SurplusTrial",
                "lightning_tricks.recipe.cli.BabysitFailed"}  # carries the results to the report; RecipeStopped follows


def test_every_exception_class_of_the_package_is_defined_in_errors():
    defined_elsewhere = sorted(
        f"{module.__name__}.{name}"
        for module in _package_modules()
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
        and module.__name__ != "lightning_tricks.errors"
    )
    defined_elsewhere = [name for name in defined_elsewhere if name not in CONTROL_FLOW]
    assert defined_elsewhere == []


@pytest.mark.parametrize("name", errors.__all__)
def test_each_error_is_ours_and_exported(name):
    obj = getattr(errors, name)
    if inspect.isfunction(obj):
        return
    # a warning is not an error: the one warning class is a DeprecationWarning (Python's filters apply to it)
    assert issubclass(obj, errors.LightningTricksError) or obj is errors.LightningTricksDeprecationWarning
    assert not issubclass(obj, Warning) or issubclass(obj, DeprecationWarning)
    assert obj.__doc__, name


def test_config_errors_are_lightning_misconfigurations_and_builtin_types():
    assert issubclass(errors.ConfigError, MisconfigurationException)
    assert issubclass(errors.InvalidArgumentError, ValueError)
    assert issubclass(errors.DataNotFoundError, FileNotFoundError)
    assert issubclass(errors.TaskNotSupportedError, TypeError)
    assert issubclass(errors.InitialLossError, RuntimeError)
    assert not issubclass(errors.InitialLossError, errors.ConfigError)  # a diagnosis, not a configuration problem


def test_user_error_in_finds_ours_through_wrapping_and_ignores_others():
    try:
        try:
            raise errors.UnknownTrickError("the checkpoint records 'x'")
        except ValueError as inner:
            raise RuntimeError("jsonargparse wrapper") from inner
    except RuntimeError as outer:
        assert isinstance(errors.user_error_in(outer), errors.UnknownTrickError)
    assert errors.user_error_in(ValueError("not ours")) is None
