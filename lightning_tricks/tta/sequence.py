"""Test-time augmentation on sequences ``(B, C, L)`` (and ``(B, L)``): shifts and crops along the length.

The image view families mean, along one axis:

* ``translate``: 3 views, the content shifted by ``-translate``, 0 and ``+translate`` steps (the border filled
  by ``padding_mode``): ``view[..., i] = pad(x)[..., translate - dx + i]``;
* ``center_crop``: the centre ``crop_size`` steps; ``five_crop``: the left, centre and right ``crop_size`` steps
  (3 windows: a sequence has no top and bottom);
* ``hflip``: the sequence reversed as well, **only when asked** (``views`` given): reversing a signal changes its
  meaning more often than mirroring an image does, so the default view set (``['hflip']``) is refused.

``vflip``, ``ten_crop`` and ``scales`` have no meaning along one axis and are refused in one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.tta.config import TTAConfig

SequenceView = tuple[str, int, bool]
"""``(kind, offset, flip)``: kind ``shift`` (offset = dx) or ``crop`` (offset = start), and the reversal."""


def sequence_views(config: TTAConfig, views_given: bool = True) -> list[SequenceView]:
    """The views of ``config`` along the length; refuses what has no 1D meaning (one line each)."""
    views = set(config.views)
    if not views_given and views == {"hflip"}:
        raise InvalidArgumentError(
            "TestTimeAugmentation on sequences (B, C, L): the default view 'hflip' would reverse them; pass "
            "views=['translate'] (shifts along the length), ['center_crop'] or ['five_crop'] with crop_size, or "
            "views=['hflip'] to average over reversed sequences on purpose."
        )
    bad = sorted(views & {"vflip", "ten_crop"}) + (["scales"] if config.scales else [])
    if bad:
        raise InvalidArgumentError(f"TestTimeAugmentation on sequences (B, C, L): {bad} have no meaning along one axis; "
                                   "use 'translate', 'center_crop', 'five_crop' or 'hflip'.")
    flips = (False, True) if "hflip" in views else (False,)
    if "translate" in views:
        t = config.translate
        windows: list[tuple[str, Any]] = [("shift", d) for d in (-t, 0, t)]
    elif "center_crop" in views:
        windows = [("crop", "center")]
    elif "five_crop" in views:
        windows = [("crop", a) for a in ("left", "center", "right")]
    else:
        windows = [("shift", 0)]
    return [(kind, where, flip) for kind, where in windows for flip in flips]  # type: ignore[misc]


def apply_sequence_view(x: Tensor, view: tuple[str, Any, bool], config: TTAConfig) -> Tensor:
    """One view of sequences ``x`` ``(B, ..., L)``: a shift (padded) or a crop window, then the optional reversal.

    Examples:
        >>> x = torch.arange(5.0).view(1, 1, 5)
        >>> apply_sequence_view(x, ("shift", 2, False), TTAConfig(views=["translate"])).flatten().tolist()
        [0.0, 0.0, 0.0, 1.0, 2.0]
    """
    kind, where, flip = view
    length = x.shape[-1]
    if kind == "shift":
        out = x
        if where:
            t = config.translate
            mode = "constant" if config.padding_mode == "zeros" else config.padding_mode
            padded = F.pad(x.reshape(-1, 1, length), (t, t), mode=mode).reshape(*x.shape[:-1], length + 2 * t)
            out = padded[..., t - where:t - where + length]
    else:
        c = config.crop_size
        assert c is not None
        start = {"left": 0, "right": length - c}.get(where, int(round((length - c) / 2.0)))
        out = x[..., start:start + c]
    return out.flip(-1) if flip else out


def sequence_tta_forward(forward: Callable[[Tensor], Any], x: Tensor, config: TTAConfig, *, views_given: bool = True,
                         seed: int | None = None, stochastic_module: nn.Module | None = None, task: Any = None
                         ) -> Tensor:
    """:func:`~lightning_tricks.tta.core.tta_forward` for sequences: every view in one batch of ``K * B`` rows.

    ``task`` is what ``tta_forward`` takes (a Task, a function reading it from an output, or None: inferred
    from the first view's output).
    """
    from lightning_tricks.core.seeding import seeded_global_rng
    from lightning_tricks.core.stochastic import stochastic_eval
    from lightning_tricks.tta.core import _resolve_task, merge_predictions

    views = sequence_views(config, views_given)
    length = x.shape[-1]
    if config.crop_size is not None and config.crop_size > length:
        raise InvalidArgumentError(f"`crop_size`={config.crop_size} is invalid for sequences of {length} steps: "
                                   f"expected crop_size <= {length}.")
    if "translate" in config.views and config.translate >= length:
        raise InvalidArgumentError(f"`translate`={config.translate} is invalid for sequences of {length} steps.")
    stochastic = config.stochastic_passes > 1
    with contextlib.ExitStack() as stack:
        if not torch.is_grad_enabled():
            stack.enter_context(torch.inference_mode())
        if stochastic:
            stack.enter_context(stochastic_eval(stochastic_module))  # type: ignore[arg-type]
            if seed is not None:
                stack.enter_context(seeded_global_rng(seed, x.device))
        rows = torch.cat([apply_sequence_view(x, v, config) for v in views for _ in range(config.stochastic_passes)])
        step = rows.shape[0] if config.max_batch is None else config.max_batch
        out = torch.cat([forward(rows[i:i + step]) for i in range(0, rows.shape[0], step)])
        per_view = out.reshape(-1, x.shape[0], *out.shape[1:])
        merged = merge_predictions(per_view, config.merge, _resolve_task(task, per_view[0], config))
    if merged.is_inference() and not torch.is_inference_mode_enabled():
        merged = merged.clone()
    return merged


__all__ = ["apply_sequence_view", "sequence_tta_forward", "sequence_views"]
