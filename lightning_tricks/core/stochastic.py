"""The contract between stochastic layers and test-time averaging.

A layer that is random in training and can also be sampled at test time (fractional max pooling,
DropConnect, stochastic depth, dropout) is deterministic in ``eval()`` by default. Test-time
augmentation's ``stochastic_passes`` and fractional pooling's ``test_samples`` need the opposite: k
passes in eval mode, each with a fresh draw, averaged. They get it through :func:`stochastic_eval`:

* ``torch.nn`` dropout layers are switched to ``train()`` for the duration (batch norm and every
  other layer stay in ``eval()``, so running statistics are neither used per batch nor updated);
* any module that defines the attribute ``lt_stochastic_eval`` (a bool, False by default) gets it set
  to True; such a module must draw fresh randomness in ``eval()`` while the flag is True.

Examples:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    >>> with stochastic_eval(model):
    ...     a, b = model(torch.ones(1, 4)), model(torch.ones(1, 4))
    >>> model[1].training
    False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

STOCHASTIC_EVAL_ATTR = "lt_stochastic_eval"
"""Attribute a module defines (False by default) to opt in to fresh draws in eval mode."""

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def stochastic_modules(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`stochastic_eval` would make random: dropout layers and opted-in modules."""
    return [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES) or hasattr(m, STOCHASTIC_EVAL_ATTR)]


@contextmanager
def stochastic_eval(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, stochastic layers draw fresh randomness although the model is in eval mode.

    Yields the list of modules made stochastic (empty when the model has none). Every change is
    undone on exit, also when the block raises.
    """
    changed: list[tuple[nn.Module, str, bool]] = []
    try:
        for module in stochastic_modules(model):
            if hasattr(module, STOCHASTIC_EVAL_ATTR):
                changed.append((module, "flag", bool(getattr(module, STOCHASTIC_EVAL_ATTR))))
                setattr(module, STOCHASTIC_EVAL_ATTR, True)
            else:
                changed.append((module, "mode", module.training))
                module.train(True)
        yield [m for m, _, _ in changed]
    finally:
        for module, kind, previous in reversed(changed):
            if kind == "flag":
                setattr(module, STOCHASTIC_EVAL_ATTR, previous)
            else:
                module.train(previous)


__all__ = ["STOCHASTIC_EVAL_ATTR", "stochastic_eval", "stochastic_modules"]
