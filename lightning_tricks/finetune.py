"""Moved to :mod:`lightning_tricks.transfer.finetune` (``from lightning_tricks import Finetune`` is unchanged); this
name is accepted until lightning-tricks 0.3.0."""

import warnings

from lightning_tricks.transfer.finetune import *  # noqa: F403
from lightning_tricks.transfer.finetune import Finetune, check_finetune_args  # noqa: F401

warnings.warn("lightning_tricks.finetune moved to lightning_tricks.transfer.finetune (the old name is accepted until "
              "lightning-tricks 0.3.0)", DeprecationWarning, stacklevel=2)
