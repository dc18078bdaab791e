"""What a LightningModule's steps compute, whatever they call: the model at the right depth, the number of classes.

Public projects write their steps in three ways: ``self(x)``, ``self.forward(x)`` (which bypasses the
module's own hooks) and ``self.model(x)`` (a submodule; Lightning's ImageNet example). A callback that
must act on "the model" cannot assume one of them. Two shared helpers serve every callback:

* :class:`InputModuleProbe` watches one step with forward pre-hooks and forward hooks on every module
  and finds the outermost module called with the batch's input tensor -- the LightningModule for
  ``self(x)``, ``model`` for ``self.model(x)`` and for a ``forward`` that calls ``self.model(x)`` -- and
  its output (the logits). It may also replace that module's output during the probed step.
* :func:`infer_num_classes`: the datamodule's ``num_classes``, else the width of the logits, else the
  ``out_features`` of the model's last ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from lightning_tricks.core.batch import find_inputs
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.errors import BatchFormatError


def batch_input(batch: Any) -> Tensor | None:
    """The batch's input tensor (:func:`lightning_tricks.core.batch.find_inputs`), or None when it has none."""
    try:
        return find_inputs(batch, None, "InputModuleProbe")
    except BatchFormatError:
        return None


def _same_tensor(value: Any, x: Tensor) -> bool:
    """``value`` is ``x`` or a tensor with its storage, shape and dtype (``x.contiguous()``, ``x.to(x.dtype)``)."""
    if value is x:
        return True
    return (isinstance(value, Tensor) and value.shape == x.shape and value.dtype == x.dtype
            and value.device == x.device and value.data_ptr() == x.data_ptr())


@dataclass
class FoundModule:
    """The outermost module a probed step called with the batch's input.

    Attributes:
        name: its dotted name in the probed root (``""`` for the root itself).
        module: the module.
        output: what its first call returned (before any replacement).
    """

    name: str
    module: nn.Module
    output: Any


class InputModuleProbe:
    """Find the outermost module that one step calls with the batch's input tensor.

    Hooks on every module of ``root`` (``root`` included) watch the calls made while the probe is
    open. A call whose first positional argument is the batch's input tensor, made while no other
    such call is running, is a top call; the first top call whose output ``accept`` takes gives
    :attr:`found`. Nested calls (the children of ``model`` that see the same tensor) do not count, so
    the module found is the outermost one, whatever the step called: ``self(x)``, ``self.forward(x)``
    (then ``forward``'s ``self.model(x)`` is the top call) or ``self.model(x)``.

    Args:
        root: the LightningModule (or any module) whose modules to watch.
        batch: the batch the step receives; its input tensor (see :func:`batch_input`) is looked up at
            the first call, so a callback that replaces the images before the step is followed.
        accept: takes a top call's output; False skips the call (e.g. a preprocessing module whose
            output is not logits). None accepts any output.
        replace: ``replace(module, args, kwargs, output)`` for every call of the found module during
            the probe; a non-None result replaces the output (what a forward hook may do).

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> holder = nn.ModuleDict({"model": model})
        >>> x = torch.randn(2, 4)
        >>> with InputModuleProbe(holder, [x, torch.zeros(2)]) as probe:
        ...     _ = holder.model(x)
        >>> probe.found.name, tuple(probe.found.output.shape)
        ('model', (2, 3))
    """

    def __init__(self, root: nn.Module, batch: Any, accept: Callable[[Any], bool] | None = None,
                 replace: Callable[[nn.Module, tuple, dict, Any], Any] | None = None) -> None:
        self.root, self.batch, self.accept, self.replace = root, batch, accept, replace
        self.found: FoundModule | None = None
        self._names = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
        self._input: Tensor | None = None
        self._running: nn.Module | None = None  # the top call in progress
        self._paused = 0
        self._handles: list[Any] = []

    def __enter__(self) -> InputModuleProbe:
        for module in self.root.modules():
            self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Calls made inside the block are not watched (e.g. the extra forwards of test-time augmentation)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _is_input(self, args: tuple) -> bool:
        if self._input is None:
            self._input = batch_input(self.batch)
        return self._input is not None and bool(args) and _same_tensor(args[0], self._input)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused or self._running is not None or self.found is not None:
            return
        if self._is_input(args):
            self._running = module

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._paused:
            return None
        if self._running is module:
            self._running = None
            if self.accept is None or self.accept(output):
                self.found = FoundModule(self._names.get(id(module), ""), module, output)
        if self.found is None or module is not self.found.module or self.replace is None:
            return None
        with self.paused():
            return self.replace(module, args, kwargs, output)


def _last_linear_out_features(module: nn.Module) -> int | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def infer_num_classes(trainer: pl.Trainer | None, module: nn.Module, owner: str = "lightning-tricks", *,
                      logits: Tensor | None = None, required: bool = True) -> int | None:
    """The number of classes: the datamodule's ``num_classes``, else the logits' width, else the last ``nn.Linear``.

    The one rule every callback that needs the number of classes follows (Mixup with soft targets,
    InitialLossCheck, test-time augmentation).

    Args:
        trainer: its ``datamodule``'s integer ``num_classes`` attribute is used first (None: no trainer).
        module: the model; the ``out_features`` of its last ``nn.Linear`` is the fallback.
        owner: the callback's name, for messages.
        logits: ``(N, C)`` outputs of the model, when known (e.g. found by :class:`InputModuleProbe`);
            their width ``C`` comes before the last ``nn.Linear``.
        required: raise when nothing is found or the sources disagree; False returns None when nothing
            is found and prefers the datamodule when they disagree.

    Raises:
        InvalidArgumentError: (``required``) no source found, or the datamodule disagrees with the model.

    Examples:
        >>> infer_num_classes(None, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10)))
        10
    """
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    from_data = getattr(datamodule, "num_classes", None)
    from_data = from_data if isinstance(from_data, int) and not isinstance(from_data, bool) else None
    if isinstance(logits, Tensor) and logits.ndim >= 2:
        from_model = int(logits.shape[-1])
        source = f"its logits have {from_model} classes"
    else:
        from_model = _last_linear_out_features(module)
        source = f"the model's last nn.Linear has out_features={from_model}"
    if from_data is not None:
        if required and from_model is not None and from_model != from_data:
            raise InvalidArgumentError(f"{owner}: the datamodule says num_classes={from_data} but {source}; set "
                                       "`num_classes` explicitly.")
        return from_data
    if from_model is None and required:
        raise InvalidArgumentError(
            f"{owner} needs the number of classes: it looked for a `num_classes` attribute on the datamodule, for "
            "the logits of the model the step calls and for an nn.Linear in the model (its last one gives the "
            "classes), and found neither; set `num_classes`."
        )
    return from_model


__all__ = ["FoundModule", "InputModuleProbe", "batch_input", "infer_num_classes"]
