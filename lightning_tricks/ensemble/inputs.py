"""What each ensemble member is given: the batch's inputs and targets (any batch form), normalized as it was trained.

* :func:`split_batch` / :func:`batch_inputs`: the inputs (and targets) of a tuple, list, dict or tensor
  batch, through the package's one batch accessor (``find_slot``: ``image``/``x``/... and
  ``label``/``y``/... in a dict, ``input_key``/``target_key`` otherwise).
* :class:`MemberInputs`: per member, the input statistics it was trained with (``Standardize``,
  read from its checkpoint by `lightning_tricks.checkpoint.recorded_input_statistics`), applied to its
  inputs; members with the same statistics share one normalized batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_tricks.core.batch import Key, check_float_images, find_slot, get_item
from lightning_tricks.errors import ConfigError
from lightning_tricks.setup.preprocessing import InputStatistics

Statistics = tuple[InputStatistics, ...]


def batch_inputs(batch: Any, input_key: Key = None, owner: str = "Ensemble") -> torch.Tensor:
    """The inputs of ``batch``: a tensor batch itself, else found by ``input_key`` or the usual places."""
    return check_float_images(get_item(batch, find_slot(batch, input_key, "images", owner)), owner, 2)


def split_batch(batch: Any, input_key: Key = None, target_key: Key = None,
                owner: str = "Ensemble") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a labelled batch (tuple, list, namedtuple or dict), or a one-line error."""
    slot = find_slot(batch, input_key, "images", owner)
    targets = get_item(batch, find_slot(batch, target_key, "targets", owner, after=slot if isinstance(slot, int)
                                        else None))
    return check_float_images(get_item(batch, slot), owner, 2), targets


def batch_targets(batch: Any, input_key: Key = None, target_key: Key = None) -> Any:
    """The targets of ``batch`` when it has any (a predict batch may not), else None."""
    try:
        return split_batch(batch, input_key, target_key)[1]
    except ConfigError:
        return None


def _same(a: Statistics, b: Statistics) -> bool:
    def equal(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                             and torch.equal(x.cpu(), y.cpu()))

    return len(a) == len(b) and all(
        s.mode == t.mode and s.eps == t.eps and equal(s.mean, t.mean) and equal(s.std, t.std)
        and equal(s.components, t.components) and equal(s.eigenvalues, t.eigenvalues) for s, t in zip(a, b, strict=True))


class MemberInputs:
    """Per member, the input statistics it was trained with (``()``: its inputs as they come).

    Args:
        statistics: one tuple per member, applied in order (a run with two ``Standardize`` callbacks).
    """

    def __init__(self, statistics: Sequence[Statistics] = ()) -> None:
        self.per_member: list[Statistics] = [tuple(s) for s in statistics]
        self._keys: list[int] = []
        self._on_device: dict[tuple[int, int, torch.device, torch.dtype], InputStatistics] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_keys": [], "_on_device": {}}

    def __len__(self) -> int:
        return len(self.per_member)

    def add(self, statistics: Sequence[InputStatistics]) -> None:
        self.per_member.append(tuple(statistics))
        self._keys = []

    def set(self, index: int, statistics: Sequence[InputStatistics]) -> None:
        self.per_member[index] = tuple(statistics)
        self._keys, self._on_device = [], {}

    def key(self, index: int) -> int:
        """The same number for members whose statistics are equal (the first such member's index)."""
        if len(self._keys) != len(self.per_member):
            self._keys = [next(i for i, theirs in enumerate(self.per_member) if _same(mine, theirs))
                          for mine in self.per_member]
        return self._keys[index]

    def apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s inputs: ``x`` normalized with its statistics, in order (``x`` itself without)."""
        key = self.key(index)
        for k, stats in enumerate(self.per_member[key]):
            cache = (key, k, x.device, x.dtype)
            if cache not in self._on_device:
                self._on_device[cache] = stats.to(x.device, x.dtype)
            x = self._on_device[cache].apply(x)
        return x


__all__ = ["MemberInputs", "Statistics", "batch_inputs", "batch_targets", "split_batch"]


def adopt_trainer_standardize(ensemble: Any, trainer: Any) -> None:
    """Members that record no input statistics take those of the trainer's ``Standardize`` callbacks (the
    trainer that trained them, e.g. a SnapshotEnsemble's); ``Standardize`` itself skips an Ensemble's
    batches, since members that carry their own statistics must get their inputs raw."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    from lightning_tricks.setup.preprocessing import Standardize

    callbacks = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, Standardize)]
    bare = [i for i in range(len(ensemble.members)) if not ensemble.member_inputs.per_member[i]]
    if not callbacks or not bare:
        return
    names = ", ".join(ensemble.member_names[i] for i in bare)
    statistics = tuple(c.statistics for c in callbacks if c.statistics is not None)
    if not statistics:
        rank_zero_warn(f"Ensemble: members {names} record no Standardize statistics and the trainer's Standardize has "
                       "none (it computes them when fit starts), so those members get the inputs as they come; remove "
                       "Standardize from this trainer if they were trained without it, else give checkpoints saved "
                       "with their callbacks' state (not weights-only).")
        return
    for i in bare:
        ensemble.set_member_inputs(i, statistics)
    rank_zero_info(f"Ensemble: members {names} get the inputs normalized with the trainer's Standardize statistics.")


__all__ += ["adopt_trainer_standardize"]
