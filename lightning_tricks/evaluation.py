"""Moved to :mod:`lightning_tricks.exact_evaluation`; this name is accepted until lightning-tricks 0.3.0."""

from lightning_tricks.core.deprecation import warn_deprecated
from lightning_tricks.exact_evaluation import *  # noqa: F403

warn_deprecated("lightning_tricks.evaluation moved to lightning_tricks.exact_evaluation (the old name is accepted until lightning-tricks 0.3.0)")
