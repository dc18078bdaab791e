"""Example models and datamodules for the CLI, the docs, the tests and the benchmarks."""

from lightning_tricks.zoo.backbones import (
    MLP,
    ZOO_BACKBONES,
    BasicBlock,
    CifarResNet,
    SimpleCNN,
    build_backbone,
)
from lightning_tricks.zoo.classifier import ImageClassifier
from lightning_tricks.zoo.data import CIFAR10DataModule, DigitsDataModule, SyntheticDataModule
from lightning_tricks.zoo.mnist1d import MNIST1DDataModule
from lightning_tricks.zoo.sequence import (
    SEQUENCE_BACKBONES,
    BasicBlock1d,
    ResNet1d,
    SequenceCNN,
    SequenceGRU,
    SequenceLogistic,
    SequenceMLP,
)

__all__ = [
    "MLP",
    "ZOO_BACKBONES",
    "BasicBlock",
    "BasicBlock1d",
    "CIFAR10DataModule",
    "CifarResNet",
    "DigitsDataModule",
    "ImageClassifier",
    "MNIST1DDataModule",
    "ResNet1d",
    "SEQUENCE_BACKBONES",
    "SequenceCNN",
    "SequenceGRU",
    "SequenceLogistic",
    "SequenceMLP",
    "SimpleCNN",
    "SyntheticDataModule",
    "build_backbone",
]
