"""Training-step time of a Lightning model with and without given callbacks, as ratios to a no-callback baseline.

Each repetition is a short ``trainer.fit`` of a fresh :class:`~lightning_tricks.zoo.ImageClassifier`
on :class:`~lightning_tricks.zoo.SyntheticDataModule` (no validation, logger, checkpointing, progress
bar or model summary). A timer callback placed first and one placed last in ``callbacks`` measure the
wall time from ``on_train_batch_start`` to ``on_train_batch_end`` of each step, so the step's own
work and everything the measured callbacks do inside it are counted; the data fetch before
``on_train_batch_start`` is not. The first ``warmup_steps`` steps are discarded and the median of the
others is the repetition's sample; repetitions are interleaved across configurations.

Example:
    ``python -m benchmarks step --callback lightning.pytorch.callbacks.Timer``
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved
from lightning_tricks.zoo import ImageClassifier, SyntheticDataModule

CallbackSpec = str | type[Callback] | Callable[[], Callback]
"""A class path (``"pkg.mod.Class"``, built with no arguments), a Callback class, or a factory."""
BASELINE = "baseline"


class NoOpCallback(Callback):
    """A callback that does nothing: benchmarking it measures the harness's own noise (ratio ~ 1)."""


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class _StartTimer(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.callbacks[0] is not self or trainer.callbacks[-1] is not self.timer.last:
            raise RuntimeError(
                "the step timers must be the first and last callbacks, but Lightning ordered them "
                f"{[type(c).__name__ for c in trainer.callbacks]} (it moves Checkpoint callbacks to the end)."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        _sync(pl_module)
        self.timer._start = time.perf_counter()


class _EndTimer(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(pl_module)
        timer = self.timer
        if timer._start is not None:
            timer._seen += 1
            if timer._seen > timer.warmup_steps:
                timer.times.append(time.perf_counter() - timer._start)
            timer._start = None


class StepTimer:
    """Per-step wall time from ``on_train_batch_start`` to ``on_train_batch_end``, through two callbacks.

    Put ``first`` before and ``last`` after the callbacks being measured (Lightning calls them in list
    order); a fit fails if Lightning reorders them.

    Args:
        warmup_steps: steps discarded at the start of each fit.

    Attributes:
        times: the kept step times in seconds.
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.times: list[float] = []
        self._start: float | None = None
        self._seen = 0
        self.first = _StartTimer(self)
        self.last = _EndTimer(self)

    def wrap(self, callbacks: Sequence[Callback]) -> list[Callback]:
        """``[first, *callbacks, last]``."""
        return [self.first, *callbacks, self.last]


def resolve_callback(spec: CallbackSpec) -> Callback:
    """Build a callback from a class path, a Callback class, or a factory.

    Raises:
        ValueError: a class path that does not import, or a factory that does not return a Callback.
    """
    if isinstance(spec, str):
        module_name, _, attr = spec.rpartition(".")
        try:
            spec = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"callback {spec!r} is invalid: expected an importable 'package.module.Class'.") from err
    callback = spec()  # type: ignore[operator]
    if not isinstance(callback, Callback):
        raise ValueError(f"callback {spec!r} built {type(callback).__name__}, not a lightning Callback.")
    return callback


def measure_step(
    configs: Mapping[str, Sequence[CallbackSpec]],
    backbone: str = "simple_cnn",
    batch_size: int = 128,
    image_size: int = 32,
    channels: int = 3,
    steps: int = 20,
    repeats: int = 5,
    warmup_steps: int = 3,
    warmup: int = 1,
    accelerator: str = "cpu",
    num_classes: int = 10,
    seed: int = 0,
    quick: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Median training-step time of each configuration, one sample per repetition, interleaved.

    Args:
        configs: name -> callbacks of that configuration (``[]`` for the baseline). Callbacks are built
            afresh for every fit.
        backbone: zoo backbone name (see :func:`~lightning_tricks.zoo.build_backbone`).
        batch_size: training batch size.
        image_size: image side.
        channels: image channels.
        steps: measured steps per fit (after ``warmup_steps``).
        repeats: measured repetitions per configuration (>= 5, or >= 3 with ``quick``).
        warmup_steps: steps discarded at the start of each fit.
        warmup: whole rounds of fits discarded before the measured ones.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        num_classes: classes of the synthetic data.
        seed: seed of the data and of every fresh model (all configurations start from the same weights).
        quick: allow 3 repeats (smoke runs).
        model_kwargs: extra :class:`~lightning_tricks.zoo.ImageClassifier` arguments.

    Returns:
        name -> per-repetition median step times in seconds.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available but not used|LeafSpec).*")
    datamodule = SyntheticDataModule(num_samples=batch_size * (steps + warmup_steps), num_classes=num_classes,
                                     image_shape=[channels, image_size, image_size], batch_size=batch_size,
                                     seed=seed)
    datamodule.setup("fit")  # generated once, reused by every fit

    def case(specs: Sequence[CallbackSpec]) -> Callable[[], float]:
        def run() -> float:
            gc.collect()
            torch.manual_seed(seed)
            model = ImageClassifier(backbone, num_classes=num_classes, in_channels=channels, image_size=image_size,
                                    schedule="none", **(model_kwargs or {}))
            timer = StepTimer(warmup_steps)
            trainer = pl.Trainer(
                accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=steps + warmup_steps,
                limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                callbacks=timer.wrap([resolve_callback(s) for s in specs]),
            )
            trainer.fit(model, datamodule=datamodule)
            if len(timer.times) != steps:
                raise RuntimeError(f"measured {len(timer.times)} steps, expected {steps}.")
            return statistics.median(timer.times)

        return run

    return interleaved({name: case(specs) for name, specs in configs.items()}, repeats=repeats, warmup=warmup,
                       quick=quick)


def measure_step_options(configs: Mapping[str, Sequence[CallbackSpec]], args: argparse.Namespace,
                         backbone: str | None = None, channels: int = 3) -> dict[str, list[float]]:
    """:func:`measure_step` with the options of :meth:`BenchmarkParser.add_step_options` (``--accelerator`` if any).

    ``backbone`` defaults to ``args.backbone``.
    """
    return measure_step(configs, backbone=backbone or args.backbone, batch_size=args.batch_size,
                        image_size=args.image_size, channels=channels, steps=args.steps, repeats=args.repeats,
                        warmup_steps=args.warmup_steps, accelerator=getattr(args, "accelerator", "cpu"),
                        quick=args.quick)


def step_protocol(args: argparse.Namespace) -> str:
    """How :func:`measure_step_options` took its samples, for a section's description."""
    return (f"per fit {args.warmup_steps} warm-up + {args.steps} measured steps, sample = median step; 1 warm-up "
            f"round, {args.repeats} interleaved repeats")


def _case_names(groups: Sequence[str]) -> dict[str, list[str]]:
    configs: dict[str, list[str]] = {BASELINE: []}
    for group in groups:
        paths = [p.strip() for p in group.split(",") if p.strip()]
        name = "+".join(p.rpartition(".")[2] for p in paths)
        configs[name if name not in configs else group] = paths
    return configs


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("step", __doc__, quick="smoke run: fewer steps and repeats, smaller batch", repeats=5,
                        device="--accelerator")
    p.add_argument("--callback", action="append", default=[], metavar="CLASS_PATH",
                   help="a callback class path (built with no arguments); repeat for one configuration each, "
                        "comma-separate to measure several together (default: benchmarks.step.NoOpCallback)")
    p.add_argument("--backbone", default="simple_cnn")
    p.add_step_options(batch_size=(128, 32), steps=(20, 5), warmup_steps=(3, 2))
    p.add_argument("--channels", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: measure, print the ratio table, write the section of RESULTS.md."""
    args = _parser().parse_args(argv)
    configs = _case_names(args.callback or [f"{__name__}.NoOpCallback"])
    samples = measure_step_options(configs, args, channels=args.channels)
    cases = "; ".join(f"{name}: {', '.join(paths) or 'no callback'}" for name, paths in configs.items())
    publish(args, "training-step time with callbacks", [
        f"Backbone `{args.backbone}`, batch {args.batch_size}, {args.channels}x{args.image_size}x{args.image_size}, "
        f"accelerator `{args.accelerator}`; step = `on_train_batch_start` -> `on_train_batch_end`; "
        f"{step_protocol(args)}. Cases: {cases}.",
        "",
        format_table(samples, BASELINE),
    ])
    return 0
