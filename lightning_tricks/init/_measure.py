"""What LSUV and the activation statistics share: how the model runs while measured, and the batch's input."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tricks._validation import InvalidArgumentError


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as training sees its statistics, without side effects: restored on exit.

    Every module is put in ``eval()`` (dropout, drop-path and other stochastic layers off), except the
    batch-norm layers, which normalize with the batch's own statistics as in training; their running
    statistics are saved and restored, so measuring leaves no trace. Each module's train/eval flag
    is restored individually.
    """
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        model.eval()
        for m in norms:
            m.train()
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
        for m, mode in modes:
            m.training = mode


def _find_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) and not isinstance(
        batch, str) else ()
    for item in items:
        found = _find_tensor(item)
        if found is not None:
            return found
    return None


def batch_input(batch: Any, batch_key: str | int | None = None) -> torch.Tensor:
    """The model input of a batch: the batch itself, ``batch[batch_key]``, or its first tensor.

    Without ``batch_key``, a list/tuple gives its first tensor (``x`` of ``(x, y)``) and a dict its
    first tensor value, searched depth-first.

    Raises:
        InvalidArgumentError: ``batch_key`` not in the batch, or no tensor found.
    """
    if batch_key is not None:
        try:
            value = batch[batch_key]
        except (KeyError, IndexError, TypeError) as err:
            raise InvalidArgumentError(f"`batch_key`={batch_key!r} is not in the training batch ({type(batch).__name__}"
                                       f"{' with keys ' + repr(list(batch)) if isinstance(batch, Mapping) else ''}).") from err
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"`batch_key`={batch_key!r} selects a {type(value).__name__}, not a tensor.")
        return value
    found = _find_tensor(batch)
    if found is None:
        raise InvalidArgumentError(f"the training batch ({type(batch).__name__}) holds no tensor: set `batch_key` to the "
                                   "key or index of the model input.")
    return found


__all__ = ["batch_input", "measurement_mode"]
