"""The Lightning shell shared by the structural tricks: surgery at setup, a step counter, checkpointed state."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_tricks._validation import check_optional_int
from lightning_tricks.regularization._randomness import LayerRandomness


class StructuralCallback(Callback):
    """Converts the model in ``setup`` (before checkpoint restore and DDP wrapping) and keys its draws by step.

    Subclasses implement :meth:`apply` (idempotent surgery that returns the shared
    :class:`LayerRandomness`). The seed (``None``: the run's seed, the same on every rank) and the counter of
    training batches are the randomness's checkpointed state (the package's one seed rule,
    :class:`~lightning_tricks._seeding.RandomStream`), so a resumed run draws what the uninterrupted run
    would have drawn.
    """

    per_rank: bool = True

    def __init__(self, seed: int | None) -> None:
        check_optional_int("seed", seed, 0)
        self.seed = seed
        self.randomness = LayerRandomness(seed, per_rank=self.per_rank)

    @property
    def batches_seen(self) -> int:
        """Training batches seen over the whole fit (resumed runs included): the step the draws are keyed by."""
        return self.randomness.batches_seen

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, randomness: LayerRandomness) -> None:
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.randomness.shared = not self.per_rank  # a subclass may set per_rank after this __init__
        self.randomness.setup(trainer)
        self.apply(trainer, pl_module, self.randomness)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.randomness.step = self.randomness.batches_seen
        self.randomness.batches_seen += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.randomness.step = None

    def state_dict(self) -> dict[str, Any]:
        return self.randomness.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.randomness.load_state_dict(state_dict)
