"""The Lightning shell shared by the structural tricks: surgery at setup, a step counter, checkpointed state,
and the record a checkpoint keeps of a trick that changes what the network computes at evaluation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_tricks.core.deprecation import RENAMED
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.surgery import SurgeryReport, exact_patterns
from lightning_tricks.core.validation import check_optional_int

RECORD_KEY = "lightning_tricks"
"""Top-level checkpoint key of our records; structural tricks go in ``checkpoint[RECORD_KEY]["structural"]``."""


class HookHolder(Callback):
    """A callback that puts hooks on the model: :meth:`release_hooks` runs when the run ends, normally or not."""

    def release_hooks(self) -> None:
        """Remove every hook the callback holds (safe to call twice)."""
        raise NotImplementedError

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release_hooks()  # a failed run leaves the model as a finished one does


class StructuralCallback(Callback):
    """Converts the model in ``setup`` (before checkpoint restore and DDP wrapping) and keys its draws by step.

    Subclasses implement :meth:`convert` (idempotent surgery through the trick's functional core) and
    :meth:`init_args`; :meth:`after_convert` adds checks that need the trainer. The seed (``None``: the
    run's seed, the same on every rank) and the counter of training batches are the randomness's
    checkpointed state (the package's one seed rule, :class:`~lightning_tricks.core.seeding.RandomStream`), so a
    resumed run draws what the uninterrupted run would have drawn. A trick whose converted network evaluates differently from the plain one
    (:meth:`changes_evaluation`) records itself in every checkpoint as plain data (class path, init
    arguments, converted module names), which :func:`lightning_tricks.apply_recorded_tricks` re-applies.
    """

    per_rank: bool = True
    converts: str = "modules"
    """What the log line counts (``"residual blocks"``)."""

    def __init__(self, seed: int | None) -> None:
        check_optional_int("seed", seed, 0)
        self.seed = seed
        self.randomness = LayerRandomness(seed, per_rank=self.per_rank)
        self.report: SurgeryReport | None = None

    def selection_state_key(self, **fields: Any) -> str:
        """The state key of a trick that selects modules: ``fields`` under the argument names of the first
        release (so its checkpoints resume), plus ``exclude`` only when one is given (keys stay as they were)."""
        extra = {"exclude": self.exclude} if getattr(self, "exclude", None) else {}
        return self._generate_state_key(**fields, **extra)

    @property
    def batches_seen(self) -> int:
        """Training batches seen over the whole fit (resumed runs included): the step the draws are keyed by."""
        return self.randomness.batches_seen

    def convert(self, model: nn.Module, randomness: LayerRandomness, modules: list[str] | None = None
                ) -> SurgeryReport:
        """Convert ``model`` in place with the trick's functional core (``modules``: exact names to convert)."""
        raise NotImplementedError

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments, as plain data, with the seed actually used."""
        raise NotImplementedError

    def changes_evaluation(self) -> bool:
        """Whether the converted network evaluates differently from the plain one (then it is recorded)."""
        return False

    def after_convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks that need the trainer, after the surgery."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.randomness.shared = not self.per_rank  # a subclass may set per_rank after this __init__
        self.randomness.setup(trainer)
        self.report = self.convert(pl_module, self.randomness)
        if self.report.total:
            self.report.log(self.converts)
            self.after_convert(trainer, pl_module)

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

    # -- the checkpoint record ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of this trick (plain data), or ``None`` when evaluation is the plain network's."""
        if self.report is None or not self.report.total or not self.changes_evaluation():
            return None
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args(),
                "modules": self.report.converted + self.report.already}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        record = self.record()
        if record is not None:
            checkpoint.setdefault(RECORD_KEY, {}).setdefault("structural", []).append(record)

    @classmethod
    def reapply(cls, model: nn.Module, record: dict[str, Any]) -> SurgeryReport:
        """Convert ``model`` as the trick that wrote ``record`` converted the model it was saved from."""
        renamed = RENAMED.get(cls.__name__, {})  # a record written before an argument's rename loads silently
        trick = cls(**{renamed.get(k, k): v for k, v in record["init_args"].items()})  # the run's own seed
        trick.randomness.shared = not trick.per_rank
        trick.randomness.setup()
        return trick.convert(model, trick.randomness, modules=exact_patterns(record["modules"]))
