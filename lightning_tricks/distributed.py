"""Moved to :mod:`lightning_tricks.core.distributed`; this name is accepted until lightning-tricks 0.3.0."""

import warnings

from lightning_tricks.core.distributed import *  # noqa: F403

warnings.warn("lightning_tricks.distributed moved to lightning_tricks.core.distributed (the old name is accepted until lightning-tricks "
              "0.3.0)", DeprecationWarning, stacklevel=2)
