"""The Ensemble's evaluation metrics: the ensemble's and every member's accuracy and loss, side by side."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy


def warn_padding(loaders: Any, world_size: int) -> None:
    """Say so when DistributedSampler pads the evaluation set with duplicates, which the counts include."""
    if world_size < 2:
        return
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
            if extra > 0:
                rank_zero_warn(f"Ensemble: DistributedSampler pads the {len(sampler.dataset)} evaluation "  # type: ignore[arg-type]
                               f"samples with {extra} duplicates, which the metrics count; use a set size "
                               f"divisible by {world_size} processes for exact metrics.")


def stage_metrics(members: int, num_classes: int, with_loss: bool, device: torch.device) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if with_loss:
        metrics["loss"] = MeanMetric()
    for i in range(members):
        metrics[f"acc_member_{i}"] = MulticlassAccuracy(num_classes, average="micro")
        metrics[f"loss_member_{i}"] = MeanMetric()
    return {k: m.to(device) for k, m in metrics.items()}


def update_metrics(metrics: dict[str, Metric], logits: torch.Tensor, scores: torch.Tensor, preds: torch.Tensor,
                    y: torch.Tensor) -> None:
    metrics["acc"].update(preds, y)
    if "loss" in metrics:
        metrics["loss"].update(F.nll_loss(scores.clamp_min(1e-12).log(), y, reduction="none"))
    for i in range(logits.shape[0]):
        metrics[f"acc_member_{i}"].update(logits[i].argmax(dim=-1), y)
        metrics[f"loss_member_{i}"].update(F.cross_entropy(logits[i].float(), y, reduction="none"))


def epoch_values(metrics: dict[str, Metric]) -> dict[str, torch.Tensor]:
    values = {name: metric.compute() for name, metric in metrics.items()}  # synced over ranks
    members = sum(name.startswith("acc_member_") for name in values)
    for kind in ("acc", "loss"):
        values[f"{kind}_member_mean"] = torch.stack([values[f"{kind}_member_{i}"] for i in range(members)]).mean()
    return {name: value.float() for name, value in values.items()}


__all__ = ["epoch_values", "stage_metrics", "update_metrics", "warn_padding"]
