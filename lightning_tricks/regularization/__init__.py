"""Regularizers: batch transforms (Cutout, Mixup/CutMix) and weight penalties (L1, L2, elastic net)."""

from lightning_tricks.regularization._batch import BatchFormatError, BatchTransformMixin
from lightning_tricks.regularization.cutout import Cutout, cutout
from lightning_tricks.regularization.mixup import MixedLabels, Mixup, MixupTargetsUnusedError, mixup
from lightning_tricks.regularization.penalty import WeightPenalty

__all__ = [
    "BatchFormatError",
    "BatchTransformMixin",
    "Cutout",
    "MixedLabels",
    "Mixup",
    "MixupTargetsUnusedError",
    "WeightPenalty",
    "cutout",
    "mixup",
]
