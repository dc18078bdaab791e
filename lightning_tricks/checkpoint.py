"""Checkpoints that carry the structural tricks they were trained with.

Interface shared by the Ensemble loaders, the CLI's ``--ckpt_path`` and ``load_from_checkpoint``:
``apply_recorded_tricks(model, checkpoint)`` re-applies to ``model`` every trick the checkpoint
records (tricks keep parameter names, so it may run before or after ``load_state_dict``) and returns
their names. This first version records nothing and applies nothing; the structural tricks fill it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def apply_recorded_tricks(model: nn.Module, checkpoint: Mapping[str, Any]) -> list[str]:
    """Re-apply to ``model`` the tricks recorded in ``checkpoint``; return their names."""
    return []
