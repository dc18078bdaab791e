"""Moved to :mod:`lightning_tricks.core.surgery`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.core.surgery import *  # noqa: F403

warn_deprecated("lightning_tricks.surgery moved to lightning_tricks.core.surgery (the old name is accepted until "
                "lightning-tricks 0.3.0)")
