"""Moved to :mod:`lightning_tricks.core.stochastic`; this name is accepted until lightning-tricks 0.3.0."""

import warnings

from lightning_tricks.core.stochastic import *  # noqa: F403

warnings.warn("lightning_tricks.stochastic moved to lightning_tricks.core.stochastic (the old name is accepted until lightning-tricks "
              "0.3.0)", DeprecationWarning, stacklevel=2)
