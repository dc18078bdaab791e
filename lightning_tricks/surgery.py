"""Moved to :mod:`lightning_tricks.core.surgery`; this name is accepted until lightning-tricks 0.3.0."""

import warnings

from lightning_tricks.core.surgery import *  # noqa: F403

warnings.warn("lightning_tricks.surgery moved to lightning_tricks.core.surgery (the old name is accepted until lightning-tricks "
              "0.3.0)", DeprecationWarning, stacklevel=2)
