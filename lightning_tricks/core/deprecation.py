"""Renamed arguments: the old name keeps working for one release, with a ``DeprecationWarning`` that says the new one.

Every argument name follows the glossary (``docs/glossary.md``, :data:`RENAMED`); where a trick's
argument was renamed to it, the old name stays in the signature (so YAML configs and LightningCLI keep
accepting it) with a ``None`` default, and the constructor calls :func:`renamed_argument`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lightning_tricks.errors import InvalidArgumentError, LightningTricksDeprecationWarning

warnings.filterwarnings("default", category=LightningTricksDeprecationWarning)  # once per calling line

REMOVED_IN = "0.3.0"
"""The release whose tricks no longer accept the old names."""

RENAMED: dict[str, dict[str, str]] = {}
"""``{trick: {old name: new name}}`` for every renamed argument (filled by :func:`renamed_argument`'s callers
at import time through :func:`register_renames`; the glossary test reads it)."""


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside lightning_tricks (the user's line, or jsonargparse's)."""
    def internal(frame: Any) -> bool:  # frames warnings.warn itself skips (the import machinery)
        return "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename

    frame, level = sys._getframe(2), 2  # the caller of warn_deprecated; sys._getframe is public API
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lightning_tricks"):
        frame, level = frame.f_back, level + 1
        while frame is not None and internal(frame):
            frame = frame.f_back
    return level


def warn_deprecated(message: str) -> None:
    """Warn with :class:`~lightning_tricks.errors.LightningTricksDeprecationWarning`, attributed to the caller's code."""
    warnings.warn(message, LightningTricksDeprecationWarning, stacklevel=_user_stacklevel())


def register_renames(owner: str, renames: dict[str, str]) -> dict[str, str]:
    """Record ``owner``'s renamed arguments (old name -> new name); returns ``renames``."""
    RENAMED.setdefault(owner, {}).update(renames)
    return renames


def renamed_argument(owner: str, old: str, new: str, old_value: Any, new_value: Any, new_default: Any) -> Any:
    """The value to use for ``new`` when the caller may have passed the deprecated ``old`` instead.

    Passing ``old`` warns (a ``DeprecationWarning`` attributed to the caller's line, naming both) and returns its value; passing both with
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
    warn_deprecated(f"{owner}: `{old}` is renamed `{new}` (the old name is accepted until lightning-tricks "
                    f"{REMOVED_IN}); write {new}={old_value!r}.")
    return old_value
