"""Stochastic depth, the blocks: the argument validator, the drop probabilities, the block adapters and the
mixins that convert a residual block in place. Public names are re-exported from
:mod:`lightning_tricks.regularization.stochastic_depth`, whose docstring has the formulas.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.core.deprecation import register_renames, renamed_argument
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.selection import check_patterns
from lightning_tricks.core.surgery import SwappableMixin, original_class
from lightning_tricks.core.validation import (
    check_choice,
    check_int,
    check_optional_int,
    check_probability,
    check_range,
)

register_renames("StochasticDepth", {"drop_rate": "p", "blocks": "include"})

MODES = ("batch", "row")
RULES = ("linear", "uniform")
DEFAULT_WARMUP_FRACTION = 0.1
"""The drop-rate warm-up on by default: the first 10% of the training batches (chosen from
``benchmarks/stochastic_depth_effect.py``; docs/stochastic_depth.md)."""
SCALINGS = ("test", "train")
"""``train`` (default): inverted, a kept branch times ``1/(1-p)`` in training; ``test``: the paper's, the branch
times ``1 - p`` at test."""
Tensor = torch.Tensor


def check_stochastic_depth_args(p: float = 0.5, mode: str = "batch", rule: str = "linear",
                                scaling: str = "train", include: Sequence[str] | None = None,
                                warmup_steps: int | None = None, warmup_fraction: float = 0.0,
                                exclude: Sequence[str] | None = None, *, drop_rate: float | None = None,
                                blocks: Sequence[str] | None = None
                                ) -> tuple[float, list[str] | None, list[str] | None]:
    """The one validator of StochasticDepth's arguments (functional core and callback); returns
    ``(p, include, exclude)`` (``drop_rate`` and ``blocks`` are the deprecated names of ``p`` and ``include``)."""
    p = renamed_argument("StochasticDepth", "drop_rate", "p", drop_rate, p, 0.5)
    include = renamed_argument("StochasticDepth", "blocks", "include", blocks, include, None)
    check_probability("p", p, allow_one=False)
    check_choice("mode", mode, MODES)
    check_choice("rule", rule, RULES)
    check_choice("scaling", scaling, SCALINGS)
    check_optional_int("warmup_steps", warmup_steps, 0)
    check_range("warmup_fraction", warmup_fraction, 0.0, 1.0)
    return p, check_patterns("include", include), check_patterns("exclude", exclude, allow_empty=True)


def warmup_ramp(batches_seen: int, warmup_batches: int) -> float:
    """The drop-rate warm-up factor before training batch ``batches_seen`` (0-based): ``min(1, t / W)``; 1 when ``W = 0``.

    Examples:
        >>> [warmup_ramp(t, 4) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return 1.0 if warmup_batches <= 0 else min(1.0, batches_seen / warmup_batches)


def drop_probabilities(num_blocks: int, p: float = 0.5, rule: str = "linear", *,
                       drop_rate: float | None = None) -> list[float]:
    """Drop probability of each block: ``p * l / L`` for ``l = 1..L`` (``linear``) or ``p`` (``uniform``).

    ``drop_rate`` is the deprecated name of ``p``.

    Examples:
        >>> drop_probabilities(4, 0.5)
        [0.125, 0.25, 0.375, 0.5]
    """
    check_int("num_blocks", num_blocks, 0)
    p = check_stochastic_depth_args(p, rule=rule, drop_rate=drop_rate)[0]
    if rule == "uniform":
        return [float(p)] * num_blocks
    return [p * layer / num_blocks for layer in range(1, num_blocks + 1)]


def drop_residual(residual: Tensor, p: float, mode: str = "row", training: bool = True, scaling: str = "train",
                  generator: torch.Generator | None = None) -> Tensor:
    """Stochastic depth on an already computed residual branch.

    Training: ``row`` keeps each example's branch with probability ``1 - p``, ``batch`` makes one draw
    for the whole batch; a kept branch is scaled by ``1 / (1 - p)`` with ``scaling="train"``. Test: the
    branch times ``1 - p`` with ``scaling="test"``, unchanged with ``"train"``. This functional form cannot
    save compute (the branch is already computed); the blocks of :func:`apply_stochastic_depth` skip it.

    Examples:
        >>> r = torch.ones(4, 2)
        >>> drop_residual(r, 0.5, generator=torch.Generator().manual_seed(4)).tolist()
        [[2.0, 2.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
        >>> drop_residual(r, 0.5, training=False, scaling="test")[0].tolist()
        [0.5, 0.5]
    """
    check_stochastic_depth_args(p, mode, scaling=scaling)
    keep = 1.0 - p
    if p == 0 or (not training and scaling == "train"):
        return residual
    if not training:
        return residual * keep
    shape = (residual.shape[0],) + (1,) * (residual.dim() - 1) if mode == "row" else (1,) * residual.dim()
    mask = torch.empty(shape, device=residual.device, dtype=residual.dtype).bernoulli_(keep, generator=generator)
    return residual * (mask.div_(keep) if scaling == "train" else mask)

# ---------------------------------------------------------------------------------------------------------------
# block adapters: how to compute the branch, the shortcut and the final activation of a known block type


@dataclass(frozen=True)
class BlockAdapter:
    """How to run a residual block type in parts.

    Attributes:
        residual: ``(block, x) -> f(x)``, the branch.
        shortcut: ``(block, x) -> id(x)``, the identity or projection.
        post: ``(block, y) -> act(y)``, applied to ``branch + shortcut``.
        inplace_post: ``post`` may modify its argument in place (the shortcut is then cloned when it is ``x``).
    """

    residual: Callable[[nn.Module, Tensor], Tensor]
    shortcut: Callable[[nn.Module, Tensor], Tensor]
    post: Callable[[nn.Module, Tensor], Tensor]
    inplace_post: bool = False


def _downsample(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(x)


def _relu(block: nn.Module, y: Tensor) -> Tensor:
    return F.relu(y)


def _tv_basic(b: nn.Module, x: Tensor) -> Tensor:
    return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))


def _tv_bottleneck(b: nn.Module, x: Tensor) -> Tensor:
    return b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))))


def _timm_basic(b: nn.Module, x: Tensor) -> Tensor:
    x = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
    x = b.bn2(b.conv2(x))
    return x if b.se is None else b.se(x)


def _timm_bottleneck(b: nn.Module, x: Tensor) -> Tensor:
    x = b.act1(b.bn1(b.conv1(x)))
    x = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(x)))))
    x = b.bn3(b.conv3(x))
    return x if b.se is None else b.se(x)


@cache
def block_adapters() -> dict[type, BlockAdapter]:
    """The block types converted through an adapter: torchvision's and timm's ResNet blocks, the zoo's BasicBlock.

    An adapter runs the block in parts, so the branch's factor rides on the residual addition
    (``torch.add(shortcut, branch, alpha=...)``); other blocks with a ``residual(x)`` method pay one
    elementwise multiply per kept branch.
    """
    from lightning_tricks.zoo.backbones import BasicBlock as ZooBasicBlock

    adapters: dict[type, BlockAdapter] = {
        ZooBasicBlock: BlockAdapter(lambda b, x: b.residual(x), lambda b, x: b.shortcut(x), _relu),
    }
    try:
        from torchvision.models import resnet as tv

        adapters[tv.BasicBlock] = BlockAdapter(_tv_basic, _downsample, _relu)
        adapters[tv.Bottleneck] = BlockAdapter(_tv_bottleneck, _downsample, _relu)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        from timm.models import resnet as timm_resnet

        adapters[timm_resnet.BasicBlock] = BlockAdapter(_timm_basic, _downsample, lambda b, y: b.act2(y), True)
        adapters[timm_resnet.Bottleneck] = BlockAdapter(_timm_bottleneck, _downsample, lambda b, y: b.act3(y), True)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return adapters


def has_residual_method(module: nn.Module) -> bool:
    """Whether ``module`` follows our protocol: a ``residual(x)`` method that its forward adds to the shortcut."""
    return callable(getattr(type(module), "residual", None))


# ---------------------------------------------------------------------------------------------------------------
# converted blocks


class _DepthMixin(SwappableMixin):
    """State shared by the converted blocks: drop probability, mode, scaling, index, last decision."""

    def _lt_configure(self, p: float, mode: str, scaling: str, randomness: LayerRandomness, index: int) -> None:
        self.lt_drop_prob = float(p)
        self.lt_mode = mode
        self.lt_scaling = scaling
        self.lt_randomness = randomness
        self.lt_index = index
        self.lt_last_kept: bool | None = None

    def _lt_plain(self) -> bool:
        """Whether the block runs exactly as the original: ``p == 0``, or eval with inverted scaling."""
        return self.lt_drop_prob == 0 or (not self.training and self.lt_scaling == "train")  # type: ignore[attr-defined]

    def _lt_branch_scale(self) -> float:
        """Factor of a computed branch: 1/(1-p) for a kept branch in training (``train`` scaling), 1-p at
        test (``test`` scaling), else 1."""
        if self.training:  # type: ignore[attr-defined]
            return 1.0 / (1.0 - self.lt_drop_prob) if self.lt_scaling == "train" else 1.0
        return 1.0 - self.lt_drop_prob

    def _lt_keep_branch(self) -> bool:
        kept = self.lt_randomness.uniform(self.lt_index) >= self.lt_drop_prob
        self.lt_last_kept = kept
        return kept

    def _lt_scale(self, branch: Tensor) -> Tensor:
        """The branch with its row mask (``row`` mode in training) and scale applied."""
        scale = self._lt_branch_scale()
        if self.training and self.lt_mode == "row":  # type: ignore[attr-defined]
            shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
            generator = self.lt_randomness.generator(branch.device, self.lt_index)
            mask = torch.empty(shape, device=branch.device, dtype=branch.dtype)
            mask.bernoulli_(1.0 - self.lt_drop_prob, generator=generator)
            return branch * (mask.mul_(scale) if scale != 1.0 else mask)
        return branch * scale if scale != 1.0 else branch

    def _lt_skip(self) -> bool:
        """``batch`` mode in training: draw the decision; True when the branch is skipped for this step."""
        return self.training and self.lt_mode == "batch" and not self._lt_keep_branch()  # type: ignore[attr-defined]


class _AdapterDepthMixin(_DepthMixin):
    """For block types with a :class:`BlockAdapter`: the forward is rebuilt from the block's parts."""

    def forward(self, x: Tensor) -> Tensor:
        if self._lt_plain():
            return super().forward(x)  # type: ignore[misc]
        adapter = block_adapters()[type(self).__lt_base__]
        shortcut = adapter.shortcut(self, x)  # type: ignore[arg-type]
        if self._lt_skip():
            if adapter.inplace_post and shortcut is x:
                shortcut = x.clone()
            return adapter.post(self, shortcut)  # type: ignore[arg-type]
        branch = adapter.residual(self, x)  # type: ignore[arg-type]
        if self.training and self.lt_mode == "row":  # type: ignore[attr-defined]
            return adapter.post(self, self._lt_scale(branch) + shortcut)  # type: ignore[arg-type]
        # the branch's factor rides on the addition: no extra kernel for inverted or test-time scaling
        return adapter.post(self, torch.add(shortcut, branch, alpha=self._lt_branch_scale()))  # type: ignore[arg-type]


class _ResidualMethodDepthMixin(_DepthMixin):
    """For blocks with a ``residual(x)`` method (the zoo's BasicBlock, your own): only ``residual`` changes."""

    def residual(self, x: Tensor) -> Tensor:
        if self._lt_plain():
            return super().residual(x)  # type: ignore[misc]
        if self._lt_skip():
            return x.new_zeros(())  # broadcasts in `residual(x) + shortcut(x)`: the branch is not computed
        return self._lt_scale(super().residual(x))  # type: ignore[misc]


def _can_wrap(module: nn.Module) -> str | None:
    if isinstance(module, _DepthMixin) or type(module) in block_adapters() or has_residual_method(module):
        return None
    return ("not a residual block StochasticDepth can convert (torchvision/timm BasicBlock or Bottleneck, or a "
            "block with a `residual(x)` method that its forward adds to the shortcut)")


def _auto_detected(name: str, module: nn.Module) -> bool:
    return original_class(module) in block_adapters() or hasattr(module, "shortcut")


def stochastic_depth_blocks(model: nn.Module) -> list[nn.Module]:
    """The converted blocks of ``model`` in order (index ``l - 1`` holds block ``l``)."""
    return sorted((m for m in model.modules() if isinstance(m, _DepthMixin)), key=lambda m: m.lt_index)
