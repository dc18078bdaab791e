"""Random numbers for the layers of one structural trick, owned by the trick (not torch's global RNG).

In training, a draw is keyed by ``(seed, [rank], step, layer)``: the same step and layer always give the
same numbers, so a block recomputed under activation checkpointing sees the same mask, the draws of one
layer do not depend on the order layers run in, and a run resumed at step ``s`` continues exactly. The
step is set by the trick's callback once per training batch. Without a callback (``step`` is ``None``,
plain torch use) and in eval mode (test-time sampling), draws come from a free-running generator.
"""

from __future__ import annotations

import torch

from lightning_tricks.distributed import derive_seed, global_rank

_EVAL_STREAM = 0x5EED_E7A1  # keeps eval-time draws apart from the training keys


class LayerRandomness:
    """Generators shared by the stochastic layers of one trick.

    Args:
        seed: base seed.
        per_rank: draws differ between DDP ranks (masks on different data) or agree on every rank
            (structural decisions such as which block the whole model skips).

    Attributes:
        step: the training step the draws are keyed by; ``None`` for free-running draws.
        rank: the global rank mixed into the keys when ``per_rank``.
    """

    def __init__(self, seed: int = 0, per_rank: bool = True) -> None:
        self.seed = int(seed)
        self.per_rank = per_rank
        self.rank = global_rank()
        self.step: int | None = None
        self._keyed: dict[torch.device, torch.Generator] = {}
        self._free: dict[torch.device, torch.Generator] = {}

    def _key(self, *parts: int) -> int:
        return derive_seed(self.seed, *((self.rank,) if self.per_rank else ()), *parts)

    def generator(self, device: torch.device, layer: int, training: bool = True) -> torch.Generator:
        """The generator for one draw of ``layer`` on ``device``, reseeded from the key when stepping."""
        device = torch.device(device)
        if training and self.step is not None:
            gen = self._keyed.get(device)
            if gen is None:
                gen = self._keyed[device] = torch.Generator(device=device)
            gen.manual_seed(self._key(self.step, layer))
            return gen
        gen = self._free.get(device)
        if gen is None:
            gen = self._free[device] = torch.Generator(device=device)
            gen.manual_seed(self._key(_EVAL_STREAM))
        return gen

    def uniform(self, layer: int, training: bool = True) -> float:
        """One number in [0, 1) computed on the host (no device sync), for a structural decision."""
        if training and self.step is not None:
            return (self._key(self.step, layer) >> 10) / float(1 << 53)
        return float(torch.rand((), generator=self.generator(torch.device("cpu"), layer, training)))

    def reset_eval(self) -> None:
        """Restart the free-running stream (so test-time sampling is reproducible run to run)."""
        self._free.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_keyed"], state["_free"] = {}, {}  # generators are recreated from the seed
        return state
