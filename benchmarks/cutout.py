"""Cutout: training-step overhead on simple_cnn, and batched cutout versus per-sample RandomErasing loops.

Two measurements, both as ratios in the same process, interleaved, median of >= 5 repetitions:

1. Step overhead: the median training step (``on_train_batch_start`` -> ``on_train_batch_end``, see
   ``benchmarks/step.py``) of the zoo's ``ImageClassifier("simple_cnn")`` at batch 128, 3x32x32, with
   ``Cutout(length=16)`` versus without. Target: <= 1.05x.
2. Transform speed at batch 256, 3x32x32: ``cutout(x, 16, generator=g)`` (one vectorized pass) versus
   a Python loop applying torchvision's ``v2.RandomErasing`` to each sample (square 16x16 erasing, the
   same area) and timm's ``RandomErasing`` (which loops over the batch itself). Target: >= 20x faster
   than the torchvision loop.

Example:
    ``python -m benchmarks cutout`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians, per_call
from benchmarks.step import measure_step


def transform_cases(batch_size: int, length: int) -> dict[str, Callable[[], object]]:
    from timm.data.random_erasing import RandomErasing as TimmErasing
    from torchvision.transforms import v2

    from lightning_tricks.regularization.cutout import cutout

    images = torch.randn(batch_size, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    area = length * length / (32 * 32)
    tv_erase = v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)
    timm_erase = TimmErasing(probability=1.0, min_area=area, max_area=area, min_aspect=1.0, max_aspect=1.0,
                             mode="const", max_count=1, device="cpu")
    return {
        "torchvision RandomErasing loop": lambda: torch.stack([tv_erase(x) for x in images]),
        "lightning-tricks cutout": lambda: cutout(images, length, generator=generator),
        "timm RandomErasing (loops inside)": lambda: timm_erase(images.clone()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and write the ``cutout`` section of RESULTS.md."""
    args = BenchmarkParser("cutout", __doc__, quick="smoke run: fewer steps and repeats", repeats=7).parse_args(argv)
    q, repeats = args.quick, args.repeats
    steps = measure_step({"baseline": [], "Cutout(length=16)": [lambda: _cutout_callback(16)]},
                         batch_size=32 if q else 128, steps=5 if q else 20, warmup_steps=2 if q else 3,
                         repeats=repeats, quick=q)
    cases = transform_cases(256, 16)
    baseline = "torchvision RandomErasing loop"
    transforms = interleaved({name: per_call(fn, 5 if q else 20) for name, fn in cases.items()},
                             repeats=repeats, quick=q)
    meds = medians(transforms)
    speedup = meds[baseline] / meds["lightning-tricks cutout"]
    overhead = medians(steps)["Cutout(length=16)"] / medians(steps)["baseline"]
    publish(args, "Cutout overhead and speed", [
        f"Training step, `ImageClassifier('simple_cnn')`, batch {32 if q else 128}, 3x32x32, CPU "
        f"(median step per fit, {repeats} interleaved repeats). **Overhead: {overhead:.3f}x** (target <= 1.05x).",
        "",
        format_table(steps, "baseline"),
        "",
        f"Transform alone, batch 256, 3x32x32, one 16x16 hole per image (median per call, {repeats} interleaved "
        f"repeats). **cutout is {speedup:.0f}x faster than the per-sample torchvision loop** (target >= 20x).",
        "",
        format_table(transforms, baseline),
    ])
    return 0


def _cutout_callback(length: int):  # a factory: benchmarks.step builds callbacks afresh for every fit
    from lightning_tricks import Cutout

    return Cutout(length=length)
