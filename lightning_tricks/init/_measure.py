"""What LSUV and the activation statistics share: how the model runs while measured, and the batch's input."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.errors import ForwardOnBatchError


@contextmanager
def forward_on_batch_input(owner: str, model: nn.Module, inputs: torch.Tensor, fix: str) -> Iterator[None]:
    """Turn a failure of ``model(inputs)`` inside the block into a one-line :class:`ForwardOnBatchError`.

    LSUV and the activation statistics run the model's own forward on the training batch's input. A
    model whose forward takes something else (a GAN's generator ``forward(z)``) fails deep inside torch
    with a message about matrix shapes; this says what was tried and what to do (``fix``).
    """
    try:
        yield
    except ConfigError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        shape = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ForwardOnBatchError(
            f"{owner} runs {type(model).__name__}'s forward on the training batch's input (shape {shape}) and it "
            f"failed ({type(err).__name__}: {first[:200]}): the forward takes something else (a GAN's forward(z)?); "
            f"{fix}") from err


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

    Without ``batch_key``, a list/tuple gives its first tensor (``x`` of ``(x, y)``) and a dict the value
    of its first usual input key (``image``, ``x``, ``input``, ... as the batch tricks look for them), else
    its first tensor value, searched depth-first.

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
    found = None
    if isinstance(batch, Mapping):  # a dict's input is under a usual input key ("image", "x", ...) when it has one
        from lightning_tricks.core.batch import IMAGE_KEYS  # here: that package imports this one

        found = next((batch[k] for k in IMAGE_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    found = _find_tensor(batch) if found is None else found
    if found is None:
        raise InvalidArgumentError(f"the training batch ({type(batch).__name__}) holds no tensor: set `batch_key` to the "
                                   "key or index of the model input.")
    return found


__all__ = ["ForwardOnBatchError", "batch_input", "forward_on_batch_input", "measurement_mode"]
