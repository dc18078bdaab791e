"""The activation kinds the tricks know, and the modules that implement each: one table for every trick.

A module is of a kind when it is an instance of one of the kind's classes, or when its class has one of
the kind's names (timm and Hugging Face define their own ``GELU``, ``Swish``, ``Sigmoid``...).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

Implementations = tuple[tuple[type[nn.Module], ...], frozenset[str]]
"""A kind's module classes and the class names that count as it."""

ACTIVATION_KINDS: dict[str, Implementations] = {
    "relu": ((nn.ReLU,), frozenset()),
    "relu6": ((nn.ReLU6,), frozenset()),
    "leaky_relu": ((nn.LeakyReLU,), frozenset()),
    "prelu": ((nn.PReLU,), frozenset()),
    "rrelu": ((nn.RReLU,), frozenset()),
    "elu": ((nn.ELU,), frozenset()),
    "celu": ((nn.CELU,), frozenset()),
    "selu": ((nn.SELU,), frozenset()),
    "gelu": ((nn.GELU,), frozenset({"GELU", "GELUTanh", "QuickGELU"})),
    "silu": ((nn.SiLU,), frozenset({"SiLU", "Swish"})),
    "sigmoid": ((nn.Sigmoid,), frozenset({"Sigmoid"})),
    "tanh": ((nn.Tanh,), frozenset({"Tanh"})),
}


def kinds(names: Iterable[str], merged: dict[str, Iterable[str]] | None = None) -> dict[str, Implementations]:
    """A trick's table: the kinds ``names`` in that order, ``merged`` kinds (new name -> kinds) pooled into one.

    Examples:
        >>> table = kinds(["relu"], merged={"elu": ["elu", "celu"]})
        >>> list(table), [c.__name__ for c in table["elu"][0]]
        (['relu', 'elu'], ['ELU', 'CELU'])
    """
    table = {name: ACTIVATION_KINDS[name] for name in names}
    for name, parts in (merged or {}).items():
        members = [ACTIVATION_KINDS[p] for p in parts]
        table[name] = (tuple(c for classes, _ in members for c in classes),
                       frozenset().union(*(names_ for _, names_ in members)))
    return table


def kind_of(module: nn.Module, table: dict[str, Implementations] = ACTIVATION_KINDS) -> str | None:
    """The first kind of ``table`` that ``module`` implements, or None."""
    for kind, (classes, names) in table.items():
        if isinstance(module, classes) or type(module).__name__ in names:
            return kind
    return None


__all__ = ["ACTIVATION_KINDS", "Implementations", "kind_of", "kinds"]
