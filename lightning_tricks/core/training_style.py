"""How a module trains, as far as a trick must know: one optimizer (a classifier) or several (a GAN).

Lightning runs several optimizers only with manual optimization (``automatic_optimization = False``),
where ``trainer.global_step`` counts every optimizer's steps. A trick that serves a classifier (a head to
replace, class scores to vote) refuses a module with several optimizers in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_tricks.errors import ModelNotSupportedError


def count_optimizers(module: Any) -> int | None:
    """How many optimizers ``module.configure_optimizers()`` returns (its usual forms), or None when that cannot be
    told before a Trainer sets the module up (it raised, or returned something else).

    Examples:
        >>> class Two(torch.nn.Module):
        ...     def configure_optimizers(self):
        ...         p = [torch.nn.Parameter(torch.zeros(1))]
        ...         return [torch.optim.SGD(p, lr=0.1), torch.optim.SGD(p, lr=0.1)], []
        >>> count_optimizers(Two())
        2
    """
    try:
        returned = module.configure_optimizers()
    except Exception:  # noqa: BLE001 - it may need what only the Trainer's setup provides
        return None
    if isinstance(returned, torch.optim.Optimizer) or (isinstance(returned, dict) and "optimizer" in returned):
        return 1
    if isinstance(returned, (list, tuple)):
        if len(returned) == 2 and all(isinstance(part, (list, tuple)) for part in returned):  # ([opts], [scheds])
            returned = returned[0]
        if all(isinstance(o, torch.optim.Optimizer) or (isinstance(o, dict) and "optimizer" in o) for o in returned):
            return len(returned)
    return None


def refuse_several_optimizers(owner: str, module: Any, count: int | None, fix: str) -> None:
    """Raise one line when ``count`` > 1: ``owner`` serves a classifier trained with one optimizer, not a GAN."""
    if count is not None and count > 1:
        raise ModelNotSupportedError(
            f"{owner} serves a classifier trained with one optimizer, but {type(module).__name__} uses {count} "
            f"(manual optimization, e.g. a GAN's generator and discriminator): it has no classifier head. {fix}")


__all__ = ["count_optimizers", "refuse_several_optimizers"]
