"""The Ensemble's argument checks and its members' class-count checks (one-line errors naming what is wrong)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.lightning_classes import lightning_module_types
from lightning_tricks.core.validation import InvalidArgumentError, check_choice, check_optional_int
from lightning_tricks.ensemble.loading import ClassSpec
from lightning_tricks.ensemble.voting import check_vote_weights

VOTING = ("soft", "hard", "weighted")
FAST_PATHS = ("auto", "probe", "vmap", "loop")
EMA_MEMBERS = ("ema", "raw", "both")


def check_checkpoints(checkpoints: Any) -> list[str]:
    """Validate the ``checkpoints`` argument: a list of paths (``None`` is an empty list)."""
    if checkpoints is None:
        return []
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Sequence):
        raise InvalidArgumentError(f"`checkpoints`={checkpoints!r} is invalid: expected a list of .ckpt paths.")
    for path in checkpoints:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise InvalidArgumentError(f"`checkpoints`={list(checkpoints)!r} is invalid: expected a list of "
                                       ".ckpt paths.")
    return [str(p) for p in checkpoints]


def check_member_class(member_class: Any, count: int) -> list[ClassSpec | None]:
    """Validate ``member_class``: one class (or import path) for every checkpoint, or a list of ``count``."""
    specs = member_class if isinstance(member_class, (list, tuple)) else [member_class] * count
    if len(specs) != count:
        raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected one class for all "
                                   f"checkpoints or a list of {count}, one per checkpoint.")
    for spec in specs:
        if spec is not None and not isinstance(spec, str) and not (
                isinstance(spec, type) and issubclass(spec, lightning_module_types())):
            raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected a LightningModule "
                                       "subclass or its import path 'package.module.ClassName'.")
    return list(specs)


def check_ensemble_arguments(checkpoints: Any, members: Any, member_class: Any, voting: Any, weights: Any,
                             fast_path: Any, ema_members: Any, num_classes: Any, member_kwargs: Any = None
                             ) -> tuple[list[str], list[nn.Module], list[ClassSpec | None], int, list[float] | None]:
    """The Ensemble's validator: ``(checkpoints, members, class per checkpoint, member count, weights)``."""
    checkpoints = check_checkpoints(checkpoints)
    modules = list(members) if members is not None else []
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise InvalidArgumentError(f"`members`[{i}]={module!r} is invalid: expected a torch.nn.Module.")
    if not checkpoints and not modules:
        raise InvalidArgumentError("`checkpoints`=[] is invalid: expected at least one checkpoint path "
                                   "(or modules in `members`).")
    check_choice("voting", voting, VOTING)
    check_choice("fast_path", fast_path, FAST_PATHS)
    check_choice("ema_members", ema_members, EMA_MEMBERS)
    check_optional_int("num_classes", num_classes, 2)
    specs = check_member_class(member_class, len(checkpoints))
    if member_kwargs is not None and not (isinstance(member_kwargs, dict) and all(isinstance(k, str)
                                                                               for k in member_kwargs)):
        raise InvalidArgumentError(f"`member_kwargs`={member_kwargs!r} is invalid: expected a dict of constructor "
                                   "argument names to values, or None.")
    member_count = len(checkpoints) * (2 if ema_members == "both" else 1) + len(modules)
    if weights is not None:
        if voting == "soft":
            raise InvalidArgumentError(f"`weights`={weights!r} is invalid with `voting`='soft': use "
                                       "voting='weighted' for a weighted mean of probabilities.")
        weights = check_vote_weights(weights, member_count)
    return checkpoints, modules, specs, member_count, weights


def declared_num_classes(module: nn.Module) -> int | None:
    """The member's class count: its ``num_classes`` hyper-parameter, else the outputs of its last layer with
    weights when that is an ``nn.Linear`` (None: unknown until its first output)."""
    hparams = getattr(module, "hparams", None)
    value = hparams.get("num_classes") if hasattr(hparams, "get") else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    weighted = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    return weighted[-1].out_features if weighted and isinstance(weighted[-1], nn.Linear) else None


def check_class_counts(names: Sequence[str], counts: Sequence[int | None], expected: int | None,
                        what: str) -> None:
    known = {n for n in counts if n is not None} | ({expected} if expected is not None else set())
    if len(known) > 1:
        listing = ", ".join(f"{name}: {n}" for name, n in zip(names, counts, strict=True) if n is not None)
        extra = f" (expected {expected})" if expected is not None else ""
        raise InvalidArgumentError(f"The ensemble's members {what} different numbers of classes ({listing}){extra}: "
                                   "every member must score the same classes.")


def check_outputs(names: Sequence[str], outputs: Sequence[Any], batch: int, expected: int | None) -> None:
    for name, out in zip(names, outputs, strict=True):
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidArgumentError(f"Ensemble member {name} returned {got} for a batch of {batch}: "
                                       "expected forward(x) to return (batch, classes) logits.")
    widths = [out.shape[1] for out in outputs]
    if len(set(widths)) > 1 or expected not in (None, widths[0]):
        check_class_counts(names, widths, expected, "output")


__all__ = ["EMA_MEMBERS", "FAST_PATHS", "VOTING", "check_checkpoints", "check_class_counts", "check_ensemble_arguments",
           "check_member_class", "check_outputs", "declared_num_classes"]
