"""A host-memory copy of a module's weights, refreshed in place: what restores the best weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


class WeightSnapshot:
    """A host-memory copy of a module's ``state_dict`` (parameters and persistent buffers), refreshed in place.

    The first :meth:`capture` allocates one CPU tensor per entry (pinned when the source is on CUDA,
    for a fast copy); later captures copy into those tensors, so keeping the best weights costs one
    device-to-host copy per improvement and no allocation. :meth:`restore` loads the copy back with
    ``load_state_dict`` (in place: the optimizer keeps referencing the same parameters).

    Examples:
        >>> net = nn.Linear(3, 2)
        >>> snapshot = WeightSnapshot()
        >>> snapshot.capture(net)
        >>> before = net.weight.detach().clone()
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> snapshot.restore(net)
        >>> torch.equal(net.weight, before)
        True
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    @property
    def state(self) -> dict[str, Any] | None:
        """The copy (name -> CPU tensor), or None before the first capture."""
        return self._state

    @property
    def nbytes(self) -> int:
        """Host memory held by the copy."""
        if self._state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._state.values() if isinstance(t, Tensor))

    def _reusable(self, source: Mapping[str, Any]) -> bool:
        held = self._state
        if held is None or held.keys() != source.keys():
            return False
        return all(
            not isinstance(src, Tensor)
            or (isinstance(dst, Tensor) and dst.shape == src.shape and dst.dtype == src.dtype)
            for dst, src in ((held[k], source[k]) for k in source)
        )

    def capture(self, module: nn.Module) -> None:
        """Copy ``module.state_dict()`` into host memory (reusing the previous copy's storage)."""
        source = module.state_dict()
        if not self._reusable(source):
            pin = torch.cuda.is_available() and any(isinstance(t, Tensor) and t.is_cuda for t in source.values())
            self._state = {k: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                           if isinstance(t, Tensor) else None for k, t in source.items()}
        held = self._state
        assert held is not None
        with torch.no_grad():
            for name, tensor in source.items():
                if isinstance(tensor, Tensor):
                    held[name].copy_(tensor.detach())
                else:  # `get_extra_state` objects
                    held[name] = copy.deepcopy(tensor)

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Adopt a copy (e.g. from a checkpoint), moved to CPU."""
        self._state = None if state is None else {
            k: v.detach().to("cpu") if isinstance(v, Tensor) else v for k, v in state.items()}

    def restore(self, module: nn.Module) -> None:
        """Load the copy into ``module`` (strict: the same keys and shapes)."""
        if self._state is None:
            raise RuntimeError("WeightSnapshot.restore called before any capture.")
        module.load_state_dict(self._state, strict=True)

    def clear(self) -> None:
        """Release the copy."""
        self._state = None

    def __eq__(self, other: object) -> bool:
        """Equal when both hold no copy, or copies with the same names and equal values (a pickle round trip)."""
        if not isinstance(other, WeightSnapshot):
            return NotImplemented
        mine, theirs = self._state, other._state
        if mine is None or theirs is None:
            return mine is theirs
        return mine.keys() == theirs.keys() and all(
            torch.equal(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a == b
            for a, b in ((mine[k], theirs[k]) for k in mine))

    __hash__ = None  # type: ignore[assignment]  # mutable
