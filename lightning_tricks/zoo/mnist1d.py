"""MNIST-1D (Greydanus & Kobak 2020), generated on this machine by the ``mnist1d`` package, never downloaded.

The ``mnist1d`` package's ``make_dataset`` builds the dataset from its fixed default arguments (seed 42,
5,000 signals of 40 steps, 4,000 for training and 1,000 for test). Generating takes a few seconds, so the
arrays are cached in the user's cache folder (``$LIGHTNING_TRICKS_CACHE``, else
``$XDG_CACHE_HOME/lightning-tricks``, else ``~/.cache/lightning-tricks``) under a name that hashes the
generation arguments and the package version. The package's ``get_dataset`` (which may download a pickle
from a URL) is never called.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_tricks.core.validation import InvalidArgumentError, check_int, check_optional_int
from lightning_tricks.zoo.data import Split, _ImageDataModule, stratified_subset

CACHE_ENV = "LIGHTNING_TRICKS_CACHE"
"""Environment variable naming the cache folder (overrides the user's cache folder)."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_TRICKS_CACHE``, else ``$XDG_CACHE_HOME/lightning-tricks``, else ``~/.cache/lightning-tricks``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lightning-tricks"


def mnist1d_args(shuffle_seq: bool = False) -> dict[str, Any]:
    """The package's default generation arguments (``mnist1d.data.get_dataset_args``), ``url`` removed."""
    from mnist1d.data import get_dataset_args

    args = dict(get_dataset_args(as_dict=True))
    args.pop("url", None)  # never used: nothing is downloaded
    args["shuffle_seq"] = bool(shuffle_seq)
    return args


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - installed from a source tree
        return "unknown"


def cache_path(args: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """Where the arrays generated from ``args`` are cached: ``<cache_dir>/mnist1d-<hash>.npz``."""
    key = json.dumps({"args": args, "mnist1d": _version()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"mnist1d-{digest}.npz"


def generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset(args)`` as float32/int64 arrays ``x, y, x_test, y_test``.

    ``make_dataset`` reseeds Python's and NumPy's global generators; their states are restored afterwards so
    that generating the data does not change the run's other random draws.
    """
    try:
        from mnist1d.data import make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as err:  # pragma: no cover - a dependency
        raise InvalidArgumentError("MNIST1DDataModule needs the `mnist1d` package: pip install mnist1d.") from err
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x": np.asarray(data["x"], dtype=np.float32), "y": np.asarray(data["y"], dtype=np.int64),
            "x_test": np.asarray(data["x_test"], dtype=np.float32),
            "y_test": np.asarray(data["y_test"], dtype=np.int64)}


def load_mnist1d(shuffle_seq: bool = False, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays, from the cache or generated (then cached; the write is atomic, so ranks may race).

    Returns:
        ``x`` ``[4000, 40]``, ``y`` ``[4000]``, ``x_test`` ``[1000, 40]``, ``y_test`` ``[1000]`` with the
        package's default arguments.
    """
    args = mnist1d_args(shuffle_seq)
    path = cache_path(args, cache_dir)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
            if len(data["x"]) == len(data["y"]) and len(data["x_test"]) == len(data["y_test"]):
                return data
        except (OSError, KeyError, ValueError):
            pass  # a truncated or foreign file: generate again
    data = generate_mnist1d(args)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
    except OSError:  # a read-only cache folder: work from memory
        pass
    return data


class MNIST1DDataModule(_ImageDataModule):
    """MNIST-1D: 10 classes of 1D signals of 40 steps, generated locally by the ``mnist1d`` package (no download).

    The package's default split is kept: its 4,000 training signals (minus ``val_size`` held out for
    validation, stratified and fixed by ``split_seed``) and its 1,000 test signals. Inputs are
    ``[B, 1, 40]`` for the zoo's sequence backbones (``mnist1d_cnn``, ``resnet1d``, ...), or ``[B, 40]``
    with ``flat=True``; the flat backbones (``mnist1d_logistic``, ``mnist1d_mlp``) take either. Signals are
    standardized with the training split's mean and std (the package already centres the whole set, so
    this changes them very little).

    Args:
        batch_size: training batch size (the paper: 100).
        val_size: training signals held out for validation (0: none; train on all 4,000 as the paper).
        shuffle_seq: the paper's "shuffled" variant: one fixed permutation of the 40 steps for every signal.
        flat: inputs ``[B, 40]`` instead of ``[B, 1, 40]``.
        train_subset: keep only this many training signals (stratified): the small-data regime.
        split_seed: seed of the validation split and the subset.
        cache_dir: cache folder (default: ``$LIGHTNING_TRICKS_CACHE``, else the user's cache folder).
        num_workers: DataLoader workers.
        eval_batch_size: batch size for val/test/predict (defaults to ``batch_size``).

    Examples:
        >>> dm = MNIST1DDataModule(batch_size=100)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)  # doctest: +SKIP
        (100, 1, 40)
    """

    num_classes = 10
    num_channels = 1
    sequence_length = 40
    total_train = 4000
    total_test = 1000

    def __init__(self, batch_size: int = 100, val_size: int = 500, shuffle_seq: bool = False, flat: bool = False,
                 train_subset: int | None = None, split_seed: int = 0, cache_dir: str | None = None,
                 num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_int("val_size", val_size, 0, self.total_train - self.num_classes)
        check_optional_int("train_subset", train_subset, self.num_classes, self.total_train - val_size)
        self.val_size, self.shuffle_seq, self.flat = val_size, bool(shuffle_seq), bool(flat)
        self.train_subset, self.split_seed, self.cache_dir = train_subset, split_seed, cache_dir
        self.image_size = self.sequence_length

    def prepare_data(self) -> None:
        load_mnist1d(self.shuffle_seq, self.cache_dir)  # generate once per node; setup then reads the cache

    def _splits(self) -> tuple[Split, Split, Split]:
        data = load_mnist1d(self.shuffle_seq, self.cache_dir)
        x = torch.from_numpy(data["x"]).unsqueeze(1)
        y = torch.from_numpy(data["y"])
        idx = np.arange(len(y))
        if self.val_size:
            from sklearn.model_selection import train_test_split

            train, val = train_test_split(idx, test_size=self.val_size, stratify=data["y"],
                                          random_state=self.split_seed)
            train, val = np.sort(train), np.sort(val)
        else:
            train, val = idx, idx[:0]
        if self.train_subset is not None:
            train = train[stratified_subset(data["y"][train], self.train_subset, self.split_seed)]
        test = (torch.from_numpy(data["x_test"]).unsqueeze(1), torch.from_numpy(data["y_test"]))
        tr, va = torch.as_tensor(train), torch.as_tensor(val)
        return (x[tr], y[tr]), (x[va], y[va]), test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        if self.flat:
            for name in ("train_set", "val_set", "test_set"):
                ds: TensorDataset = getattr(self, name)
                setattr(self, name, TensorDataset(ds.tensors[0].flatten(1), ds.tensors[1]))

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized ``(x, y)`` tensors of ``train``, ``val`` or ``test`` (after :meth:`setup`)."""
        if split not in ("train", "val", "test"):
            raise InvalidArgumentError(f"`split`={split!r} is invalid: expected 'train', 'val' or 'test'.")
        self.setup()
        ds = getattr(self, f"{split}_set")
        return ds.tensors[0], ds.tensors[1]


__all__ = ["CACHE_ENV", "MNIST1DDataModule", "cache_path", "default_cache_dir", "generate_mnist1d", "load_mnist1d",
           "mnist1d_args"]
