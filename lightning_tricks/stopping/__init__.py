"""Moved to :mod:`lightning_tricks.early_stopping`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.early_stopping import *  # noqa: F403

warn_deprecated("lightning_tricks.stopping moved to lightning_tricks.early_stopping (the old name is accepted until lightning-tricks 0.3.0)")
