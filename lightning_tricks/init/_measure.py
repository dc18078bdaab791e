"""What LSUV and the activation statistics share: how the model runs while measured, and what a failed forward says.

The batch's input comes from the one batch accessor, :func:`lightning_tricks.core.batch.find_inputs`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tricks.core.validation import ConfigError
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


def run_with_hooks(model: nn.Module, inputs: Any, modules: list[nn.Module], hook: Any, with_kwargs: bool = False) -> None:
    """One measured forward pass of ``model`` on ``inputs`` with ``hook`` on each of ``modules`` (each once),
    removed afterwards whatever happens."""
    handles = [m.register_forward_hook(hook, with_kwargs=with_kwargs) for m in {id(m): m for m in modules}.values()]
    try:
        with torch.no_grad(), measurement_mode(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["ForwardOnBatchError", "forward_on_batch_input", "measurement_mode", "run_with_hooks"]
