"""Moved to :mod:`lightning_tricks.core.stochastic`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.core.stochastic import *  # noqa: F403

warn_deprecated("lightning_tricks.stochastic moved to lightning_tricks.core.stochastic (the old name is accepted until "
                "lightning-tricks 0.3.0)")
