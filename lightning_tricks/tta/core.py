"""The functional core of test-time augmentation: views of a batch, one batched forward, the merge."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.core.seeding import seeded_global_rng
from lightning_tricks.core.stochastic import stochastic_eval
from lightning_tricks.core.task import Task, TaskNotSupportedError, aligned_with_inputs, infer_task
from lightning_tricks.core.validation import InvalidArgumentError, check_choice
from lightning_tricks.tta.config import MERGE_MODES, TASKS, TTAConfig, View, check_dense_views


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


def _task_of(task: str | Task, outputs: Tensor) -> Task:
    """A :class:`Task` for ``merge_predictions``'s ``task`` argument (a kind name means logits)."""
    if isinstance(task, Task):
        return task
    check_choice("task", task, TASKS)
    if task == "regression":
        return Task("regression", "values")
    classes = int(outputs.shape[2]) if outputs.ndim > 2 else 1
    return Task(task, "logits", classes, max(outputs.ndim - 3, 0), sigmoid=task == "multilabel")


def _merge_log_probs(logp: Tensor, merge: str, coverage: Tensor | None) -> Tensor:
    """Merge ``(K, batch, classes, ...)`` log-probabilities over the views (dim 0) into ``(batch, classes, ...)``.

    ``coverage`` (bool, broadcastable to ``logp`` with a class dimension of 1) marks where a view has a
    prediction; each position is merged over the views that cover it.
    """
    num_views = logp.shape[0]
    if coverage is None:
        count: Tensor | float = float(num_views)
        covered = logp
        mean = torch.logsumexp(logp, dim=0) - math.log(num_views)
    else:
        count = coverage.sum(dim=0).to(logp.dtype)
        covered = logp.masked_fill(~coverage, -math.inf)
        mean = torch.logsumexp(covered, dim=0) - count.log()
    if merge == "mean":
        return mean
    if merge == "gmean":
        total = logp.sum(dim=0) if coverage is None else logp.masked_fill(~coverage, 0.0).sum(dim=0)
        return (total / count).log_softmax(dim=1)
    if merge == "max":
        return covered.amax(dim=0).log_softmax(dim=1)
    votes = F.one_hot(logp.argmax(dim=2), logp.shape[2]).movedim(-1, 2).to(logp.dtype)
    votes = votes.sum(dim=0) if coverage is None else (votes * coverage).sum(dim=0)
    return torch.logaddexp(votes.log(), mean) - torch.log1p(torch.as_tensor(count, dtype=logp.dtype))


def merge_predictions(outputs: Tensor, merge: str = "mean", task: str | Task = "classification",
                      coverage: Tensor | None = None) -> Tensor:
    """Merge K predictions per input, ``outputs`` shaped ``(K, batch, ...)``, into one per input.

    Classification outputs are ``(K, batch, classes)`` logits (or log-probabilities), and the result is the
    log-probability of the merged distribution (so ``F.cross_entropy``, ``F.nll_loss``, ``argmax`` and
    ``softmax`` keep working); a :class:`~lightning_tricks.core.task.Task` whose form is ``probs`` (a forward
    ending in softmax) gets the merged probabilities back:

    * ``mean``: \\(\\log \\frac1K \\sum_k p_k\\), computed as ``logsumexp(log_softmax) - log K``;
    * ``gmean``: \\(\\operatorname{log\\_softmax}(\\frac1K \\sum_k \\log p_k)\\), the renormalized geometric
      mean, finite for any finite logits (a product of logits, as ttach computes it, is NaN for
      negative ones);
    * ``max``: \\(\\operatorname{log\\_softmax}(\\max_k \\log p_k)\\), the per-class maximum probability, renormalized;
    * ``vote``: \\(\\log \\frac{n_c + \\bar p_c}{K + 1}\\) with \\(n_c\\) the number of views whose top class is
      \\(c\\) and \\(\\bar p\\) the mean probability: its argmax is the majority class, ties broken by the
      mean probability, then by the lowest class index; it stays finite for classes without votes.

    Other tasks:

    * ``multilabel`` (``(K, batch, labels)`` logits): each label is a two-class problem (sigmoid
      probabilities); the modes above merge them per label and the result is the logit of the merged
      probability, ``log p - log(1 - p)`` (so ``BCEWithLogits``, ``sigmoid`` and ``> 0`` thresholds keep
      working); ``mean`` is the mean of the sigmoid probabilities, ``gmean`` the mean of the logits;
    * ``dense`` (``(K, batch, classes, *spatial)``): the same per position, over the class dimension;
      ``coverage`` (bool, broadcastable to ``outputs`` with a class dimension of 1) restricts each
      position to the views that predicted it (crops pasted back);
    * ``regression``: the mean of the raw outputs (over the covering views).

    With ``K = 1`` (and no ``coverage``) the single output is returned unchanged.

    Examples:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # 2 views, 1 input, 2 classes
        >>> merge_predictions(logits).exp()
        tensor([[0.5000, 0.5000]])
        >>> merge_predictions(torch.tensor([[[2.0]], [[-2.0]]]), task="multilabel")  # mean sigmoid 0.5: logit 0
        tensor([[0.]])
    """
    check_choice("merge", merge, MERGE_MODES)
    if outputs.ndim < 2:
        raise ValueError(f"outputs of shape {tuple(outputs.shape)} are invalid: expected (views, batch, ...).")
    task = _task_of(task, outputs)
    num_views = outputs.shape[0]
    if coverage is not None and not coverage.all():
        if not bool(coverage.any(dim=0).all()):
            raise ValueError("coverage leaves positions without any view: every position needs one prediction.")
    else:
        coverage = None
    if task.kind == "regression":
        if coverage is None:
            return outputs[0] if num_views == 1 else outputs.mean(dim=0)
        weight = coverage.to(outputs.dtype)
        return (outputs * weight).sum(dim=0) / weight.sum(dim=0)
    if not task.sigmoid and (outputs.ndim != 3 if task.kind == "classification" else outputs.ndim < 4):
        expected = "(batch, classes) logits" if task.kind == "classification" else "(batch, classes, *spatial) maps"
        raise ValueError(f"{task.kind} outputs of shape {tuple(outputs.shape[1:])} per view are invalid: expected "
                         f"{expected}. Use task='dense' for per-pixel class maps, task='regression' to average raw "
                         "outputs of other shapes.")
    if num_views == 1 and coverage is None:
        return outputs[0]
    work = outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()
    if task.sigmoid:  # each label (pixel) a two-class problem: [log(1 - p), log p] along a new dim 2
        if task.form == "probs":
            p = work.clamp(0.0, 1.0)
            logp = torch.stack((torch.log1p(-p), p.log()), dim=2)
        elif task.form == "log_probs":
            logp = torch.stack((torch.log(-torch.expm1(work.clamp_max(0.0))), work), dim=2)
        else:
            logp = torch.stack((F.logsigmoid(-work), F.logsigmoid(work)), dim=2)
        merged = _merge_log_probs(logp, merge, None if coverage is None else coverage.unsqueeze(2))
        if task.form == "probs":
            return merged[:, 1].exp()
        return merged[:, 1] if task.form == "log_probs" else merged[:, 1] - merged[:, 0]
    logp = work.clamp_min(0.0).log() if task.form == "probs" else work.log_softmax(dim=2)
    merged = _merge_log_probs(logp, merge, coverage)
    return merged.exp() if task.form == "probs" else merged


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


TaskSource = Task | Callable[[Tensor], Task] | None
"""What :func:`tta_forward` is told of the task: a :class:`Task`, a function of the first view's output that
returns it (the callback's, which also reads the batch's targets), or None (read from that output)."""


def _resolve_task(task: TaskSource, output: Tensor, config: TTAConfig) -> Task:
    if isinstance(task, Task):
        return task
    if task is not None:
        return task(output)
    return infer_task(output, None, config.task)


def _window_shape(view: View, height: int, width: int, config: TTAConfig) -> tuple[int, int]:
    """Spatial size of the view's input."""
    if view.crop is not None:
        return config.crop_size, config.crop_size  # type: ignore[return-value]
    return _scaled_size(height, width, view.scale)


def _refuse(view: View, why: str) -> TaskNotSupportedError:
    return TaskNotSupportedError(f"TestTimeAugmentation cannot map the view {view.name} back onto the input's grid: "
                                 f"{why}")


def _map_back(out: Tensor, view: View, config: TTAConfig, x: Tensor, spatial: int) -> tuple[Tensor, Tensor | None]:
    """One view's map output on the input's grid (flips undone, shift moved back, crop pasted back, scale
    resized back), and where it has a prediction (None: everywhere)."""
    height, width = x.shape[-2:]
    if view.vflip and spatial < 2:
        raise _refuse(view, f"vflip moved dim -2 of the input, which is not a spatial dim of the {tuple(out.shape)} "
                            "output; use hflip.")
    if view.hflip:
        out = out.flip(-1)
    if view.vflip:
        out = out.flip(-2)
    if view.scale is None and view.crop is None and view.shift in (None, (0, 0)):
        return out, None
    view_size = _window_shape(view, height, width, config)
    if spatial < 2 or tuple(out.shape[-2:]) != view_size:
        raise _refuse(view, f"its output's spatial size {tuple(out.shape[-2:])} is not the view's {view_size}; use "
                            "flip views only, or return maps at the input's resolution.")
    if view.scale is not None:
        planes = out.reshape(-1, 1, *view_size)
        planes = planes if planes.dtype in (torch.float32, torch.float64) else planes.float()
        resized = F.interpolate(planes, size=(height, width), mode="bilinear", align_corners=False)
        return resized.to(out.dtype).reshape(*out.shape[:-2], height, width), None
    if view.crop is not None:
        top, left, h, w = _window(view, height, width, config.crop_size, 0)
        canvas = out.new_zeros(*out.shape[:-2], height, width)
        canvas[..., top:top + h, left:left + w] = out
        covered = torch.zeros(height, width, dtype=torch.bool, device=out.device)
        covered[top:top + h, left:left + w] = True
        return canvas, covered
    t, (dy, dx) = config.translate, view.shift  # type: ignore[misc]
    planes = F.pad(out.reshape(-1, 1, height, width), (t, t, t, t))
    moved = planes[..., t + dy:t + dy + height, t + dx:t + dx + width].reshape(out.shape)
    covered = torch.zeros(height + 2 * t, width + 2 * t, dtype=torch.bool, device=out.device)
    covered[t:t + height, t:t + width] = True
    return moved, covered[t + dy:t + dy + height, t + dx:t + dx + width]


def _align(per_view: list[tuple[View, Tensor]], x: Tensor, config: TTAConfig, task: Task
           ) -> tuple[Tensor, Tensor | None]:
    """The views' outputs stacked ``(K, batch, ...)``, maps moved back onto the input's grid, and their coverage."""
    first = per_view[0][1]
    if task.kind == "dense":
        spatial = task.spatial_ndim
    elif task.kind == "regression" and x.ndim >= 3 and aligned_with_inputs(first, x):
        spatial = min(x.ndim - 2, first.ndim - 1)  # a map on the input's grid (depth, denoising): moved back too
    else:
        return torch.stack([out for _, out in per_view]), None
    if any(view.crop is not None or view.shift not in (None, (0, 0)) or view.scale is not None for view, _ in per_view):
        check_dense_views(config.views, config.crop_size, config.scales)
    mapped = [_map_back(out, view, config, x, spatial) for view, out in per_view]
    stacked = torch.stack([out for out, _ in mapped])
    if all(covered is None for _, covered in mapped):
        return stacked, None
    shape = (stacked.shape[0], *([1] * (stacked.ndim - 3)), *x.shape[-2:])
    coverage = torch.stack([torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device) if covered is None
                            else covered for _, covered in mapped]).reshape(shape)
    if not bool(coverage.any(dim=0).all()):
        raise TaskNotSupportedError(f"TestTimeAugmentation's crops of {config.crop_size} pixels leave parts of the "
                                    f"{tuple(x.shape[-2:])} input without a prediction for the dense output; use "
                                    f"crop_size >= half the image side (five_crop covers it then), or flips/translate.")
    return stacked, coverage


def tta_forward(forward: Callable[[Tensor], Any], x: Tensor, config: TTAConfig, *, seed: int | None = None,
                stochastic_module: nn.Module | None = None, task: TaskSource = None) -> Tensor:
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
        task: the task (see :data:`TaskSource`); None reads it from the first view's output with
            ``config.task`` as the override. Dense outputs (and regression maps on the input's grid) are
            mapped back onto the input's grid before the merge: flips undone, shifts moved back, crops
            pasted back (each pixel merged over the crops that cover it), scales resized back (bilinear).

    Returns:
        The merged prediction (see :func:`merge_predictions`): ``(B, classes)`` log-probabilities for
        classification with ``K > 1``, logits of the merged probabilities for multi-label outputs.

    Raises:
        TaskNotSupportedError: dense outputs with views that cannot be mapped back.

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
        per_view: list[tuple[View, Tensor]] = []
        for group in groups.values():
            out = _run_views(forward, x, group, config)
            per_view += zip(group, out.reshape(len(group), x.shape[0], *out.shape[1:]), strict=True)
        resolved = _resolve_task(task, per_view[0][1], config)
        if resolved.kind == "regression" and config.merge != "mean":
            raise TaskNotSupportedError(f"TestTimeAugmentation's merge={config.merge!r} needs class scores, but the "
                                        f"model is {resolved.describe()}; use merge='mean' (the outputs are averaged).")
        stacked, coverage = _align(per_view, x, config, resolved)
        merged = merge_predictions(stacked, config.merge, resolved, coverage)
    if merged.is_inference() and not torch.is_inference_mode_enabled():
        merged = merged.clone()  # a normal tensor, so the caller may modify it in place
    return merged
