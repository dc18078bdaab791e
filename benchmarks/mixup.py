"""Mixup: training-step overhead on simple_cnn, and per-sample-lambda mixup versus timm's and torchvision's.

Two measurements, both as ratios in the same process, interleaved, median of >= 5 repetitions:

1. Step overhead: the median training step of the zoo's ``ImageClassifier("simple_cnn")`` at batch
   128, 3x32x32, with ``Mixup()`` (one lambda per batch, ``targets="labels"``) and with
   ``Mixup(mode="sample", cutmix_alpha=1.0)`` versus without. Target: <= 1.05x.
2. Transform speed at batch 256, 3x32x32, 10 classes, images and targets: our ``mixup(...,
   mode="sample")`` (one lambda per sample, on the tensors' device) versus timm's ``Mixup`` in its
   ``batch`` mode (one lambda, in place) and ``elem`` mode (per sample, a Python loop), and
   torchvision's ``v2.MixUp`` (one lambda). Target: no slower than 1.2x timm's batch mode.

Example:
    ``python -m benchmarks mixup`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians, per_call
from benchmarks.step import measure_step


def transform_cases(batch_size: int, num_classes: int = 10) -> dict[str, Callable[[], object]]:
    from timm.data.mixup import Mixup as TimmMixup
    from torchvision.transforms import v2

    from lightning_tricks.regularization.mixup import mixup

    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, num_classes, (batch_size,))
    generator = torch.Generator().manual_seed(0)
    timm_batch = TimmMixup(mixup_alpha=1.0, mode="batch", label_smoothing=0.0, num_classes=num_classes)
    timm_elem = TimmMixup(mixup_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=num_classes)
    tv_mixup = v2.MixUp(alpha=1.0, num_classes=num_classes)
    return {
        "timm Mixup mode=batch": lambda: timm_batch(images, labels),
        "lightning-tricks mixup mode=sample": lambda: mixup(images, labels, num_classes, alpha=1.0, mode="sample",
                                                            generator=generator),
        "lightning-tricks mixup mode=batch": lambda: mixup(images, labels, num_classes, alpha=1.0,
                                                           generator=generator),
        "timm Mixup mode=elem (per sample)": lambda: timm_elem(images, labels),
        "torchvision v2.MixUp": lambda: tv_mixup(images, labels),
    }


def _mixup_callback(**kwargs):  # a factory: benchmarks.step builds callbacks afresh for every fit
    from lightning_tricks import Mixup

    return Mixup(**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and write the ``mixup`` section of RESULTS.md."""
    args = BenchmarkParser("mixup", __doc__, quick="smoke run: fewer steps and repeats", repeats=7).parse_args(argv)
    q, repeats = args.quick, args.repeats
    steps = measure_step({
        "baseline": [],
        "Mixup()": [lambda: _mixup_callback()],
        "Mixup(mode=sample, cutmix_alpha=1)": [lambda: _mixup_callback(mode="sample", cutmix_alpha=1.0)],
    }, batch_size=32 if q else 128, steps=5 if q else 20, warmup_steps=2 if q else 3, repeats=repeats, quick=q)
    baseline = "timm Mixup mode=batch"
    transforms = interleaved({name: per_call(fn, 5 if q else 20) for name, fn in transform_cases(256).items()},
                             repeats=repeats, quick=q)
    ratio = medians(transforms)["lightning-tricks mixup mode=sample"] / medians(transforms)[baseline]
    step_meds = medians(steps)
    overheads = ", ".join(f"{name} {step_meds[name] / step_meds['baseline']:.3f}x" for name in step_meds
                          if name != "baseline")
    publish(args, "Mixup overhead and speed", [
        f"Training step, `ImageClassifier('simple_cnn')`, batch {32 if q else 128}, 3x32x32, CPU "
        f"(median step per fit, {repeats} interleaved repeats). **Overhead: {overheads}** (target <= 1.05x).",
        "",
        format_table(steps, "baseline"),
        "",
        f"Transform alone (images and targets), batch 256, 3x32x32, 10 classes, alpha 1 (median per call, "
        f"{repeats} interleaved repeats). **Per-sample-lambda mixup / timm batch mode: {ratio:.2f}x** "
        "(target <= 1.2x).",
        "",
        format_table(transforms, baseline),
    ])
    return 0
