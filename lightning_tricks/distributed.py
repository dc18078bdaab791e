"""Moved to :mod:`lightning_tricks.core.distributed`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.core.distributed import *  # noqa: F403

warn_deprecated("lightning_tricks.distributed moved to lightning_tricks.core.distributed (the old name is accepted until "
                "lightning-tricks 0.3.0)")
