"""Regularizers, one module each (a functional core plus a Lightning callback): batch transforms (Cutout,
Mixup/CutMix), weight penalties (L1, L2, elastic net) and structural ones by model surgery (DropConnect,
stochastic depth, fractional max pooling)."""

from lightning_tricks.core.batch import BatchFormatError, BatchTransformMixin
from lightning_tricks.regularization.cutout import Cutout, cutout
from lightning_tricks.regularization.dropconnect import DropConnect, DropConnectConv2d, DropConnectLinear
from lightning_tricks.regularization.fractional_pooling import FractionalMaxPooling, SeededFractionalMaxPool2d
from lightning_tricks.regularization.mixup import MixedLabels, Mixup, MixupTargetsUnusedError, mixup
from lightning_tricks.regularization.stochastic_depth import StochasticDepth
from lightning_tricks.regularization.weight_penalty import WeightPenalty

__all__ = [
    "BatchFormatError",
    "BatchTransformMixin",
    "Cutout",
    "DropConnect",
    "DropConnectConv2d",
    "DropConnectLinear",
    "FractionalMaxPooling",
    "MixedLabels",
    "Mixup",
    "MixupTargetsUnusedError",
    "SeededFractionalMaxPool2d",
    "StochasticDepth",
    "WeightPenalty",
    "cutout",
    "mixup",
]
