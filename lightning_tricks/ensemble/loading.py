"""Member loading: a LightningModule built from a checkpoint, safely (``weights_only=True`` unless trusted).

Members are built by Lightning's own ``LightningModule.load_from_checkpoint`` (which migrates old
checkpoints, runs ``configure_model`` and ``on_load_checkpoint`` and honours LightningCLI's instantiator
allowlist). What it lacks is added here: the class looked up from the ``_class_path`` that LightningCLI
records in the hyper-parameters (members of one ensemble may have different classes), errors that name
the file, the raw weights of an ``EMAWeightAveraging`` checkpoint, and the structural tricks a checkpoint
records (`lightning_tricks.checkpoint.apply_recorded_tricks`), applied from ``on_load_checkpoint`` so that
they are in place before Lightning's strict ``load_state_dict``.
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_tricks.checkpoint import (
    apply_recorded_tricks,
    recorded_input_statistics,
    tricks_applied_on_load,
)
from lightning_tricks.core.lightning_classes import lightning_module_types
from lightning_tricks.core.validation import (
    ConfigError,
    DataNotFoundError,
    InvalidArgumentError,
    check_choice,
)
from lightning_tricks.errors import CheckpointError, UnsafeCheckpointError  # noqa: F401  (re-exported)

ClassSpec = str | type[pl.LightningModule]

# torch.save's legacy (pre-zip) format starts with a pickled magic number: PROTO n, LONG1 of 10 bytes
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


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


def _is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive, or (legacy format) a pickle stream that starts with its magic number."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as file:
        head = file.read(2 + len(_LEGACY_MAGIC))
    return head[:1] == b"\x80" and head[2:] == _LEGACY_MAGIC


def check_checkpoint_files(paths: Sequence[str], name: str = "checkpoints") -> None:
    """Every path names an existing file: one line naming the first missing one otherwise."""
    for i, path in enumerate(paths):
        if not Path(path).expanduser().is_file():
            raise DataNotFoundError(f"`{name}`[{i}]={path!r} does not exist: expected a Lightning checkpoint "
                                    "file (.ckpt).")


def read_checkpoint(path: str | os.PathLike, trust_checkpoints: bool = False, label: str | None = None
                    ) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint onto the CPU, with ``weights_only=True`` unless trusted.

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs unpickling and ``trust_checkpoints`` is False; the message
            names the object found, the risk and the opt-in.
        CheckpointError: not a PyTorch file at all, or no ``state_dict``.
    """
    label = label or f"checkpoint {str(path)!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"{label} does not exist: expected a Lightning checkpoint file (.ckpt).")
    if not _is_torch_file(file):
        raise CheckpointError(f"{label} is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy "
                              "format): expected a Lightning .ckpt file from ModelCheckpoint or trainer.save_checkpoint.")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not trust_checkpoints)
    except pickle.UnpicklingError as err:
        if trust_checkpoints or "weights only load failed" not in str(err).lower():
            raise CheckpointError(f"{label} is not a PyTorch checkpoint, or it is damaged: {err}") from err
        found = re.search(r"GLOBAL (\S+) was not", str(err))
        what = f"`{found.group(1)}`" if found else "a Python object that is not a tensor or plain value"
        raise UnsafeCheckpointError(
            f"{label} was refused: it holds {what}, and loading anything beyond tensors and plain values means "
            "unpickling, which can run arbitrary code on this machine. If you trust where the file comes from, "
            "opt in with trust_checkpoints=True (YAML: `trust_checkpoints: true`); otherwise re-save it with "
            "tensors and plain values only.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{label} is not a PyTorch checkpoint, or it is damaged: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{label} has no 'state_dict': expected a Lightning checkpoint "
                              "(from ModelCheckpoint or trainer.save_checkpoint).")
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{label} has a 'state_dict' but no 'pytorch-lightning_version', which every Lightning "
                              "checkpoint records: expected a file from ModelCheckpoint or trainer.save_checkpoint.")
    return checkpoint


def _member_class(checkpoint: dict[str, Any], member_class: ClassSpec | None, trust: bool, label: str) -> type:
    if member_class is None:
        named = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if named is None:
            raise CheckpointError(
                f"{label} does not record its LightningModule class (LightningCLI stores it as `_class_path`; "
                "checkpoints of Python-built modules do not): pass member_class='package.module.ClassName'.")
        cls = _class_named_by_checkpoint(named, trust, label)
    else:
        cls = _import_class(member_class, "member_class") if isinstance(member_class, str) else member_class
    if not (isinstance(cls, type) and issubclass(cls, lightning_module_types())):
        raise CheckpointError(f"{label}: the member class {cls!r} is not a LightningModule subclass.")
    return cls


def _load_weights(module: nn.Module, state: dict[str, Any], label: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{label}: its weights do not fit {class_path(type(module))} (a different class or "
                              f"architecture?): {err}") from err


def _with_recorded_tricks(module: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """The one place where a member gets the structural tricks its checkpoint records. It runs before the
    member's weights load strictly (converted modules may hold buffers the plain module lacks); applying
    twice changes nothing."""
    apply_recorded_tricks(module, checkpoint)
    return module


def build_members(path: str | os.PathLike, checkpoint: dict[str, Any], member_class: ClassSpec | None = None,
                  trust_checkpoints: bool = False, variants: Sequence[str] = ("ema",), label: str | None = None,
                  member_kwargs: dict[str, Any] | None = None) -> list[pl.LightningModule]:
    """One module per weights variant (``ema``/``raw``) of the checkpoint ``checkpoint`` read from ``path``.

    The module comes from ``cls.load_from_checkpoint(path, weights_only=not trust_checkpoints,
    **member_kwargs)``; a ``raw`` variant then loads ``current_model_state`` (the training weights next to
    Lightning ``WeightAveraging``'s averaged ones) when the checkpoint has them.
    """
    label = label or f"checkpoint {str(path)!r}"
    cls = _member_class(checkpoint, member_class, trust_checkpoints, label)
    try:
        with tricks_applied_on_load(cls, apply=_with_recorded_tricks) as served:
            model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=not trust_checkpoints,
                                             **(member_kwargs or {}))
        if not any(m is model for m in served):  # a subclass (named by the CLI's _class_path) with its own hook
            _with_recorded_tricks(model, checkpoint)
    except ConfigError:
        raise
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise CheckpointError(f"{label}: loading {class_path(cls)} failed: {type(err).__name__}: {err}") from err
        raise CheckpointError(f"{label}: its weights do not fit {class_path(cls)} built from its hyper-parameters "
                              f"(a different class or architecture?): {err}") from err
    except Exception as err:  # noqa: BLE001 - the user's constructor may raise anything
        hint = (" Pass the constructor arguments the checkpoint does not hold with member_kwargs={...}, as "
                "load_from_checkpoint(**kwargs) takes them." if isinstance(err, TypeError) else "")
        raise CheckpointError(f"{label}: building {class_path(cls)} from its saved hyper-parameters failed: "
                              f"{type(err).__name__}: {err}.{hint}") from err
    members = []
    raw_state = checkpoint.get("current_model_state")
    for k, variant in enumerate(variants):
        member = model if k == 0 else copy.deepcopy(model)
        if variant == "raw" and isinstance(raw_state, dict):
            _load_weights(member, raw_state, label)
        members.append(member.eval())
    return members


def copy_with_weights(template: nn.Module, checkpoint: dict[str, Any], label: str) -> nn.Module:
    """A deep copy of a live ``template`` module holding the checkpoint's weights: no class lookup, no rebuild."""
    module = _with_recorded_tricks(copy.deepcopy(template), checkpoint)
    _load_weights(module, checkpoint["state_dict"], label)
    return module.eval()


def load_member(path: str | os.PathLike, member_class: ClassSpec | None = None, trust_checkpoints: bool = False,
                weights: str = "ema", label: str | None = None,
                member_kwargs: dict[str, Any] | None = None) -> pl.LightningModule:
    """Build a LightningModule from a checkpoint, safely: ``weights_only=True`` unless ``trust_checkpoints``.

    The class is ``member_class`` when given, else the ``_class_path`` that LightningCLI records in the
    checkpoint's hyper-parameters (``load_from_checkpoint_support``, on by default). A class named by
    the checkpoint is resolved only from modules already imported, as Lightning does, unless
    ``trust_checkpoints``. The module is built by Lightning's ``load_from_checkpoint`` from the saved
    hyper-parameters and ``member_kwargs`` (its ``on_load_checkpoint`` hook runs, the weights load
    strictly), then the structural tricks the checkpoint records are re-applied. The module is
    returned in eval mode, on the CPU.

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
        member_kwargs: constructor arguments the checkpoint's hyper-parameters lack (or that override
            them), as ``load_from_checkpoint(**kwargs)`` takes them, e.g. ``{"data_path": "/data"}``.

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs more than ``weights_only`` loading and is not trusted.
        CheckpointError: not a PyTorch checkpoint, no state dict, an unknown class, a constructor that
            fails, or weights that do not fit the class.

    Examples:
        >>> member = load_member("runs/digits/version_0/checkpoints/best.ckpt")  # doctest: +SKIP
    """
    check_choice("weights", weights, ("ema", "raw"))
    label = label or f"checkpoint {str(path)!r}"
    checkpoint = read_checkpoint(path, trust_checkpoints, label)
    return build_members(path, checkpoint, member_class, trust_checkpoints, (weights,), label, member_kwargs)[0]


def check_one_optimizer(checkpoint: dict[str, Any], label: str) -> None:
    """A classifier's checkpoint: trained with one optimizer (a GAN's has two: no classifier to vote)."""
    states = checkpoint.get("optimizer_states")
    if isinstance(states, (list, tuple)) and len(states) > 1:
        raise CheckpointError(
            f"{label} was trained with {len(states)} optimizers (manual optimization, e.g. a GAN's generator and "
            "discriminator): an Ensemble votes the class scores of classifiers; give it classifier checkpoints.")


def checkpoint_members(checkpoints: Sequence[str], class_specs: Sequence[ClassSpec | None], ema_members: str,
                       trust_checkpoints: bool, member_kwargs: dict[str, Any] | None = None
                       ) -> list[tuple[str, pl.LightningModule, tuple[Any, ...]]]:
    """``(name, module, input statistics)`` for every member the checkpoints make: one each, two with
    ``ema_members='both'``; the statistics are the ``Standardize`` ones the checkpoint records (`()`: none)."""
    loaded: list[tuple[str, pl.LightningModule, tuple[Any, ...]]] = []
    variants = {"ema": ("ema",), "raw": ("raw",), "both": ("ema", "raw")}[ema_members]
    names = short_names(checkpoints)
    for i, (path, spec) in enumerate(zip(checkpoints, class_specs, strict=True)):
        label = f"`checkpoints`[{i}]={path!r}"
        checkpoint = read_checkpoint(path, trust_checkpoints, label)
        check_one_optimizer(checkpoint, label)
        inputs = tuple(recorded_input_statistics(checkpoint))
        if ema_members == "both" and not isinstance(checkpoint.get("current_model_state"), dict):
            raise CheckpointError(
                f"{label} holds one set of weights (no 'current_model_state'), so `ema_members`='both' cannot "
                "make two members of it: write it during fit with lightning.pytorch.callbacks.EMAWeightAveraging "
                "(or lightning_tricks.EMAMembers), or set ema_members='ema'.")
        modules = build_members(path, checkpoint, spec, trust_checkpoints, variants, label, member_kwargs)
        for variant, module in zip(variants, modules, strict=True):
            loaded.append((f"{names[i]}[{variant}]" if ema_members == "both" else names[i], module, inputs))
    return loaded


def short_names(paths: Sequence[str]) -> list[str]:
    """The shortest path suffixes that tell the files apart (``run_a/best.ckpt``, ``run_b/best.ckpt``)."""
    parts = [Path(p).parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


__all__ = ["CheckpointError", "ClassSpec", "UnsafeCheckpointError", "build_members", "check_checkpoint_files",
           "check_one_optimizer",
           "checkpoint_members", "copy_with_weights", "load_member", "read_checkpoint"]
