"""One-time setup: activation functions (swap, Maxout), input preprocessing, batch augmentation, BatchNorm folding."""

from lightning_tricks.setup.activation_swap import ActivationSwap
from lightning_tricks.setup.activations import find_functional_activations, swap_activations
from lightning_tricks.setup.augment import BatchAugment, augment
from lightning_tricks.setup.bn_folding import FoldReport, fold_batch_norm
from lightning_tricks.setup.maxout import Maxout, MaxoutConv2d, maxout
from lightning_tricks.setup.preprocessing import (
    InputStatistics,
    MomentAccumulator,
    Standardize,
    fit_statistics,
)

__all__ = [
    "ActivationSwap",
    "BatchAugment",
    "FoldReport",
    "InputStatistics",
    "Maxout",
    "MaxoutConv2d",
    "MomentAccumulator",
    "Standardize",
    "augment",
    "find_functional_activations",
    "fit_statistics",
    "fold_batch_norm",
    "maxout",
    "swap_activations",
]
