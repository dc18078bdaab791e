"""Reading a checkpoint or weights file, with one line for every way it can be unusable.

``torch.load`` reports a damaged file in many ways (``PytorchStreamReader failed reading zip archive:
failed finding central directory`` for a truncated save, ``EOFError: Ran out of input`` for an empty file,
``invalid load key`` for a file that is not a checkpoint at all), and Lightning reports a checkpoint of
another model as a multi-line ``Error(s) in loading state_dict``. :func:`checkpoint_error` turns each into a
:class:`CheckpointError` of one line that names the file, what is wrong and what to do;
:func:`load_checked` is ``torch.load`` raising it; :func:`check_fits` compares a checkpoint's tensors with a
model's before anything runs.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_tricks.errors import CheckpointError

_DAMAGED = ("PytorchStreamReader", "central directory", "zip archive", "Ran out of input", "invalid load key",
            "unpickling stack underflow", "truncated", "file might be corrupted", "Invalid argument",
            "could not find")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def _list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _looks_like_torch_file(file: Path) -> bool:
    """A zip archive (``torch.save``'s format since 1.6, even truncated: it starts with ``PK``) or a pickle."""
    with open(file, "rb") as handle:
        head = handle.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def state_dict_mismatch(message: str) -> str | None:
    """One line from PyTorch's ``Error(s) in loading state_dict`` message, ``None`` for another message."""
    if "Error(s) in loading state_dict" not in message:
        return None
    owner = re.search(r"loading state_dict for (\w+)", message)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$")):
        found = re.search(pattern, message, flags=re.M)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {label} ({_list(keys)})")
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", message)
    if shapes:
        parts.append(f"{len(shapes)} of another shape ("
                     + _list([f"{k} {a} in the file vs {b}" for k, a, b in shapes], 3) + ")")
    model = owner.group(1) if owner else "the model"
    return f"its tensors do not fit {model}: " + "; ".join(parts or ["see PyTorch's message"])


def checkpoint_error(path: str | os.PathLike, err: BaseException, what: str = "checkpoint") -> CheckpointError | None:
    """The one-line :class:`CheckpointError` for ``err`` raised while loading ``path``; ``None`` if unrelated."""
    if isinstance(err, CheckpointError):
        return err
    shown = f"{what} {str(path)!r}"
    file = Path(path).expanduser()
    if isinstance(err, FileNotFoundError) or not file.exists():
        return CheckpointError(f"{shown} does not exist: check the path (nothing is downloaded).")
    if file.is_file() and file.stat().st_size == 0:
        return CheckpointError(f"{shown} is empty (0 bytes): its save was interrupted; use another checkpoint.")
    message = str(err)
    mismatch = state_dict_mismatch(message)
    if mismatch is not None:
        return CheckpointError(f"{shown} is of another model: {mismatch}. Load it into the model it was saved from.")
    if isinstance(err, KeyError) and str(err).strip("'\"") in ("state_dict", "pytorch-lightning_version"):
        return CheckpointError(f"{shown} is not a Lightning checkpoint (it has no {err}): pass a .ckpt file saved by "
                               "a Trainer.")
    if isinstance(err, TypeError) and "unexpected keyword argument" in message:
        return CheckpointError(f"{shown} was saved from another LightningModule class: its hyper_parameters do not fit "
                               f"({_first_line(err)}). Load it with the class it was saved from.")
    if file.is_file() and not _looks_like_torch_file(file):
        return CheckpointError(f"{shown} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): "
                               "the file is corrupt or of another kind.")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in message:
        return CheckpointError(f"{shown} holds Python objects beyond tensors, which weights_only=True loading refuses; "
                               "load it with weights_only=False only if you trust the file.")
    if isinstance(err, (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError)) and any(
            marker in message or marker in type(err).__name__ for marker in _DAMAGED):
        return CheckpointError(f"{shown} is truncated or corrupt ({_first_line(err)}): its save was interrupted or "
                               "the file was damaged; use another checkpoint (e.g. the one saved before it).")
    return None


def load_checked(path: str | os.PathLike, *, what: str = "checkpoint", weights_only: bool = True,
                 map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path)``; a missing, empty, truncated or corrupt file raises a one-line :class:`CheckpointError`."""
    try:
        return torch.load(Path(path).expanduser(), map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as err:
        translated = checkpoint_error(path, err, what)
        if translated is None:
            raise
        raise translated from None


def check_fits(path: str | os.PathLike, model: nn.Module, state_dict: Mapping[str, Any], what: str = "checkpoint",
               ignore: Any = None) -> None:
    """Raise a one-line :class:`CheckpointError` when ``state_dict`` is clearly of another model than ``model``.

    Clearly: a tensor both have differs in shape, or most of the model's tensors are absent from the file.
    Keys ``ignore(key)`` accepts (a trick's markers) are left out. Smaller differences are left to the strict load,
    whose own error names them.
    """
    own = {k: v for k, v in model.state_dict().items() if not (ignore and ignore(k))}
    theirs = {k: v for k, v in state_dict.items() if not (ignore and ignore(k))}
    if not own:
        return
    shapes = [f"{k} {list(theirs[k].shape)} in the file vs {list(v.shape)}" for k, v in own.items()
              if k in theirs and isinstance(theirs[k], torch.Tensor) and tuple(theirs[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in theirs]
    if shapes or 2 * len(missing) > len(own):
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(own)} tensors are missing ({_list(missing)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_list(shapes, 3)})")
        raise CheckpointError(f"{what} {str(path)!r} is of another model than {type(model).__name__}: "
                              + "; ".join(parts) + ". Load it into the model it was saved from.")


__all__ = ["CheckpointError", "check_fits", "checkpoint_error", "load_checked", "state_dict_mismatch"]
