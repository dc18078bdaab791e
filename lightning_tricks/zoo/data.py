"""Datamodules for the zoo: scikit-learn's digits (embedded), CIFAR-10 from a local folder, synthetic data.

None of them downloads anything. Normalization statistics always come from the training split only
(the lectures' preprocessing rule), and every split is fixed by a seed, so runs are comparable.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tricks.core.validation import (
    DataNotFoundError,
    InvalidArgumentError,
    check_int,
    check_non_negative,
    check_optional_int,
    check_range,
)

Split = tuple[torch.Tensor, torch.Tensor]


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of an ``(N, C, H, W)`` (or ``(N, C, L)``) tensor, shaped ``(1, C, 1, 1)`` (``(1, C, 1)``)."""
    dims = (0, *range(2, images.dim()))
    mean = images.mean(dim=dims, keepdim=True)
    std = images.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return mean, std


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified subset of ``size`` elements (fixed by ``seed``), sorted."""
    from sklearn.model_selection import train_test_split

    if size >= len(labels):
        return np.arange(len(labels))
    idx, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(idx)


class _FlipCropDataset(Dataset):
    """Random crop with zero padding and horizontal flip, the standard CIFAR augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        h, w = x.shape[-2:]
        p = self.padding
        x = F.pad(x, (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        x = x[:, top:top + h, left:left + w]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


class _ImageDataModule(pl.LightningDataModule):
    """Shared loaders for datamodules that hold their splits as tensors."""

    num_classes: int
    num_channels: int
    image_size: int

    def __init__(self, batch_size: int, num_workers: int, eval_batch_size: int | None) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_optional_int("eval_batch_size", eval_batch_size, 1)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def _splits(self) -> tuple[Split, Split, Split]:
        raise NotImplementedError

    def _train_dataset(self, x: torch.Tensor, y: torch.Tensor) -> Dataset:
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (xtr, ytr), (xva, yva), (xte, yte) = self._splits()
        self.mean, self.std = channel_stats(xtr)  # training split only
        def norm(x: torch.Tensor) -> torch.Tensor:
            return ((x - self.mean) / self.std).contiguous()

        self.train_set = self._train_dataset(norm(xtr), ytr)
        self.val_set = TensorDataset(norm(xva), yva)
        self.test_set = TensorDataset(norm(xte), yte)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    check_range("val_fraction", val_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    check_range("test_fraction", test_fraction, 0.0, 1.0, high_inclusive=False)
    if val_fraction + test_fraction >= 1.0:
        raise InvalidArgumentError(
            f"`val_fraction`+`test_fraction`={val_fraction + test_fraction!r} is invalid: expected a sum below 1 "
            "so that a training split remains."
        )


def _check_subset(train_subset: int | None, available: int, num_classes: int) -> None:
    check_optional_int("train_subset", train_subset, num_classes, available)


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images of 10 classes, no download.

    The train/val/test split is stratified and fixed by ``split_seed``. Images are scaled from 0..16,
    optionally resized to ``resize_to`` (bilinear), then normalized with the per-channel mean and std of
    the training split only.

    Args:
        batch_size: training batch size.
        val_fraction: fraction of all images for validation, in (0, 1).
        test_fraction: fraction of all images for test, in [0, 1); the two sum below 1.
        resize_to: side length to resize to (e.g. 32 for CIFAR-style models), or None to keep 8x8.
        train_subset: keep only this many training images (stratified): the small-data regime.
        split_seed: seed of the split and the subset.
        num_workers: DataLoader workers.
        eval_batch_size: batch size for val/test/predict (defaults to ``batch_size``).

    Examples:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((32, 1, 8, 8), 10)
    """

    num_classes = 10
    num_channels = 1
    total_images = 1797

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 resize_to: int | None = None, train_subset: int | None = None, split_seed: int = 0,
                 num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        _check_fractions(val_fraction, test_fraction)
        check_optional_int("resize_to", resize_to, 1)
        n_held = round(self.total_images * val_fraction) + round(self.total_images * test_fraction)
        _check_subset(train_subset, self.total_images - n_held, self.num_classes)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.resize_to, self.train_subset, self.split_seed = resize_to, train_subset, split_seed
        self.image_size = resize_to or 8

    def _splits(self) -> tuple[Split, Split, Split]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = np.asarray(digits.target)
        idx = np.arange(len(y))
        n_val = round(len(y) * self.val_fraction)
        n_test = round(len(y) * self.test_fraction)
        rest, val = train_test_split(idx, test_size=n_val, stratify=y, random_state=self.split_seed)
        if n_test:
            train, test = train_test_split(rest, test_size=n_test, stratify=y[rest], random_state=self.split_seed)
        else:
            train, test = rest, rest[:0]
        if self.train_subset is not None:
            train = train[stratified_subset(y[train], self.train_subset, self.split_seed)]
        if self.resize_to is not None and self.resize_to != 8:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        yt = torch.as_tensor(y, dtype=torch.long)
        return tuple((x[torch.as_tensor(i)], yt[torch.as_tensor(i)]) for i in (train, val, test))  # type: ignore[return-value]


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and refuses anything else."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


CIFAR10_LAYOUT = "data_batch_1 ... data_batch_5, test_batch and batches.meta (the python-pickle 'cifar-10-batches-py' folder)"


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 read from a local folder in the standard python-pickle layout; it never downloads.

    ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent. The validation split is a
    stratified, seeded part of the 50,000 training images; the 10,000 test images are the test split.
    Training images get the standard augmentation (4-pixel padded random crop and horizontal flip)
    unless ``augment=False``.

    Args:
        data_dir: folder holding ``data_batch_1``..``data_batch_5``, ``test_batch``, ``batches.meta``.
        batch_size: training batch size.
        val_size: number of training images held out for validation.
        augment: random crop and flip on training images.
        train_subset: keep only this many training images (stratified).
        split_seed: seed of the validation split and the subset.
        num_workers: DataLoader workers.
        eval_batch_size: batch size for val/test/predict.

    Raises:
        FileNotFoundError: the folder or one of its files is missing, naming the path and the layout.

    Examples:
        >>> dm = CIFAR10DataModule("~/data/cifar-10-batches-py")  # doctest: +SKIP
    """

    num_classes = 10
    num_channels = 3
    image_size = 32
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, data_dir: str, batch_size: int = 128, val_size: int = 5000, augment: bool = True,
                 train_subset: int | None = None, split_seed: int = 0, num_workers: int = 0,
                 eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.data_dir = self._resolve(Path(data_dir).expanduser())
        check_int("val_size", val_size, 0)
        self.val_size, self.augment = val_size, augment
        self.train_subset, self.split_seed = train_subset, split_seed

    @classmethod
    def _resolve(cls, path: Path) -> Path:
        if (path / "cifar-10-batches-py").is_dir():
            path = path / "cifar-10-batches-py"
        if not path.is_dir():
            raise DataNotFoundError(f"`data_dir`={str(path)!r} does not exist: expected a folder with {CIFAR10_LAYOUT}.")
        missing = [f for f in (*cls.train_files, "test_batch", "batches.meta") if not (path / f).is_file()]
        if missing:
            raise DataNotFoundError(
                f"`data_dir`={str(path)!r} lacks {', '.join(missing)}: expected {CIFAR10_LAYOUT}."
            )
        return path

    def _read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.data_dir / name
        try:
            with open(path, "rb") as f:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as err:
            raise InvalidArgumentError(f"{str(path)!r} is not a CIFAR-10 python-pickle batch ({err}); expected {CIFAR10_LAYOUT}.") from err
        if len(data) != len(labels) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
            raise InvalidArgumentError(f"{str(path)!r} is malformed: {len(data)} images, {len(labels)} labels in 0..9 expected.")
        return torch.from_numpy(data).float() / 255.0, torch.from_numpy(labels)

    def _splits(self) -> tuple[Split, Split, Split]:
        from sklearn.model_selection import train_test_split

        parts = [self._read(f) for f in self.train_files]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        if not 0 < self.val_size < len(y):
            raise InvalidArgumentError(f"`val_size`={self.val_size} is invalid: expected 0 < val_size < {len(y)} training images.")
        train, val = train_test_split(np.arange(len(y)), test_size=self.val_size, stratify=y.numpy(),
                                      random_state=self.split_seed)
        _check_subset(self.train_subset, len(train), self.num_classes)
        if self.train_subset is not None:
            train = train[stratified_subset(y.numpy()[train], self.train_subset, self.split_seed)]
        train, val = torch.as_tensor(np.sort(train)), torch.as_tensor(np.sort(val))
        return (x[train], y[train]), (x[val], y[val]), self._read("test_batch")

    def _train_dataset(self, x: torch.Tensor, y: torch.Tensor) -> Dataset:
        return _FlipCropDataset(x, y) if self.augment else TensorDataset(x, y)


class SyntheticDataModule(_ImageDataModule):
    """Random images and labels of any shape and class count, for fast tests and benchmarks.

    Each class has a fixed random prototype image; a sample is ``signal * prototype + N(0, 1)`` noise,
    so a model can learn it (``signal=0`` gives pure noise). Everything is fixed by ``seed``.

    Args:
        num_samples: training images (val and test get ``num_samples // 4`` each).
        num_classes: number of classes.
        image_shape: ``[channels, height, width]``.
        signal: class-prototype amplitude.
        batch_size: training batch size.
        seed: seed of the prototypes, images and labels.
        num_workers: DataLoader workers.
        eval_batch_size: batch size for val/test/predict.

    Examples:
        >>> dm = SyntheticDataModule(num_samples=64, image_shape=[3, 16, 16], batch_size=8)
        >>> dm.setup("fit")
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)
        (8, 3, 16, 16)
    """

    def __init__(self, num_samples: int = 512, num_classes: int = 10, image_shape: list[int] | None = None,
                 signal: float = 1.0, batch_size: int = 64, seed: int = 0, num_workers: int = 0,
                 eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        shape = list(image_shape) if image_shape is not None else [3, 32, 32]
        check_int("num_samples", num_samples, 1)
        check_int("num_classes", num_classes, 2)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise InvalidArgumentError(f"`image_shape`={image_shape!r} is invalid: expected [channels, height, width] of positive ints.")
        check_non_negative("signal", signal)
        self.num_samples, self.num_classes, self.image_shape = num_samples, num_classes, shape
        self.signal, self.seed = signal, seed
        self.num_channels = shape[0]
        self.image_size = shape[1]

    def _splits(self) -> tuple[Split, Split, Split]:
        g = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn(self.num_classes, *self.image_shape, generator=g)

        def draw(n: int) -> Split:
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            return self.signal * prototypes[y] + torch.randn(n, *self.image_shape, generator=g), y

        held = max(1, self.num_samples // 4)
        return draw(self.num_samples), draw(held), draw(held)
