"""Exact evaluation under DDP: every validation and test sample is evaluated once, on one rank.

Lightning gives validation and test loaders a ``torch.utils.data.DistributedSampler``, which pads the
dataset with repeated samples until it divides by the number of ranks: 45 test images on 2 ranks are
evaluated as 46, and the duplicate biases every metric (Lightning warns about it and recommends
``devices=1`` for ``trainer.test``). This module removes the padding:

* :func:`even_batches` (the functional core) splits ``num_samples`` positions over the ranks without
  repetition (rank ``r`` gets positions ``r, r + W, r + 2W, ...``, as ``DistributedSampler`` does) and
  cuts each rank's share into the **same number of batches on every rank**, the last ones smaller.
  Equal batch counts matter: any collective called once per step (DDP's buffer broadcast, a
  ``self.log(..., on_step=True, sync_dist=True)``, a torchmetrics metric with
  ``dist_sync_on_step=True``) is reached by every rank, so nothing can hang, unlike Lightning's
  ``UnrepeatedDistributedSampler``, whose ranks can differ by one batch.
* :class:`EvenDistributedBatchSampler` and :func:`exact_eval_dataloader` apply it to a ``DataLoader``
  (usable in a plain torch DDP script, without Lightning).
* :class:`ExactDistributedEvaluation` is the Lightning callback; :func:`install_exact_evaluation` is
  the same mechanism for other callbacks (test-time augmentation and ensembles use it).

Metrics then equal the single-process values: torchmetrics metrics sum their states over ranks, and
``self.log(..., sync_dist=True)`` averages over ranks weighted by each rank's batch sizes. For the
latter we also correct a Lightning 2.6 detail that only shows without padding: it averages the
integer count of logged samples over the ranks in integer arithmetic (45 samples on 2 ranks count as
44), so during the exact stages integer means are computed in floating point.

Examples:
    >>> [even_batches(5, batch_size=2, num_replicas=2, rank=r) for r in (0, 1)]
    [[[0, 2], [4]], [[1], [3]]]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from lightning_tricks._lightning_internals import (
    exact_evaluation_patch,
    rebuild_dataloader,
    replace_prepare_dataloader,
    replace_strategy_reduce,
    require_verified,
    requires_distributed_sampler,
    restore_prepare_dataloader,
    restore_strategy_reduce,
    set_exact_evaluation_patch,
)
from lightning_tricks.core.validation import InvalidArgumentError, check_int

EXACT_STAGES = ("validate", "test")
"""Stages whose loaders :class:`ExactDistributedEvaluation` can make exact (``predict`` already is)."""
_MODES = {"validate": RunningStage.VALIDATING, "test": RunningStage.TESTING}


def padded_duplicates(num_samples: int, num_replicas: int) -> int:
    """How many samples ``DistributedSampler`` (``drop_last=False``) evaluates twice: ``-N mod W``."""
    return (-num_samples) % num_replicas


def even_batches(num_samples: int, batch_size: int, num_replicas: int, rank: int) -> list[list[int]]:
    """Positions ``0..num_samples-1`` that ``rank`` evaluates, as batches; every rank gets as many batches.

    Rank ``r`` takes positions ``r, r + W, ...`` (no padding, no repetition). Its share is cut into
    ``ceil(ceil(N / W) / batch_size)`` batches of at most ``batch_size``: full batches first, then
    smaller ones, none empty. That count is the same on every rank whenever each rank has at least
    as many samples as batches, which holds for ``batch_size >= 2`` and ``N >= W``; otherwise (batch
    size 1, or fewer samples than ranks) the shares are cut into full batches and counts differ by one.

    Args:
        num_samples: size of the evaluation set (its sampler's length).
        batch_size: the loader's batch size.
        num_replicas: number of ranks.
        rank: this rank.

    Returns:
        The batches of positions of ``rank``, in order.
    """
    check_int("num_samples", num_samples, 0)
    check_int("batch_size", batch_size, 1)
    check_int("num_replicas", num_replicas, 1)
    check_int("rank", rank, 0, num_replicas - 1)
    positions = list(range(rank, num_samples, num_replicas))
    largest_share = math.ceil(num_samples / num_replicas)
    num_batches = math.ceil(largest_share / batch_size)
    if len(positions) < num_batches:  # cannot be equal: fall back to full batches
        num_batches = math.ceil(len(positions) / batch_size)
    batches, start = [], 0
    for i in range(num_batches):
        size = min(batch_size, len(positions) - start - (num_batches - 1 - i))
        batches.append(positions[start:start + size])
        start += size
    return batches


def equal_batch_counts(num_samples: int, batch_size: int, num_replicas: int) -> bool:
    """Whether :func:`even_batches` gives every rank the same number of batches."""
    return len({len(even_batches(num_samples, batch_size, num_replicas, r)) for r in range(num_replicas)}) == 1


class EvenDistributedBatchSampler(Sampler[list[int]]):
    """A batch sampler that evaluates each of ``sampler``'s indices once over all ranks, in equal batch counts.

    The global order is the wrapped sampler's: ``SequentialSampler`` gives ``0..N-1``; a
    ``RandomSampler`` (a shuffled evaluation loader) gives a permutation seeded by ``seed + epoch``,
    identical on every rank; any other sampler is iterated and must give the same order on every rank
    (Lightning assumes the same). Batches follow :func:`even_batches`.

    Args:
        sampler: the loader's original sampler (its ``len`` is the set's size).
        batch_size: maximal batch size.
        num_replicas: number of ranks (default: the process group's).
        rank: this rank (default: the process group's).
        seed: seed of the permutation when ``sampler`` is a ``RandomSampler``.

    Examples:
        >>> from torch.utils.data import SequentialSampler
        >>> list(EvenDistributedBatchSampler(SequentialSampler(range(7)), 2, num_replicas=2, rank=1))
        [[1, 3], [5]]
    """

    def __init__(self, sampler: Sampler, batch_size: int, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.sampler, self.batch_size, self.num_replicas, self.rank = sampler, batch_size, num_replicas, rank
        self.seed, self.epoch = seed, 0
        self.num_samples = len(sampler)  # type: ignore[arg-type]
        self.batches = even_batches(self.num_samples, batch_size, num_replicas, rank)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch; changes the order only for a ``RandomSampler``."""
        self.epoch = epoch

    def _global_order(self) -> Sequence[int]:
        if isinstance(self.sampler, SequentialSampler):
            return range(self.num_samples)
        if isinstance(self.sampler, RandomSampler) and not self.sampler.replacement:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._global_order()
        for batch in self.batches:
            yield [int(order[p]) for p in batch]

    def __len__(self) -> int:
        return len(self.batches)


def _rebuildable(dataloader: DataLoader) -> str | None:
    """Why ``dataloader`` cannot be given an even batch sampler, or None when it can."""
    if type(dataloader.batch_sampler) is not BatchSampler:
        return f"it has a custom batch sampler ({type(dataloader.batch_sampler).__name__})"
    if dataloader.batch_sampler.drop_last:
        return "it drops the last incomplete batch (drop_last=True), so single-process evaluation is not complete either"
    try:
        len(dataloader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return "its sampler has no length"
    return None


def exact_eval_dataloader(dataloader: DataLoader, num_replicas: int | None = None, rank: int | None = None,
                          seed: int = 0) -> DataLoader:
    """A copy of ``dataloader`` whose batches are this rank's share under :class:`EvenDistributedBatchSampler`.

    Every other setting (workers, collate function, pinning, ...) is kept; ``DataLoader`` subclasses
    are rebuilt the way Lightning rebuilds them when it injects its own sampler.

    Args:
        dataloader: an evaluation loader with a plain ``BatchSampler`` (``batch_size=...``) and
            ``drop_last=False``.
        num_replicas: number of ranks (default: the process group's).
        rank: this rank (default: the process group's).
        seed: seed of the order when the loader shuffles.

    Raises:
        ValueError: the loader cannot be split exactly (custom batch sampler, ``drop_last=True``, a
            sampler without length); the message says which.

    Examples:
        >>> loader = DataLoader(list(range(5)), batch_size=2)
        >>> [b.tolist() for b in exact_eval_dataloader(loader, num_replicas=2, rank=0)]
        [[0, 2], [4]]
    """
    reason = _rebuildable(dataloader)
    if reason is not None:
        raise ValueError(f"cannot evaluate this {type(dataloader).__name__} exactly on several ranks: {reason}.")
    batch_sampler = EvenDistributedBatchSampler(dataloader.sampler, dataloader.batch_size or 1, num_replicas, rank,
                                                seed)
    return rebuild_dataloader(dataloader, batch_sampler=batch_sampler, batch_size=1, sampler=None, shuffle=False,
                              drop_last=False)


def _active_modes(trainer: pl.Trainer) -> frozenset[RunningStage]:
    patch = exact_evaluation_patch(trainer)
    return patch.modes() if patch is not None else frozenset()


class _ExactMeanReduce:
    """``trainer.strategy.reduce`` with integer means computed in floating point during the exact stages.

    ``self.log(..., sync_dist=True)`` averages an epoch as ``reduce(sum of value x batch size, "mean")
    / reduce(sum of batch sizes, "mean")``; the sum of batch sizes is an integer tensor, which
    Lightning's mean divides by the world size in integer arithmetic (45 samples over 2 ranks count as
    44). Harmless with padding (every rank has as many samples), biased once ranks hold different counts.

    Lightning stores the reduce function in each logged key's metadata and refuses a later
    ``self.log`` of that key whose metadata differs, so this object compares equal to the strategy's
    own ``reduce`` and to any other instance for the same strategy, and it reads the active stages
    from the trainer at call time (a key registered in an earlier run keeps working).
    """

    def __init__(self, trainer: pl.Trainer, original: Any) -> None:
        self.trainer, self.original = trainer, original

    def __call__(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        stage = self.trainer.state.stage
        if stage == RunningStage.SANITY_CHECKING:
            stage = RunningStage.VALIDATING
        if (stage in _active_modes(self.trainer) and isinstance(tensor, torch.Tensor)
                and not tensor.is_floating_point() and not tensor.is_complex()
                and isinstance(reduce_op, str) and reduce_op.lower() in ("mean", "avg")):
            tensor = tensor.to(torch.get_default_dtype())  # the logged mean keeps Lightning's usual dtype
        return self.original(tensor, group=group, reduce_op=reduce_op)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ExactMeanReduce):
            return other.trainer.strategy is self.trainer.strategy
        return bool(other == self.original)

    def __hash__(self) -> int:
        return hash(self.original)


class _ExactEvaluationPatch:
    """Two instance-level replacements on one trainer, in place while at least one owner needs them (both
    through `lightning_tricks._lightning_internals`, where the private accesses live).

    * the data connector's ``_prepare_dataloader``: Lightning calls it for every loader of every
      stage, from any source (datamodule, module hooks, loaders passed to ``trainer.test``); for the
      owners' stages it returns the exact loader instead of the padded one and defers to Lightning
      otherwise.
    * ``trainer.strategy.reduce``: see :class:`_ExactMeanReduce`.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.strategy = trainer.strategy
        self.owners: dict[int, frozenset[RunningStage]] = {}
        self.warned: set[str] = set()
        self.original_prepare = replace_prepare_dataloader(trainer, self.prepare_dataloader)
        replace_strategy_reduce(self.strategy, lambda original: _ExactMeanReduce(trainer, original), _ExactMeanReduce)

    def remove(self) -> None:
        restore_prepare_dataloader(self.trainer, self.prepare_dataloader)
        restore_strategy_reduce(self.strategy, _ExactMeanReduce)

    def modes(self) -> frozenset[RunningStage]:
        return frozenset().union(*self.owners.values())

    def prepare_dataloader(self, dataloader: object, shuffle: bool, mode: RunningStage) -> object:
        if (mode in self.modes() and isinstance(dataloader, DataLoader)
                and requires_distributed_sampler(self.trainer, dataloader)):
            reason = _rebuildable(dataloader)
            if reason is None:
                kwargs = self.trainer.distributed_sampler_kwargs or {}
                seed = int(os.getenv("PL_GLOBAL_SEED", 0))
                return exact_eval_dataloader(dataloader, kwargs.get("num_replicas"), kwargs.get("rank"), seed)
            if reason not in self.warned:
                self.warned.add(reason)
                rank_zero_warn(f"ExactDistributedEvaluation: the {mode.value} loader keeps Lightning's padded "
                               f"DistributedSampler because {reason}; metrics may count up to world_size - 1 "
                               "samples twice.")
        return self.original_prepare(dataloader, shuffle, mode)


def install_exact_evaluation(trainer: pl.Trainer, owner: object, stages: Sequence[str]) -> bool:
    """Make ``trainer``'s loaders of ``stages`` (``"validate"``, ``"test"``) exact, on behalf of ``owner``.

    Call it from ``Callback.setup`` (before the loops build their loaders) on every rank. Several
    owners (e.g. :class:`ExactDistributedEvaluation` and test-time augmentation) share one patch;
    :func:`uninstall_exact_evaluation` removes ``owner``'s stages and restores Lightning's behaviour
    when no owner is left. On a single process nothing is changed.

    Returns:
        Whether the trainer runs on several ranks (and the patch is in place).

    Raises:
        UnverifiedLightningError: a Lightning version these private methods were not checked on, or one that
            does not route loaders through the methods we replace (a ``RuntimeError``).
    """
    modes = frozenset(_MODES[s] for s in stages if s in _MODES)
    if trainer.world_size <= 1 or not modes:
        return False
    require_verified("Exact distributed evaluation")
    patch = exact_evaluation_patch(trainer)
    if patch is None:
        patch = _ExactEvaluationPatch(trainer)
        set_exact_evaluation_patch(trainer, patch)
    patch.owners[id(owner)] = modes
    return True


def uninstall_exact_evaluation(trainer: pl.Trainer, owner: object) -> None:
    """Withdraw ``owner``'s stages; restore Lightning's behaviour when no owner is left. Safe to call twice."""
    patch = exact_evaluation_patch(trainer)
    if patch is None:
        return
    patch.owners.pop(id(owner), None)
    if not patch.owners:
        patch.remove()
        set_exact_evaluation_patch(trainer, None)


def check_stages(name: str, stages: Sequence[str] | None, allowed: Sequence[str], default: Sequence[str]) -> list[str]:
    """Validate a ``stages`` argument: distinct names from ``allowed`` (Lightning's stage names), ``None`` is
    ``default``; shared by ExactDistributedEvaluation and TestTimeAugmentation."""
    chosen = list(default if stages is None else stages)
    if isinstance(stages, str) or not chosen or any(s not in allowed for s in chosen) or len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(
            f"`{name}`={stages!r} is invalid: expected a non-empty list of distinct stages from "
            + ", ".join(repr(s) for s in allowed) + "."
        )
    return chosen


class ExactDistributedEvaluation(Callback):
    """Evaluate every validation/test sample exactly once under DDP, so metrics equal the single-process ones.

    Replaces the padded ``DistributedSampler`` that Lightning gives evaluation loaders with
    :class:`EvenDistributedBatchSampler`: no duplicates, and the same number of batches on every rank,
    so per-step collectives cannot hang. ``predict`` is already unpadded in Lightning. On a single
    process the callback does nothing (there is no padding). Loaders it cannot split exactly (a custom
    batch sampler, ``drop_last=True``) keep Lightning's sampler, with a warning. A loader that already
    has its own ``DistributedSampler``, or ``Trainer(use_distributed_sampler=False)``, is left alone.

    Args:
        stages: the evaluation stages to make exact, from ``"validate"`` (also the validation during
            ``fit``) and ``"test"``.

    Examples:
        >>> trainer = pl.Trainer(strategy="ddp", devices=2, callbacks=[ExactDistributedEvaluation()])  # doctest: +SKIP
        >>> trainer.test(model, datamodule=dm)  # test_acc equals the devices=1 value  # doctest: +SKIP
    """

    def __init__(self, stages: list[str] | None = None) -> None:
        self.stages = check_stages("stages", stages, EXACT_STAGES, EXACT_STAGES)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=self.stages)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install_exact_evaluation(trainer, self, self.stages)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        uninstall_exact_evaluation(trainer, self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        uninstall_exact_evaluation(trainer, self)


__all__ = [
    "EXACT_STAGES",
    "check_stages",
    "EvenDistributedBatchSampler",
    "ExactDistributedEvaluation",
    "equal_batch_counts",
    "even_batches",
    "exact_eval_dataloader",
    "install_exact_evaluation",
    "padded_duplicates",
    "uninstall_exact_evaluation",
]
