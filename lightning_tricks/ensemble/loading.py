"""Member loading: a LightningModule built from a checkpoint, safely (``torch.load(weights_only=True)`` by default).

The class comes from the caller or from the ``_class_path`` that LightningCLI records in the checkpoint's
hyper-parameters; members of one ensemble may have different classes and architectures.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tricks._validation import ConfigError, DataNotFoundError, InvalidArgumentError, check_choice

# Lightning's allowlist of instantiators a checkpoint may name (lightning.pytorch.core.saving._ALLOWED_INSTANTIATORS).
_TRUSTED_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")

ClassSpec = str | type[pl.LightningModule]


class CheckpointError(ConfigError):
    """A checkpoint that cannot serve as an ensemble member: not a Lightning checkpoint, unknown class, bad weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses because it holds arbitrary Python objects."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str, label: str) -> type:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InvalidArgumentError(f"`{label}`={path!r} is invalid: expected an importable "
                                   f"'package.module.ClassName' ({err}).") from err


def _class_named_by_checkpoint(path: Any, trust: bool, label: str) -> type:
    if not isinstance(path, str) or "." not in path:
        raise CheckpointError(f"{label} names its class as {path!r}: expected 'package.module.ClassName'.")
    module_name, _, name = path.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        if not trust:
            raise CheckpointError(
                f"{label} names its class {path!r}, whose module is not imported; importing a module named by a file "
                f"runs that module's code. Pass member_class={path!r} if you vouch for it, import the module first, "
                "or opt in with trust_checkpoints=True.")
        module = importlib.import_module(module_name)
    target = getattr(module, name, None)
    if not isinstance(target, type):
        raise CheckpointError(f"{label} names its class {path!r}, which {module_name!r} does not define.")
    return target


def _torch_load(path: Path, trust: bool, label: str) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust:
            raise CheckpointError(f"{label} could not be unpickled: {err}") from err
        found = re.search(r"GLOBAL (\S+) was not", str(err))
        what = f"`{found.group(1)}`" if found else "a Python object that is not a tensor or plain value"
        raise UnsafeCheckpointError(
            f"{label} was refused: it holds {what}, and loading anything beyond tensors and plain values means "
            "unpickling, which can run arbitrary code on this machine. If you trust where the file comes from, "
            "opt in with trust_checkpoints=True (YAML: `trust_checkpoints: true`); otherwise re-save it with "
            "tensors and plain values only.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{label} is not a readable torch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{label} has no 'state_dict': expected a Lightning checkpoint "
                              "(from ModelCheckpoint or trainer.save_checkpoint).")
    return checkpoint


def _init_kwargs(cls: type, hparams: dict[str, Any], hparams_name: Any) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    named = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if isinstance(hparams_name, str) and hparams_name in named:  # old style: __init__(self, hparams)
        return {hparams_name: hparams}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return hparams
    return {k: v for k, v in hparams.items() if k in named}


def load_member(path: str | os.PathLike, member_class: ClassSpec | None = None, trust_checkpoints: bool = False,
                weights: str = "ema", label: str | None = None) -> pl.LightningModule:
    """Build a LightningModule from a checkpoint, safely: ``torch.load(weights_only=True)`` by default.

    The class is ``member_class`` when given, else the ``_class_path`` that LightningCLI records in the
    checkpoint's hyper-parameters (``load_from_checkpoint_support``, on by default). A class named by
    the checkpoint is resolved only from modules already imported, as Lightning does, unless
    ``trust_checkpoints``. The module is built from the saved hyper-parameters (through LightningCLI's
    instantiator when the checkpoint names it), its ``on_load_checkpoint`` hook runs, and the weights
    load strictly. The module is returned in eval mode, on the CPU.

    Args:
        path: the ``.ckpt`` file.
        member_class: the LightningModule class or its import path; ``None`` reads ``_class_path``.
        trust_checkpoints: load with ``weights_only=False`` and import modules the checkpoint names
            (only for files from a trusted source: unpickling can run arbitrary code).
        weights: which weights of a checkpoint written during fit with Lightning's ``WeightAveraging``
            (e.g. ``EMAWeightAveraging``): ``ema`` (its ``state_dict``, the averaged weights) or ``raw``
            (``current_model_state``, the training weights). A checkpoint without weight averaging
            holds one set of weights, used for both.
        label: how errors name the file (defaults to the path).

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs more than ``weights_only`` loading and is not trusted.
        CheckpointError: no state dict, an unknown class, or weights that do not fit the class.

    Example:
        >>> member = load_member("runs/digits/version_0/checkpoints/best.ckpt")  # doctest: +SKIP
    """
    check_choice("weights", weights, ("ema", "raw"))
    label = label or f"checkpoint {str(path)!r}"
    return _build_member(read_checkpoint(path, trust_checkpoints, label), member_class, trust_checkpoints, weights,
                         label)


def read_checkpoint(path: str | os.PathLike, trust_checkpoints: bool = False, label: str | None = None
                    ) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint onto the CPU, with ``weights_only=True`` unless trusted.

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs unpickling and ``trust_checkpoints`` is False; the message
            names the object found, the risk and the opt-in.
        CheckpointError: not a torch file, or no ``state_dict``.
    """
    label = label or f"checkpoint {str(path)!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"{label} does not exist: expected a Lightning checkpoint file (.ckpt).")
    return _torch_load(file, trust_checkpoints, label)


def _build_member(checkpoint: dict[str, Any], member_class: ClassSpec | None, trust_checkpoints: bool, weights: str,
                  label: str) -> pl.LightningModule:
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    instantiator = hparams.pop("_instantiator", None)
    named_class = hparams.pop("_class_path", None)
    if member_class is None:
        if named_class is None:
            raise CheckpointError(
                f"{label} does not record its LightningModule class (LightningCLI stores it as `_class_path`; "
                "checkpoints of Python-built modules do not): pass member_class='package.module.ClassName'.")
        cls = _class_named_by_checkpoint(named_class, trust_checkpoints, label)
    else:
        cls = _import_class(member_class, "member_class") if isinstance(member_class, str) else member_class
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise CheckpointError(f"{label}: the member class {cls!r} is not a LightningModule subclass.")
    try:
        kwargs = _init_kwargs(cls, hparams, checkpoint.get("hparams_name"))
        if instantiator in _TRUSTED_INSTANTIATORS:  # LightningCLI's: builds nested class_path arguments too
            from lightning.pytorch.cli import instantiate_module

            model = instantiate_module(cls, kwargs)
        else:
            model = cls(**kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's constructor may raise anything
        raise CheckpointError(f"{label}: building {class_path(cls)} from its saved hyper-parameters failed: "
                              f"{type(err).__name__}: {err}") from err
    state = checkpoint["state_dict"]
    if weights == "raw" and isinstance(checkpoint.get("current_model_state"), dict):
        state = checkpoint["current_model_state"]
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{label}: its weights do not fit {class_path(cls)} built from its hyper-parameters "
                              f"(a different class or architecture?): {err}") from err
    return model.eval()


def checkpoint_members(checkpoints: Sequence[str], class_specs: Sequence[ClassSpec | None], ema_members: str,
                       trust_checkpoints: bool) -> list[tuple[str, pl.LightningModule]]:
    """``(name, module)`` for every member the checkpoints make: one each, two with ``ema_members='both'``."""
    loaded: list[tuple[str, pl.LightningModule]] = []
    variants = {"ema": ("ema",), "raw": ("raw",), "both": ("ema", "raw")}[ema_members]
    names = short_names(checkpoints)
    for i, (path, spec) in enumerate(zip(checkpoints, class_specs, strict=True)):
        label = f"`checkpoints`[{i}]={path!r}"
        checkpoint = read_checkpoint(path, trust_checkpoints, label)
        if ema_members == "both" and not isinstance(checkpoint.get("current_model_state"), dict):
            raise CheckpointError(
                f"{label} holds one set of weights (no 'current_model_state'), so `ema_members`='both' cannot "
                "make two members of it: write it during fit with lightning.pytorch.callbacks.EMAWeightAveraging "
                "(or lightning_tricks.EMAMembers), or set ema_members='ema'.")
        for variant in variants:
            module = _build_member(checkpoint, spec, trust_checkpoints, variant, label)
            suffix = f"[{variant}]" if ema_members == "both" else ""
            loaded.append((f"{names[i]}{suffix}", module))
    return loaded


def short_names(paths: Sequence[str]) -> list[str]:
    """The shortest path suffixes that tell the files apart (``run_a/best.ckpt``, ``run_b/best.ckpt``)."""
    parts = [Path(p).parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


__all__ = ["CheckpointError", "ClassSpec", "UnsafeCheckpointError", "checkpoint_members", "load_member",
           "read_checkpoint"]
