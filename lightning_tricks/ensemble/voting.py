"""Voting, the ensemble's functional core: soft, hard and weighted votes over the members' logits, fitted weights.

Plain torch, no Lightning: every function takes ``(members, batch, classes)`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_tricks.core.task import output_form
from lightning_tricks.core.validation import InvalidArgumentError, check_int


def _check_member_logits(member_logits: torch.Tensor) -> None:
    if not isinstance(member_logits, torch.Tensor) or member_logits.ndim != 3 or member_logits.shape[0] < 1:
        shape = tuple(member_logits.shape) if isinstance(member_logits, torch.Tensor) else type(member_logits).__name__
        raise InvalidArgumentError(f"`member_logits` of shape {shape} is invalid: expected (members, batch, classes).")


def check_vote_weights(weights: Sequence[float] | torch.Tensor, members: int, name: str = "weights") -> list[float]:
    """Validate voting weights: ``members`` finite non-negative numbers, not all zero. Returns them as floats."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != members:
        raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected {members} weights, one per member.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected finite non-negative numbers.")
    if sum(values) <= 0:
        raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected at least one positive weight.")
    return [float(v) for v in values]


def _normalized(weights: Sequence[float] | torch.Tensor | None, members: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((members,), 1.0 / members, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(check_vote_weights(weights, members), dtype=like.dtype, device=like.device)
    return w / w.sum()


def as_logits(output: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """A member's output as logits, whatever its form (`lightning_tricks.core.task.output_form`).

    Log-probabilities are logits already (``softmax(log p) = p``); probabilities become their log
    (softmax) or logit (sigmoid), so every vote below averages the same probabilities the member meant.

    Examples:
        >>> probs = torch.tensor([[0.2, 0.8]])
        >>> as_logits(probs).softmax(-1)
        tensor([[0.2000, 0.8000]])
    """
    if output_form(output, sigmoid) != "probs":
        return output
    clamped = output.clamp(1e-12, 1.0)
    return torch.logit(output, eps=1e-12) if sigmoid else clamped.log()


def multilabel_vote(member_logits: torch.Tensor, voting: str = "soft",
                    weights: Sequence[float] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, multi-hot predictions)`` of multi-label members: a sigmoid per label, never a softmax.

    ``soft`` (and ``weighted``) average the members' sigmoid probabilities and predict the labels above 0.5;
    ``hard`` takes each label's (weighted) majority of the members' 0.5 decisions (a tie predicts the label
    when the mean probability is above 0.5), and returns the vote shares.

    Examples:
        >>> logits = torch.tensor([[[3.0, -3.0]], [[-1.0, -3.0]]])
        >>> multilabel_vote(logits)[1]
        tensor([[1, 0]])
    """
    _check_member_logits(member_logits)
    probs = member_logits.float().sigmoid()
    w = _normalized(weights, probs.shape[0], probs)
    mean = torch.einsum("m,mnc->nc", w, probs)
    if voting != "hard":
        return mean, (mean > 0.5).long()
    shares = torch.einsum("m,mnc->nc", w, (probs > 0.5).float())
    preds = (shares > 0.5) | ((shares == 0.5) & (mean > 0.5))
    return shares, preds.long()


def soft_vote(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """The ensemble's class probabilities: the (weighted) mean of the members' softmax probabilities.

    Args:
        member_logits: ``(members, batch, classes)`` logits.
        weights: one non-negative weight per member (normalized to sum 1); ``None`` is the plain mean.

    Returns:
        ``(batch, classes)`` probabilities in float32 (or the logits' dtype if wider).

    Examples:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
        >>> soft_vote(logits).argmax(-1)
        tensor([0])
    """
    _check_member_logits(member_logits)
    probs = member_logits.float().softmax(dim=-1) if member_logits.dtype != torch.float64 else member_logits.softmax(-1)
    w = _normalized(weights, probs.shape[0], probs)
    return torch.einsum("m,mnc->nc", w, probs)


def vote_shares(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Each class's share of the (weighted) votes, a member voting for its argmax class: ``(batch, classes)``."""
    _check_member_logits(member_logits)
    votes = F.one_hot(member_logits.argmax(dim=-1), member_logits.shape[-1]).float()
    w = _normalized(weights, votes.shape[0], votes)
    return torch.einsum("m,mnc->nc", w, votes)


def hard_vote(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Majority voting: the class most members (by weight) predict, for each sample.

    Ties are broken deterministically: among the tied classes, the one with the highest mean softmax
    probability wins, and if that ties too, the lowest class index.

    Args:
        member_logits: ``(members, batch, classes)`` logits.
        weights: one non-negative weight per member (a weighted majority); ``None`` gives one vote each.

    Returns:
        ``(batch,)`` class indices.

    Examples:
        >>> logits = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 2.0, 0.0]]])
        >>> hard_vote(logits)
        tensor([1])
    """
    shares = vote_shares(member_logits, weights)
    tied = shares == shares.max(dim=-1, keepdim=True).values
    tie_break = torch.where(tied, soft_vote(member_logits, weights), torch.full_like(shares, -1.0))
    return tie_break.argmax(dim=-1)


def fit_vote_weights(member_logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 2000,
                     tol: float = 1e-9) -> torch.Tensor:
    """Voting weights that minimize the negative log-likelihood of the weighted soft vote on labelled data.

    The mixture ``p(y|x) = sum_m w_m p_m(y|x)`` is fitted over the probability simplex by
    expectation-maximization, which increases the likelihood at every step and reaches the global
    optimum of this convex problem; it starts from equal weights and needs no learning rate.

    Args:
        member_logits: ``(members, samples, classes)`` logits on held-out (validation) data.
        targets: ``(samples,)`` class indices.
        max_iter: EM iterations at most.
        tol: stop when no weight moves by more than this.

    Returns:
        ``(members,)`` float64 weights summing to 1.

    Examples:
        >>> good = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
        >>> bad = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
        >>> fit_vote_weights(torch.stack([good, bad]), torch.tensor([0, 1])).argmax().item()
        0
    """
    _check_member_logits(member_logits)
    if targets.ndim != 1 or targets.shape[0] != member_logits.shape[1]:
        raise InvalidArgumentError(f"`targets` of shape {tuple(targets.shape)} is invalid: expected "
                                   f"({member_logits.shape[1]},), one class index per sample.")
    check_int("max_iter", max_iter, 1)
    log_probs = member_logits.double().log_softmax(dim=-1)
    index = targets.to(log_probs.device).view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    likelihood = log_probs.gather(-1, index).squeeze(-1).exp().clamp_min(1e-300)  # (members, samples)
    weights = torch.full((likelihood.shape[0],), 1.0 / likelihood.shape[0], dtype=torch.float64,
                         device=likelihood.device)
    for _ in range(max_iter):
        responsibility = weights[:, None] * likelihood
        updated = (responsibility / responsibility.sum(dim=0, keepdim=True)).mean(dim=1)
        converged = bool((updated - weights).abs().max() <= tol)
        weights = updated
        if converged:
            break
    return weights / weights.sum()


__all__ = ["check_vote_weights", "fit_vote_weights", "hard_vote", "as_logits", "multilabel_vote", "soft_vote", "vote_shares"]
