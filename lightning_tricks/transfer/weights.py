"""Loading a local weights file into a model's backbone: a Lightning checkpoint, a torchvision or timm
``state_dict`` or ``.safetensors``, key prefixes aligned, the head skipped, every mismatch in one message.

Re-exported by :mod:`lightning_tricks.transfer`. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_tricks.core.checkpoint_io import checkpoint_error
from lightning_tricks.core.validation import DataNotFoundError
from lightning_tricks.errors import WeightsMismatchError
from lightning_tricks.transfer.freezing import find_head


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: a Lightning checkpoint's ``state_dict``, a torchvision or timm
    ``state_dict`` (``.pth``/``.pt``/``.bin``, or a dict holding it under ``state_dict`` or ``model``), or a
    ``.safetensors`` file. Loaded with ``weights_only=True`` unless ``trust``.

    Raises:
        DataNotFoundError: no such file.
        WeightsMismatchError: the file holds no tensors by name, or needs unpickling and is not trusted.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"`weights`={str(path)!r} does not exist: expected a local checkpoint or state_dict "
                                "file (nothing is downloaded).")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    try:
        content = torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        translated = checkpoint_error(path, err, "`weights`")
        if "Weights only load failed" not in str(err) or "not a PyTorch checkpoint" in str(translated):
            raise translated or err from None  # a damaged file, not a pickle of objects
        raise WeightsMismatchError(f"`weights`={str(path)!r} holds Python objects beyond tensors ({str(err)[:120]}...);"
                                   " if you trust the file, set trust_checkpoints=True.") from None
    except Exception as err:  # empty, truncated, corrupt: one line naming the file
        translated = checkpoint_error(path, err, "`weights`")
        if translated is None:
            raise
        raise translated from None
    for key in ("state_dict", "model", "module"):
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if not isinstance(content, Mapping) or not content or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise WeightsMismatchError(f"`weights`={str(path)!r} is not a state_dict: expected a mapping of names to "
                                   "tensors, or a checkpoint holding one under 'state_dict'.")
    return dict(content)


def _align(file_keys: list[str], model_keys: set[str]) -> tuple[str, str]:
    """The (file prefix, model prefix) pair under which the most file keys name model keys."""
    counts: dict[str, int] = {}
    for key in file_keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    file_prefixes = [""] + [p for p, c in counts.items() if 2 * c >= len(file_keys)]
    best = ("", "", -1)
    for fp in file_prefixes:
        stripped = [k[len(fp):] for k in file_keys if k.startswith(fp)]
        model_prefixes = {""}
        for key in stripped[:8]:
            model_prefixes |= {m[: len(m) - len(key)] for m in model_keys if m.endswith("." + key)}
        for mp in model_prefixes:
            score = sum(mp + k in model_keys for k in stripped)
            if score > best[2]:
                best = (fp, mp, score)
    return best[0], best[1]


@dataclass
class LoadReport:
    """What :func:`load_weights` did: how many tensors loaded, and the file's keys it left out (the head)."""

    loaded: int
    skipped_head: list[str]
    file_prefix: str
    model_prefix: str


def _listing(kind: str, keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{len(keys)} {kind} ({shown})"


def load_weights(model: nn.Module, path: str | os.PathLike, head: str | None = None, strict: bool = True,
                 trust: bool = False, skip_head: bool = True) -> LoadReport:
    """Load a local weights file into ``model``'s backbone, skipping the classifier head.

    The file's keys and the model's may differ by a prefix (``model.`` in a LightningModule's checkpoint,
    ``module.`` from DDP, none in a torchvision file): the pair of prefixes under which most keys match is
    used. The head's keys are skipped whatever their shape, so a checkpoint trained for another number of
    classes loads. Every other difference (backbone keys missing from the file, file keys the model does
    not have, shapes that differ) is listed in one error, or ignored with ``strict=False``.
    ``skip_head=False`` loads the head too (its shape must then match).

    Raises:
        WeightsMismatchError: with ``strict``, any missing, unexpected or mis-shaped backbone key.
    """
    state = read_state_dict(path, trust)
    head_name = find_head(model, head)
    own = model.state_dict()
    fp, mp = _align(list(state), set(own))
    head_prefix = head_name + "." if skip_head else "\0"
    mapped = {mp + k[len(fp):]: (k, v) for k, v in state.items() if k.startswith(fp)}
    skipped = [k for m, (k, _) in mapped.items() if m.startswith(head_prefix)]
    target = [k for k in own if k.startswith(mp) and not k.startswith(head_prefix)]
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in state if not k.startswith(fp)] + [
        k for m, (k, _) in mapped.items() if m not in own and not m.startswith(head_prefix)]
    shapes = [f"{m} {tuple(mapped[m][1].shape)} vs {tuple(own[m].shape)}" for m in target
              if m in mapped and mapped[m][1].shape != own[m].shape]
    problems = [_listing(kind, keys) for kind, keys in (
        ("backbone keys missing from the file", missing), ("unexpected keys in the file", unexpected),
        ("shape mismatches (file vs model)", shapes)) if keys]
    if problems and strict:
        raise WeightsMismatchError(f"`weights`={str(path)!r} does not fit {type(model).__name__} (file prefix "
                                   f"{fp!r} -> model prefix {mp!r}, head {head_name!r} skipped): "
                                   + "; ".join(problems) + ". Set strict=False to load the matching keys only.")
    bad = {m.split(" ")[0] for m in shapes}
    loadable = {m: v for m, (_, v) in mapped.items() if m in own and m not in bad and not m.startswith(head_prefix)}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(len(loadable), skipped, fp, mp)

