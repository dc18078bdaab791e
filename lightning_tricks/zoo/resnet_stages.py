"""The stage layout every CIFAR-style ResNet of the zoo shares, whatever its block (2-D images or 1-D sequences)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def residual_stages(make_block: Callable[[int, int, int], nn.Module], width: int, n: int
                    ) -> tuple[list[nn.Sequential], int]:
    """The three stages of a CIFAR-style ResNet (He et al. 2016): ``n`` blocks each, widths ``w, 2w, 4w``, the
    first block of stages 2 and 3 with stride 2; ``make_block(in_planes, planes, stride)`` builds one block.
    Returns the stages and the last stage's width."""
    stages, planes = [], width
    for i, stage_planes in enumerate((width, 2 * width, 4 * width)):
        blocks = []
        for j in range(n):
            blocks.append(make_block(planes, stage_planes, 2 if (i > 0 and j == 0) else 1))
            planes = stage_planes
        stages.append(nn.Sequential(*blocks))
    return stages, planes


def build_resnet(net: nn.Module, dims: int, in_channels: int, num_classes: int, width: int, n: int,
                 make_block: Callable[[int, int, int], nn.Module], kernel_size: int = 3) -> None:
    """Give ``net`` the CIFAR ResNet's modules (``conv1``, ``bn1``, ``relu``, ``layer1-3``, ``pool``, ``fc``) for
    images (``dims=2``) or sequences (``dims=1``), convolutions He-initialized (fan-out, as the paper)."""
    conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if dims == 1
                        else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d))
    net.conv1 = conv(in_channels, width, kernel_size, padding=kernel_size // 2, bias=False)
    net.bn1 = norm(width)
    net.relu = nn.ReLU(inplace=True)
    (net.layer1, net.layer2, net.layer3), planes = residual_stages(make_block, width, n)
    net.pool = pool(1)
    net.fc = nn.Linear(planes, num_classes)
    for m in net.modules():
        if isinstance(m, conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward pass of a network :func:`build_resnet` built."""
    x = net.relu(net.bn1(net.conv1(x)))
    x = net.layer3(net.layer2(net.layer1(x)))
    return net.fc(torch.flatten(net.pool(x), 1))


__all__ = ["build_resnet", "residual_stages", "resnet_forward"]
