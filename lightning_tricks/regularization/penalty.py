"""Moved to :mod:`lightning_tricks.regularization.weight_penalty`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.regularization.weight_penalty import *  # noqa: F403

warn_deprecated("lightning_tricks.regularization.penalty moved to lightning_tricks.regularization.weight_penalty (the old name is accepted until lightning-tricks 0.3.0)")
