"""Backbones for the zoo: a small CNN, an MLP, CIFAR-style ResNets, and any torchvision/timm model.

All are built with random initialization; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.core.validation import InvalidArgumentError, check_int, check_probability
from lightning_tricks.zoo.resnet_stages import build_resnet, resnet_forward
from lightning_tricks.zoo.sequence import SEQUENCE_BACKBONES, build_sequence_backbone

ZOO_BACKBONES = ("simple_cnn", "mlp", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
"""Backbone names the zoo builds itself; other names go to torchvision, then timm."""


class SimpleCNN(nn.Module):
    """Two conv stages (conv-BN-ReLU x2, then 2x2 max pooling), global average pooling and a 2-layer head.

    Works on any input size of at least 4x4 (the global pooling removes the spatial size), so it
    serves digits at 8x8 and CIFAR at 32x32. The head's hidden ``Linear`` is where DropConnect acts;
    the ``MaxPool2d`` layers are where fractional max pooling acts.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, hidden: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_int("width", width, 1)
        check_int("hidden", hidden, 1)
        check_probability("dropout", dropout, allow_one=False)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class MLP(nn.Module):
    """Fully connected network: ``depth`` hidden layers of ``width`` units with an activation each."""

    def __init__(self, in_features: int, num_classes: int = 10, width: int = 256, depth: int = 2,
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        check_int("width", width, 1)
        check_int("depth", depth, 0)
        check_probability("dropout", dropout, allow_one=False)
        activations = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                       "leaky_relu": nn.LeakyReLU}
        if activation not in activations:
            raise InvalidArgumentError(f"`activation`={activation!r} is invalid: expected one of {', '.join(map(repr, activations))}.")
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), activations[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PadShortcut(nn.Module):
    """He et al. (2016) option A shortcut for CIFAR ResNets: subsample by 2 and zero-pad channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        pad = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The residual branch is ``conv1 -> bn1 -> relu -> conv2 -> bn2``; ``bn2`` is its last normalization
    (the one zero-init-residual zeroes). ``residual(x)`` and ``shortcut`` are separate so that
    structural tricks (stochastic depth) can skip the branch.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2): 16/32/64 channels, 3 stages of n blocks."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InvalidArgumentError(f"`depth`={depth!r} is invalid: expected 6n+2 with n >= 1 (20, 32, 44, 56, 110).")
        build_resnet(self, 2, in_channels, num_classes, width, (depth - 2) // 6, BasicBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resnet_forward(self, x)


class _RepeatChannels(nn.Module):
    """Feeds a 1-channel image to a backbone built for 3 channels (no parameters)."""

    def __init__(self, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, *x.shape[2:])
        return self.backbone(x)


def _available_torchvision() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_backbone(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   **kwargs: Any) -> nn.Module:
    """Build a randomly initialized backbone by name.

    Args:
        name: ``simple_cnn``, ``mlp``, ``resnet20``/``32``/``44``/``56``/``110`` (CIFAR-style), a sequence
            backbone for ``[B, C, L]`` inputs (``mnist1d_logistic``, ``mnist1d_mlp``, ``mnist1d_cnn``, ``mnist1d_gru``,
            ``resnet1d`` / ``resnet1d_8``; ``length`` in ``kwargs``, default 40), any
            torchvision classification model (``resnet18``, ``tv:resnet18`` to force torchvision) or any
            timm model (``timm:resnet18`` or a name torchvision does not have).
        num_classes: number of output logits.
        in_channels: image channels.
        image_size: input side length (only the MLP needs it).
        **kwargs: passed to the backbone's constructor.

    Raises:
        ValueError: unknown name, listing the zoo names and where to find the others.

    Examples:
        >>> build_backbone("resnet20", num_classes=10, in_channels=3)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if name in SEQUENCE_BACKBONES or name.startswith("resnet1d_"):
        return build_sequence_backbone(name, num_classes, in_channels, **kwargs)
    if name == "simple_cnn":
        return SimpleCNN(in_channels, num_classes, **kwargs)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, **kwargs)
    if name in ZOO_BACKBONES:
        return CifarResNet(int(name.removeprefix("resnet")), in_channels, num_classes, **kwargs)
    source, _, model_name = name.rpartition(":")
    if source not in ("", "tv", "torchvision", "timm"):
        raise InvalidArgumentError(f"`backbone`={name!r} is invalid: the prefix must be 'tv:' or 'timm:'.")
    if source in ("", "tv", "torchvision"):
        import torchvision

        if model_name in _available_torchvision():
            model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)
            return model if in_channels == 3 else _RepeatChannels(model, 3)
        if source:
            raise InvalidArgumentError(f"`backbone`={name!r} is invalid: torchvision has no model {model_name!r}.")
    import timm

    if timm.is_model(model_name):
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                 **kwargs)
    raise InvalidArgumentError(
        f"`backbone`={name!r} is invalid: expected one of {', '.join(ZOO_BACKBONES + SEQUENCE_BACKBONES)}, a torchvision model name "
        "(torchvision.models.list_models()) or a timm model name (timm.list_models())."
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__: Sequence[str] = ["SimpleCNN", "MLP", "BasicBlock", "CifarResNet", "build_backbone", "ZOO_BACKBONES"]
