"""Test-time augmentation around any model, without Lightning: :class:`TTAWrapper`."""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from lightning_tricks.core.layout import model_layout
from lightning_tricks.core.stochastic import STOCHASTIC_EVAL_ATTR, stochastic_modules
from lightning_tricks.core.task import Task, infer_task
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.tta.config import tta_config
from lightning_tricks.tta.core import tta_forward
from lightning_tricks.tta.sequence import sequence_tta_forward


def _has_randomness(model: nn.Module) -> bool:
    """Whether ``stochastic_eval`` would make ``model`` random: an opted-in module or dropout with p > 0."""
    return any(hasattr(m, STOCHASTIC_EVAL_ATTR) or getattr(m, "p", 1.0) > 0 for m in stochastic_modules(model))


def _no_stochastic_layers(passes: int, target: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"`stochastic_passes`={passes} is invalid for {target}: it has no stochastic layer (torch.nn dropout with p > 0, or a "
        "module with the `lt_stochastic_eval` attribute, see lightning_tricks.core.stochastic). Add one, or set "
        "stochastic_passes=1."
    )


class TTAWrapper(nn.Module):
    """Any model with test-time augmentation: ``TTAWrapper(model, views=["hflip"])(x)``, no Lightning needed.

    The wrapped model is the submodule ``model`` (its parameters appear as ``model.*`` in this
    module's ``state_dict``). Arguments are those of :class:`TTAConfig`, plus ``seed``.

    Args:
        model: the model, returning ``(batch, classes)`` scores, ``(batch, classes, *spatial)`` maps, or
            anything ``(batch, ...)`` for ``task="regression"``.
        views: view families (default ``["hflip"]``).
        crop_size: see :class:`TTAConfig`.
        scales: see :class:`TTAConfig`.
        translate: see :class:`TTAConfig`.
        padding_mode: see :class:`TTAConfig`.
        stochastic_passes: see :class:`TTAConfig`.
        merge: see :class:`TTAConfig`.
        task: see :class:`TTAConfig`. The wrapper sees no targets: with ``task=None`` it reads the task from
            the first output alone (``(batch, classes)`` is single-label classification), so pass
            ``task="multilabel"`` for a multi-label model.
        max_batch: see :class:`TTAConfig`.
        seed: seed of the stochastic passes (each call draws the same randomness; torch's global
            generators are seeded inside a fork and left as they were). ``None`` draws from the global
            generators, which follow the run's seed: a plain module has no fit whose seed it could fix.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        >>> tta = TTAWrapper(model, views=["hflip", "five_crop"], crop_size=28, max_batch=256)
        >>> log_probs = tta(torch.randn(4, 3, 32, 32))  # 10 views per image, as one batch of 40 rows
        >>> torch.allclose(log_probs.exp().sum(dim=1), torch.ones(4))
        True
    """

    def __init__(self, model: nn.Module, views: Sequence[str] | None = None, crop_size: int | None = None,
                 scales: Sequence[int] | None = None, translate: int = 2, padding_mode: str = "replicate",
                 stochastic_passes: int = 1, merge: str = "mean", task: str | None = None,
                 max_batch: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.config = tta_config(views, crop_size, scales, translate, padding_mode, stochastic_passes, merge, task,
                              max_batch)
        if stochastic_passes > 1 and not _has_randomness(model):
            raise _no_stochastic_layers(stochastic_passes, f"the model {type(model).__name__}")
        self.model = model
        self.seed = seed
        self.task: Task | None = None  # read from the first output merged (the wrapper sees no targets)
        self._views_given = views is not None  # on sequences the default 'hflip' (a reversal) is refused

    def _read_task(self, output: Tensor) -> Task:
        if self.task is None:
            self.task = infer_task(output, None, self.config.task)
        return self.task

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim in (2, 3) and model_layout(self.model) == "sequence":
            return sequence_tta_forward(self.model, x, self.config, seed=self.seed, views_given=self._views_given,
                                        stochastic_module=self.model, task=self._read_task)
        return tta_forward(self.model, x, self.config, seed=self.seed, stochastic_module=self.model,
                           task=self._read_task)
