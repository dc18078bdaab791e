"""The 1D training augmentation the MNIST-1D TTA benchmark cuts itself (random shifts), checked against brute force."""

from __future__ import annotations

import torch

from benchmarks.tta_effect import random_shift


def _shifted(x: torch.Tensor, s: int) -> torch.Tensor:
    """``x`` shifted by ``s`` steps (output[i] = x[clamp(i + s)]), one index at a time."""
    length = x.shape[-1]
    return torch.stack([x[..., min(max(i + s, 0), length - 1)] for i in range(length)], dim=-1)


def test_random_shift_of_signals_shifts_each_row_within_the_bound() -> None:
    x = torch.randn(64, 2, 20)
    out = random_shift(x, 3, torch.Generator().manual_seed(0))
    seen = set()
    for row, shifted in zip(x, out, strict=True):
        matches = [s for s in range(-3, 4) if torch.equal(shifted, _shifted(row, s))]
        assert matches, "a row is not a shift of its signal by at most 3 steps"
        seen.add(matches[0])
    assert len(seen) > 3  # the shifts differ between rows
