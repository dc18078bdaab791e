"""The one seed rule of every stochastic trick: :class:`RandomStream`.

Every callback that draws random numbers (Cutout, Mixup, BatchAugment, DropConnect, stochastic depth,
fractional pooling, test-time augmentation's stochastic passes, WeightInit) owns a ``RandomStream``:

* **the seed**: the user's ``seed``, else the run's seed (:func:`run_seed`: the one given to
  ``seed_everything``, else ``torch.initial_seed()``). It is resolved once, at the callback's first
  ``setup``; under DDP rank 0's value is broadcast, so every rank starts from the same seed even when
  the ranks' torch generators were seeded differently;
* **the derivation**: a draw is keyed by ``derive_seed(seed, [global rank], *parts)`` (parts: the batch
  counter, a layer index, a stage, ...). A stream that is not ``shared`` mixes in the rank, so ranks
  draw differently (augmentation of different data); a ``shared`` one leaves it out, so every rank draws
  the same (a structural decision, an initialization);
* **the generators**: one ``torch.Generator`` per device, reseeded for each key (no host-device copy);
* **the state**: ``{"seed", "batches_seen"}`` in the callback's checkpoint state, so a resumed run
  restores the seed and the counter and draws what the uninterrupted run would have drawn.

Example:
    >>> stream = RandomStream(seed=7)
    >>> a = torch.rand(3, generator=stream.next_generator("cpu"))  # batch 0
    >>> b = torch.rand(3, generator=stream.next_generator("cpu"))  # batch 1
    >>> resumed = RandomStream(seed=None)
    >>> resumed.load_state_dict({"seed": 7, "batches_seen": 1})
    >>> torch.equal(torch.rand(3, generator=resumed.next_generator("cpu")), b)
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tricks.core.distributed import derive_seed, global_rank
from lightning_tricks.core.validation import check_optional_int


def run_seed() -> int:
    """The run's seed: the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else ``torch.initial_seed()``."""
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else int(torch.initial_seed())


def resolve_seed(seed: int | None, trainer: pl.Trainer | None = None) -> int:
    """``seed``, else :func:`run_seed`; with a multi-rank ``trainer``, rank 0's value on every rank.

    Call it on every rank at the same point (``Callback.setup``) when ``trainer`` is given: the
    broadcast is a collective.
    """
    if seed is not None:
        return int(seed)
    value = run_seed()
    if trainer is not None and trainer.world_size > 1:
        value = int(trainer.strategy.broadcast(value, src=0))
    return value


_EVAL_SCOPE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("lt_eval_scope", default=None)
_scopes = itertools.count()


def eval_scope() -> tuple[int, int] | None:
    """``(seed, entry)`` of the innermost :func:`seeded_global_rng` block, ``None`` outside one.

    The structural tricks' eval-time draws (test-time sampling of DropConnect, fractional pooling, stochastic
    depth) restart from ``seed`` at each new ``entry``, as torch's global generators do, so a seeded block draws
    the same whatever ran before it (a resumed run's validation equals the uninterrupted one's).
    """
    return _EVAL_SCOPE.get()


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """Inside the block torch's global generators (CPU, and ``device``'s if CUDA) are seeded with ``seed``.

    For layers that cannot take a generator (``torch.nn`` dropout): their state is restored on exit, so
    the draws inside leave the rest of the run's randomness untouched. The tricks' own eval-time streams
    restart from ``seed`` inside the block too (:func:`eval_scope`).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    token = _EVAL_SCOPE.set((int(seed), next(_scopes)))
    try:
        with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        _EVAL_SCOPE.reset(token)


class RandomStream:
    """A callback's own random numbers: seed, per-rank derivation, device generators and checkpoint state.

    Args:
        seed: the seed (an integer, checked here); ``None`` resolves to the run's seed at :meth:`setup`
            (see the module docstring).
        shared: draw the same on every rank (leave the rank out of the keys) instead of per rank.

    Attributes:
        seed: the resolved seed (``None`` until resolved).
        rank: the global rank mixed into the keys unless ``shared`` (set by :meth:`setup`).
        batches_seen: the counter :meth:`next_generator` keys by and advances; checkpointed.
    """

    def __init__(self, seed: int | None = None, *, shared: bool = False) -> None:
        self.seed: int | None = check_optional_int("seed", seed)
        self.shared = shared
        self.rank = global_rank()
        self.batches_seen = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def setup(self, trainer: pl.Trainer | None = None) -> int:
        """Resolve the seed once and take the trainer's rank; returns the seed.

        With a multi-rank ``trainer`` and no seed this is a collective (rank 0's run seed is broadcast):
        call it on every rank, from a hook every rank runs (``Callback.setup``).
        """
        if self.seed is None:
            self.seed = resolve_seed(None, trainer)
        if trainer is not None:
            self.rank = trainer.global_rank
        return self.seed

    @property
    def resolved_seed(self) -> int:
        """The seed, resolved here without a broadcast when :meth:`setup` was not called (use outside a fit)."""
        return self.setup() if self.seed is None else self.seed

    @property
    def generators(self) -> Mapping[torch.device, torch.Generator]:
        """The device generators created so far (none until the first draw)."""
        return self._generators

    def key(self, *parts: int) -> int:
        """The 63-bit seed of the draw identified by ``parts`` on this rank (on every rank when ``shared``)."""
        return derive_seed(self.resolved_seed, *(() if self.shared else (self.rank,)), *parts)

    def seeded(self, device: torch.device | str, *parts: int) -> torch.Generator:
        """``device``'s generator (created once), seeded with :meth:`key` of ``parts``."""
        device = torch.device(device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(self.key(*parts))

    def next_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of the next batch (keyed by :attr:`batches_seen`, which is then advanced)."""
        generator = self.seeded(device, self.batches_seen)
        self.batches_seen += 1
        return generator

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the seed (when the state has one) and the counter: the resumed run continues the saved one."""
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.batches_seen = int(state_dict.get("batches_seen", 0))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generators"] = {}  # recreated from the seed on the next draw (ddp_spawn pickles callbacks)
        return state


__all__ = ["RandomStream", "eval_scope", "resolve_seed", "run_seed", "seeded_global_rng"]
