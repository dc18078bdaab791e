"""Maxout units (Goodfellow et al. 2013): the maximum of ``k`` affine pieces, ``max(w_1^T x + b_1, ..., w_k^T x + b_k)``.

CS231n lists Maxout with the ReLU family: it generalizes ReLU and Leaky ReLU (both are maxout of two
pieces with one piece fixed), it does not saturate or die, and it costs ``k`` times the parameters.
A Maxout layer replaces a layer *and* its activation, so it is a building block for models of one's own
rather than something a callback can swap in: ``nn.Sequential(Maxout(64, 128, pieces=2), ...)``.

The pieces of an output unit are adjacent rows of one wide linear layer (or one wide convolution), so a
layer is a single matmul/conv plus a max over a reshaped view: no Python loop over pieces.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_tricks.core.validation import check_int


def maxout(x: torch.Tensor, pieces: int, dim: int = 1) -> torch.Tensor:
    """The maximum over groups of ``pieces`` adjacent entries along ``dim`` (whose size must divide by it).

    Examples:
        >>> maxout(torch.tensor([[1.0, 3.0, -2.0, -5.0]]), pieces=2)
        tensor([[ 3., -2.]])
    """
    check_int("pieces", pieces, 1)
    dim = dim % x.ndim
    size = x.shape[dim]
    if size % pieces:
        raise ValueError(f"maxout: dimension {dim} has size {size}, which is not a multiple of pieces={pieces}.")
    return x.unflatten(dim, (size // pieces, pieces)).amax(dim=dim + 1)


class Maxout(nn.Module):
    """A linear maxout layer: ``out_features`` units, each the maximum of ``pieces`` affine functions of the input.

    Args:
        in_features: input features (last dimension).
        out_features: output units.
        pieces: affine pieces per unit (``k``; 2 is the usual choice).
        bias: whether the pieces have biases.

    Attributes:
        linear: the ``nn.Linear(in_features, out_features * pieces)`` holding every piece (unit ``j``'s pieces
            are rows ``j * pieces ... j * pieces + pieces - 1``).

    Examples:
        >>> layer = Maxout(16, 8, pieces=3)
        >>> layer(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """

    def __init__(self, in_features: int, out_features: int, pieces: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.pieces = check_int("pieces", pieces, 1)
        self.linear = nn.Linear(in_features, out_features * pieces, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxout(self.linear(x), self.pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pieces={self.pieces}"


class MaxoutConv2d(nn.Module):
    """A convolutional maxout layer: each output channel is the maximum of ``pieces`` convolutions.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: the convolution's kernel size.
        pieces: convolutions per output channel.
        stride: the convolution's stride.
        padding: the convolution's padding.
        bias: whether the pieces have biases.

    Attributes:
        conv: the ``nn.Conv2d(in_channels, out_channels * pieces, ...)`` holding every piece.

    Examples:
        >>> layer = MaxoutConv2d(3, 8, kernel_size=3, padding=1)
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, pieces: int = 2, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.pieces = check_int("pieces", pieces, 1)
        self.conv = nn.Conv2d(check_int("in_channels", in_channels, 1), out_channels * pieces,
                              check_int("kernel_size", kernel_size, 1), stride=check_int("stride", stride, 1),
                              padding=check_int("padding", padding, 0), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxout(self.conv(x), self.pieces, dim=1)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, pieces={self.pieces}"


__all__ = ["Maxout", "MaxoutConv2d", "maxout"]
