"""The functional core of test-time augmentation: views of a batch, one batched forward, the merge."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks._seeding import seeded_global_rng
from lightning_tricks._validation import InvalidArgumentError, check_choice
from lightning_tricks.stochastic import stochastic_eval
from lightning_tricks.tta.config import MERGE_MODES, TASKS, TTAConfig, View


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
        raise InvalidArgumentError(f"views {list(config.views)} need image batches shaped (batch, ..., height, width); "
                                   f"got shape {tuple(x.shape)}. Non-image inputs support views=['identity'] with "
                                   "stochastic_passes.")
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
                stack.enter_context(seeded_global_rng(seed, x.device))
        outputs = [_run_views(forward, x, group, config) for group in groups.values()]
        stacked = torch.cat([o.reshape(-1, x.shape[0], *o.shape[1:]) for o in outputs])
        merged = merge_predictions(stacked, config.merge, config.task)
    if merged.is_inference() and not torch.is_inference_mode_enabled():
        merged = merged.clone()  # a normal tensor, so the caller may modify it in place
    return merged
