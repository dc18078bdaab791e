"""What the Ensemble does when an evaluation stage starts: screen the members, fit the voting weights."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_tricks.core.validation import ConfigError
from lightning_tricks.ensemble import screening


def screen_before(ensemble: Any, stage: str) -> None:
    screening.screen_before_stage(ensemble, ensemble.trainer, stage)


def fit_weights_on_validation_set(ensemble: Any, stage: str) -> None:
    """Weighted voting without weights: fit them on the datamodule's validation set, the same on every rank."""
    if ensemble.voting != "weighted" or ensemble.vote_weights is not None:
        return
    datamodule = ensemble.trainer.datamodule
    loader = getattr(datamodule, "val_dataloader", None) if datamodule is not None else None
    if loader is None:
        raise ConfigError("voting='weighted' without weights fits them on the datamodule's validation set, "
                          "but this run has no datamodule with val_dataloader(): pass weights=[...] or a datamodule.")
    if stage == "validate":
        rank_zero_warn("Ensemble: the voting weights are fitted on the validation set that is being evaluated, "
                       "so the validation metrics are optimistic; report test metrics.")
    # every rank fits on the whole validation set (no sampler, no padding), then rank 0's result is used
    weights = ensemble.fit_weights(loader(), sync=True)
    ensemble.vote_weights = ensemble.trainer.strategy.broadcast(weights.cpu(), src=0).to(ensemble.device)
    rank_zero_info("Ensemble: fitted voting weights " + ", ".join(
        f"{name}={w:.3f}" for name, w in zip(ensemble.member_names, ensemble.vote_weights.tolist(), strict=True)))


__all__ = ["fit_weights_on_validation_set", "screen_before"]
