"""Test-time augmentation: average the model's predictions over a fixed set of views of each input.

The lectures' "average a fixed set of crops at test time": AlexNet averages 5 crops and their flips,
ResNet resizes to several scales and takes 10 crops at each, and stochastic layers (dropout,
fractional pooling) "average out the randomness" over several passes.

Three layers:

* the functional core: :class:`TTAConfig` (a validated, YAML-friendly description of the views),
  :func:`apply_view`, :func:`merge_predictions` and :func:`tta_forward`, which runs all views of a
  batch that share a shape through the model as one batch of ``B * K`` rows (chunked by
  ``max_batch``), under ``torch.inference_mode`` when autograd is off;
* :class:`TTAWrapper`, a plain ``nn.Module`` around any model (no Lightning needed);
* :class:`TestTimeAugmentation`, the Lightning callback: during ``test`` and ``predict`` (and
  optionally ``validate``) it replaces the LightningModule's ``forward`` by the TTA forward, so the
  user's unmodified ``test_step`` (``logits = self(x)``) and metrics see merged predictions; the
  original ``forward`` is put back at the end of the stage, also when the stage raises.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_tricks._validation import ConfigError, InvalidArgumentError, check_choice, check_int
from lightning_tricks.distributed import derive_seed
from lightning_tricks.evaluation import _check_stages, install_exact_evaluation, uninstall_exact_evaluation
from lightning_tricks.stochastic import STOCHASTIC_EVAL_ATTR, stochastic_eval, stochastic_modules

VIEW_FAMILIES = ("identity", "hflip", "vflip", "center_crop", "five_crop", "ten_crop", "translate")
"""View families; the view set is their cartesian product (e.g. ``["hflip", "five_crop"]`` = ten-crop)."""
CROP_FAMILIES = ("center_crop", "five_crop", "ten_crop")
CROP_ANCHORS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
MERGE_MODES = ("mean", "gmean", "max", "vote")
TASKS = ("classification", "regression")
PADDING_MODES = ("replicate", "reflect", "zeros")
TTA_STAGES = ("validate", "test", "predict")
_STAGE_IDS = {"validate": 0, "test": 1, "predict": 2}


class ForwardNotCalledError(ConfigError, RuntimeError):
    """The step of the evaluated stage never called the wrapped ``forward``, so TTA could not act."""


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


def _check_views(views: Sequence[str]) -> list[str]:
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
    return chosen


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
        task: ``classification`` (outputs are ``(batch, classes)`` logits) or ``regression`` (raw
            outputs of any shape, averaged).
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
    task: str = "classification"
    max_batch: int | None = None
    expanded: tuple[View, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        views = _check_views(self.views)
        object.__setattr__(self, "views", tuple(views))
        if self.crop_size is not None:
            check_int("crop_size", self.crop_size, 1)
        if self.scales is not None:
            scales = self.scales
            if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or not scales or any(
                    isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in scales):
                raise InvalidArgumentError(f"`scales`={scales!r} is invalid: expected a non-empty list of sizes > 0.")
            object.__setattr__(self, "scales", tuple(scales))
        check_int("translate", self.translate, 1)
        check_choice("padding_mode", self.padding_mode, PADDING_MODES)
        check_int("stochastic_passes", self.stochastic_passes, 1)
        check_choice("merge", self.merge, MERGE_MODES)
        check_choice("task", self.task, TASKS)
        if self.task == "regression" and self.merge != "mean":
            raise InvalidArgumentError(f"`merge`={self.merge!r} is invalid with task='regression': expected 'mean' "
                                       "(regression outputs are averaged).")
        if self.max_batch is not None:
            check_int("max_batch", self.max_batch, 1)
        crops = [v for v in views if v in CROP_FAMILIES]
        if crops and self.crop_size is None:
            raise InvalidArgumentError(f"`crop_size`=None is invalid with views {crops[0]!r}: expected the crop side in pixels.")
        if self.crop_size is not None and not crops and self.scales is None:
            raise InvalidArgumentError(f"`crop_size`={self.crop_size!r} is invalid: no view crops (add 'center_crop', "
                                       "'five_crop' or 'ten_crop' to views, or give scales to center-crop).")
        if self.crop_size is not None and self.scales is not None and self.crop_size > min(self.scales):
            raise InvalidArgumentError(f"`crop_size`={self.crop_size!r} is invalid: it is larger than the image at "
                                       f"scale {min(self.scales)}; expected crop_size <= {min(self.scales)}.")
        object.__setattr__(self, "expanded", tuple(self._expand(views)))

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


def _scaled_size(height: int, width: int, scale: int | None) -> tuple[int, int]:
    """torchvision's ``resize(x, [scale])`` output size: shorter side ``scale``, aspect ratio kept."""
    if scale is None:
        return height, width
    if width <= height:
        return int(scale * height / width), scale
    return scale, int(scale * width / height)


def _window(view: View, height: int, width: int, crop_size: int | None, pad: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the view's window in the resized and padded image."""
    if view.crop is not None:
        assert crop_size is not None
        c = crop_size
        top = {"top": 0, "bottom": height - c}.get(view.crop.split("_")[0], int(round((height - c) / 2.0)))
        left = {"left": 0, "right": width - c}.get(view.crop.split("_")[-1], int(round((width - c) / 2.0)))
        return top, left, c, c
    if view.shift is not None:
        dy, dx = view.shift
        return pad - dy, pad - dx, height, width
    return 0, 0, height, width


def _check_input(x: Any, config: TTAConfig) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"test-time augmentation needs forward's first argument to be a tensor batch; got "
                        f"{type(x).__name__}. If the step passes a whole batch (e.g. [x, y]) to forward, pass x only.")
    if all(v.is_identity for v in config.expanded):
        return
    if x.ndim < 3:
        raise ValueError(f"views {list(config.views)} need image batches shaped (batch, ..., height, width); got "
                         f"shape {tuple(x.shape)}. Non-image inputs support views=['identity'] with stochastic_passes.")
    height, width = x.shape[-2:]
    for scale in config.scales or (None,):
        h, w = _scaled_size(height, width, scale)
        if config.crop_size is not None and config.crop_size > min(h, w):
            where = f" after scaling to {scale}" if scale is not None else ""
            raise InvalidArgumentError(f"`crop_size`={config.crop_size} is invalid for images of {h}x{w}{where}: "
                                       f"expected crop_size <= {min(h, w)}.")
        if "translate" in config.views and config.translate >= min(h, w):
            raise InvalidArgumentError(f"`translate`={config.translate} is invalid for images of {h}x{w}: expected a "
                                       f"shift smaller than {min(h, w)} pixels.")


def _base(x: Tensor, scale: int | None, pad: int, padding_mode: str) -> Tensor:
    if scale is not None:
        from torchvision.transforms.v2.functional import resize

        x = resize(x, [scale], antialias=True)
    if pad:
        mode = "constant" if padding_mode == "zeros" else padding_mode
        planes = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (pad, pad, pad, pad), mode=mode)  # any leading dims
        x = planes.reshape(*x.shape[:-2], *planes.shape[-2:])
    return x


def apply_view(x: Tensor, view: View, config: TTAConfig) -> Tensor:
    """The view of a batch ``x`` (``(batch, ..., height, width)``): resize, window, flips.

    Examples:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> apply_view(x, View(hflip=True), TTAConfig()).flatten()[:4].tolist()
        [3.0, 2.0, 1.0, 0.0]
    """
    pad = config.translate if view.shift is not None else 0
    return _cut(_base(x, view.scale, pad, config.padding_mode), view, config, pad)


def _cut(base: Tensor, view: View, config: TTAConfig, pad: int) -> Tensor:
    height, width = base.shape[-2] - 2 * pad, base.shape[-1] - 2 * pad
    top, left, h, w = _window(view, height, width, config.crop_size, pad)
    out = base[..., top:top + h, left:left + w]
    if view.hflip:
        out = out.flip(-1)
    if view.vflip:
        out = out.flip(-2)
    return out


def merge_predictions(outputs: Tensor, merge: str = "mean", task: str = "classification") -> Tensor:
    """Merge K predictions per input, ``outputs`` shaped ``(K, batch, ...)``, into one per input.

    Classification outputs are ``(K, batch, classes)`` logits, and the result is the log-probability
    of the merged distribution (so ``F.cross_entropy``, ``argmax`` and ``softmax`` keep working):

    * ``mean``: \\(\\log \\frac1K \\sum_k p_k\\), computed as ``logsumexp(log_softmax) - log K``;
    * ``gmean``: \\(\\operatorname{log\\_softmax}(\\frac1K \\sum_k \\log p_k)\\), the renormalized geometric
      mean, finite for any finite logits (a product of logits, as ttach computes it, is NaN for
      negative ones);
    * ``max``: \\(\\operatorname{log\\_softmax}(\\max_k \\log p_k)\\), the per-class maximum probability, renormalized;
    * ``vote``: \\(\\log \\frac{n_c + \\bar p_c}{K + 1}\\) with \\(n_c\\) the number of views whose top class is
      \\(c\\) and \\(\\bar p\\) the mean probability: its argmax is the majority class, ties broken by the
      mean probability, then by the lowest class index; it stays finite for classes without votes.

    With ``K = 1`` the single output is returned unchanged. ``task="regression"`` averages raw outputs.

    Examples:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # 2 views, 1 input, 2 classes
        >>> merge_predictions(logits).exp()
        tensor([[0.5000, 0.5000]])
    """
    check_choice("merge", merge, MERGE_MODES)
    check_choice("task", task, TASKS)
    if outputs.ndim < 2:
        raise ValueError(f"outputs of shape {tuple(outputs.shape)} are invalid: expected (views, batch, ...).")
    num_views = outputs.shape[0]
    if task == "regression":
        return outputs[0] if num_views == 1 else outputs.mean(dim=0)
    if outputs.ndim != 3:
        raise ValueError(f"classification outputs of shape {tuple(outputs.shape[1:])} per view are invalid: expected "
                         "(batch, classes) logits. Use task='regression' to average raw outputs of other shapes.")
    if num_views == 1:
        return outputs[0]
    logp = (outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()).log_softmax(dim=-1)
    log_k = math.log(num_views)
    if merge == "mean":
        return torch.logsumexp(logp, dim=0) - log_k
    if merge == "gmean":
        return logp.mean(dim=0).log_softmax(dim=-1)
    if merge == "max":
        return logp.amax(dim=0).log_softmax(dim=-1)
    votes = F.one_hot(logp.argmax(dim=-1), logp.shape[-1]).sum(dim=0).to(logp.dtype)
    return torch.logaddexp(votes.log(), torch.logsumexp(logp, dim=0) - log_k) - math.log(num_views + 1)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from generators seeded with ``seed`` inside the block; the global RNG state is restored after."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _run_views(forward: Callable[[Tensor], Any], x: Tensor, views: Sequence[View], config: TTAConfig) -> Tensor:
    """Outputs of ``views`` (same output shape) on ``x``, shaped ``(len(views) * batch, ...)``, view-major."""
    batch = x.shape[0]
    rows = len(views) * batch
    step = rows if config.max_batch is None else config.max_batch
    bases: dict[tuple[int | None, int, int, int], Tensor] = {}
    outputs = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        pieces, r = [], r0
        while r < r1:
            v, b0 = divmod(r, batch)
            b1 = min(batch, b0 + (r1 - r))
            view = views[v]
            pad = config.translate if view.shift is not None else 0
            key = (view.scale, pad, b0, b1)
            if key not in bases:
                bases.clear()  # views are scale-major: one resized (or padded) slice is live at a time
                bases[key] = _base(x[b0:b1], view.scale, pad, config.padding_mode)
            pieces.append(_cut(bases[key], view, config, pad))
            r += b1 - b0
        chunk = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        out = forward(chunk)
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != chunk.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"test-time augmentation needs forward to return one tensor with a row per input; for "
                            f"{chunk.shape[0]} inputs it returned {shape}.")
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def tta_forward(forward: Callable[[Tensor], Any], x: Tensor, config: TTAConfig, *, seed: int | None = None,
                stochastic_module: nn.Module | None = None) -> Tensor:
    """Evaluate ``forward`` on every view of ``x`` and merge: the functional core of test-time augmentation.

    Views of the same shape go through ``forward`` together, as one batch of ``K * B`` rows (or
    chunks of at most ``config.max_batch`` rows); views of different shapes (several scales without
    crops) in one batch per shape. When autograd is off the work runs under
    ``torch.inference_mode``. With one identity view and no chunking it is exactly ``forward(x)``.

    Args:
        forward: the model (or its original ``forward``), called on view batches.
        x: a batch, ``(B, C, H, W)`` for spatial views (any ``(B, ...)`` for identity views).
        config: the views and the merge.
        seed: with ``stochastic_passes > 1``, seed the draws (the global RNG state is restored after);
            None draws from the global generators.
        stochastic_module: the module whose stochastic layers are made active for the passes
            (required when ``stochastic_passes > 1``).

    Returns:
        The merged prediction, ``(B, classes)`` log-probabilities for classification with ``K > 1``.

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> tta_forward(model, torch.randn(2, 1, 4, 4), TTAConfig(views=["hflip"])).shape
        torch.Size([2, 3])
    """
    _check_input(x, config)
    views = config.expanded
    if len(views) == 1 and views[0].is_identity and (config.max_batch is None or x.shape[0] <= config.max_batch):
        return forward(x)
    stochastic = config.stochastic_passes > 1
    if stochastic and stochastic_module is None:
        raise ValueError("stochastic_passes > 1 needs `stochastic_module`: the model whose stochastic layers to activate.")
    height, width = x.shape[-2:] if x.ndim >= 3 else (0, 0)
    groups: dict[tuple[int, int], list[View]] = {}
    for view in views:
        if view.crop is not None:
            shape = (config.crop_size, config.crop_size)
        else:
            shape = _scaled_size(height, width, view.scale)
        groups.setdefault(shape, []).append(view)  # type: ignore[arg-type]
    no_grad = not torch.is_grad_enabled()
    with contextlib.ExitStack() as stack:
        if no_grad:
            stack.enter_context(torch.inference_mode())
        if stochastic:
            stack.enter_context(stochastic_eval(stochastic_module))  # type: ignore[arg-type]
            if seed is not None:
                stack.enter_context(_seeded(seed, x.device))
        outputs = [_run_views(forward, x, group, config) for group in groups.values()]
        stacked = torch.cat([o.reshape(-1, x.shape[0], *o.shape[1:]) for o in outputs])
        merged = merge_predictions(stacked, config.merge, config.task)
    if merged.is_inference() and not torch.is_inference_mode_enabled():
        merged = merged.clone()  # a normal tensor, so the caller may modify it in place
    return merged


def _config(views: Sequence[str] | None, crop_size: int | None, scales: Sequence[int] | None, translate: int,
            padding_mode: str, stochastic_passes: int, merge: str, task: str, max_batch: int | None) -> TTAConfig:
    views = _check_views(["hflip"] if views is None else views)  # before the tuple conversion: errors quote the input
    return TTAConfig(views=tuple(views), crop_size=crop_size, scales=scales,  # type: ignore[arg-type]
                     translate=translate, padding_mode=padding_mode, stochastic_passes=stochastic_passes,
                     merge=merge, task=task, max_batch=max_batch)


def _has_randomness(model: nn.Module) -> bool:
    """Whether ``stochastic_eval`` would make ``model`` random: an opted-in module or dropout with p > 0."""
    return any(hasattr(m, STOCHASTIC_EVAL_ATTR) or getattr(m, "p", 1.0) > 0 for m in stochastic_modules(model))


def _no_stochastic_layers(passes: int, target: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"`stochastic_passes`={passes} is invalid for {target}: it has no stochastic layer (torch.nn dropout with p > 0, or a "
        "module with the `lt_stochastic_eval` attribute, see lightning_tricks.stochastic). Add one, or set "
        "stochastic_passes=1."
    )


class TTAWrapper(nn.Module):
    """Any model with test-time augmentation: ``TTAWrapper(model, views=["hflip"])(x)``, no Lightning needed.

    The wrapped model is the submodule ``model`` (its parameters appear as ``model.*`` in this
    module's ``state_dict``). Arguments are those of :class:`TTAConfig`, plus ``seed``.

    Args:
        model: the model, returning ``(batch, classes)`` logits (or any ``(batch, ...)`` for
            ``task="regression"``).
        views: view families (default ``["hflip"]``).
        crop_size: see :class:`TTAConfig`.
        scales: see :class:`TTAConfig`.
        translate: see :class:`TTAConfig`.
        padding_mode: see :class:`TTAConfig`.
        stochastic_passes: see :class:`TTAConfig`.
        merge: see :class:`TTAConfig`.
        task: see :class:`TTAConfig`.
        max_batch: see :class:`TTAConfig`.
        seed: seed of the stochastic passes (each call draws the same randomness; ``None`` uses the
            global generators).

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        >>> tta = TTAWrapper(model, views=["hflip", "five_crop"], crop_size=28, max_batch=256)
        >>> log_probs = tta(torch.randn(4, 3, 32, 32))  # 10 views per image, as one batch of 40 rows
        >>> torch.allclose(log_probs.exp().sum(dim=1), torch.ones(4))
        True
    """

    def __init__(self, model: nn.Module, views: Sequence[str] | None = None, crop_size: int | None = None,
                 scales: Sequence[int] | None = None, translate: int = 2, padding_mode: str = "replicate",
                 stochastic_passes: int = 1, merge: str = "mean", task: str = "classification",
                 max_batch: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.config = _config(views, crop_size, scales, translate, padding_mode, stochastic_passes, merge, task,
                              max_batch)
        if stochastic_passes > 1 and not _has_randomness(model):
            raise _no_stochastic_layers(stochastic_passes, f"the model {type(model).__name__}")
        self.model = model
        self.seed = seed

    def forward(self, x: Tensor) -> Tensor:
        return tta_forward(self.model, x, self.config, seed=self.seed, stochastic_module=self.model)


class TestTimeAugmentation(Callback):
    """Test-time augmentation for an unmodified LightningModule: its ``self(x)`` returns merged predictions.

    During the chosen stages the callback replaces ``forward`` of the LightningModule (or of its
    submodule ``module``) by :func:`tta_forward` around the original, so ``test_step`` and
    ``predict_step`` written as ``logits = self(x)`` get the merged prediction (log-probabilities of
    the merged distribution), and the user's loss and metrics report TTA figures. The original
    ``forward`` is restored when the stage ends, when it raises, and at teardown; nothing is added to
    the model's ``state_dict``. If the step never calls the wrapped ``forward`` (e.g. it calls
    ``self.backbone(x)``), the first batch raises :class:`ForwardNotCalledError` naming ``module``.

    Under DDP, evaluation loaders of the TTA stages are made exact (every sample evaluated once, see
    :mod:`lightning_tricks.evaluation`), so test metrics equal the single-process values.

    Args:
        views: view families, combined as a cartesian product (default ``["hflip"]``); see
            :class:`TTAConfig`. Flips are label-preserving for natural images, not for digits or text.
        crop_size: side of the crops of ``center_crop``/``five_crop``/``ten_crop``.
        scales: shorter-side sizes for multi-scale testing.
        translate: shift in pixels of the ``translate`` views.
        padding_mode: border fill of shifted views (``replicate``, ``reflect``, ``zeros``).
        stochastic_passes: draws per view with dropout and ``lt_stochastic_eval`` modules active.
        merge: ``mean``, ``gmean``, ``max`` or ``vote``; see :func:`merge_predictions`.
        task: ``classification`` or ``regression`` (mean of raw outputs).
        max_batch: largest number of rows per model call (memory bound); ``None``: all views of a shape at once.
        stages: stages to augment, from ``validate`` (also fit's validation), ``test``, ``predict``
            (default ``["test", "predict"]``).
        module: dotted attribute path of the submodule whose ``forward`` to wrap (e.g. ``"model"``
            when the steps call ``self.model(x)``); ``None``: the LightningModule itself.
        exact_distributed: under DDP, evaluate every ``validate``/``test`` sample exactly once.
        seed: seed of the stochastic passes; draws depend on (seed, rank, stage, dataloader, batch index).

    Examples:
        >>> tta = TestTimeAugmentation(views=["hflip", "five_crop"], crop_size=28)
        >>> trainer = pl.Trainer(callbacks=[tta])  # doctest: +SKIP
        >>> trainer.test(model, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(self, views: list[str] | None = None, crop_size: int | None = None, scales: list[int] | None = None,
                 translate: int = 2, padding_mode: str = "replicate", stochastic_passes: int = 1, merge: str = "mean",
                 task: str = "classification", max_batch: int | None = None, stages: list[str] | None = None,
                 module: str | None = None, exact_distributed: bool = True, seed: int = 0) -> None:
        self.config = _config(views, crop_size, scales, translate, padding_mode, stochastic_passes, merge, task,
                              max_batch)
        self.stages = _check_stages("stages", stages, TTA_STAGES, ("test", "predict"))
        if module is not None and (not isinstance(module, str) or not all(p.isidentifier() for p in module.split("."))):
            raise InvalidArgumentError(f"`module`={module!r} is invalid: expected a dotted attribute path such as "
                                       "'model' or 'net.backbone', or None for the LightningModule.")
        check_int("seed", seed)
        self.module, self.exact_distributed, self.seed = module, exact_distributed, seed
        self._wrapped: tuple[nn.Module, Any, bool] | None = None
        self._stage: str | None = None
        self._batch = (0, 0)
        self._calls = 0
        self._batches = 0
        self._announced: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config, stages=self.stages, module=self.module)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target: Any = pl_module
        for part in (self.module or "").split(".") if self.module else ():
            if not isinstance(getattr(target, part, None), nn.Module):
                raise InvalidArgumentError(
                    f"`module`={self.module!r} is invalid for {type(pl_module).__name__}: it has no submodule at "
                    f"{part!r}. Submodules: {', '.join(n for n, _ in pl_module.named_children()) or 'none'}."
                )
            target = getattr(target, part)
        return target

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        if self.config.stochastic_passes > 1 and not _has_randomness(target):
            raise _no_stochastic_layers(self.config.stochastic_passes, f"{type(target).__name__} (`module`={self.module!r})")
        if self.config.num_views == 1:
            rank_zero_warn("TestTimeAugmentation has a single identity view: predictions are the plain model's.")
        if self.exact_distributed:
            install_exact_evaluation(trainer, self, self.stages)

    # -- forward wrapping -------------------------------------------------------------------------

    def _wrap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or self._wrapped is not None:
            return
        target = self._target(pl_module)
        had_own = "forward" in target.__dict__
        original = target.forward
        config, callback = self.config, self

        def forward_with_tta(*args: Any, **kwargs: Any) -> Tensor:
            callback._calls += 1
            if not args:
                raise TypeError("TestTimeAugmentation wraps forward(x, ...): call the model with the input batch as "
                                "its first positional argument.")
            x, rest = args[0], args[1:]
            batch = x.shape[0] if isinstance(x, Tensor) and x.ndim else None
            for value in (*rest, *kwargs.values()):
                if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch:
                    raise TypeError("TestTimeAugmentation augments forward's first argument only; forward also got a "
                                    f"tensor with {batch} rows, which the views would not match.")

            def call(v: Tensor) -> Any:
                return original(v, *rest, **kwargs)

            seed = None
            if config.stochastic_passes > 1:
                seed = derive_seed(callback.seed, trainer.global_rank, _STAGE_IDS[stage], *callback._batch)
            return tta_forward(call, x, config, seed=seed, stochastic_module=target)

        target.forward = forward_with_tta
        self._wrapped = (target, original, had_own)
        self._stage, self._calls, self._batches = stage, 0, 0
        if stage not in self._announced:
            self._announced.add(stage)
            where = f"{type(pl_module).__name__}.{self.module}" if self.module else type(pl_module).__name__
            rank_zero_info(f"TestTimeAugmentation: {stage} predictions of {where} average {config.describe()}.")

    def _unwrap(self) -> None:
        if self._wrapped is None:
            return
        target, original, had_own = self._wrapped
        if had_own:
            target.forward = original
        else:
            target.__dict__.pop("forward", None)
        self._wrapped, self._stage = None, None

    @property
    def active(self) -> bool:
        """Whether the model's forward is currently wrapped."""
        return self._wrapped is not None

    def _batch_start(self, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        if self._stage == stage:
            self._batch = (dataloader_idx, batch_idx)

    def _batch_end(self, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stage != stage:
            return
        self._batches += 1
        if self._batches == 1 and self._calls == 0:
            self._unwrap()
            hint = ("set `module` to the submodule the step calls (e.g. module='model')" if self.module is None
                    else "check `module`")
            raise ForwardNotCalledError(
                f"TestTimeAugmentation could not act: the first {stage} batch never called "
                f"{type(pl_module).__name__}{'.' + self.module if self.module else ''}.forward. The step must compute "
                f"its predictions with self(x) / self.forward(x); otherwise {hint}."
            )

    # -- hooks ------------------------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "predict")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start("validate", batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch_start("test", batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._batch_start("predict", batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(pl_module, "validate")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(pl_module, "test")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(pl_module, "predict")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap()
        uninstall_exact_evaluation(trainer, self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()
        uninstall_exact_evaluation(trainer, self)


__all__ = [
    "MERGE_MODES",
    "VIEW_FAMILIES",
    "ForwardNotCalledError",
    "TTAConfig",
    "TTAWrapper",
    "TestTimeAugmentation",
    "View",
    "apply_view",
    "merge_predictions",
    "tta_forward",
]
