"""Renamed arguments: the old name keeps working for one release, with a ``DeprecationWarning`` that says the new one.

Every argument name follows the glossary (``docs/glossary.md``, :data:`RENAMED`); where a trick's
argument was renamed to it, the old name stays in the signature (so YAML configs and LightningCLI keep
accepting it) with a ``None`` default, and the constructor calls :func:`renamed_argument`.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_tricks.errors import InvalidArgumentError

REMOVED_IN = "0.3.0"
"""The release whose tricks no longer accept the old names."""

RENAMED: dict[str, dict[str, str]] = {}
"""``{trick: {old name: new name}}`` for every renamed argument (filled by :func:`renamed_argument`'s callers
at import time through :func:`register_renames`; the glossary test reads it)."""


def register_renames(owner: str, renames: dict[str, str]) -> dict[str, str]:
    """Record ``owner``'s renamed arguments (old name -> new name); returns ``renames``."""
    RENAMED.setdefault(owner, {}).update(renames)
    return renames


def renamed_argument(owner: str, old: str, new: str, old_value: Any, new_value: Any, new_default: Any) -> Any:
    """The value to use for ``new`` when the caller may have passed the deprecated ``old`` instead.

    Passing ``old`` warns (``DeprecationWarning``, naming both) and returns its value; passing both with
    different values is an error naming both.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_argument("Demo", "drop_rate", "p", 0.3, 0.1, new_default=0.1)
        0.3
        >>> str(caught[0].message)
        'Demo: `drop_rate` is renamed `p` (the old name is accepted until lightning-tricks 0.3.0); write p=0.3.'
        >>> renamed_argument("Demo", "drop_rate", "p", None, 0.2, new_default=0.1)
        0.2
    """
    if old_value is None:
        return new_value
    if new_value != new_default and new_value != old_value:
        raise InvalidArgumentError(f"{owner}: `{old}`={old_value!r} and `{new}`={new_value!r} are the same argument "
                                   f"(`{old}` is its old name): pass only `{new}`.")
    warnings.warn(f"{owner}: `{old}` is renamed `{new}` (the old name is accepted until lightning-tricks "
                  f"{REMOVED_IN}); write {new}={old_value!r}.", DeprecationWarning, stacklevel=3)
    return old_value
