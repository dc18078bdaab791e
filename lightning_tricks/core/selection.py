"""Which modules or parameters a trick acts on: one vocabulary for every trick.

Every trick that acts on part of a model takes the same three arguments (see the glossary,
``docs/glossary.md``):

- ``include``: glob patterns (``fnmatch``, case-sensitive) on qualified names, as ``named_modules()`` or
  ``named_parameters()`` write them (``model.layer1.0.conv1``). An item is selected when a pattern
  matches its name or the name of one of its ancestors, so ``"head"`` selects ``head.0`` and
  ``head.0.weight``, and ``"layer*.*.conv1"`` works too. ``None``: every eligible item.
- ``exclude``: patterns of the same form; the items they match are dropped.
- ``layer_types``: class names (``"Conv2d"``) or qualified names (``"torch.nn.Conv2d"``); a module matches
  when its class or a base class has that name, so ``Conv2d`` also selects timm's ``StdConv2d``.

A pattern or a type that selects nothing is an error that names it and shows names that exist: a typo
must not silently leave the model as it was.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from torch import nn

from lightning_tricks.errors import InvalidArgumentError

Item = TypeVar("Item")
WhyNot = Callable[[Any], "str | None"]
"""``None`` for an item the trick can act on, else the reason it cannot (shown in the error)."""


def check_patterns(arg: str, patterns: Sequence[str] | None, *, allow_empty: bool = False) -> list[str] | None:
    """``patterns`` as a list after checking it is a list of non-empty strings (``None`` stays ``None``).

    Examples:
        >>> check_patterns("include", ["head", "*.fc"])
        ['head', '*.fc']
        >>> check_patterns("include", "head")
        Traceback (most recent call last):
        ...
        lightning_tricks.errors.InvalidArgumentError: `include`='head' is invalid: expected a list of glob patterns on qualified names, e.g. ['head', 'layer*.conv1'].
    """
    if patterns is None:
        return None
    if (isinstance(patterns, str) or not isinstance(patterns, Iterable) or (not patterns and not allow_empty)
            or not all(isinstance(p, str) and p for p in patterns)):
        raise InvalidArgumentError(f"`{arg}`={patterns!r} is invalid: expected a list of glob patterns on qualified "
                                   "names, e.g. ['head', 'layer*.conv1'].")
    return list(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` matches ``name`` or the name of one of its ancestors.

    Examples:
        >>> name_matches("head.0.weight", "head"), name_matches("layer2.1.conv1", "layer*.*.conv1")
        (True, True)
        >>> name_matches("backbone.head", "head")
        False
    """
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def class_names(module: Any) -> set[str]:
    """Names (plain and qualified) of the object's class and its base classes."""
    return {name for cls in type(module).__mro__ for name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")}


def describe_names(names: Sequence[str], limit: int = 8) -> str:
    """``'a', 'b', 'c' and 5 more``: the names an error shows.

    Examples:
        >>> describe_names(["a", "b", "c"], limit=2)
        "'a', 'b' and 1 more"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + (f" and {len(names) - limit} more" if len(names) > limit else "")) if names else "(none)"


def check_layer_types(model: nn.Module, layer_types: Sequence[str | type], owner: str,
                      arg: str = "layer_types") -> list[str | type]:
    """``layer_types`` after checking each entry names a class of at least one module of ``model``."""
    if isinstance(layer_types, str) or not layer_types:
        raise InvalidArgumentError(f"{owner}: `{arg}`={layer_types!r} is invalid: expected a non-empty list of layer "
                                   "types such as ['Conv2d', 'Linear'].")
    present = [class_names(m) for m in model.modules()]
    for entry in layer_types:
        if not any(type_matches(names, entry) for names in present):
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise InvalidArgumentError(f"{owner}: `{arg}` entry {entry!r} matches no module of {type(model).__name__}: "
                                       f"its module types are {describe_names(kinds, 12)}.")
    return list(layer_types)


def type_matches(names: set[str], entry: str | type) -> bool:
    """Whether a module whose :func:`class_names` are ``names`` is of the type ``entry`` (a name or a class)."""
    return (entry.__name__ in names and f"{entry.__module__}.{entry.__qualname__}" in names) if isinstance(
        entry, type) else entry in names


def is_of_types(module: Any, layer_types: Sequence[str | type]) -> bool:
    """Whether ``module``'s class or a base class is one of ``layer_types`` (names or classes)."""
    names = class_names(module)
    return any(type_matches(names, entry) for entry in layer_types)


def select(
    named: Iterable[tuple[str, Item]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    why_not: WhyNot | None = None,
    owner: str,
    what: str = "module",
    include_arg: str = "include",
    exclude_arg: str = "exclude",
    error: type[Exception] = InvalidArgumentError,
) -> list[tuple[str, Item]]:
    """The items a trick acts on, in the order of ``named``: eligible, matched by ``include``, not by ``exclude``.

    Args:
        named: ``(qualified name, item)`` pairs, e.g. ``model.named_modules()`` or ``named_parameters()``.
        include: patterns (see the module docstring); ``None`` keeps every eligible item.
        exclude: patterns of the items to drop.
        why_not: ``None`` for an item the trick can act on, else the reason it cannot; ``None`` (the
            argument): every item is eligible.
        owner: the trick, named at the start of every error.
        what: what the items are (``"module"``, ``"parameter"``), for the messages.
        include_arg, exclude_arg: the user-facing argument names (a deprecated alias names itself).
        error: the exception class raised for a pattern that selects nothing.

    Raises:
        InvalidArgumentError: (or ``error``) an ``include`` pattern that matches no item, or only items the
            trick cannot act on (each with its reason); an ``exclude`` pattern that matches no item.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
        >>> linear = lambda m: None if isinstance(m, nn.Linear) else "not a Linear"
        >>> [n for n, _ in select(net.named_modules(), include=["2"], why_not=linear, owner="demo")]
        ['2.0', '2.1']
        >>> [n for n, _ in select(net.named_modules(), exclude=["2.1"], why_not=linear, owner="demo")]
        ['0', '2.0']
        >>> select(net.named_modules(), include=["1"], why_not=linear, owner="demo")
        Traceback (most recent call last):
        ...
        lightning_tricks.errors.InvalidArgumentError: demo: `include` pattern '1' matches only modules demo cannot act on: '1' (ReLU: not a Linear).
    """
    include = check_patterns(include_arg, include)
    exclude = check_patterns(exclude_arg, exclude, allow_empty=True)
    items = list(named)
    names = [n for n, _ in items if n]
    by_name = dict(items)
    reasons = {n: (why_not(item) if why_not is not None else None) for n, item in items}
    for pattern in include or ():
        matched = [n for n in names if name_matches(n, pattern)]
        if not matched:
            raise error(f"{owner}: `{include_arg}` pattern {pattern!r} matches no {what}: names look like "
                        f"{describe_names(names)} (glob patterns on qualified names; a pattern also selects "
                        f"what is inside a match).")
        if all(reasons[n] is not None for n in matched):
            shown = "; ".join(f"{n!r} ({type(by_name[n]).__name__}: {reasons[n]})" for n in matched[:6])
            more = f" and {len(matched) - 6} more" if len(matched) > 6 else ""
            raise error(f"{owner}: `{include_arg}` pattern {pattern!r} matches only {what}s {owner} cannot act on: "
                        f"{shown}{more}.")
    for pattern in exclude or ():
        if not any(name_matches(n, pattern) for n in names):
            raise error(f"{owner}: `{exclude_arg}` pattern {pattern!r} matches no {what}: names look like "
                        f"{describe_names(names)}.")
    return [(n, item) for n, item in items
            if reasons[n] is None
            and (include is None or any(name_matches(n, p) for p in include))
            and not any(name_matches(n, p) for p in exclude or ())]
