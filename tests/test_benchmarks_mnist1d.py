"""The 1D views and augmentations the MNIST-1D effect benchmarks cut themselves, checked against brute force."""

from __future__ import annotations

import pytest
import torch

from benchmarks.regularization_effect import SpanCutout
from benchmarks.tta_effect import random_shift, sequence_views


def _shifted(x: torch.Tensor, s: int) -> torch.Tensor:
    """``x`` shifted by ``s`` steps (output[i] = x[clamp(i + s)]), one index at a time."""
    length = x.shape[-1]
    return torch.stack([x[..., min(max(i + s, 0), length - 1)] for i in range(length)], dim=-1)


def test_shift_views_are_every_shift_with_replicate_padding() -> None:
    x = torch.randn(3, 2, 11)
    views = sequence_views(x, "shift", 3)
    assert views.shape == (7, 3, 2, 11)
    for k, s in enumerate(range(-3, 4)):
        assert torch.equal(views[k], _shifted(x, s))
    assert torch.equal(sequence_views(x, "shift", 0)[0], x)


def test_crop_views_resize_five_windows_and_reverse_flips() -> None:
    ramp = torch.arange(40.0).view(1, 1, 40)
    views = sequence_views(ramp, "crop", 36)
    assert views.shape == (5, 1, 1, 40)
    for k, start in enumerate((0, 1, 2, 3, 4)):  # linspace(0, 4, 5): windows [start, start + 36)
        assert views[k].min() >= start - 1e-5 and views[k].max() <= start + 35 + 1e-5
    reverse = sequence_views(ramp, "reverse", 0)
    assert torch.equal(reverse[1, 0, 0], ramp[0, 0].flip(0))
    with pytest.raises(ValueError, match="unknown"):
        sequence_views(ramp, "zoom", 2)


def test_random_shift_of_signals_shifts_each_row_within_the_bound() -> None:
    x = torch.randn(64, 2, 20)
    out = random_shift(x, 3, torch.Generator().manual_seed(0))
    seen = set()
    for row, shifted in zip(x, out, strict=True):
        matches = [s for s in range(-3, 4) if torch.equal(shifted, _shifted(row, s))]
        assert matches, "a row is not a shift of its signal by at most 3 steps"
        seen.add(matches[0])
    assert len(seen) > 3  # the shifts differ between rows


def test_span_cutout_zeroes_one_clipped_span_per_signal() -> None:
    import lightning.pytorch as pl

    torch.manual_seed(0)
    cutout = SpanCutout(length=8)
    cutout.on_train_start(pl.Trainer(logger=False), pl.LightningModule())
    x = torch.rand(200, 3, 40) + 1.0  # no zeros before
    cutout.on_train_batch_start(None, None, (x, torch.zeros(200)), 0)  # type: ignore[arg-type]
    zero = x == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel alike
    for row in zero[:, 0]:
        idx = torch.nonzero(row).flatten()
        assert 4 <= len(idx) <= 8 and idx.max() - idx.min() + 1 == len(idx)  # one contiguous span, clipped at ends
    assert (zero[:, 0].sum(1) == 8).float().mean() > 0.6  # most spans are whole
