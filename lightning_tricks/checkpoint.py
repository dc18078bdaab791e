"""Checkpoints that carry the structural tricks they were trained with.

A structural trick whose converted network evaluates differently from the plain one (fractional max
pooling; stochastic depth with the paper's ``scaling="test"``; activation swaps) records itself in every
checkpoint, as plain data, under ``checkpoint["lightning_tricks"]["structural"]``::

    [{"class_path": "lightning_tricks.regularization.fractional_pooling.FractionalMaxPooling",
      "init_args": {"output_ratio": 0.7071, ..., "seed": 0}, "modules": ["model.maxpool"]}]

:func:`apply_recorded_tricks` converts a freshly built model the same way, and :func:`load_from_checkpoint`
does it for ``MyModule.load_from_checkpoint``. Tricks whose evaluation is the plain network (DropConnect,
stochastic depth with the default inverted scaling) record nothing: the plain model is already right.

Input preprocessing learned during training (``Standardize``'s statistics) is not part of the network:
the callback normalizes every batch, and keeps its statistics in its own checkpoint state
(``checkpoint["callbacks"]``). A checkpoint written without the callbacks' state (``weights_only=True``,
as ``SnapshotEnsemble`` writes its snapshots) gets them under ``checkpoint["lightning_tricks"]["inputs"]``
(:func:`input_records`, :func:`records_on_save`). :func:`recorded_input_statistics` reads either place;
the `Ensemble` applies each member's to that member's inputs.

The converted modules also hold a marker buffer (:func:`lightning_tricks.core.surgery.mark`), so a user's own
plain ``MyModule.load_from_checkpoint(path)`` fails with ``Unexpected key(s) in state_dict:
"...lightning_tricks_FractionalMaxPooling"`` instead of evaluating another network. Re-apply the tricks
*before* a strict ``load_state_dict`` (or load through :func:`load_from_checkpoint`).
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_tricks.core.callback import RECORD_KEY, StructuralCallback
from lightning_tricks.core.checkpoint_io import CheckpointError, check_fits, checkpoint_error
from lightning_tricks.core.surgery import MARKER_PREFIX, is_marker, marker_values
from lightning_tricks.errors import UnknownTrickError  # noqa: F401  (re-exported)
from lightning_tricks.regularization.fractional_pooling import FractionalMaxPooling
from lightning_tricks.regularization.stochastic_depth import StochasticDepth
from lightning_tricks.setup.activation_swap import ActivationSwap
from lightning_tricks.setup.preprocessing import InputStatistics, Standardize

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def recorded_tricks(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The structural tricks recorded in ``checkpoint`` (a loaded checkpoint dict), in the order they were applied.

    A checkpoint saved with ``weights_only=True`` (``ModelCheckpoint(save_weights_only=True)``) skips the
    callbacks' hooks, so it has no record: the tricks are then rebuilt from the marker buffers in its
    ``state_dict``, which hold what evaluation needs (pooling ratio, kernel, seed; each block's ``p_l``).

    Args:
        checkpoint: the loaded checkpoint dict.

    Returns:
        ``[{"class_path": ..., "init_args": {...}, "modules": [...]}, ...]`` (``[]`` when none).

    Examples:
        >>> recorded_tricks({"state_dict": {}})
        []
    """
    records = checkpoint.get(RECORD_KEY, {})
    recorded = list(records.get("structural", [])) if isinstance(records, Mapping) else []
    return recorded or _records_from_markers(checkpoint.get("state_dict") or {})


def _pooling_records(markers: list[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    pools: dict[tuple, list[str]] = {}
    for module, value in markers:
        ratio, kernel, seed, _ = marker_values(value, "fiui")
        pools.setdefault((ratio, kernel, seed), []).append(module)
    return [{"class_path": f"{FractionalMaxPooling.__module__}.FractionalMaxPooling",
             "init_args": {"output_ratio": ratio, "kernel_size": kernel, "seed": seed}, "modules": modules}
            for (ratio, kernel, seed), modules in pools.items()]


def _depth_records(markers: list[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    blocks = [(module, float(marker_values(value, "f")[0])) for module, value in markers]
    probabilities = [p for _, p in blocks]
    rule = "uniform" if len(set(probabilities)) == 1 else "linear"
    return [{"class_path": f"{StochasticDepth.__module__}.StochasticDepth",
             "init_args": {"p": probabilities[-1], "rule": rule, "scaling": "test"},
             "modules": [name for name, _ in blocks], "drop_probabilities": probabilities}]


MarkerDecoder = Callable[[list[tuple[str, torch.Tensor]]], list[dict[str, Any]]]

MARKER_DECODERS: dict[str, MarkerDecoder] = {
    "FractionalMaxPooling": _pooling_records,
    "StochasticDepth": _depth_records,
    "ActivationSwap": ActivationSwap.records_from_markers,
}
"""The tricks that mark the modules they convert (``lightning_tricks_<Trick>``, :func:`~lightning_tricks.core.surgery.mark`):
each maps its ``(module name, marker)`` pairs to the records its callback would have written."""


def _records_from_markers(state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    markers: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if not is_marker(key):
            continue
        module, _, name = key.rpartition(".")
        trick = name[len(MARKER_PREFIX):]
        if trick not in MARKER_DECODERS:
            raise UnknownTrickError(f"the checkpoint's state_dict has the marker {key!r} of an unknown trick.")
        markers.setdefault(trick, []).append((module, value))
    return [record for trick, found in markers.items() for record in MARKER_DECODERS[trick](found)]


MOVED_TRICKS = {"lightning_tricks.setup.activations.ActivationSwap": "lightning_tricks.setup.activation_swap.ActivationSwap"}
"""Class paths that checkpoints saved before a move record, and where the class is now."""


def _trick_class(class_path: Any) -> type[StructuralCallback]:
    class_path = MOVED_TRICKS.get(class_path, class_path) if isinstance(class_path, str) else class_path
    # Only our own structural tricks are imported: a checkpoint must not name arbitrary code to run.
    if not isinstance(class_path, str) or not class_path.startswith("lightning_tricks."):
        raise UnknownTrickError(f"the checkpoint records the trick {class_path!r}, which is not a lightning_tricks "
                                "structural trick: refusing to import it.")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise UnknownTrickError(f"the checkpoint records the trick {class_path!r}, which this version of "
                                f"lightning_tricks does not have ({err}).") from None
    if not (isinstance(cls, type) and issubclass(cls, StructuralCallback)):
        raise UnknownTrickError(f"the checkpoint records {class_path!r}, which is not a structural trick.")
    return cls


def apply_recorded_tricks(model: nn.Module, checkpoint: Mapping[str, Any]) -> list[str]:
    """Re-apply to ``model`` the structural tricks recorded in ``checkpoint``; return their class names.

    ``model`` is the module the checkpoint was saved from, rebuilt (its ``state_dict`` names match the
    checkpoint's). The surgery keeps parameter names and adds only the tricks' marker buffers, so call it
    before ``model.load_state_dict(checkpoint["state_dict"])`` (strict), or after a non-strict load.
    Applying twice changes nothing the second time.

    Args:
        model: the rebuilt model (a LightningModule or any ``nn.Module``).
        checkpoint: the loaded checkpoint dict (``torch.load(path, weights_only=True)`` reads our records).

    Returns:
        The names of the re-applied tricks, e.g. ``["FractionalMaxPooling"]`` (``[]`` when none is recorded).

    Raises:
        UnknownTrickError: the checkpoint names a class that is not one of our structural tricks.

    Examples:
        >>> from lightning_tricks.zoo import ImageClassifier
        >>> apply_recorded_tricks(ImageClassifier(), {"state_dict": {}})
        []
    """
    return _apply(model, recorded_tricks(checkpoint))


def _apply(model: nn.Module, records: list[dict[str, Any]]) -> list[str]:
    applied = []
    for record in records:
        cls = _trick_class(record.get("class_path"))
        cls.reapply(model, record)
        applied.append(cls.__name__)
    return applied


def apply_tricks_recorded_in(model: nn.Module, checkpoint_path: str | Path | None) -> list[str]:
    """:func:`apply_recorded_tricks` for a checkpoint file, read with ``weights_only=True``.

    Used by the CLI's ``validate/test/predict --ckpt_path`` before Lightning restores the weights. A path
    that is not a file (``None``, ``"best"``) or a file that needs more than ``weights_only`` applies
    nothing: Lightning's own load then reports it (and a marker of an unapplied trick fails it loudly).

    Args:
        model: the model the weights will be loaded into.
        checkpoint_path: the ``.ckpt`` file.

    Returns:
        The names of the re-applied tricks.

    Examples:
        >>> from lightning_tricks.zoo import ImageClassifier
        >>> apply_tricks_recorded_in(ImageClassifier(), "best")
        []
    """
    if checkpoint_path is None or not Path(checkpoint_path).is_file():
        return []
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to report: Lightning's load of the same file says what is wrong
        return []
    return apply_recorded_tricks(model, checkpoint)


_LIGHTNING_PATHS = ("best", "last", "hpc", "registry")


def read_checkpoint_file(checkpoint_path: str | Path | None, what: str = "--ckpt_path") -> Mapping[str, Any] | None:
    """The checkpoint at ``checkpoint_path`` (memory-mapped, ``weights_only``), or one :class:`CheckpointError` line
    for a file that is empty, truncated, corrupt or not a Lightning checkpoint.

    ``None`` for what is left to Lightning: its names (``"best"``, ``"last"``, URLs), a missing file (the CLI names
    the checkpoints beside it), a file that needs more than ``weights_only`` loading.
    """
    path = str(checkpoint_path) if checkpoint_path is not None else None
    if path is None or path in _LIGHTNING_PATHS or path.startswith("registry:") or "://" in path or not Path(
            path).expanduser().exists():
        return None
    try:
        content = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        translated = checkpoint_error(path, err, what)
        if translated is None or (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
                                  and "is not a PyTorch checkpoint" not in str(translated)):
            return None  # Lightning decides how to load a file of Python objects
        raise translated from None
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        raise CheckpointError(f"{what} {path!r} is not a Lightning checkpoint (it has no 'state_dict'): pass a .ckpt "
                              "file saved by a Trainer.")
    return content


def check_checkpoint_path(model: nn.Module, checkpoint_path: str | Path | None, what: str = "--ckpt_path") -> None:
    """Before a ``fit``/``validate``/``test``/``predict`` from ``checkpoint_path``: one line, nothing run or written,
    for a file that is empty, truncated, corrupt, not a Lightning checkpoint, or clearly of another model.

    See :func:`read_checkpoint_file` for what is left to Lightning. Checkpoints that record structural tricks
    (which may change the model's tensors) are only read, not compared.

    Raises:
        CheckpointError: what is wrong with the file, in one line.
    """
    content = read_checkpoint_file(checkpoint_path, what)
    if content is None:
        return
    try:
        if recorded_tricks(content):
            return
    except UnknownTrickError:
        return  # Lightning's load reports the unknown marker
    check_fits(str(checkpoint_path), model, content["state_dict"], what, ignore=is_marker)


@contextlib.contextmanager
def tricks_applied_on_load(cls: type[pl.LightningModule], apply: Callable[[nn.Module, dict[str, Any]], Any] | None = None
                           ) -> Iterator[list[nn.Module]]:
    """Apply the recorded tricks inside ``cls.load_from_checkpoint`` calls made in this context.

    Lightning's ``load_from_checkpoint`` builds the module, calls its ``on_load_checkpoint`` hook with the
    (migrated) checkpoint, then loads the weights strictly: the hook is where the tricks must be applied, as
    converted modules hold entries the plain module lacks (marker buffers, PReLU slopes). ``cls.on_load_checkpoint``
    is wrapped for the duration; yields the list of the modules the wrapper served (a subclass whose own hook
    does not call ``super()`` is not served).

    Args:
        cls: the LightningModule class whose ``load_from_checkpoint`` is called.
        apply: what applies the tricks to ``(module, checkpoint)`` (default :func:`apply_recorded_tricks`; the
            Ensemble passes its one entry point for members).

    Examples:
        >>> with tricks_applied_on_load(MyModule) as served:  # doctest: +SKIP
        ...     model = MyModule.load_from_checkpoint("best.ckpt")
    """
    served: list[nn.Module] = []
    own = cls.__dict__.get("on_load_checkpoint")
    hook = cls.on_load_checkpoint

    def on_load_checkpoint(self: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        hook(self, checkpoint)
        (apply or apply_recorded_tricks)(self, checkpoint)
        served.append(self)

    cls.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    try:
        yield served
    finally:
        if own is None:
            del cls.on_load_checkpoint
        else:
            cls.on_load_checkpoint = own  # type: ignore[method-assign]


def load_from_checkpoint(cls: type[ModuleT], checkpoint_path: str | Path, *, weights_only: bool = True,
                         map_location: Any = None, strict: bool | None = None, **kwargs: Any) -> ModuleT:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` with the checkpoint's structural tricks re-applied.

    The model evaluates as the trained model did with its callbacks (same pooling, same test-time
    scaling, same activations). Without recorded tricks this is exactly Lightning's ``load_from_checkpoint``.

    Args:
        cls: the LightningModule class the checkpoint was saved from.
        checkpoint_path: path of the ``.ckpt`` file.
        weights_only: load with ``torch.load(weights_only=True)`` (default: safe for checkpoints from elsewhere).
        map_location: as Lightning's ``load_from_checkpoint``.
        strict: as Lightning's ``load_from_checkpoint`` (``None``: the module's ``strict_loading``).
        **kwargs: passed on to ``cls.load_from_checkpoint`` (constructor arguments that override the saved ones).

    Returns:
        The model, with the tricks re-applied and the weights loaded.

    Examples:
        >>> import lightning_tricks
        >>> model = lightning_tricks.load_from_checkpoint(MyModule, "best.ckpt")  # doctest: +SKIP
    """
    try:
        with tricks_applied_on_load(cls) as served:
            model = cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict,
                                             weights_only=weights_only, **kwargs)
    except Exception as err:  # a missing, empty, truncated or corrupt file, or another model's: one line
        translated = checkpoint_error(checkpoint_path, err)
        if translated is None:
            raise
        raise translated from None
    if not any(m is model for m in served):
        # Built as a subclass (LightningCLI's instantiator) whose own hook skips ours: with recorded tricks only a
        # non-strict load gets here (markers are unexpected keys), so convert now and load the rest of the weights.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only)
        if apply_recorded_tricks(model, checkpoint):
            model.load_state_dict(checkpoint["state_dict"], strict=False)
    return model


# -- input preprocessing (Standardize) ------------------------------------------------------------------------

INPUTS = "inputs"
"""``checkpoint[RECORD_KEY][INPUTS]``: the input preprocessing a weights-only checkpoint's model was trained with."""


def input_records(callbacks: Any) -> list[dict[str, Any]]:
    """The records of the ``Standardize`` callbacks among ``callbacks`` that hold statistics, in their order::

        [{"class_path": "lightning_tricks.setup.preprocessing.Standardize",
          "init_args": {"mode": "channel", ...}, "statistics": {"mode": ..., "mean": tensor, ...}}]
    """
    return [{"class_path": f"{Standardize.__module__}.Standardize",
             "init_args": {"mode": cb.mode, "eps": cb.eps, "n_components": cb.n_components, "input_key": cb.input_key},
             "statistics": cb.statistics.state_dict()}
            for cb in callbacks if isinstance(cb, Standardize) and cb.statistics is not None]


def recorded_input_statistics(checkpoint: Mapping[str, Any]) -> list[InputStatistics]:
    """The input statistics a model was trained with, in the order they were applied (``[]``: none recorded).

    Read from our records (``checkpoint["lightning_tricks"]["inputs"]``, written into weights-only checkpoints),
    else from the state of the ``Standardize`` callbacks in ``checkpoint["callbacks"]`` (every full checkpoint).

    Examples:
        >>> recorded_input_statistics({"state_dict": {}})
        []
    """
    records = checkpoint.get(RECORD_KEY, {})
    recorded = list(records.get(INPUTS, [])) if isinstance(records, Mapping) else []
    states = [r.get("statistics") for r in recorded if isinstance(r, Mapping)]
    if not recorded:
        callbacks = checkpoint.get("callbacks")
        states = [state.get("statistics") for key, state in (callbacks.items() if isinstance(callbacks, Mapping) else ())
                  if str(key).startswith("Standardize") and isinstance(state, Mapping)]
    return [InputStatistics.from_state_dict(state) for state in states if isinstance(state, Mapping)]


@contextlib.contextmanager
def records_on_save(pl_module: nn.Module, records: Mapping[str, Any]) -> Iterator[None]:
    """Checkpoints saved in this context (``trainer.save_checkpoint``, weights-only too) get ``records`` under
    ``checkpoint["lightning_tricks"]``: the module's ``on_save_checkpoint`` hook, which Lightning calls for
    every checkpoint, is wrapped on the instance for the duration."""
    hook = pl_module.on_save_checkpoint  # type: ignore[union-attr]
    had_own = "on_save_checkpoint" in vars(pl_module)

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        hook(checkpoint)
        if records:
            checkpoint.setdefault(RECORD_KEY, {}).update(records)

    object.__setattr__(pl_module, "on_save_checkpoint", on_save_checkpoint)
    try:
        yield
    finally:
        if had_own:
            object.__setattr__(pl_module, "on_save_checkpoint", hook)
        else:
            object.__delattr__(pl_module, "on_save_checkpoint")


__all__ = ["INPUTS", "MARKER_DECODERS", "CheckpointError", "UnknownTrickError", "apply_recorded_tricks",
           "apply_tricks_recorded_in", "check_checkpoint_path", "input_records", "load_from_checkpoint",
           "read_checkpoint_file", "recorded_input_statistics", "recorded_tricks", "records_on_save",
           "tricks_applied_on_load"]
