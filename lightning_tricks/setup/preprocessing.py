"""Input preprocessing from the training set: mean/std per channel, the mean image, PCA and whitening.

CS231n: subtract the mean image (AlexNet), or the per-channel mean (VGG), or the per-channel mean and
divide by the per-channel std (ResNet); zero-centering, PCA (decorrelation) and whitening are for flat
data. Statistics come from the **training split only** and are applied to every split.

* :class:`MomentAccumulator` is the functional core: it streams batches (on their device, in float64)
  into the sums a mode needs, all-reduces them over DDP ranks (:meth:`MomentAccumulator.all_reduce`), and
  :meth:`MomentAccumulator.finalize` turns them into :class:`InputStatistics`, whose :meth:`~InputStatistics.apply`
  normalizes a batch. :func:`fit_statistics` does both for an iterable of batches.
* :class:`Standardize` is the callback: at fit start it streams the training loader once (each rank its
  shard; the duplicates ``DistributedSampler`` pads a shard with are not counted, so the statistics under
  DDP equal the single-process ones), keeps the statistics in the checkpoint, and normalizes the inputs of
  every training, validation, test and predict batch on the device. An `Ensemble` applies each member's
  recorded statistics to that member's inputs itself (the callback leaves its batches alone).

Modes (``x`` is one sample; flat modes flatten it to ``D`` features):

* ``channel``: ``(x - mean_c) / std_c`` per channel (dimension 1), the ResNet recipe.
* ``channel_mean``: ``x - mean_c`` (VGG). ``image``: ``x - mean image`` (AlexNet).
* ``feature``: ``(x - mean) / std`` per feature. ``center``: ``x - mean``.
* ``pca``: ``(x - mean) U_k``, the coordinates in the top ``k`` eigenvectors of the covariance (decorrelated).
* ``whiten``: ``(x - mean) U_k / sqrt(S_k + eps)``: decorrelated with unit variance (the lectures' ``eps`` 1e-5).

Standard deviations are population ones (divided by N, as numpy and scikit-learn's ``StandardScaler``);
a std below ``eps`` (a constant feature, e.g. digits' blank border pixels) divides by 1 instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from lightning_tricks._lightning_internals import prepared_train_dataloader
from lightning_tricks.core.batch import (
    BatchFormatError,
    Key,
    can_replace,
    check_key,
    read_images,
    replace_item,
)
from lightning_tricks.core.distributed import all_reduce
from lightning_tricks.core.validation import (
    ConfigError,
    DataNotFoundError,
    InvalidArgumentError,
    check_choice,
    check_int,
    check_positive,
)

MODES = ("channel", "channel_mean", "image", "feature", "center", "pca", "whiten")
"""Preprocessing modes (see the module docstring)."""
_CHANNEL_MODES = ("channel", "channel_mean")
_FLAT_MODES = ("feature", "center", "pca", "whiten")
_PCA_MODES = ("pca", "whiten")


def check_preprocessing(mode: str, eps: float, n_components: int | None) -> tuple[str, float, int | None]:
    """Validate ``mode``, ``eps`` and ``n_components`` (shared by the core and the callback)."""
    check_choice("mode", mode, MODES)
    check_positive("eps", eps)
    if n_components is not None:
        if mode not in _PCA_MODES:
            raise InvalidArgumentError(f"`n_components`={n_components!r} is invalid with mode={mode!r}: only 'pca' "
                                       "and 'whiten' keep components; remove it.")
        check_int("n_components", n_components, 1)
    return mode, float(eps), n_components


def check_components(n_components: int | None, features: int) -> int:
    """The number of components kept: ``n_components`` (at most ``features``) or all of them."""
    if n_components is None:
        return features
    if n_components > features:
        raise InvalidArgumentError(f"`n_components`={n_components} is invalid for inputs with {features} features: "
                                   f"expected at most {features}.")
    return n_components


@dataclass
class InputStatistics:
    """Statistics of the training inputs and the transform they define (see the module docstring).

    Attributes:
        mode: one of :data:`MODES`.
        count: samples (channel modes: values per channel) the statistics were computed over.
        mean: ``(C,)`` per channel, ``(C, H, W)``-shaped mean image, or ``(D,)`` per feature.
        std: ``(C,)`` or ``(D,)`` divisors (1 where the std is below ``eps``), or None.
        components: ``(D, k)`` eigenvectors of the covariance, by decreasing eigenvalue (``pca``/``whiten``).
        eigenvalues: ``(k,)`` their eigenvalues (variances along them).
        eps: the whitening epsilon.
    """

    mode: str
    count: int
    mean: torch.Tensor
    std: torch.Tensor | None = None
    components: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    eps: float = 1e-5

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> InputStatistics:
        """A copy with every tensor on ``device`` in ``dtype``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)
        return InputStatistics(self.mode, self.count, move(self.mean), move(self.std),  # type: ignore[arg-type]
                               move(self.components), move(self.eigenvalues), self.eps)

    def output_shape(self, sample_shape: torch.Size) -> torch.Size:
        """The shape of one transformed sample."""
        k = self.components.shape[1] if self.components is not None else None
        if k is None or k == sample_shape.numel():
            return sample_shape
        return torch.Size([k])

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize a batch ``x`` (``(N, ...)``); the statistics must be on its device and dtype (see :meth:`to`).

        With ``out`` (``x`` itself is allowed), the result is written there; only for shape-keeping modes.
        """
        mode = self.mode
        if mode in _CHANNEL_MODES:
            view = (1, -1) + (1,) * (x.ndim - 2)
            result = x.sub(self.mean.view(view)) if out is None else torch.sub(x, self.mean.view(view), out=out)
            return result if self.std is None else result.div_(self.std.view(view))
        if mode == "image":
            return x - self.mean if out is None else torch.sub(x, self.mean, out=out)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.mean.numel():
            raise InvalidArgumentError(f"Standardize: inputs with {flat.shape[1]} features per sample do not match the "
                                       f"{self.mean.numel()} features the statistics were computed on.")
        result = flat - self.mean
        if self.std is not None:
            result = result / self.std
        if self.components is not None:
            result = result @ self.components
            if mode == "whiten":
                result = result / torch.sqrt(self.eigenvalues + self.eps)
        result = result.reshape(x.shape[0], *self.output_shape(x.shape[1:]))
        if out is not None:
            return out.copy_(result)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "count": self.count, "eps": self.eps, "mean": self.mean.cpu(),
                "std": None if self.std is None else self.std.cpu(),
                "components": None if self.components is None else self.components.cpu(),
                "eigenvalues": None if self.eigenvalues is None else self.eigenvalues.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> InputStatistics:
        return cls(state["mode"], int(state["count"]), state["mean"], state.get("std"), state.get("components"),
                   state.get("eigenvalues"), float(state.get("eps", 1e-5)))


class MomentAccumulator:
    """Streams batches into the float64 sums one mode needs; every rank's sums add up (``all_reduce``).

    Args:
        mode: one of :data:`MODES`.

    Examples:
        >>> acc = MomentAccumulator("channel")
        >>> acc.update(torch.arange(8.0).view(2, 1, 2, 2))
        >>> stats = acc.finalize()
        >>> stats.mean, stats.std
        (tensor([3.5000], dtype=torch.float64), tensor([2.2913], dtype=torch.float64))
    """

    def __init__(self, mode: str = "channel") -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.count = 0
        self.sums: list[torch.Tensor] | None = None  # [sum, sum of squares or x^T x (when needed)]
        self.sample_shape: torch.Size | None = None

    def _moments(self, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        x = x.detach().to(torch.float64)
        if self.mode in _CHANNEL_MODES:
            dims = [0, *range(2, x.ndim)]
            count = x.numel() // x.shape[1]
            return count, [x.sum(dims), x.square().sum(dims)]
        if self.mode == "image":
            return x.shape[0], [x.sum(0)]
        flat = x.reshape(x.shape[0], -1)
        if self.mode in _PCA_MODES:
            return flat.shape[0], [flat.sum(0), flat.T @ flat]
        return flat.shape[0], [flat.sum(0), flat.square().sum(0)]

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``(N, ...)`` (channels at dimension 1 for the channel modes)."""
        if x.ndim < (2 if self.mode in _FLAT_MODES else 3 if self.mode == "image" else 2):
            raise InvalidArgumentError(f"Standardize(mode={self.mode!r}): inputs of shape {tuple(x.shape)} are invalid: "
                                       "expected (N, C, ...) batches.")
        if self.sample_shape is not None and x.shape[1:] != self.sample_shape:
            raise InvalidArgumentError(f"Standardize: a training batch of sample shape {tuple(x.shape[1:])} follows "
                                       f"ones of {tuple(self.sample_shape)}: statistics need equal sample shapes.")
        count, moments = self._moments(x)
        self.sample_shape = x.shape[1:]
        self.count += count
        if self.sums is None:
            self.sums = moments
        else:
            for total, m in zip(self.sums, moments, strict=True):
                total += m

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum counts and sums over the DDP ranks (identity on one process); every rank must call it.

        A rank that saw no batch contributes zeros (it learns the sample shape from the others).
        """
        shape = torch.tensor([float(self.count)] + [float(s) for s in (self.sample_shape or ())], dtype=torch.float64,
                             device=device)
        ndim = all_reduce(torch.tensor([float(len(shape) - 1)], dtype=torch.float64, device=device), "max")
        header = torch.zeros(1 + int(ndim.item()), dtype=torch.float64, device=device)
        header[: len(shape)] = shape
        counts = all_reduce(header[:1].clone())
        dims = all_reduce(header[1:].clone(), "max")
        self.count = int(counts.item())
        self.sample_shape = torch.Size(int(d) for d in dims.tolist())
        if self.count == 0:  # no rank saw a batch (every rank knows it): finalize says so in one line
            return
        if self.sums is None:
            _, self.sums = self._moments(torch.zeros(1, *self.sample_shape, device=device))
        flat = torch.cat([s.reshape(-1) for s in self.sums]).to(device)
        all_reduce(flat)
        sizes = [s.numel() for s in self.sums]
        self.sums = [chunk.view_as(s).to(s.device) for chunk, s in zip(flat.split(sizes), self.sums, strict=True)]

    def finalize(self, eps: float = 1e-5, n_components: int | None = None) -> InputStatistics:
        """The statistics of everything added (and all-reduced)."""
        mode, eps, n_components = check_preprocessing(self.mode, eps, n_components)
        if self.sums is None or self.count == 0:
            raise ConfigError("Standardize: no training sample was seen (the training dataloader is empty); "
                              "statistics need at least one batch.")
        if not all(bool(torch.isfinite(total).all()) for total in self.sums):
            raise ConfigError("Standardize: the training inputs contain NaN or infinite values, so every standardized "
                              "input would be NaN: clean the data (e.g. torch.nan_to_num) or drop those samples.")
        n = self.count
        mean = self.sums[0] / n
        if mode == "channel_mean" or mode == "image" or mode == "center":
            return InputStatistics(mode, n, mean, eps=eps)
        if mode in ("channel", "feature"):
            var = (self.sums[1] / n - mean.square()).clamp_min(0.0)
            std = var.sqrt()
            return InputStatistics(mode, n, mean, torch.where(std < eps, torch.ones_like(std), std), eps=eps)
        k = check_components(n_components, mean.numel())
        cov = self.sums[1] / n - torch.outer(mean, mean)
        eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigenvalues, descending=True)[:k]
        # a deterministic sign per eigenvector (largest entry positive), so every rank and run agree
        vectors = vectors[:, order]
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        return InputStatistics(mode, n, mean, None, vectors * signs, eigenvalues[order].clamp_min(0.0), eps)


def fit_statistics(batches: Iterable[torch.Tensor], mode: str = "channel", eps: float = 1e-5,
                   n_components: int | None = None) -> InputStatistics:
    """Statistics of the inputs of ``batches`` in one streaming pass (one process).

    Examples:
        >>> x = torch.randn(1000, 3) @ torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 0, 0.5]])
        >>> white = fit_statistics(x.split(100), "whiten").to("cpu", torch.float64).apply(x.double())
        >>> torch.allclose(white.T @ white / len(x), torch.eye(3, dtype=torch.float64), atol=1e-3)
        True
    """
    check_preprocessing(mode, eps, n_components)
    accumulator = MomentAccumulator(mode)
    for batch in batches:
        accumulator.update(batch)
    return accumulator.finalize(eps, n_components)


# --------------------------------------------------------------------------------------------- callback


def _training_loader(trainer: pl.Trainer) -> Any:
    """The training DataLoader as the fit loop will iterate it (the first one of several)."""
    loader = prepared_train_dataloader(trainer)
    if loader is None:
        raise ConfigError("Standardize needs the training data, but this fit has no train dataloader.")
    return loader


def _real_samples(loader: Any) -> int | None:
    """Samples of this rank's shard that are not DistributedSampler padding (None: count every sample).

    ``DistributedSampler`` (without ``drop_last``) repeats the first indices so that every rank gets
    ``ceil(N / world)`` samples; rank ``r`` takes positions ``r, r + world, ...``, so its padded samples are
    its last ones and it holds ``len(range(r, N, world))`` real samples.
    """
    sampler = getattr(loader, "sampler", None) if isinstance(loader, DataLoader) else None
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
    return None


def stream_training_set(trainer: pl.Trainer, update: Callable[[torch.Tensor], None], owner: str,
                        input_key: Key = None, max_batches: int | None = None) -> torch.device:
    """Call ``update(inputs)`` on every training batch of this rank's shard (padding skipped), on the device.

    The global RNG is forked around the pass (a shuffling sampler draws from it), so training draws the same
    batches as without it. Returns the device the inputs were moved to (the strategy's root device).
    """
    loader = _training_loader(trainer)
    device = trainer.strategy.root_device
    remaining = _real_samples(loader)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for index, batch in enumerate(loader):
            if (max_batches is not None and index >= max_batches) or remaining == 0:
                break
            images = read_images(batch, input_key, owner, 2)[1]
            if remaining is not None:
                images, remaining = images[:remaining], remaining - min(remaining, images.shape[0])
            update(move_data_to_device(images, device))
    return device


class Standardize(Callback):
    """Normalize every batch's inputs with statistics of the training set, computed once at fit start.

    At ``on_fit_start`` (unless statistics were restored from a checkpoint or computed by an earlier fit),
    the training loader is streamed once, each rank over its shard, the sums are all-reduced and every rank
    holds the same statistics; the duplicates ``DistributedSampler`` pads a shard with are skipped. Batches
    are moved to the training device first, so the pass runs there. The global RNG is forked around it, so
    training draws the same batches with and without this callback. The statistics are saved in the
    checkpoint (``state_dict``) and restored on ``ckpt_path``, for fit and for validate/test/predict.

    Every training, validation, test and predict batch is normalized on the device in the callback's
    ``on_*_batch_start``: list/dict batches get a new tensor, tuple/tensor batches are written in place
    (not when the images are a view of another tensor, or ``pca``/``whiten`` keep fewer components than
    features; then yield lists or dicts from the DataLoader).

    Args:
        mode: ``channel`` (per-channel mean and std, default), ``channel_mean``, ``image`` (mean image),
            ``feature`` (per-feature mean and std of flattened samples), ``center``, ``pca`` or ``whiten``.
        eps: a std below it divides by 1; whitening divides by ``sqrt(eigenvalue + eps)`` (default 1e-5).
        n_components: ``pca``/``whiten`` only: leading components kept (default all).
        input_key: where the inputs are in a batch: a dict key or a position (default: found as Cutout does).
        max_batches: training batches per rank the statistics are computed on (default all).
        statistics_from: a checkpoint saved with Standardize to take the statistics from, when a stage starts
            without them: evaluating an :class:`~lightning_tricks.Ensemble` of Standardize-trained members
            (``ckpt_path`` cannot serve there: it would load a member into the Ensemble). Loaded with
            ``weights_only=True``.

    Attributes:
        statistics: the :class:`InputStatistics` (None until computed or restored).

    Raises:
        InvalidArgumentError: in ``__init__``, an unknown mode, ``eps <= 0``, ``n_components`` with another
            mode; at fit start, more components than features.
        ConfigError: a batch of a stage before any statistics exist (validate/test without fitting or a
            checkpoint saved with Standardize); a ``statistics_from`` file without Standardize statistics.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[Standardize("channel")])
    """

    def __init__(self, mode: str = "channel", eps: float = 1e-5, n_components: int | None = None,
                 input_key: Key = None, max_batches: int | None = None, statistics_from: str | None = None) -> None:
        self.mode, self.eps, self.n_components = check_preprocessing(mode, eps, n_components)
        if statistics_from is not None and (not isinstance(statistics_from, str) or not statistics_from):
            raise InvalidArgumentError(f"`statistics_from`={statistics_from!r} is invalid: expected the path of a "
                                       "checkpoint saved with Standardize.")
        self.statistics_from = statistics_from
        self.input_key = check_key("input_key", input_key)
        self.max_batches = None if max_batches is None else check_int("max_batches", max_batches, 1)
        self.statistics: InputStatistics | None = None
        self._on_device: dict[tuple[torch.device, torch.dtype], InputStatistics] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, n_components=self.n_components, input_key=self.input_key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_on_device"] = {}
        return state

    def compute(self, trainer: pl.Trainer) -> InputStatistics:
        """Stream this rank's training shard and all-reduce; every rank must call it (it is collective)."""
        accumulator = MomentAccumulator(self.mode)
        device = stream_training_set(trainer, accumulator.update, "Standardize", self.input_key, self.max_batches)
        accumulator.all_reduce(device)
        return accumulator.finalize(self.eps, self.n_components)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.statistics is None and self.statistics_from is not None:
            self.load_state_dict(self._saved_state(self.statistics_from))

    def _saved_state(self, path: str) -> dict[str, Any]:
        """This callback's state in the checkpoint ``path`` (the entry with our ``state_key``, else the only one)."""
        if not os.path.isfile(path):
            raise DataNotFoundError(f"Standardize: `statistics_from`={path!r} is not a file; pass the path of a "
                                    "checkpoint saved with Standardize.")
        states = torch.load(path, map_location="cpu", weights_only=True).get("callbacks", {})
        ours = {k: v for k, v in states.items() if isinstance(k, str) and k.startswith("Standardize")
                and isinstance(v, dict) and v.get("statistics") is not None}
        if self.state_key in ours:
            return ours[self.state_key]
        if len(ours) == 1 and next(iter(ours.values()))["statistics"]["mode"] == self.mode:
            return next(iter(ours.values()))
        found = ", ".join(ours) or "none"
        raise ConfigError(f"Standardize: the checkpoint {path!r} holds no Standardize statistics for "
                          f"mode={self.mode!r} (Standardize states found: {found}); pass a checkpoint of a run that "
                          "trained with this Standardize.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.statistics is not None:
            return
        self.statistics = self.compute(trainer)
        self._on_device.clear()
        s = self.statistics
        rank_zero_info(f"Standardize({self.mode}): statistics of {s.count} training values"
                       + (f", mean {s.mean.mean():.4g}" if s.mean is not None else "")
                       + (f", {s.components.shape[1]} components" if s.components is not None else "") + ".")

    def _stats_for(self, images: torch.Tensor) -> InputStatistics:
        if self.statistics is None:
            raise ConfigError("Standardize has no statistics yet: they are computed when fit starts; for validate/test/"
                              "predict alone, pass ckpt_path of a checkpoint saved with Standardize, or "
                              "Standardize(statistics_from=<that checkpoint>) (an Ensemble needs neither: it applies "
                              "each member's recorded statistics itself).")
        key = (images.device, images.dtype)
        if key not in self._on_device:
            self._on_device[key] = self.statistics.to(images.device, images.dtype)
        return self._on_device[key]

    def normalize_batch(self, batch: Any) -> Any:
        """Normalize the inputs of ``batch``: in place where the batch allows it; returns the batch."""
        slot, images = read_images(batch, self.input_key, "Standardize", 2)
        stats = self._stats_for(images)
        if can_replace(batch, slot):
            return replace_item(batch, slot, stats.apply(images))
        if images._is_view() or stats.output_shape(images.shape[1:]) != images.shape[1:]:
            raise BatchFormatError(
                f"Standardize cannot write its output into the {type(batch).__name__} batch's inputs in place (they "
                "are a view of another tensor, or PCA changes their shape): yield lists or dicts from the DataLoader.")
        stats.apply(images, out=images)
        return batch

    def _normalize(self, pl_module: pl.LightningModule, batch: Any) -> None:
        # an Ensemble normalizes each member's inputs with the statistics that member was trained with
        if not getattr(pl_module, "applies_member_preprocessing", False):
            self.normalize_batch(batch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._normalize(pl_module, batch)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._normalize(pl_module, batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._normalize(pl_module, batch)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._normalize(pl_module, batch)

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": None if self.statistics is None else self.statistics.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("statistics")
        self.statistics = None if state is None else InputStatistics.from_state_dict(state)
        self._on_device.clear()


__all__ = ["MODES", "InputStatistics", "MomentAccumulator", "Standardize", "fit_statistics", "stream_training_set"]
