"""Find submodules and change them in place, keeping every parameter and buffer name.

The structural regularizers (DropConnect, stochastic depth, fractional max pooling) change the model
itself. They share the rules written here:

* **Selection** (:func:`select_modules`, through :func:`lightning_tricks.core.selection.select`): modules are
  chosen by qualified name with glob patterns (``include``/``exclude``; ``"model.head"`` also selects what is
  inside it), by a predicate, or by a trick's default rule, and filtered by what the trick can wrap. A pattern that matches nothing, or matches only modules the trick cannot wrap, is an error
  that names the argument and the pattern: nothing silently does nothing.
* **No renaming.** A module with parameters is changed by swapping its class to a subclass
  (:func:`swap_class`): same object, same parameters, buffers and hooks, so ``state_dict()`` keys are
  identical with and without the trick, a checkpoint loads either way and ``ckpt_path`` resume works.
  A module without state (a pooling layer) may be replaced by another stateless module
  (:func:`replace_module`). :func:`keys_unchanged` checks the promise after every surgery.
* **Marked when evaluation changes.** A trick whose converted network evaluates differently from the
  plain one (fractional pooling, stochastic depth with test-time scaling) adds one small persistent buffer
  named ``lightning_tricks_<Trick>`` to each converted module (:func:`mark`). A checkpoint of the converted
  model then fails to load strictly into the plain architecture with ``Unexpected key(s) in state_dict:
  "....lightning_tricks_FractionalMaxPooling"`` instead of silently evaluating another network; a plain
  checkpoint still loads into the converted model (the missing marker keeps its value). These are the only
  keys surgery may add (:func:`keys_unchanged` ignores them).
* **Idempotent.** Applying a trick twice changes nothing the second time; modules already converted are
  counted as such in the :class:`SurgeryReport`, which is logged once (rank zero) with counts.
* **Picklable.** Swapped classes are derived on demand from the original class and a module-level mixin,
  and pickle (``ddp_spawn``, ``torch.save(model)``, ``copy.deepcopy``) as "mixin + original class",
  so even a user's own block class survives a round trip in a fresh process.

Examples:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [name for name, _ in select_modules(model, ["*"], can_wrap=lambda m: None if isinstance(m, nn.Linear)
    ...                                     else "not a Linear", arg_name="layers", trick="Demo")]
    ['0', '2']
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_tricks.core import selection
from lightning_tricks.core.selection import describe_names
from lightning_tricks.errors import ModelNotSupportedError  # noqa: F401  (re-exported)

CanWrap = Callable[[nn.Module], "str | None"]
"""Returns ``None`` when a trick can convert the module, else the reason it cannot (shown to the user)."""
Predicate = Callable[[str, nn.Module], bool]


def check_patterns(name: str, patterns: Sequence[str] | None) -> list[str] | None:
    """``None`` or a non-empty list of glob patterns (strings), else an error naming the argument
    (:func:`lightning_tricks.core.selection.check_patterns`)."""
    return selection.check_patterns(name, patterns)


def select_modules(
    model: nn.Module,
    patterns: Sequence[str] | None,
    *,
    can_wrap: CanWrap,
    arg_name: str,
    trick: str,
    default: Predicate | None = None,
    predicate: Predicate | None = None,
    exclude: Sequence[str] | None = None,
    exclude_arg: str = "exclude",
) -> list[tuple[str, nn.Module]]:
    """The submodules a trick should convert, in ``named_modules()`` order, chosen by
    :func:`lightning_tricks.core.selection.select` (the package's one selector).

    Args:
        model: the model to search (for a LightningModule, names start at its attributes, e.g. ``model.fc``).
        patterns: the ``include`` glob patterns on qualified module names; a pattern also selects the
            modules inside a match (``"layer1"`` selects the convertible blocks in ``layer1``). A module is
            selected when ``can_wrap`` accepts it. ``None`` uses ``default``.
        can_wrap: ``None`` for a module the trick can convert, else the reason it cannot.
        arg_name: the user-facing argument that holds ``patterns`` (named in errors).
        trick: the trick's name (named in errors).
        default: which convertible modules to take when ``patterns`` is ``None`` (all of them when ``None``).
        predicate: an extra filter ``(name, module) -> bool`` (Python API only).
        exclude: glob patterns of modules (and what is inside them) to leave as they are.
        exclude_arg: the user-facing argument that holds ``exclude``.

    Returns:
        ``[(qualified name, module), ...]``, without duplicates.

    Raises:
        InvalidArgumentError: a pattern matches no module, or only modules the trick cannot convert (the
            message names the pattern, what it matched and why each cannot be converted).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
        >>> linear = lambda m: None if isinstance(m, nn.Linear) else "not a Linear"
        >>> [n for n, _ in select_modules(net, ["2"], can_wrap=linear, arg_name="include", trick="Demo")]
        ['2.0', '2.1']
    """
    named = [(n, m) for n, m in model.named_modules() if n and (predicate is None or predicate(n, m))]
    why_not: Callable[[nn.Module], str | None] = can_wrap
    if patterns is None and default is not None:
        chosen_by_default = {id(m) for n, m in named if default(n, m)}

        def why_not(module: nn.Module) -> str | None:
            return can_wrap(module) or (None if id(module) in chosen_by_default else "not chosen by default")

    return selection.select(named, include=patterns, exclude=exclude, why_not=why_not, owner=trick,
                            include_arg=arg_name, exclude_arg=exclude_arg)


def exact_patterns(names: Iterable[str]) -> list[str]:
    """Glob patterns that each match one module name exactly (to re-select the modules a checkpoint names)."""
    return [glob.escape(name) for name in names]


# ---------------------------------------------------------------------------------------------------------------
# class swapping


_DERIVED: dict[tuple[type, type], type] = {}


def register_derived_class(mixin: type, base: type, derived: type) -> None:
    """Use the module-level class ``derived`` (a subclass of ``mixin`` and ``base``) for that pair."""
    if not (issubclass(derived, mixin) and issubclass(derived, base)):
        raise TypeError(f"{derived.__name__} must subclass both {mixin.__name__} and {base.__name__}")
    derived.__lt_mixin__ = mixin  # type: ignore[attr-defined]
    derived.__lt_base__ = base  # type: ignore[attr-defined]
    _DERIVED[(mixin, base)] = derived


def derived_class(mixin: type, base: type) -> type:
    """The class ``mixin + base`` (created once, then cached): ``isinstance`` checks against ``base`` still hold."""
    key = (mixin, base)
    if key not in _DERIVED:
        _DERIVED[key] = type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {
            "__module__": mixin.__module__, "__lt_mixin__": mixin, "__lt_base__": base,
            "__doc__": f"{base.__qualname__} converted by {mixin.__name__} (see {mixin.__module__}).",
        })
    return _DERIVED[key]


def _new_derived(mixin: type, base: type) -> nn.Module:
    cls = derived_class(mixin, base)
    return cls.__new__(cls)


class SwappableMixin:
    """Base of the mixins :func:`swap_class` applies: pickles as "mixin + original class".

    A derived class created at run time cannot be found by name in a fresh process (``ddp_spawn``), so
    instances reduce to ``(mixin, base)`` and the derived class is recreated on load.
    """

    __lt_mixin__: type
    __lt_base__: type

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        return _new_derived, (cls.__lt_mixin__, cls.__lt_base__), self.__getstate__()  # type: ignore[attr-defined]


def swap_class(module: nn.Module, mixin: type) -> bool:
    """Turn ``module`` into an instance of ``mixin + type(module)`` in place; ``False`` if it already is one.

    The object stays the same, so its parameters, buffers, hooks and every reference to it are kept.
    """
    if isinstance(module, mixin):
        return False
    module.__class__ = derived_class(mixin, type(module))
    return True


def original_class(module: nn.Module) -> type:
    """The class a swapped module had before :func:`swap_class` (its own class otherwise)."""
    return getattr(type(module), "__lt_base__", type(module))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name`` by ``new``; both must hold no parameters or buffers (markers aside).

    Returns:
        The module that was replaced.

    Raises:
        ValueError: either module has state (replacing it would rename or drop ``state_dict`` entries).
    """
    old = model.get_submodule(name)
    for module, which in ((old, "old"), (new, "new")):
        if any(not is_marker(key) for key in module.state_dict()):
            raise ValueError(f"replace_module: the {which} module at {name!r} has state; use swap_class to keep names.")
    model.set_submodule(name, new)
    return old


MARKER_PREFIX = "lightning_tricks_"
"""Buffers named ``lightning_tricks_<Trick>`` mark modules whose evaluation differs from the plain network."""


def is_marker(key: str) -> bool:
    """Whether a ``state_dict`` key is a trick's marker buffer (see :func:`mark`)."""
    return key.rsplit(".", 1)[-1].startswith(MARKER_PREFIX)


def _keep_missing_marker(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # A checkpoint of the plain model has no marker: keep the module's own value, so it loads strictly.
    for name, buffer in module.named_buffers(recurse=False):
        if name.startswith(MARKER_PREFIX) and prefix + name not in state_dict:
            state_dict[prefix + name] = buffer


_U64 = 1 << 64


def _encode(value: int | float) -> int:
    if isinstance(value, float):  # the float64 bit pattern: exact, and an integer buffer survives model.half()
        return int(torch.tensor(value, dtype=torch.float64).view(torch.int64))
    value = int(value)
    if not -(1 << 63) <= value < _U64:
        raise ValueError(f"mark: {value} does not fit in 64 bits.")
    # an unsigned 64-bit value (a run's seed, torch.initial_seed() of an unseeded run, is one half the time)
    # is stored as its two's complement int64 code; marker_values(..., "u") reads it back
    return value - _U64 if value >= 1 << 63 else value


def marker_values(marker: torch.Tensor, kinds: str) -> list[int | float]:
    """Decode a marker buffer written by :func:`mark`.

    ``kinds`` has one letter per value: ``f`` (float), ``i`` (signed int) or ``u`` (unsigned 64-bit int, a seed).
    """
    codes = marker.detach().cpu().to(torch.int64)
    decode = {"f": lambda code: float(code.view(torch.float64)), "i": lambda code: int(code),
              "u": lambda code: int(code) % _U64}
    return [decode[kind](code) for code, kind in zip(codes, kinds, strict=True)]


def mark(module: nn.Module, trick: str, values: Sequence[int | float]) -> str:
    """Give ``module`` the persistent buffer ``lightning_tricks_<trick>`` holding ``values``; returns its name.

    The buffer makes a checkpoint of the converted model fail to load strictly into the plain architecture,
    naming the trick; loading a checkpoint without it keeps the module's value (a load pre-hook fills it in).
    The values (exact, as int64 codes: read them with :func:`marker_values`) are what is needed to convert
    a plain model the same way when a checkpoint has no record of the trick (Lightning's ``weights_only``
    checkpoints skip callback hooks).
    """
    name = MARKER_PREFIX + trick
    device = next(module.parameters(), next(module.buffers(), torch.empty(0))).device
    value = torch.tensor([_encode(v) for v in values], dtype=torch.int64, device=device)
    if name in dict(module.named_buffers(recurse=False)):
        setattr(module, name, value)
        return name
    module.register_buffer(name, value)
    if not getattr(module, "lt_marker_hook", False):
        module.register_load_state_dict_pre_hook(_keep_missing_marker)
        module.lt_marker_hook = True
    return name


def unmark(module: nn.Module, trick: str) -> None:
    """Remove the marker buffer of ``trick`` from ``module``, if it has one."""
    name = MARKER_PREFIX + trick
    if name in dict(module.named_buffers(recurse=False)):
        delattr(module, name)


def keys_unchanged(before: Iterable[str], model: nn.Module, trick: str) -> None:
    """Check that surgery kept the ``state_dict`` keys, markers aside (raises ``RuntimeError`` naming the difference)."""
    before = [k for k in before if not is_marker(k)]
    after = [k for k in model.state_dict() if not is_marker(k)]
    if before != after:
        gone, new = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        raise RuntimeError(f"{trick} changed the state_dict keys (removed {gone[:5]}, added {new[:5]}); "
                           "please report this as a bug.")


@dataclass
class SurgeryReport:
    """What a surgery changed: newly converted modules, modules already converted, and modules passed over.

    Attributes:
        trick: the trick's name.
        converted: names converted now.
        already: names that were converted before (the surgery is idempotent).
        skipped: ``(name, reason)`` for modules a default rule passed over on purpose (e.g. the classifier head).
        detail: the trick's settings, for the log line.
    """

    trick: str
    converted: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    detail: str = ""

    @property
    def total(self) -> int:
        """Modules under the trick after the surgery."""
        return len(self.converted) + len(self.already)

    def message(self, what: str) -> str:
        """One line: counts, names and settings."""
        if self.total == 1 and what.endswith("s"):
            what = what[:-1]
        parts = [f"{self.trick}: {self.total} {what} ({len(self.converted)} converted now, "
                 f"{len(self.already)} already converted)"]
        if self.detail:
            parts.append(self.detail)
        names = self.converted + self.already
        parts.append(f"modules: {describe_names(names)}")
        parts.extend(f"left {name!r} as is: {reason}" for name, reason in self.skipped)
        return "; ".join(parts) + "."

    def log(self, what: str) -> None:
        """Log :meth:`message` on rank zero."""
        rank_zero_info(self.message(what))


__all__ = [
    "MARKER_PREFIX",
    "ModelNotSupportedError",
    "SurgeryReport",
    "check_patterns",
    "SwappableMixin",
    "derived_class",
    "describe_names",
    "exact_patterns",
    "is_marker",
    "keys_unchanged",
    "mark",
    "marker_values",
    "original_class",
    "register_derived_class",
    "replace_module",
    "select_modules",
    "swap_class",
    "unmark",
]
