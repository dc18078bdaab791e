"""Shared batch access for callbacks that transform training batches (Cutout, Mixup).

A callback sees the training batch in ``on_train_batch_start`` and can only change it in place: a list
or a dict item can be replaced, a tensor can be written in place, but a tuple cannot be given new
targets. ``LightningModule.on_after_batch_transfer`` (or ``LightningDataModule``'s) may return a new
batch: :class:`BatchTransformMixin` runs the batch-transform callbacks there, for any batch type.

Where the images and targets are:

* a tensor batch is the images;
* a list or tuple (what a default ``DataLoader`` yields): the images are the first tensor, the targets
  the element right after it; ``input_key``/``target_key`` may name other positions (or a field of a
  namedtuple);
* a dict: the first of the usual names (``image``, ``images``, ``input``, ``x``, ... and ``label``,
  ``labels``, ``target``, ``y``, ...) unless ``input_key``/``target_key`` name the keys.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_tricks.core.lightning_classes import lightning_module_types
from lightning_tricks.core.seeding import RandomStream
from lightning_tricks.core.validation import InvalidArgumentError, check_int
from lightning_tricks.errors import BatchFormatError  # noqa: F401  (re-exported)

IMAGE_KEYS = ("image", "images", "img", "imgs", "input", "inputs", "x", "pixel_values")
"""Dict keys tried, in order, for the images when ``input_key`` is not given."""
TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class", "classes", "mask", "masks")
"""Dict keys tried, in order, for the targets when ``target_key`` is not given."""

Key = str | int | None
Slot = str | int | None  # a position, a dict key, or None for "the batch itself"


def check_key(name: str, value: Key) -> Key:
    """Validate an ``input_key``/``target_key`` argument: None, a dict key (str) or a position (int >= 0)."""
    if value is None or isinstance(value, str):
        return value
    return check_int(name, value, 0)


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, (list, tuple)):
        kinds = [f"tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch]
        return f"a {type(batch).__name__} of [{', '.join(kinds)}]"
    return f"a {type(batch).__name__}"


def _field_index(batch: tuple, key: str, owner: str, role: str, arg: str) -> int:
    fields = getattr(type(batch), "_fields", None)
    if fields is None or key not in fields:
        raise BatchFormatError(f"{owner}: `{arg}`={key!r} names a field, but the batch is {_describe(batch)}; "
                               f"give the position of the {role} as an integer.")
    return fields.index(key)


def find_slot(batch: Any, key: Key, role: str, owner: str, after: Slot = None) -> Slot:
    """Where the ``role`` ("images" or "targets") is in ``batch``; raise a helpful error when it is not found.

    Args:
        batch: the training batch.
        key: the user's ``input_key``/``target_key`` (None: the defaults described in the module docstring).
        role: ``"images"`` or ``"targets"``.
        owner: the callback's name, for messages.
        after: for targets in a sequence without a key, the images' position (targets follow it).
    """
    arg = "input_key" if role == "images" else "target_key"
    if batch is None:
        raise BatchFormatError(f"{owner} got no batch in on_train_batch_start (a training_step that takes a "
                               "`dataloader_iter` hides it); give training_step a batch argument.")
    if isinstance(batch, torch.Tensor):
        if role == "images" and key is None:
            return None
        raise BatchFormatError(f"{owner} needs {role}, but the batch is {_describe(batch)} "
                               "(a bare tensor holds only images); yield (images, targets) from your DataLoader.")
    if isinstance(batch, Mapping):
        if key is not None:
            if key not in batch:
                raise BatchFormatError(f"{owner}: `{arg}`={key!r} is not in the batch, which is {_describe(batch)}.")
            return key
        names = IMAGE_KEYS if role == "images" else TARGET_KEYS
        for name in names:
            if name in batch:
                return name
        raise BatchFormatError(f"{owner} looked for the {role} under {', '.join(map(repr, names))} in {_describe(batch)}; "
                               f"set `{arg}` to the key that holds them.")
    if isinstance(batch, (list, tuple)):
        if isinstance(key, str):
            index = _field_index(batch, key, owner, role, arg) if isinstance(batch, tuple) else None
            if index is None:
                raise BatchFormatError(f"{owner}: `{arg}`={key!r} is a name, but the batch is {_describe(batch)}; "
                                       "give a position (integer).")
            return index
        if key is not None:
            if key >= len(batch):
                raise BatchFormatError(f"{owner}: `{arg}`={key} is out of range for {_describe(batch)}.")
            return key
        if role == "images":  # the first element, or past non-tensors (a name, a list) the first float tensor:
            for i, item in enumerate(batch):  # never integer labels after a nested input such as ([x], y)
                if isinstance(item, torch.Tensor) and (i == 0 or item.is_floating_point()):
                    return i
            raise BatchFormatError(f"{owner} found no input in {_describe(batch)} (a tensor first, or a float tensor "
                                   "after other items); set `input_key` to its position.")
        index = 1 if after is None else int(after) + 1
        if index < len(batch) and isinstance(batch[index], torch.Tensor):
            return index
        raise BatchFormatError(f"{owner} expected the targets right after the images in {_describe(batch)}; "
                               "set `target_key` to their position.")
    raise BatchFormatError(f"{owner} cannot read {role} from {_describe(batch)}: expected a tensor, a list, a tuple "
                           "or a dict.")


def find_targets(batch: Any, target_key: Key = None) -> Any:
    """The batch's targets where it has them (:func:`find_slot`'s rules), else None: for tricks that only read them."""
    try:
        images = find_slot(batch, None, "images", "lightning-tricks")
        return get_item(batch, find_slot(batch, target_key, "targets", "lightning-tricks", after=images))
    except BatchFormatError:
        return None


def find_inputs(batch: Any, input_key: Key = None, owner: str = "lightning-tricks") -> torch.Tensor:
    """The batch's model input as a tensor, for tricks that run the model on it (WeightInit, LSUV, TTA, ...).

    :func:`find_slot`'s images (``input_key``; without it a tensor batch, a sequence's first tensor, a dict's
    first usual image key); a dict with none of :data:`IMAGE_KEYS` gives its first floating-point tensor (the
    glossary's ``input_key`` rule).

    Raises:
        BatchFormatError: ``input_key`` not in the batch, or no tensor where the input should be.

    Examples:
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> find_inputs({"label": y, "image": x}) is x, find_inputs((x, y)) is x, find_inputs({"y": y, "feat": x}) is x
        (True, True, True)
        >>> find_inputs(([x], y))
        Traceback (most recent call last):
        ...
        lightning_tricks.errors.BatchFormatError: lightning-tricks found no input in a tuple of [list, tensor(2,)] (a tensor first, or a float tensor after other items); set `input_key` to its position.
    """
    if input_key is None and isinstance(batch, Mapping) and not any(k in batch for k in IMAGE_KEYS):
        found = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        if found is not None:
            return found
    slot = find_slot(batch, input_key, "images", owner)
    value = get_item(batch, slot)
    if not isinstance(value, torch.Tensor):
        raise BatchFormatError(f"{owner}: the model input ({'the batch' if slot is None else repr(slot)}) of "
                               f"{_describe(batch)} is a {type(value).__name__}, not a tensor; set `input_key`.")
    return value


def get_item(batch: Any, slot: Slot) -> Any:
    return batch if slot is None else batch[slot]


def can_replace(batch: Any, slot: Slot) -> bool:
    """Whether the item at ``slot`` can be replaced without building a new batch object."""
    return slot is not None and isinstance(batch, (MutableSequence, MutableMapping))


def replace_item(batch: Any, slot: Slot, value: Any) -> Any:
    """``batch`` with ``value`` at ``slot``: mutated in place for lists and dicts, rebuilt for tuples."""
    if slot is None:
        return value
    if can_replace(batch, slot):
        batch[slot] = value
        return batch
    items = list(batch)
    items[slot] = value  # type: ignore[index]
    if hasattr(type(batch), "_fields"):  # namedtuple
        return type(batch)(*items)
    return type(batch)(items)


def check_float_images(images: Any, owner: str, min_ndim: int) -> torch.Tensor:
    """Images must be a floating-point tensor with at least ``min_ndim`` dimensions (batch first)."""
    if not isinstance(images, torch.Tensor):
        raise BatchFormatError(f"{owner} expected the images to be a tensor, got {type(images).__name__}; "
                               "set `input_key`.")
    if not images.is_floating_point():
        raise InvalidArgumentError(
            f"{owner}: images of dtype {images.dtype} are invalid: expected floating-point images (float32, float16, "
            "bfloat16, float64); convert them in your Dataset (e.g. torchvision.transforms.v2.ToDtype(torch.float32, "
            "scale=True))."
        )
    if images.ndim < min_ndim:
        shape = "(N, C, H, W) or (N, H, W)" if min_ndim >= 3 else "(N, ...)"
        raise InvalidArgumentError(f"{owner}: images of shape {tuple(images.shape)} are invalid: expected {shape}.")
    return images


def read_images(batch: Any, key: Key, owner: str, min_ndim: int) -> tuple[Slot, torch.Tensor]:
    """Where the batch's float images are (found by ``key``, see :func:`find_slot`) and the images themselves."""
    slot = find_slot(batch, key, "images", owner)
    return slot, check_float_images(get_item(batch, slot), owner, min_ndim)


class BatchTransformCallback(Callback):
    """Base of the callbacks that transform training batches; owns their random stream and checkpoint state.

    Randomness (the package's one seed rule, :class:`~lightning_tricks.core.seeding.RandomStream`): for the
    ``k``-th training batch this callback transforms (counted over the whole fit, every micro-batch of
    gradient accumulation included), the generator on the batch's device is seeded with
    ``derive_seed(seed, global_rank, k)``. Ranks draw differently; a resumed run, which restores ``k``
    and ``seed`` from the checkpoint, draws exactly as the uninterrupted one did. ``seed=None`` takes
    the run's seed (the one given to ``seed_everything``, else ``torch.initial_seed()``; rank 0's under DDP).
    """

    p: float = 1.0
    """Probability that a batch (or sample) is transformed; subclasses with a ``p`` argument set it."""

    def __init__(self, input_key: Key = None, seed: int | None = None) -> None:
        self.input_key = check_key("input_key", input_key)
        self.randomness = RandomStream(seed)
        self.seed = seed
        self._transformed_batch: Any = None  # the batch BatchTransformMixin already transformed

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def active(self) -> bool:
        """False when the callback is configured off (it then leaves every batch untouched): ``p`` = 0."""
        return self.p > 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.randomness.setup(trainer)

    def _next_generator(self, trainer: pl.Trainer, device: torch.device) -> torch.Generator:
        """The device's generator, seeded for the next batch (and the batch counter advanced)."""
        self.randomness.rank = trainer.global_rank  # also when called outside a fit (transform_batch directly)
        return self.randomness.next_generator(device)

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, in_place: bool) -> Any:
        """Transform ``batch``; with ``in_place`` the same batch object must carry the result."""
        raise NotImplementedError

    def _write_images(self, batch: Any, slot: Slot, images: torch.Tensor, out: torch.Tensor, in_place: bool,
                      what: str) -> Any:
        """Put ``out`` where ``images`` were: a new batch item where the batch allows it, else (a callback's
        in-place pass over a tuple) over ``images`` themselves, which must not be a view of a dataset's storage."""
        if in_place and not can_replace(batch, slot):
            if images._is_view():
                raise self._needs_mixin(batch, what)
            images.copy_(out)
            return batch
        return replace_item(batch, slot, out)

    def transform_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Return the transformed batch (a new object where needed); what :class:`BatchTransformMixin` calls."""
        if not self.active:
            return batch
        return self._transform(trainer, pl_module, batch, in_place=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._transformed_batch is not None:
            done, self._transformed_batch = self._transformed_batch, None
            if done is batch:
                return
        if self.active:
            self._transform(trainer, pl_module, batch, in_place=True)

    def _needs_mixin(self, batch: Any, what: str) -> BatchFormatError:
        return BatchFormatError(
            f"{self.name} must {what}, but the batch is {_describe(batch)}, which a callback cannot change in "
            "place. Add lightning_tricks.BatchTransformMixin as the first base class of your LightningModule "
            "(class MyModule(BatchTransformMixin, LightningModule)), or of your LightningDataModule if it "
            "overrides on_after_batch_transfer; if your class overrides on_after_batch_transfer, call super() "
            "there. Or yield lists or dicts from your DataLoader."
        )

    def state_dict(self) -> dict[str, Any]:
        return self.randomness.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.randomness.load_state_dict(state_dict)


class BatchTransformMixin:
    """Lets Cutout and Mixup return a new training batch, so they serve tuple batches too.

    A callback can only change a batch in place; a tuple's targets cannot be replaced that way. Put this
    mixin first among the bases of your ``LightningModule`` (or of your ``LightningDataModule`` when that
    is the class that overrides ``on_after_batch_transfer``): its ``on_after_batch_transfer`` calls
    ``super()`` and then every batch-transform callback of the trainer, in the order of
    ``trainer.callbacks``, on training batches only. The callbacks then skip their own in-place pass.
    Nothing else of your class changes.

    Examples:
        >>> import lightning.pytorch as pl
        >>> class MyModule(BatchTransformMixin, pl.LightningModule):
        ...     pass  # your training_step etc. unchanged; tuple batches now work with Mixup
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        if isinstance(self, lightning_module_types()):
            trainer, pl_module = self._trainer, self
        else:
            trainer = getattr(self, "trainer", None)
            pl_module = trainer.lightning_module if trainer is not None else None
        if trainer is None or not trainer.training:
            return batch
        transforms = [cb for cb in trainer.callbacks if isinstance(cb, BatchTransformCallback)]
        for callback in transforms:
            batch = callback.transform_batch(trainer, pl_module, batch)
        for callback in transforms:
            callback._transformed_batch = batch
        return batch
