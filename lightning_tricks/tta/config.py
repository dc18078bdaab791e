"""What test-time augmentation does: the view families, their validation (one validator) and expansion."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_tricks.core.task import TASK_KINDS, TaskNotSupportedError, check_task_kind
from lightning_tricks.core.validation import InvalidArgumentError, check_choice, check_int, check_optional_int

VIEW_FAMILIES = ("identity", "hflip", "vflip", "center_crop", "five_crop", "ten_crop", "translate")
"""View families; the view set is their cartesian product (e.g. ``["hflip", "five_crop"]`` = ten-crop)."""
CROP_FAMILIES = ("center_crop", "five_crop", "ten_crop")
CROP_ANCHORS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
MERGE_MODES = ("mean", "gmean", "max", "vote")
TASKS = TASK_KINDS
"""Values of the ``task`` argument (None: read from the first batch, see :mod:`lightning_tricks.core.task`)."""
PADDING_MODES = ("replicate", "reflect", "zeros")


@dataclass(frozen=True)
class View:
    """One view: resize (shorter side to ``scale``), then a window (a ``crop`` anchor or a ``shift``), then flips.

    ``shift=(dy, dx)`` moves the content ``dy`` pixels down and ``dx`` right, filling the border by
    padding. ``copy`` numbers the repeated passes of a stochastic model (the same view drawn again).
    """

    scale: int | None = None
    crop: str | None = None
    shift: tuple[int, int] | None = None
    hflip: bool = False
    vflip: bool = False
    copy: int = 0

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.crop is None and self.shift in (None, (0, 0)) and not (self.hflip or self.vflip)

    @property
    def name(self) -> str:
        parts = [f"scale={self.scale}"] if self.scale is not None else []
        parts += [f"crop={self.crop}"] if self.crop else []
        parts += [f"shift={self.shift}"] if self.shift not in (None, (0, 0)) else []
        parts += ["hflip"] * self.hflip + ["vflip"] * self.vflip
        parts += [f"pass={self.copy}"] if self.copy else []
        return "/".join(parts) or "identity"



def validate_tta_hparams(views: Sequence[str], crop_size: int | None, scales: Sequence[int] | None, translate: int,
                         padding_mode: str, stochastic_passes: int, merge: str, task: str | None,
                         max_batch: int | None) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Check every argument of test-time augmentation once; return the views and scales as tuples.

    The one validator of the trick: :class:`TTAConfig` calls it, and the wrapper and the callback build a
    :class:`TTAConfig`. Errors quote the value as the user gave it (a list stays a list).
    """
    allowed = "a non-empty list of distinct names from " + ", ".join(map(repr, VIEW_FAMILIES))
    if isinstance(views, str) or not isinstance(views, Sequence) or not views:
        raise InvalidArgumentError(f"`views`={views!r} is invalid: expected {allowed}.")
    chosen = list(views)
    if any(v not in VIEW_FAMILIES for v in chosen) or len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(f"`views`={views!r} is invalid: expected {allowed}.")
    crops = [v for v in chosen if v in CROP_FAMILIES]
    if len(crops) > 1:
        raise InvalidArgumentError(f"`views`={views!r} is invalid: expected at most one of {', '.join(CROP_FAMILIES)} "
                                   "(they are alternative crop sets).")
    if "ten_crop" in chosen and "hflip" in chosen:
        raise InvalidArgumentError(f"`views`={views!r} is invalid: 'ten_crop' already includes the horizontal flips; "
                                   "use 'ten_crop' alone or 'five_crop' with 'hflip'.")
    if crops and "translate" in chosen:
        raise InvalidArgumentError(f"`views`={views!r} is invalid: 'translate' and '{crops[0]}' both choose the "
                                   "window; use one of them.")
    check_optional_int("crop_size", crop_size, 1)
    if scales is not None:
        if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or not scales or any(
                isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in scales):
            raise InvalidArgumentError(f"`scales`={scales!r} is invalid: expected a non-empty list of sizes > 0.")
        scales = tuple(scales)
    check_int("translate", translate, 1)
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    check_int("stochastic_passes", stochastic_passes, 1)
    check_choice("merge", merge, MERGE_MODES)
    check_task_kind("task", task)
    if task == "dense":
        check_dense_views(chosen, crop_size, scales)
    if task == "regression" and merge != "mean":
        raise InvalidArgumentError(f"`merge`={merge!r} is invalid with task='regression': expected 'mean' "
                                   "(regression outputs are averaged).")
    check_optional_int("max_batch", max_batch, 1)
    if crops and crop_size is None:
        raise InvalidArgumentError(f"`crop_size`=None is invalid with views {crops[0]!r}: expected the crop side in pixels.")
    if crop_size is not None and not crops and scales is None:
        raise InvalidArgumentError(f"`crop_size`={crop_size!r} is invalid: no view crops (add 'center_crop', "
                                   "'five_crop' or 'ten_crop' to views, or give scales to center-crop).")
    if crop_size is not None and scales is not None and crop_size > min(scales):
        raise InvalidArgumentError(f"`crop_size`={crop_size!r} is invalid: it is larger than the image at "
                                   f"scale {min(scales)}; expected crop_size <= {min(scales)}.")
    return tuple(chosen), scales  # type: ignore[return-value]


def check_dense_views(views: Sequence[str], crop_size: int | None, scales: Sequence[int] | None) -> None:
    """Refuse, in one line, views whose dense (per-pixel) outputs cannot all be mapped back onto the input's grid.

    Flips are undone, shifts moved back, five/ten crops pasted back (each pixel averaged over the crops that
    cover it), scales resized back; a lone center crop leaves the border without a prediction, and crops or
    shifts at several scales are not mapped back.
    """
    crops = [v for v in views if v in CROP_FAMILIES]
    if "center_crop" in crops or (crop_size is not None and not crops and scales is not None):
        raise TaskNotSupportedError("TestTimeAugmentation cannot merge dense outputs over a center crop: the border "
                                    "outside it gets no prediction; use five_crop/ten_crop (crops pasted back and "
                                    "averaged where they overlap), translate, scales or flips.")
    if scales is not None and (crops or "translate" in views):
        raise TaskNotSupportedError(f"TestTimeAugmentation maps dense outputs back from scales or from "
                                    f"{crops[0] if crops else 'translate'}, not from both; drop `scales` or the "
                                    f"{crops[0] if crops else 'translate'} view.")


@dataclass(frozen=True)
class TTAConfig:
    """What test-time augmentation does: which views, how they are merged, how many rows per model call.

    The view set is the cartesian product of the ``views`` families, taken at every size in
    ``scales``, each drawn ``stochastic_passes`` times:

    * ``identity``: the input itself; ``hflip`` / ``vflip``: the input and its horizontal / vertical
      mirror (2 views each);
    * ``center_crop``, ``five_crop`` (4 corners + center), ``ten_crop`` (five crops and their mirrors):
      ``crop_size`` x ``crop_size`` windows, placed as ``torchvision``'s ``five_crop`` places them;
    * ``translate``: the 3 x 3 grid of shifts by ``{-translate, 0, translate}`` pixels (9 views), the
      uncovered border filled by ``padding_mode``;
    * ``scales``: resize the shorter side to each size first (bilinear, antialiased), as ResNet's
      multi-scale test does; with ``crop_size`` but no crop family, the center crop of each scale.

    Args:
        views: view families, combined as a cartesian product.
        crop_size: side of the crops (required by the crop families).
        scales: shorter-side sizes to resize to before the other views (multi-scale testing).
        translate: shift in pixels of the ``translate`` views.
        padding_mode: border fill of shifted views: ``replicate`` (edge pixels), ``reflect`` or
            ``zeros`` (zero, i.e. the mean pixel of standardized inputs).
        stochastic_passes: draws of each view with the model's stochastic layers active
            (dropout, modules with ``lt_stochastic_eval``); batch norm stays in eval mode.
        merge: ``mean`` (of probabilities), ``gmean`` (of probabilities, via mean log-probability),
            ``max`` (per-class maximum probability, renormalized) or ``vote`` (majority of the views'
            top classes); see :func:`merge_predictions`.
        task: what the model computes, one of :data:`~lightning_tricks.core.task.TASK_KINDS`, or None
            (default) to read it from the first output (and, in the callback, the batch's targets) with
            :func:`~lightning_tricks.core.task.infer_task`: ``classification`` (``(batch, classes)`` scores:
            merged probabilities, returned as log-probabilities, or probabilities for a forward ending in
            softmax), ``multilabel`` (per-label sigmoid probabilities merged, returned as logits),
            ``dense`` (``(batch, classes, *spatial)`` maps: each view mapped back onto the input's grid
            first) or ``regression`` (raw outputs averaged; maps on the input's grid mapped back first).
        max_batch: largest number of rows per model call (``None``: one call per view shape).

    Raises:
        InvalidArgumentError: an unknown view, merge mode or task, an empty view list, a crop family
            without ``crop_size`` (or ``crop_size`` with nothing to crop), ``crop_size`` larger than a
            scale, a scale or size ``<= 0``, conflicting families.

    Examples:
        >>> TTAConfig(views=["hflip", "five_crop"], crop_size=28).num_views
        10
    """

    views: tuple[str, ...] = ("hflip",)
    crop_size: int | None = None
    scales: tuple[int, ...] | None = None
    translate: int = 2
    padding_mode: str = "replicate"
    stochastic_passes: int = 1
    merge: str = "mean"
    task: str | None = None
    max_batch: int | None = None
    expanded: tuple[View, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        views, scales = validate_tta_hparams(self.views, self.crop_size, self.scales, self.translate, self.padding_mode,
                                             self.stochastic_passes, self.merge, self.task, self.max_batch)
        object.__setattr__(self, "views", views)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "expanded", tuple(self._expand(list(views))))

    def _expand(self, views: list[str]) -> Iterator[View]:
        if "five_crop" in views or "ten_crop" in views:
            windows: list[dict[str, Any]] = [{"crop": a} for a in CROP_ANCHORS]
        elif "center_crop" in views or self.crop_size is not None:
            windows = [{"crop": "center"}]
        elif "translate" in views:
            t = self.translate
            windows = [{"shift": (dy, dx)} for dy in (-t, 0, t) for dx in (-t, 0, t)]
        else:
            windows = [{}]
        hflips = (False, True) if ("hflip" in views or "ten_crop" in views) else (False,)
        vflips = (False, True) if "vflip" in views else (False,)
        for scale, window, hflip, vflip, copy in itertools.product(
                self.scales or (None,), windows, hflips, vflips, range(self.stochastic_passes)):
            yield View(scale=scale, hflip=hflip, vflip=vflip, copy=copy, **window)

    @property
    def num_views(self) -> int:
        """K: the number of model evaluations per input (views x stochastic passes)."""
        return len(self.expanded)

    def describe(self) -> str:
        """One line for logs: the view families, sizes, passes and merge."""
        parts = [" x ".join(self.views)]
        if self.crop_size is not None:
            parts.append(f"crop {self.crop_size}")
        if self.scales is not None:
            parts.append(f"scales {list(self.scales)}")
        if "translate" in self.views:
            parts.append(f"shift {self.translate}px ({self.padding_mode})")
        if self.stochastic_passes > 1:
            parts.append(f"{self.stochastic_passes} stochastic passes")
        noun = "view" if self.num_views == 1 else "views"
        return f"{self.num_views} {noun} ({', '.join(parts)}), merge={self.merge!r}"


def tta_config(views: Sequence[str] | None, crop_size: int | None, scales: Sequence[int] | None, translate: int,
               padding_mode: str, stochastic_passes: int, merge: str, task: str | None,
               max_batch: int | None) -> TTAConfig:
    """The :class:`TTAConfig` of the wrapper's and the callback's arguments (``views=None``: ``["hflip"]``)."""
    return TTAConfig(views=["hflip"] if views is None else views, crop_size=crop_size, scales=scales,  # type: ignore[arg-type]
                     translate=translate, padding_mode=padding_mode, stochastic_passes=stochastic_passes,
                     merge=merge, task=task, max_batch=max_batch)
