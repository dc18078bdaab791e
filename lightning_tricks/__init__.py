"""lightning-tricks: the practice of CS231n's "Training Neural Networks" as drop-in Lightning callbacks.

Every public callback and mixin is re-exported here, so configs can say ``lightning_tricks.<Name>``.
"""

from lightning_tricks.regularization import (
    DropConnect,
    DropConnectConv2d,
    DropConnectLinear,
    FractionalMaxPooling,
    SeededFractionalMaxPool2d,
    StochasticDepth,
)
from lightning_tricks.zoo import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageClassifier,
    SyntheticDataModule,
)

__version__ = "0.1.0"

# Callbacks are listed here as they land; `lightning-tricks --help` prints this list.
CALLBACKS: tuple[str, ...] = (
    "DropConnect",
    "FractionalMaxPooling",
    "StochasticDepth",
)

__all__ = [
    "CALLBACKS",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "DropConnect",
    "DropConnectConv2d",
    "DropConnectLinear",
    "FractionalMaxPooling",
    "ImageClassifier",
    "SeededFractionalMaxPool2d",
    "StochasticDepth",
    "SyntheticDataModule",
    "__version__",
]
