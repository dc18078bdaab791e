"""The stage layout every CIFAR-style ResNet of the zoo shares, whatever its block (2-D images or 1-D sequences)."""

from __future__ import annotations

from collections.abc import Callable

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


__all__ = ["residual_stages"]
