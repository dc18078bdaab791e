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

__all__ = [
    "MLP",
    "ZOO_BACKBONES",
    "BasicBlock",
    "CIFAR10DataModule",
    "CifarResNet",
    "DigitsDataModule",
    "ImageClassifier",
    "SimpleCNN",
    "SyntheticDataModule",
    "build_backbone",
]
