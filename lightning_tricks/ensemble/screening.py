"""Members that must not vote: a loss that is not finite, far above the other members', or far above chance.

A snapshot taken while training diverged (a learning-rate peak too high for the model) predicts garbage
with confidence; averaged with good members it drags the ensemble to chance. Before an evaluation, the
`Ensemble` measures every member's mean cross-entropy on labelled data (the datamodule's validation set
when there is one, else the data being evaluated) and leaves out of the vote, with one warning line
naming each and its loss, every member whose loss

* is not finite, or
* exceeds ``max_loss_ratio`` x the median of the other members' finite losses ("far above the others"), or
* exceeds ``max_loss_ratio`` x ``log(C)``, the loss of a uniform guess over ``C`` classes (this catches
  members that all diverged, which no comparison among them can).

If no member is left, the evaluation is refused in one line.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.ensemble.inputs import split_batch


def check_max_loss_ratio(value: Any) -> float | None:
    """``max_loss_ratio``: a number > 1, or None (every member votes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise InvalidArgumentError(f"`max_loss_ratio`={value!r} is invalid: expected a number > 1 (a member whose "
                                   "loss exceeds that many times the others' is left out of the vote), or None.")
    return float(value)


def exclusions(names: Sequence[str], losses: Sequence[float], num_classes: int, max_ratio: float,
               what: str = "validation") -> dict[int, str]:
    """``{member index: why it must not vote}`` under the rules of the module docstring.

    Examples:
        >>> exclusions(["a", "b", "c"], [0.5, 0.6, 40.0], 10, 10.0)
        {2: 'c (validation loss 40 > 10 x 0.55, the median of the other members)'}
        >>> exclusions(["a", "b"], [1784.0, 55362.0], 10, 10.0)[0]
        'a (validation loss 1784 > 10 x log(10) = 2.303, a uniform guess)'
    """
    reasons: dict[int, str] = {}
    chance = math.log(max(num_classes, 2))
    for i, loss in enumerate(losses):
        others = [other for j, other in enumerate(losses) if j != i and math.isfinite(other)]
        median = statistics.median(others) if others else None
        if not math.isfinite(loss):
            reasons[i] = f"{names[i]} ({what} loss {loss}, not finite)"
        elif median is not None and loss > max_ratio * median:
            reasons[i] = f"{names[i]} ({what} loss {loss:.4g} > {max_ratio:g} x {median:.4g}, the median of the other members)"
        elif loss > max_ratio * chance:
            reasons[i] = (f"{names[i]} ({what} loss {loss:.4g} > {max_ratio:g} x log({num_classes}) = {chance:.4g}, "
                          "a uniform guess)")
    return reasons


@torch.no_grad()
def member_losses(ensemble: Any, loaders: Iterable[Any], trainer: Any = None) -> tuple[list[float], int]:
    """Every member's mean cross-entropy over the labelled batches of ``loaders`` (summed over DDP ranks when a
    ``trainer`` runs several processes; every rank must call it then), and the number of classes."""
    device = ensemble.device
    sums = torch.zeros(len(ensemble.members) + 1, dtype=torch.float64, device=device)
    width = 0
    for loader in loaders:
        for batch in loader:
            x, y = split_batch(batch, ensemble.input_key, ensemble.target_key)
            x, y = x.to(device), y.to(device)
            logits = ensemble.member_logits(x, sync=trainer is not None).float()  # checks the outputs' shapes
            width = logits.shape[-1]
            for i in range(logits.shape[0]):
                sums[i] += F.cross_entropy(logits[i], y, reduction="sum").double()
            sums[-1] += y.shape[0]
    if trainer is not None and trainer.world_size > 1:
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
    count = float(sums[-1])
    return [float(s) / count if count else math.nan for s in sums[:-1].tolist()], width


def screen(ensemble: Any, loaders: Iterable[Any], what: str, trainer: Any = None) -> list[int]:
    """Measure, decide and say: the indices of the members that vote (warns once about the others).

    Raises:
        ConfigError: no member is left, or the ones left have only zero voting weights.
    """
    losses, width = member_losses(ensemble, loaders, trainer)
    if all(math.isnan(v) for v in losses) and width == 0:  # no labelled sample: nothing to decide on
        rank_zero_warn(f"Ensemble: the {what} data has no labelled sample, so members are not screened: every member "
                       "votes.")
        return list(range(len(ensemble.members)))
    reasons = exclusions(ensemble.member_names, losses, ensemble.expected_num_classes() or width,
                         ensemble.max_loss_ratio, what)
    voters = [i for i in range(len(losses)) if i not in reasons]
    listing = "; ".join(reasons[i] for i in sorted(reasons))
    if not voters:
        raise ConfigError(f"Ensemble: no member can vote: {listing}. Retrain them (a lower learning rate, a shorter "
                          "cycle peak), or set max_loss_ratio=None to vote them anyway.")
    weights = ensemble.vote_weights
    if weights is not None and float(weights[voters].sum()) <= 0:
        raise ConfigError(f"Ensemble: the members left after screening ({listing} excluded) have zero voting "
                          "weights: give them weights, or set max_loss_ratio=None.")
    if reasons:
        rank_zero_warn(f"Ensemble: excluded from the vote: {listing}; {len(voters)} of {len(losses)} members vote "
                       "(max_loss_ratio=None keeps every member).")
    return voters


__all__ = ["check_max_loss_ratio", "exclusions", "member_losses", "screen"]


def _loaders(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def screening_data(trainer: Any, stage: str) -> tuple[list[Any], str]:
    """``(loaders, what)`` to screen the members on before ``stage``: the datamodule's validation set, else the
    stage's own labelled data; ``([], "")`` for ``predict`` without a validation set."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        try:
            loaders = _loaders(datamodule.val_dataloader())
        except Exception:  # noqa: BLE001 - not implemented, or its split is built only for another stage
            loaders = []
        if loaders:
            return loaders, "validation"
    if stage == "validate":
        return _loaders(trainer.val_dataloaders), "validation"
    if stage == "test":
        return _loaders(trainer.test_dataloaders), "test"
    return [], ""


def screen_before_stage(ensemble: Any, trainer: Any, stage: str) -> None:
    """What the Ensemble runs at the start of validate/test/predict (every rank, at the same point)."""
    ensemble.voters = None
    if ensemble.max_loss_ratio is None:
        return
    loaders, what = screening_data(trainer, stage)
    if not loaders:
        rank_zero_warn("Ensemble: predict has no labelled data to check the members on (no datamodule validation "
                       "set), so every member votes, even one whose loss diverged; give a datamodule with "
                       "val_dataloader(), or set max_loss_ratio=None to say you vouch for them.")
        return
    ensemble.voters = screen(ensemble, loaders, what, trainer)


__all__ += ["screen_before_stage", "screening_data"]
