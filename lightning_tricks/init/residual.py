"""Zero-init residual (Goyal et al. 2017): each residual branch's last normalization starts at gamma = 0.

Split from :mod:`lightning_tricks.init.schemes` (which re-exports these names); ``WeightInit``'s
``zero_init_residual`` and :func:`~lightning_tricks.init.init_weights` call :func:`zero_init_residual`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from lightning_tricks.core.selection import class_names, describe_names, name_matches
from lightning_tricks.core.validation import InvalidArgumentError


def _known_residual_norms() -> list[tuple[type, str]]:
    """(block class, attribute of its residual branch's last normalization) for the ResNets we know.

    torchvision and timm are only looked at when already imported: a model built by them has imported them.
    """
    from lightning_tricks.zoo.backbones import BasicBlock
    from lightning_tricks.zoo.sequence import BasicBlock1d

    known: list[tuple[type, str]] = [(BasicBlock, "bn2"), (BasicBlock1d, "bn2")]
    if "torchvision.models.resnet" in sys.modules:
        tv = sys.modules["torchvision.models.resnet"]
        known += [(tv.BasicBlock, "bn2"), (tv.Bottleneck, "bn3")]
    if "timm.models.resnet" in sys.modules:
        tm = sys.modules["timm.models.resnet"]
        known += [(tm.BasicBlock, "bn2"), (tm.Bottleneck, "bn3")]
    return known


KNOWN_RESIDUAL_BLOCKS = (
    "lightning_tricks.zoo.BasicBlock.bn2",
    "lightning_tricks.zoo.BasicBlock1d.bn2",
    "torchvision.models.resnet.BasicBlock.bn2",
    "torchvision.models.resnet.Bottleneck.bn3",
    "timm.models.resnet.BasicBlock.bn2",
    "timm.models.resnet.Bottleneck.bn3",
)
"""The blocks ``zero_init_residual=True`` finds, with the normalization it zeroes in each."""


def residual_norms(module: nn.Module, blocks: bool | Sequence[str] = True) -> list[tuple[str, nn.Module]]:
    """The normalization layers :func:`zero_init_residual` would zero, as ``(name, module)`` pairs.

    Args:
        module: the model.
        blocks: True for the blocks of :data:`KNOWN_RESIDUAL_BLOCKS`; or a list of specs, each either
            ``"BlockClass.attribute"`` (every instance of a class named ``BlockClass``, its attribute
            ``attribute``, which may be dotted) or a glob pattern over module names
            (``"layer*.*.bn2"``). A spec whose first part is a class name in the model is read as the
            former.

    Raises:
        InvalidArgumentError: True finds no known block, or a spec matches nothing, or a match has no
            ``weight`` parameter.
    """
    named = list(module.named_modules())
    found: dict[str, nn.Module] = {}
    if blocks is True:
        known = _known_residual_norms()
        for name, m in named:
            for cls, attr in known:
                if isinstance(m, cls):
                    norm = getattr(m, attr)
                    found[f"{name}.{attr}" if name else attr] = norm
                    break
        if not found:
            raise InvalidArgumentError(
                f"`zero_init_residual`=True found no residual block in {type(module).__name__}: it knows "
                f"{', '.join(KNOWN_RESIDUAL_BLOCKS)}. For your own blocks name the last normalization of each "
                "residual branch: zero_init_residual: ['MyBlock.bn2'] (class.attribute) or ['layer*.*.bn2'] (name pattern)."
            )
    else:
        if isinstance(blocks, str) or not blocks:
            raise InvalidArgumentError(f"`zero_init_residual`={blocks!r} is invalid: expected True, False or a non-empty "
                                       "list of 'BlockClass.attribute' specs or module-name patterns.")
        names_in_model = set().union(*(class_names(m) for _, m in named))
        module_names = [n for n, _ in named if n]
        for spec in blocks:
            head, _, attr = spec.partition(".")
            matched: dict[str, nn.Module] = {}
            if head in names_in_model and attr:
                for name, m in named:
                    if head in class_names(m):
                        target = m.get_submodule(attr) if _has_submodule(m, attr) else None
                        if target is None:
                            raise InvalidArgumentError(f"`zero_init_residual` spec {spec!r}: module {name!r} "
                                                       f"({type(m).__name__}) has no submodule {attr!r}.")
                        matched[f"{name}.{attr}" if name else attr] = target
            else:  # a name pattern: the modules it matches themselves (not what is inside them)
                matched = {name: m for name, m in named if name and name_matches(name, spec)
                           and not ("." in name and name_matches(name.rpartition(".")[0], spec))}
            if not matched:
                raise InvalidArgumentError(
                    f"`zero_init_residual` spec {spec!r} matches nothing in {type(module).__name__}: expected "
                    "'BlockClass.attribute' with a class of the model, or a pattern over module names such as "
                    f"{describe_names(module_names, 6)}."
                )
            found.update(matched)
    for name, norm in found.items():
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise InvalidArgumentError(f"`zero_init_residual`: {name!r} ({type(norm).__name__}) has no `weight` to zero "
                                       "(a normalization layer with affine=False has none).")
    return list(found.items())


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def zero_init_residual(module: nn.Module, blocks: bool | Sequence[str] = True) -> list[str]:
    """Zero the last normalization gamma of each residual branch, so every block starts as the identity.

    Goyal et al. (2017): with ``y = x + F(x)`` and ``F`` ending in a normalization with scale gamma,
    gamma = 0 makes ``F(x) = beta = 0`` at the start; the network begins as a shallower one and the
    residual branches grow in as training needs them. This is torchvision's ``zero_init_residual=True``
    and timm's ``zero_init_last``, for any model and for your own blocks.

    Args:
        module: the model.
        blocks: see :func:`residual_norms`.

    Returns:
        The names of the zeroed normalization layers (only their ``weight`` changes).

    Examples:
        >>> from lightning_tricks.zoo import CifarResNet
        >>> zero_init_residual(CifarResNet(20))[:2]
        ['layer1.0.bn2', 'layer1.1.bn2']
    """
    norms = residual_norms(module, blocks)
    with torch.no_grad():
        for _, norm in norms:
            norm.weight.zero_()
    return [name for name, _ in norms]


__all__ = ["KNOWN_RESIDUAL_BLOCKS", "residual_norms", "zero_init_residual"]
