"""Moved to :mod:`lightning_tricks.large_batch`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.large_batch import *  # noqa: F403

warn_deprecated("lightning_tricks.scaling moved to lightning_tricks.large_batch (the old name is accepted until lightning-tricks 0.3.0)")
