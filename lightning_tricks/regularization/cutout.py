"""Cutout (DeVries & Taylor, 2017): zero random square regions of the training images.

Functional core: :func:`sample_cutout_centers`, :func:`cutout_mask` and :func:`cutout` (plain torch,
no Lightning). :class:`Cutout` is the callback that applies it to training batches only.

Geometry (the paper's): each hole is a ``length`` x ``length`` square whose center is drawn uniformly
over the whole image, so a hole near the border is clipped by it and covers less area. Rows
``[cy - length // 2, cy - length // 2 + length)`` and the same for columns, intersected with the image.
Every sample draws its own centers (the paper's per-image holes; Composer's CutOut uses one box for
the whole batch).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tricks.core.batch import (
    BatchTransformCallback,
    Key,
    check_float_images,
    read_images,
)
from lightning_tricks.core.layout import check_layout, input_layout
from lightning_tricks.core.validation import InvalidArgumentError, check_bool, check_int, check_probability

NO_HOLE = -1
"""Center coordinate of a hole that was not drawn (the sample was skipped with probability ``1 - p``)."""


def check_length(length: int | float) -> int | float:
    """``length``: an int number of pixels (>= 1) or a float fraction of the image's shorter side in (0, 1]."""
    if isinstance(length, bool) or not isinstance(length, (int, float)):
        raise InvalidArgumentError(f"`length`={length!r} is invalid: expected an int number of pixels >= 1 or a "
                                   "float fraction of the image's shorter side in (0, 1].")
    if isinstance(length, int):
        if length < 1:
            raise InvalidArgumentError(f"`length`={length!r} is invalid: expected an int number of pixels >= 1 "
                                       "(or a float fraction in (0, 1]).")
    elif not 0.0 < length <= 1.0:
        raise InvalidArgumentError(f"`length`={length!r} is invalid: expected a float fraction of the image's "
                                   "shorter side in (0, 1], or an int number of pixels.")
    return length


def resolve_length(length: int | float, height: int, width: int) -> int:
    """The hole side in pixels for an image of ``height`` x ``width``; raises if it exceeds the shorter side."""
    check_length(length)
    side = min(height, width)
    pixels = max(1, round(length * side)) if isinstance(length, float) else length
    if pixels > side:
        raise InvalidArgumentError(f"`length`={length!r} is invalid for {height}x{width} images: expected at most "
                                   f"the shorter side ({side} pixels), or a fraction in (0, 1].")
    return pixels


def sample_cutout_centers(
    batch_size: int,
    height: int,
    width: int,
    n_holes: int = 1,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw hole centers: ``(batch_size, n_holes, 2)`` int64 ``(row, col)``, uniform over the image.

    With probability ``1 - p`` a sample gets no hole: its centers are :data:`NO_HOLE`. Draw order (so a
    seeded generator reproduces :func:`cutout`): the skip decisions (only when ``p < 1``), then the rows,
    then the columns.
    """
    applied = None
    if p < 1.0:
        applied = torch.rand(batch_size, generator=generator, device=device) < p
    rows = torch.randint(0, height, (batch_size, n_holes), generator=generator, device=device)
    cols = torch.randint(0, width, (batch_size, n_holes), generator=generator, device=device)
    centers = torch.stack((rows, cols), dim=-1)
    if applied is not None:
        centers = centers.masked_fill(~applied[:, None, None], NO_HOLE)
    return centers


def rectangle_mask(top: torch.Tensor, left: torch.Tensor, bottom: torch.Tensor, right: torch.Tensor, height: int,
                   width: int) -> torch.Tensor:
    """Boolean ``(*shape, height, width)`` mask, True in rows ``[top, bottom)`` and columns ``[left, right)``.

    The corners are integer tensors of one broadcastable ``shape``; bounds outside the image clip the
    rectangle (shared by Cutout's holes and CutMix's boxes).
    """
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < bottom[..., None])
    in_cols = (cols >= left[..., None]) & (cols < right[..., None])
    return in_rows[..., :, None] & in_cols[..., None, :]


def cutout_mask(centers: torch.Tensor, length: int, height: int, width: int) -> torch.Tensor:
    """Boolean ``(N, height, width)`` mask, True inside any of each sample's clipped square holes.

    Args:
        centers: ``(N, n_holes, 2)`` ``(row, col)`` centers; :data:`NO_HOLE` rows make no hole.
        length: hole side in pixels.
        height: image height.
        width: image width.
    """
    drawn = centers[..., 0] != NO_HOLE  # (N, n_holes)
    start = centers - length // 2
    mask = rectangle_mask(start[..., 0], start[..., 1], start[..., 0] + length, start[..., 1] + length, height, width)
    mask = mask & drawn[..., None, None]  # (N, n_holes, H, W)
    return mask[:, 0] if mask.shape[1] == 1 else mask.any(dim=1)


def cutout(
    images: torch.Tensor,
    length: int | float,
    n_holes: int = 1,
    *,
    p: float = 1.0,
    fill: float = 0.0,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Fill ``n_holes`` random squares of side ``length`` per image with ``fill`` (each sample its own holes).

    Args:
        images: ``(N, C, H, W)`` (or ``(N, H, W)``) floating-point images, any memory format.
        length: hole side: an int number of pixels, or a float fraction of the shorter side in (0, 1].
        n_holes: holes per image (they may overlap).
        p: probability that an image gets its holes; ``p=0`` returns ``images`` itself, drawing nothing.
        fill: value written into the holes (0 is the mean of normalized images, as in the paper).
        generator: the random generator (on the images' device); None uses torch's global one.
        inplace: write into ``images`` instead of returning a new tensor.

    Returns:
        The images with holes, same shape, dtype and memory format.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = cutout(torch.ones(4, 3, 32, 32), length=16, generator=g)
        >>> bool((out == 0).any()), out.shape
        (True, torch.Size([4, 3, 32, 32]))
    """
    check_float_images(images, "cutout", 3)
    check_int("n_holes", n_holes, 1)
    check_probability("p", p)
    if p == 0.0:
        return images
    height, width = images.shape[-2:]
    pixels = resolve_length(length, height, width)
    centers = sample_cutout_centers(images.shape[0], height, width, n_holes, p, generator, images.device)
    mask = cutout_mask(centers, pixels, height, width)
    mask = mask.view(images.shape[0], *([1] * (images.ndim - 3)), height, width)
    if inplace:
        return images.masked_fill_(mask, fill)
    return torch.where(mask, fill, images)  # keeps the memory format (masked_fill does not)


def cutout_span(
    sequences: torch.Tensor,
    length: int | float,
    n_holes: int = 1,
    *,
    p: float = 1.0,
    fill: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cutout for sequences ``(N, C, L)`` or ``(N, L)``: ``n_holes`` spans of ``length`` steps per sample, all channels.

    A span's centre is uniform over the ``L`` steps and the span ``[c - length // 2, c - length // 2 + length)``
    is clipped by the ends (the paper's square holes, in one dimension). Draw order: the skip decisions
    (only when ``p < 1``), then the centres.

    Examples:
        >>> out = cutout_span(torch.ones(2, 1, 40), 8, generator=torch.Generator().manual_seed(0))
        >>> out.shape, int((out == 0).sum()) <= 16
        (torch.Size([2, 1, 40]), True)
    """
    check_float_images(sequences, "cutout_span", 2)
    check_int("n_holes", n_holes, 1)
    check_probability("p", p)
    if sequences.ndim > 3:
        raise InvalidArgumentError(f"cutout_span: sequences of shape {tuple(sequences.shape)} are invalid: expected "
                                   "(N, C, L) or (N, L); use cutout for images.")
    if p == 0.0:
        return sequences
    steps = sequences.shape[-1]
    pixels = resolve_length(length, steps, steps)
    n = sequences.shape[0]
    applied = torch.rand(n, generator=generator, device=sequences.device) < p if p < 1.0 else None
    centers = torch.randint(0, steps, (n, n_holes), generator=generator, device=sequences.device)
    start = centers - pixels // 2
    positions = torch.arange(steps, device=sequences.device)
    mask = ((positions >= start[..., None]) & (positions < start[..., None] + pixels)).any(dim=1)  # (N, L)
    if applied is not None:
        mask &= applied[:, None]
    mask = mask.view(n, *([1] * (sequences.ndim - 2)), steps)
    return torch.where(mask, fill, sequences)


class Cutout(BatchTransformCallback):
    """Cutout on training batches: random square holes per image; validation, test and predict untouched.

    Works on an unmodified LightningModule: the images (first tensor of a list/tuple batch, a dict's
    ``image``/``x``/... key, or ``input_key``) get their holes in ``on_train_batch_start``. List and
    dict items are replaced by a new tensor; tuple and bare-tensor batches are written in place (which
    DataLoader batches allow), or through :class:`~lightning_tricks.BatchTransformMixin` when your module
    has it. Each sample draws its own centers from the callback's generator, seeded from
    ``(seed, global rank, batch counter)``: ranks differ, and a resumed run repeats the uninterrupted one.

    Args:
        length: hole side: an int number of pixels (the paper: 16 on CIFAR-10, 8 on CIFAR-100), or a float
            fraction of the image's shorter side in (0, 1] (0.5 is 16 pixels on 32x32 images).
        n_holes: holes per image.
        p: probability that an image gets its holes; 0 turns the callback off (an exact identity).
        fill: value written into the holes (0 is the mean of normalized images).
        input_key: where the images are: a dict key or a position; None finds them (see
            :mod:`lightning_tricks.core.batch`).
        seed: seed of the callback's generator; None takes the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        layout: ``auto`` (4D inputs are images; 3D inputs are sequences ``(N, C, L)`` when the model has 1D
            conv/pool/recurrent layers, images ``(N, H, W)`` when it has 2D ones), ``image`` or ``sequence``.
            On sequences each hole is a span of ``length`` steps (a float: a fraction of ``L``) across all
            channels (:func:`cutout_span`); ``sequence`` also takes flat ``(N, L)`` inputs.
        log: log ``cutout/p``, the probability applied, at every training batch (``pl_module.log``, so
            ``EarlyStopping``/``ModelCheckpoint`` can monitor it); ``False`` logs nothing.

    Raises:
        InvalidArgumentError: an argument out of range, at construction; at the first batch, a ``length``
            larger than the images or non-floating-point images; a 3D input whose layout the model does not
            tell (set ``layout``).
        BatchFormatError: at the first batch, images that cannot be found or written.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[Cutout(length=16)])  # doctest: +SKIP
    """

    def __init__(self, length: int | float = 0.5, n_holes: int = 1, p: float = 1.0, fill: float = 0.0,
                 input_key: Key = None, seed: int | None = None, layout: str = "auto", log: bool = True) -> None:
        super().__init__(input_key=input_key, seed=seed)
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        self.layout = check_layout(layout)
        self.length = check_length(length)
        self.n_holes = check_int("n_holes", n_holes, 1)
        self.p = check_probability("p", p)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            raise InvalidArgumentError(f"`fill`={fill!r} is invalid: expected a number.")
        self.fill = float(fill)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(length=self.length, n_holes=self.n_holes, p=self.p, input_key=self.input_key)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.log_enabled and self.active:
            pl_module.log("cutout/p", self.p, on_step=True, on_epoch=False)

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, in_place: bool) -> Any:
        slot, images = read_images(batch, self.input_key, self.name, 2 if self.layout == "sequence" else 3)
        generator = self._next_generator(trainer, images.device)
        if input_layout(images, pl_module, self.layout, self.name) == "sequence":
            out = cutout_span(images, self.length, self.n_holes, p=self.p, fill=self.fill, generator=generator)
        else:
            out = cutout(images, self.length, self.n_holes, p=self.p, fill=self.fill, generator=generator)
        return self._write_images(batch, slot, images, out, in_place,
                                  "write holes into images that are a view of another tensor (your Dataset may yield "
                                  "slices of its storage, which in-place holes would change)")


__all__ = ["NO_HOLE", "Cutout", "cutout", "cutout_mask", "cutout_span", "rectangle_mask", "sample_cutout_centers"]
