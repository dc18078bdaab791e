"""What a batch's input is: images ``[N, C, H, W]``, sequences ``[N, C, L]`` or flat features ``[N, F]``.

A 3-dimensional input is ambiguous: grayscale images ``(N, H, W)`` or sequences ``(N, C, L)`` (MNIST-1D's
``[B, 1, 40]``). The tricks that act along the input's geometry (Cutout's holes, CutMix's boxes, test-time
views, batch augmentation) read it once here: ``layout="auto"`` decides from the model (2D layers: images;
1D convolutions, 1D pooling or recurrent layers: sequences) and refuses in one line when the model does not
tell; ``layout="image"`` / ``"sequence"`` says it.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tricks.core.validation import check_choice
from lightning_tricks.errors import LayoutError

LAYOUTS = ("auto", "image", "sequence")
"""``auto`` (from the input's rank and the model's layers), ``image`` or ``sequence``."""

_IMAGE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_SEQUENCE_LAYERS = (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.RNNBase)


def check_layout(layout: str) -> str:
    return check_choice("layout", layout, LAYOUTS)


def model_layout(model: nn.Module | None) -> str | None:
    """``"image"`` when ``model`` has 2D conv/norm/pool layers, ``"sequence"`` when it has 1D conv/pool or
    recurrent layers (and no 2D ones), else None."""
    if model is None:
        return None
    modules = list(model.modules())
    if any(isinstance(m, _IMAGE_LAYERS) for m in modules):
        return "image"
    if any(isinstance(m, _SEQUENCE_LAYERS) for m in modules):
        return "sequence"
    return None


def input_layout(x: Tensor, model: nn.Module | None = None, layout: str = "auto", owner: str = "lightning-tricks"
                 ) -> str:
    """The layout of the input batch ``x``: ``"image"`` (4+ dims, or 3 read as ``(N, H, W)``), ``"sequence"``
    (``(N, C, L)``, or ``(N, L)`` when ``layout="sequence"``) or ``"flat"`` (``(N, F)``).

    Raises:
        LayoutError: a 3-dimensional input with ``layout="auto"`` and a model without 2D or 1D layers; an
            input whose rank contradicts ``layout``.

    Examples:
        >>> import torch
        >>> input_layout(torch.zeros(2, 1, 40), nn.Conv1d(1, 4, 3))
        'sequence'
        >>> input_layout(torch.zeros(2, 3, 8, 8))
        'image'
    """
    check_layout(layout)
    ndim = x.dim()
    if layout == "sequence":
        if ndim not in (2, 3):
            raise LayoutError(f"{owner}(layout='sequence') expected sequences (N, C, L) or (N, L), got shape "
                              f"{tuple(x.shape)}.")
        return "sequence"
    if ndim >= 4 or layout == "image":
        return "image"
    if ndim <= 2:
        return "flat"
    found = model_layout(model)
    if found is None:
        raise LayoutError(
            f"{owner}: inputs of shape {tuple(x.shape)} can be images (N, H, W) or sequences (N, C, L), and the "
            "model has neither 2D nor 1D conv/pool/recurrent layers to tell: set layout='image' or layout='sequence'."
        )
    return found


__all__ = ["LAYOUTS", "LayoutError", "check_layout", "input_layout", "model_layout"]
