"""Backbones for sequences ``[B, C, L]`` (and flat ``[B, L]``): MNIST-1D's paper models and a 1D ResNet.

The paper's models (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D"; the mnist1d repository's
``models.py``), rebuilt here with random initialization:

* :class:`SequenceLogistic`: one ``Linear`` on the flattened input (the paper's logistic regression).
* :class:`SequenceMLP`: ``Linear(F, 100)``, ReLU, ``h + ReLU(Linear(100, 100)(h))``, ``Linear(100, 10)``.
* :class:`SequenceCNN`: three ``Conv1d`` layers of 25 channels (kernel 5 then 3 and 3, stride 2, padding 1),
  ReLU each, then one ``Linear`` on the flattened ``25 x 5`` features.
* :class:`SequenceGRU`: a bidirectional GRU with 6 hidden units per direction over the 40 time steps, then
  one ``Linear`` on all its outputs.

and :class:`ResNet1d`, a CIFAR-style ResNet with :class:`BasicBlock1d` (``Conv1d`` + ``BatchNorm1d``), so that
the residual tricks (stochastic depth, zero-init residual) have something to act on.

Every backbone takes ``[B, C, L]`` or ``[B, L]`` (read as one channel); the flat models flatten what they get.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.core.validation import InvalidArgumentError, check_int
from lightning_tricks.zoo.resnet_stages import build_resnet, resnet_forward

SEQUENCE_BACKBONES = ("mnist1d_logistic", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_gru", "resnet1d")
"""Backbone names for sequence inputs (``build_backbone`` passes ``in_channels``, ``num_classes`` and
``length``, 40 for MNIST-1D by default)."""
MNIST1D_LENGTH = 40


def _as_sequence(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``[B, L]`` -> ``[B, 1, L]``; checks the length the module was built for."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if x.dim() != 3 or x.shape[-1] != module.length or x.shape[1] != module.in_channels:  # type: ignore[operator]
        raise InvalidArgumentError(
            f"{type(module).__name__} was built for inputs [B, {module.in_channels}, {module.length}] (or [B, "
            f"{module.length}] with one channel), got {list(x.shape)}: set the backbone's `length`/`in_channels` "
            "(backbone_kwargs: {length: L}) to the data's."
        )
    return x


class _Sequence(nn.Module):
    def __init__(self, in_channels: int, length: int) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("length", length, 1)
        self.in_channels, self.length = in_channels, length


class SequenceLogistic(_Sequence):
    """Multinomial logistic regression on the flattened sequence: ``Linear(C * L, num_classes)``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, length: int = MNIST1D_LENGTH) -> None:
        super().__init__(in_channels, length)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(_as_sequence(x, self)))


class SequenceMLP(_Sequence):
    """The paper's MLP: ``h = relu(fc1(x))``, ``h = h + relu(fc2(h))``, ``fc3(h)`` on the flattened sequence."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, length: int = MNIST1D_LENGTH,
                 hidden: int = 100) -> None:
        super().__init__(in_channels, length)
        check_int("hidden", hidden, 1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * length, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(self.flatten(_as_sequence(x, self))))
        h = h + self.act2(self.fc2(h))
        return self.fc3(h)


def conv_length(length: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a ``Conv1d`` (dilation 1)."""
    return (length + 2 * padding - kernel) // stride + 1


class SequenceCNN(_Sequence):
    """The paper's CNN: 3 ``Conv1d`` (``channels`` each; kernels 5, 3, 3; stride 2; padding 1) + ReLU, then ``Linear``.

    On MNIST-1D's 40 steps the features are ``25 x 5 = 125`` wide, as in the paper's ``ConvBase``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, length: int = MNIST1D_LENGTH,
                 channels: int = 25) -> None:
        super().__init__(in_channels, length)
        check_int("channels", channels, 1)
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        out = conv_length(conv_length(conv_length(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        if out < 1:
            raise InvalidArgumentError(f"`length`={length} is invalid for SequenceCNN: expected at least 4 steps.")
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_sequence(x, self)
        h = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        return self.fc(self.flatten(h))


class SequenceGRU(_Sequence):
    """The paper's GRU: bidirectional, ``hidden`` units per direction, every time step's output into one ``Linear``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, length: int = MNIST1D_LENGTH,
                 hidden: int = 6, bidirectional: bool = True) -> None:
        super().__init__(in_channels, length)
        check_int("hidden", hidden, 1)
        self.gru = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1) * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(_as_sequence(x, self).transpose(1, 2))  # [B, L, C] -> [B, L, D * hidden]
        return self.fc(out.reshape(out.shape[0], -1))


class BasicBlock1d(nn.Module):
    """1D ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with ``Conv1d``/``BatchNorm1d``.

    As the zoo's 2D ``BasicBlock``: ``residual(x)`` is the branch and ``shortcut`` the identity (or a 1x1
    ``Conv1d`` + ``BatchNorm1d`` projection when the stride or width changes), so stochastic depth skips the
    branch and zero-init-residual zeroes ``bn2``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_planes, planes, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(planes, planes, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv1d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm1d(planes))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet1d(_Sequence):
    """ResNet-(6n+2) for sequences: a ``Conv1d`` stem, 3 stages of ``n`` :class:`BasicBlock1d` (``width``, 2x, 4x
    channels; the 2nd and 3rd halve the length), global average pooling and ``fc``.

    Any length works (the pooling removes it); ``length`` only checks the input.
    """

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, length: int = MNIST1D_LENGTH,
                 width: int = 16, kernel_size: int = 3) -> None:
        super().__init__(in_channels, length)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InvalidArgumentError(f"`depth`={depth!r} is invalid: expected 6n+2 with n >= 1 (8, 14, 20, 32, 56).")
        check_int("width", width, 1)
        check_int("kernel_size", kernel_size, 1)
        build_resnet(self, 1, in_channels, num_classes, width, (depth - 2) // 6,
                     lambda inp, out, stride: BasicBlock1d(inp, out, stride, kernel_size), kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resnet_forward(self, _as_sequence(x, self))


def build_sequence_backbone(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs: object) -> nn.Module:
    """Build one of :data:`SEQUENCE_BACKBONES` (``resnet1d`` takes ``depth``, default 20; ``resnet1d_8`` etc. too).

    Examples:
        >>> build_sequence_backbone("mnist1d_cnn")(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """
    classes: dict[str, type[nn.Module]] = {"mnist1d_logistic": SequenceLogistic, "mnist1d_mlp": SequenceMLP,
                                           "mnist1d_cnn": SequenceCNN, "mnist1d_gru": SequenceGRU}
    if name in classes:
        return classes[name](in_channels=in_channels, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
    suffix = name.removeprefix("resnet1d_")
    if name == "resnet1d" or (name.startswith("resnet1d_") and suffix.isdigit()):
        depth = kwargs.pop("depth", 20) if name == "resnet1d" else int(suffix)
        return ResNet1d(depth, in_channels, num_classes, **kwargs)  # type: ignore[arg-type]
    raise InvalidArgumentError(f"`backbone`={name!r} is invalid: expected one of {', '.join(SEQUENCE_BACKBONES)}.")


__all__ = ["MNIST1D_LENGTH", "SEQUENCE_BACKBONES", "BasicBlock1d", "ResNet1d", "SequenceCNN", "SequenceGRU",
           "SequenceLogistic", "SequenceMLP", "build_sequence_backbone", "conv_length"]
