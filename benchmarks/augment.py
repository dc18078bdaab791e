"""BatchAugment and Standardize: vectorized batch augmentation vs torchvision's per-image v2 transforms, and step overhead.

Two measurements, both as ratios in the same process, interleaved, median of >= 5 repetitions:

1. Transform speed at batch 256, 3x32x32 (CPU): :func:`~lightning_tricks.setup.augment.augment` (random crop
   with padding 4, horizontal flip 0.5, brightness and contrast jitter 0.2; one vectorized pass, per-sample
   draws) versus a Python loop applying torchvision's ``v2.Compose([RandomCrop(32, padding=4),
   RandomHorizontalFlip(), ColorJitter(brightness=0.2, contrast=0.2)])`` to each image, the way a Dataset
   applies it. Also crop + flip alone against ``v2.RandomCrop`` + ``v2.RandomHorizontalFlip`` per image.
   Target: >= 10x faster than the per-image loop.
2. Step overhead: the median training step (see ``benchmarks/step.py``) of the zoo's ``simple_cnn`` at batch
   128, 3x32x32, with ``BatchAugment(padding=4, flip=0.5, brightness=0.2, contrast=0.2)`` and with
   ``Standardize('channel')`` versus without.

Example:
    ``python -m benchmarks augment`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians, per_call
from benchmarks.step import measure_step


def transform_cases(batch_size: int) -> dict[str, Callable[[], object]]:
    from torchvision.transforms import v2

    from lightning_tricks.setup.augment import augment

    images = torch.rand(batch_size, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    full = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.2, contrast=0.2)])
    crop_flip = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    return {
        "torchvision v2 per-image loop": lambda: torch.stack([full(x) for x in images]),
        "lightning-tricks augment": lambda: augment(images, 4, 0.5, 0.2, 0.2, generator=generator),
        "torchvision v2 crop+flip per-image loop": lambda: torch.stack([crop_flip(x) for x in images]),
        "lightning-tricks augment crop+flip": lambda: augment(images, 4, 0.5, generator=generator),
    }


def _augment_callback():  # factories: benchmarks.step builds callbacks afresh for every fit
    from lightning_tricks import BatchAugment

    return BatchAugment(padding=4, flip=0.5, brightness=0.2, contrast=0.2)


def _standardize_callback():
    from lightning_tricks import Standardize

    return Standardize("channel", max_batches=4)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and write the ``augment`` section of RESULTS.md."""
    args = BenchmarkParser("augment", __doc__, quick="smoke run: fewer steps and repeats", repeats=7).parse_args(argv)
    q, repeats = args.quick, args.repeats
    cases = transform_cases(256)
    transforms = interleaved({name: per_call(fn, 3 if q else 10) for name, fn in cases.items()}, repeats=repeats, quick=q)
    meds = medians(transforms)
    speedup = meds["torchvision v2 per-image loop"] / meds["lightning-tricks augment"]
    speedup_cf = meds["torchvision v2 crop+flip per-image loop"] / meds["lightning-tricks augment crop+flip"]
    steps = measure_step({"baseline": [], "BatchAugment": [_augment_callback], "Standardize": [_standardize_callback]},
                         batch_size=32 if q else 128, steps=5 if q else 20, warmup_steps=2 if q else 3,
                         repeats=repeats, quick=q)
    step_meds = medians(steps)
    publish(args, "batch augmentation speed and step overhead", [
        f"Transform alone, batch 256, 3x32x32, CPU (median per call, {repeats} interleaved repeats). **augment (crop "
        f"pad 4 + flip + brightness/contrast 0.2) is {speedup:.1f}x faster than torchvision's v2 transforms applied "
        f"per image in a loop** (target >= 10x); crop + flip alone: {speedup_cf:.1f}x.",
        "",
        format_table(transforms, "torchvision v2 per-image loop"),
        "",
        f"Training step, `ImageClassifier('simple_cnn')`, batch {32 if q else 128}, 3x32x32, CPU (median step per fit, "
        f"{repeats} interleaved repeats). **BatchAugment: {step_meds['BatchAugment'] / step_meds['baseline']:.3f}x, "
        f"Standardize: {step_meds['Standardize'] / step_meds['baseline']:.3f}x** the baseline step (Standardize's "
        "one-time statistics pass happens before the first step and is not counted).",
        "",
        format_table(steps, "baseline"),
    ])
    return 0
