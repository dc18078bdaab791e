"""The Lightning shell shared by the structural tricks: surgery at setup, a step counter, checkpointed state."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_tricks._validation import check_int
from lightning_tricks.regularization._randomness import LayerRandomness


def resolve_seed(seed: int | None) -> int:
    """``seed``, else the seed of ``seed_everything`` (``PL_GLOBAL_SEED``, the same on every rank), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class StructuralCallback(Callback):
    """Converts the model in ``setup`` (before checkpoint restore and DDP wrapping) and keys its draws by step.

    Subclasses implement :meth:`apply` (idempotent surgery that returns the shared
    :class:`LayerRandomness`). The counter of training batches is the callback's checkpointed state, so a
    resumed run draws what the uninterrupted run would have drawn.
    """

    per_rank: bool = True

    def __init__(self, seed: int | None) -> None:
        if seed is not None:
            check_int("seed", seed, 0)
        self.seed = seed
        self.randomness: LayerRandomness | None = None
        self.batches_seen = 0
        self._resolved_seed: int | None = None

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, randomness: LayerRandomness) -> None:
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resolved_seed is None:
            self._resolved_seed = resolve_seed(self.seed)
        if self.randomness is None:
            self.randomness = LayerRandomness(self._resolved_seed, per_rank=self.per_rank)
        self.randomness.seed = self._resolved_seed
        self.randomness.rank = trainer.global_rank
        self.apply(trainer, pl_module, self.randomness)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.randomness is not None
        self.randomness.step = self.batches_seen
        self.batches_seen += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.randomness is not None:
            self.randomness.step = None

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._resolved_seed, "batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        if state_dict.get("seed") is not None:
            self._resolved_seed = int(state_dict["seed"])
            if self.randomness is not None:
                self.randomness.seed = self._resolved_seed
