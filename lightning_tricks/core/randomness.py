"""Random numbers for the layers of one structural trick, owned by the trick (not torch's global RNG).

In training, a draw is keyed by ``(seed, [rank], step, layer)``: the same step and layer always give the
same numbers, so a block recomputed under activation checkpointing sees the same mask, the draws of one
layer do not depend on the order layers run in, and a run resumed at step ``s`` continues exactly. The
step is set by the trick's callback once per training batch. Without a callback (``step`` is ``None``,
plain torch use) and in eval mode (test-time sampling), draws come from a free-running generator, which
restarts from the block's seed inside a seeded block (:func:`~lightning_tricks.core.seeding.eval_scope`: test-time
augmentation's stochastic passes), so those draws do not depend on what ran before.
The seed, the rank and the keys follow the package's one seed rule, :class:`~lightning_tricks.core.seeding.RandomStream`.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_tricks.core.distributed import derive_seed
from lightning_tricks.core.seeding import RandomStream, eval_scope

_EVAL_STREAM = 0x5EED_E7A1  # keeps eval-time draws apart from the training keys


class LayerRandomness(RandomStream):
    """Generators shared by the stochastic layers of one trick.

    Args:
        seed: base seed (``None``: the run's seed, resolved at the callback's setup).
        per_rank: draws differ between DDP ranks (masks on different data) or agree on every rank
            (structural decisions such as which block the whole model skips).

    Attributes:
        step: the training step the draws are keyed by; ``None`` for free-running draws.
        rank: the global rank mixed into the keys when ``per_rank``.
    """

    def __init__(self, seed: int | None = 0, per_rank: bool = True) -> None:
        super().__init__(seed, shared=not per_rank)
        self.step: int | None = None
        self._free: dict[torch.device, torch.Generator] = {}
        self._free_scope: tuple[int, int] | None = None

    @property
    def per_rank(self) -> bool:
        return not self.shared

    def generator(self, device: torch.device, layer: int, training: bool = True) -> torch.Generator:
        """The generator for one draw of ``layer`` on ``device``, reseeded from the key when stepping."""
        device = torch.device(device)
        if training and self.step is not None:
            return self.seeded(device, self.step, layer)
        scope = eval_scope()
        if scope != self._free_scope:  # entered or left a seeded block (test-time augmentation's passes)
            self._free.clear()
            self._free_scope = scope
        gen = self._free.get(device)
        if gen is None:
            gen = self._free[device] = torch.Generator(device=device)
            gen.manual_seed(self.key(_EVAL_STREAM) if scope is None else derive_seed(self.key(_EVAL_STREAM), scope[0]))
        return gen

    def uniform(self, layer: int, training: bool = True) -> float:
        """One number in [0, 1) computed on the host (no device sync), for a structural decision."""
        if training and self.step is not None:
            return (self.key(self.step, layer) >> 10) / float(1 << 53)
        return float(torch.rand((), generator=self.generator(torch.device("cpu"), layer, training)))

    def reset_eval(self) -> None:
        """Restart the free-running stream (so test-time sampling is reproducible run to run)."""
        self._free.clear()
        self._free_scope = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_free"], state["_free_scope"] = {}, None  # generators are recreated from the seed
        return state
