"""The direction of a monitored metric, shared by every callback that takes ``monitor``.

Lightning's callbacks default to ``mode="min"``; with ``monitor="val_acc"`` that silently prefers the
worst epoch. When the user gives no ``mode`` we infer it from the metric's name instead.
"""

from __future__ import annotations

import re
from typing import Literal

# name tokens of metrics where higher is better (matched against the lower-cased name split on
# separators and camelCase boundaries: "val_acc", "val/top1", "valF1" all match)
HIGHER_IS_BETTER: frozenset[str] = frozenset({
    "acc", "accuracy", "auc", "auroc", "f1", "fbeta", "precision", "recall", "iou", "jaccard", "dice",
    "map", "ap", "top1", "top5", "r2", "psnr", "ssim", "bleu", "rouge", "ndcg", "mrr", "kappa", "mcc",
    "sensitivity", "specificity",
})


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def infer_mode(monitor: str) -> Literal["min", "max"]:
    """``"max"`` when a token of ``monitor`` names a higher-is-better metric, else ``"min"``.

    Examples:
        >>> infer_mode("val_acc"), infer_mode("val/mAP"), infer_mode("val_loss"), infer_mode("valF1")
        ('max', 'max', 'min', 'max')
    """
    tokens = _tokens(monitor)
    return "max" if any(t in HIGHER_IS_BETTER for t in tokens) else "min"
