"""Image augmentation on the device for whole batches: random crop with padding, flip, colour jitter, PCA colour.

The lectures' list for images: random crops (pad by 4 and crop back to 32x32 on CIFAR), horizontal flips,
brightness and contrast jitter, and AlexNet's "fancy PCA" colour augmentation, which adds to every pixel of
an image ``[p1 p2 p3] [a1 s1, a2 s2, a3 s3]^T`` with ``p_i`` the eigenvectors of the training set's RGB
covariance, ``s_i`` the standard deviations along them (the square roots of its eigenvalues, as the
Torch/torchvision ResNet references use ImageNet's ``[0.2175, 0.0188, 0.0045]``) and ``a_i ~ N(0, pca_std)``
drawn per image.

* :func:`sample_augment_params` draws every sample's parameters at once; :func:`apply_augment` applies them
  to the batch in one vectorized pass (crop and flip are one ``pad`` and one ``gather``, the colour operations
  broadcast per-sample factors). :func:`augment` does both.
* :class:`BatchAugment` is the callback: training batches only, any batch size, its own generator seeded
  from ``(seed, global rank, batch counter)`` and kept in the checkpoint, in the style of :class:`~lightning_tricks.Cutout`.

Per sample, in this order: crop offsets and flip; then brightness ``x * b`` with ``b ~ U[1 - brightness,
1 + brightness]``; then contrast ``c x + (1 - c) mean(gray(x))``, ``c ~ U[1 - contrast, 1 + contrast]``, the
image's mean grey level (ITU-R 601 weights for 3 channels, as torchvision); then the PCA colour shift.
With ``clamp`` the colour operations clip to [0, 1] as torchvision's do for float images; without it (the
default) they also work on normalized images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_tricks.core.batch import (
    BatchFormatError,
    BatchTransformCallback,
    Key,
    check_float_images,
    check_key,
    find_slot,
    get_item,
    read_images,
)
from lightning_tricks.core.layout import LayoutError, model_layout
from lightning_tricks.core.task import (
    Task,
    TaskNotSupportedError,
    aligned_with_inputs,
    check_task_kind,
    infer_target_task,
)
from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_int,
    check_probability,
    check_range,
)
from lightning_tricks.setup.preprocessing import MomentAccumulator, stream_training_set

PADDING_MODES = ("zeros", "reflect", "replicate")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class AugmentParams:
    """Every sample's draws; None for an operation that is off.

    Attributes:
        offsets: ``(N, 2)`` int64 ``(row, col)`` of the crop's top-left corner in the padded image, in [0, 2p].
        flip: ``(N,)`` bool, True for a horizontally flipped sample.
        brightness: ``(N,)`` multiplicative factors.
        contrast: ``(N,)`` contrast factors.
        alpha: ``(N, C)`` PCA colour coefficients.
    """

    offsets: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


def check_augment(padding: int, padding_mode: str, flip: float, brightness: float, contrast: float,
                  pca_std: float) -> None:
    """Validate the augmentation's arguments (shared by :func:`augment` and :class:`BatchAugment`)."""
    check_int("padding", padding, 0)
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    check_probability("flip", flip)
    check_range("brightness", brightness, 0.0, 1.0)
    check_range("contrast", contrast, 0.0, 1.0)
    check_range("pca_std", pca_std, 0.0, None)


def sample_augment_params(batch_size: int, channels: int, padding: int = 4, flip: float = 0.5,
                          brightness: float = 0.0, contrast: float = 0.0, pca_std: float = 0.0,
                          generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> AugmentParams:
    """Draw the parameters of a batch, in this order: crop rows, crop columns, flips, brightness, contrast, alpha.

    Only the operations that are on draw (``padding > 0``, ``flip > 0``, ...); each draw is one tensor op for
    the whole batch, on ``device``.
    """
    n = batch_size
    params = AugmentParams()
    if padding > 0:
        rows = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
        cols = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
        params.offsets = torch.stack((rows, cols), dim=1)
    if flip > 0:
        params.flip = torch.rand(n, generator=generator, device=device) < flip
    if brightness > 0:
        params.brightness = 1.0 + brightness * (2 * torch.rand(n, generator=generator, device=device) - 1)
    if contrast > 0:
        params.contrast = 1.0 + contrast * (2 * torch.rand(n, generator=generator, device=device) - 1)
    if pca_std > 0:
        params.alpha = pca_std * torch.randn(n, channels, generator=generator, device=device)
    return params


def crop_flip(images: torch.Tensor, offsets: torch.Tensor | None, flip: torch.Tensor | None, padding: int,
              padding_mode: str = "zeros", fill: float = 0.0) -> torch.Tensor:
    """Each image padded by ``padding``, cropped back to its size at its offset, then flipped if asked.

    ``fill`` is the value of the ``zeros`` padding (e.g. an ignore index for masks).

    One ``pad`` and one ``gather`` for the whole batch: every output pixel's index into its padded image is
    ``(row + dy) * W_padded + (col or W - 1 - col) + dx``.
    """
    squeeze = images.ndim == 3
    x = images.unsqueeze(1) if squeeze else images
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    if padding > 0 and padding_mode == "reflect" and padding >= min(height, width):
        raise InvalidArgumentError(f"`padding`={padding} is invalid with padding_mode='reflect' for {height}x{width} "
                                   "images: expected less than the shorter side.")
    if padding > 0:
        mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}[padding_mode]
        x = F.pad(x.reshape(n, -1, height, width), (padding,) * 4, mode=mode,
                  **({"value": fill} if mode == "constant" else {}))
    padded_width = width + 2 * padding
    device = images.device
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    if flip is not None:
        cols = torch.where(flip.view(n, 1, 1), (width - 1) - cols, cols)
    if offsets is not None:
        rows = rows + offsets[:, 0].view(n, 1, 1)
        cols = cols + offsets[:, 1].view(n, 1, 1)
    else:
        rows, cols = rows + padding, cols + padding
    index = (rows * padded_width + cols).view(n, 1, height * width)
    flat = x.reshape(n, -1, x.shape[-2] * x.shape[-1])
    out = flat.gather(2, index.expand(n, flat.shape[1], height * width)).view(images.shape if not squeeze else
                                                                             (n, 1, height, width))
    return out.squeeze(1) if squeeze else out


def crop_flip_targets(targets: torch.Tensor, offsets: torch.Tensor | None, flip: torch.Tensor | None, padding: int,
                      padding_mode: str = "zeros", ignore_index: int = -100) -> torch.Tensor:
    """Dense targets (``[N, H, W]`` masks, ``[N, C, H, W]`` maps) cropped and flipped as :func:`crop_flip` moved
    their images: the pixels a crop brings in from outside the image are padded as the images were
    (``reflect``/``replicate`` copy real pixels, so their labels too); under ``zeros`` padding (no image
    there) integer masks get ``ignore_index`` (``F.cross_entropy``'s default ignore value, -100) and float
    maps 0.

    Examples:
        >>> mask = torch.arange(4).reshape(1, 2, 2)
        >>> crop_flip_targets(mask, torch.tensor([[0, 1]]), None, padding=1).tolist()  # moved down one row
        [[[-100, -100], [0, 1]]]
    """
    fill = 0.0 if targets.is_floating_point() else float(ignore_index)
    return crop_flip(targets, offsets, flip, padding, padding_mode, fill)


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.to(images.dtype).view(-1, *([1] * (images.ndim - 1)))


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``c x + (1 - c) m`` per sample, ``m`` the image's mean grey level (the grey weights applied to the channel means)."""
    spatial = tuple(range(2, images.ndim)) if images.ndim >= 4 else tuple(range(1, images.ndim))
    means = images.mean(dim=spatial)  # (N, C) or (N,)
    if images.ndim >= 4 and images.shape[1] == 3:
        mean = means @ torch.tensor(_GRAY, dtype=images.dtype, device=images.device)
    else:
        mean = means.mean(1) if means.ndim == 2 else means
    c = _per_sample(factors, images)
    return images * c + _per_sample(mean, images) * (1 - c)


def apply_augment(images: torch.Tensor, params: AugmentParams, padding: int = 4, padding_mode: str = "zeros",
                  pca_basis: torch.Tensor | None = None, clamp: bool = False) -> torch.Tensor:
    """Apply drawn parameters to a batch ``(N, C, H, W)`` (or ``(N, H, W)``); returns a new tensor.

    Args:
        images: floating-point images.
        params: from :func:`sample_augment_params`.
        padding: the crop's padding (the offsets are in [0, 2 * padding]).
        padding_mode: ``zeros``, ``reflect`` or ``replicate``.
        pca_basis: ``(C, C)`` eigenvectors (columns) scaled by their standard deviations, needed with ``alpha``.
        clamp: clip the colour operations to [0, 1].
    """
    out = images
    if params.offsets is not None or params.flip is not None:
        out = crop_flip(out, params.offsets, params.flip, padding, padding_mode)
    if params.brightness is not None:
        out = out * _per_sample(params.brightness, out)
        out = out.clamp(0.0, 1.0) if clamp else out
    if params.contrast is not None:
        out = adjust_contrast(out, params.contrast)
        out = out.clamp(0.0, 1.0) if clamp else out
    if params.alpha is not None:
        if pca_basis is None:
            raise InvalidArgumentError("apply_augment: PCA colour augmentation needs `pca_basis` (see rgb_pca_basis).")
        shift = (params.alpha.to(out.dtype) @ pca_basis.to(out).T)  # (N, C): sum_i a_i s_i p_i
        out = out + shift.view(*shift.shape, *([1] * (out.ndim - 2)))
        out = out.clamp(0.0, 1.0) if clamp else out
    return out if out is not images else images.clone()


def rgb_pca_basis(covariance: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` eigenvectors of a channel covariance as columns, each scaled by sqrt(its eigenvalue)."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    return (vectors * eigenvalues.clamp_min(0.0).sqrt()).float()


def augment(images: torch.Tensor, padding: int = 4, flip: float = 0.5, brightness: float = 0.0,
            contrast: float = 0.0, pca_std: float = 0.0, *, padding_mode: str = "zeros",
            pca_basis: torch.Tensor | None = None, clamp: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with padding, horizontal flip, brightness/contrast jitter and PCA colour, per sample.

    Args:
        images: ``(N, C, H, W)`` floating-point images.
        padding: pixels of padding before the random crop back to ``H x W`` (0: no crop).
        flip: probability of a horizontal flip.
        brightness: factors drawn from ``U[1 - brightness, 1 + brightness]`` (0: off).
        contrast: factors drawn from ``U[1 - contrast, 1 + contrast]`` (0: off).
        pca_std: std of AlexNet's PCA colour coefficients (0.1 in the paper; 0: off).
        padding_mode: ``zeros``, ``reflect`` or ``replicate``.
        pca_basis: from :func:`rgb_pca_basis` (needed when ``pca_std > 0``).
        clamp: clip the colour operations to [0, 1].
        generator: random generator on the images' device (default torch's global one).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment(torch.rand(8, 3, 32, 32), padding=4, flip=0.5, brightness=0.2, generator=g).shape
        torch.Size([8, 3, 32, 32])
    """
    check_augment(padding, padding_mode, flip, brightness, contrast, pca_std)
    check_float_images(images, "augment", 3)
    channels = images.shape[1] if images.ndim >= 4 else 1
    params = sample_augment_params(images.shape[0], channels, padding, flip, brightness, contrast, pca_std,
                                   generator, images.device)
    return apply_augment(images, params, padding, padding_mode, pca_basis, clamp)


class BatchAugment(BatchTransformCallback):
    """Augment training batches on the device: random crop with padding, flips, colour jitter, PCA colour.

    Validation, test and predict batches are left alone. Every sample draws its own crop, flip and
    factors from the callback's generator, seeded from ``(seed, global rank, batch counter)``: ranks
    differ, and a resumed run repeats the uninterrupted one. With ``pca_std > 0`` the RGB covariance of
    the training set is computed at fit start (one streaming pass over the training loader, all-reduced
    over DDP ranks, saved in the checkpoint), unless ``pca_basis`` is given.

    The images (first tensor of a list/tuple batch, a dict's ``image``/``x``/... key, or ``input_key``) are
    replaced in list and dict batches and written in place in tuple and tensor batches (or through
    :class:`~lightning_tricks.BatchTransformMixin`). Put it before :class:`~lightning_tricks.Standardize`
    in ``trainer.callbacks`` to augment the raw images (``clamp: true`` for [0, 1] images).

    Tasks (read once, at the first batch, from the targets: :func:`~lightning_tricks.core.task.infer_target_task`,
    or ``task``): classification, multi-label and regression targets are left as they are; dense targets
    -- masks ``[N, H, W]`` or maps ``[N, C, H, W]`` on the images' grid, also float regression maps, and
    without ``target_key`` any other batch item on that grid (a mask beside a label) -- get the same crop
    and flip as their images (:func:`crop_flip_targets`: under ``zeros`` padding the
    pixels brought in from outside are ``ignore_index`` in integer masks, 0 in float maps; under
    ``reflect``/``replicate`` they are padded as the images). The colour operations never touch targets.

    Args:
        padding: padding before the random crop back to the image size (4 on CIFAR; 0: no crop).
        flip: probability of a horizontal flip (0.5; 0: none).
        brightness: brightness factors from ``U[1 - brightness, 1 + brightness]`` (0: off).
        contrast: contrast factors from ``U[1 - contrast, 1 + contrast]`` (0: off).
        pca_std: std of AlexNet's PCA colour coefficients (0.1 in the paper; 0: off).
        padding_mode: ``zeros`` (default), ``reflect`` or ``replicate``.
        clamp: clip the colour operations to [0, 1] (as torchvision does for float images).
        pca_basis: ``C`` lists of ``C`` numbers: eigenvectors (columns) times their std, instead of the
            training set's.
        input_key: where the images are: a dict key or a position; None finds them.
        seed: seed of the callback's generator; None takes the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        target_key: where the targets are (dict key or position); None: the element after the images, or a
            dict's ``label``/``mask``/... key. A batch without targets is augmented alone.
        task: ``classification``, ``multilabel``, ``dense``, ``regression`` or None (read from the targets).
        ignore_index: the label of mask pixels a crop brings in from outside the image under ``zeros`` padding.

    Raises:
        InvalidArgumentError: an argument out of range, at construction.
        BatchFormatError: at the first batch, images that cannot be found or written.
        TaskNotSupportedError: at the first batch, ``task="dense"`` with targets not on the images' grid.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[BatchAugment(padding=4, flip=0.5, brightness=0.2)])  # doctest: +SKIP
    """

    def __init__(self, padding: int = 4, flip: float = 0.5, brightness: float = 0.0, contrast: float = 0.0,
                 pca_std: float = 0.0, padding_mode: str = "zeros", clamp: bool = False,
                 pca_basis: list[list[float]] | None = None, input_key: Key = None, seed: int | None = None,
                 target_key: Key = None, task: str | None = None, ignore_index: int = -100) -> None:
        super().__init__(input_key=input_key, seed=seed)
        self.target_key = check_key("target_key", target_key)
        self.task_kind = check_task_kind("task", task)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise InvalidArgumentError(f"`ignore_index`={ignore_index!r} is invalid: expected an integer label.")
        self.ignore_index = ignore_index
        self.task: Task | None = None  # read at the first batch with targets
        check_augment(padding, padding_mode, flip, brightness, contrast, pca_std)
        self.padding, self.padding_mode, self.flip = padding, padding_mode, float(flip)
        self.brightness, self.contrast, self.pca_std = float(brightness), float(contrast), float(pca_std)
        self.clamp = bool(clamp)
        self.pca_basis: torch.Tensor | None = None
        if pca_basis is not None:
            basis = torch.as_tensor(pca_basis, dtype=torch.float32)
            if basis.ndim != 2 or basis.shape[0] != basis.shape[1]:
                raise InvalidArgumentError(f"`pca_basis`={pca_basis!r} is invalid: expected a square C x C list of lists.")
            self.pca_basis = basis

    @property
    def active(self) -> bool:
        return bool(self.padding or self.flip or self.brightness or self.contrast or self.pca_std)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(padding=self.padding, flip=self.flip, brightness=self.brightness,
                                        contrast=self.contrast, pca_std=self.pca_std, input_key=self.input_key)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pca_std == 0 or self.pca_basis is not None:
            return
        accumulator = MomentAccumulator("pca")

        def add_pixels(images: torch.Tensor) -> None:  # every pixel is one C-dimensional sample
            accumulator.update(images.movedim(1, -1).reshape(-1, images.shape[1]))

        device = stream_training_set(trainer, add_pixels, self.name, self.input_key)
        accumulator.all_reduce(device)
        stats = accumulator.finalize()
        covariance = (stats.components * stats.eigenvalues) @ stats.components.T
        self.pca_basis = rgb_pca_basis(covariance.cpu())
        rank_zero_info(f"BatchAugment: PCA colour std along the training set's RGB eigenvectors "
                       f"{[round(float(v), 4) for v in stats.eigenvalues.sqrt()]}.")

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, in_place: bool) -> Any:
        slot, images = read_images(batch, self.input_key, self.name, 3)
        if images.ndim == 3 and model_layout(pl_module) == "sequence":
            raise LayoutError(f"{self.name} needs images (N, C, H, W): its crops, flips and colour ops have no meaning "
                              f"on sequences {tuple(images.shape)}; use Cutout or Mixup (spans along the length).")
        generator = self._next_generator(trainer, images.device)
        if self.pca_std > 0 and self.pca_basis is None:
            raise InvalidArgumentError("BatchAugment(pca_std > 0) has no PCA basis: it is computed at fit start; "
                                       "outside a fit, pass `pca_basis`.")
        channels = images.shape[1] if images.ndim >= 4 else 1
        params = sample_augment_params(images.shape[0], channels, self.padding, self.flip, self.brightness,
                                       self.contrast, self.pca_std, generator, images.device)  # as augment() draws
        out = apply_augment(images, params, self.padding, self.padding_mode, self.pca_basis, self.clamp)
        geometric = params.offsets is not None or params.flip is not None
        maps = self._maps(batch, slot, images) if geometric else []
        batch = self._write_images(batch, slot, images, out, in_place,
                                   "write augmented images into images that are a view of another tensor")
        for map_slot, targets in maps:
            moved = crop_flip_targets(targets, params.offsets, params.flip, self.padding, self.padding_mode,
                                      self.ignore_index)
            batch = self._write_images(batch, map_slot, targets, moved, in_place,
                                       "move the masks with the images, but the masks are a view of another tensor")
        return batch

    def _maps(self, batch: Any, image_slot: Any, images: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
        """Every item of the batch that must get the images' crop and flip: dense targets, and (without
        ``target_key``) any other ``[N, ..., H, W]`` tensor on the images' grid (a mask beside a label)."""
        target_slot, targets = self._dense_targets(batch, image_slot, images)
        maps = [(target_slot, targets)] if targets is not None else []
        if self.target_key is not None or self.task_kind in ("classification", "multilabel"):
            return maps
        items = batch.items() if isinstance(batch, dict) else enumerate(batch) if isinstance(batch, (list, tuple)) \
            else ()
        for key, item in items:
            if key not in (image_slot, target_slot) and isinstance(item, torch.Tensor) and item.ndim >= 3 \
                    and item.shape[0] == images.shape[0] and item.shape[-2:] == images.shape[-2:]:
                maps.append((key, item))
        return maps

    def _dense_targets(self, batch: Any, image_slot: Any, images: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """Where the batch's targets are and the targets, when they are maps that move with the images."""
        try:
            target_slot = find_slot(batch, self.target_key, "targets", self.name, after=image_slot)
        except BatchFormatError:
            if self.target_key is not None:
                raise
            return None, None
        targets = get_item(batch, target_slot)
        if not isinstance(targets, torch.Tensor) or targets.ndim == 0 or targets.shape[0] != images.shape[0]:
            return None, None
        if self.task is None:
            self.task = infer_target_task(targets, images, self.task_kind)
        aligned = aligned_with_inputs(targets, images)
        if self.task.kind not in ("dense", "regression") or not aligned:
            return None, None
        if targets.ndim < 3 or targets.shape[-2:] != images.shape[-2:]:
            raise TaskNotSupportedError(f"{self.name} moves dense targets on a 2-D grid ([N, H, W] masks, [N, C, H, W] "
                                        f"maps), got {tuple(targets.shape)} for images {tuple(images.shape)}; use "
                                        "padding=0 and flip=0 (colour only) for these targets.")
        return target_slot, targets

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pca_basis": self.pca_basis}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("pca_basis") is not None:
            self.pca_basis = state_dict["pca_basis"]


__all__ = ["PADDING_MODES", "AugmentParams", "BatchAugment", "adjust_contrast", "apply_augment", "augment",
           "crop_flip", "crop_flip_targets", "rgb_pca_basis", "sample_augment_params"]
