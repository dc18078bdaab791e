"""Training-step overhead of DeadUnitMonitor and UpdateRatioMonitor, against a fastai-style per-batch histogram hook.

One interleaved run of short fits of ``ImageClassifier("resnet56")`` on synthetic 3x32x32 data (batch
64 by default), with the cases: no callback (baseline); ``DeadUnitMonitor``; ``UpdateRatioMonitor``
measuring every 50 steps; both; and a fastai ``ActivationStats``-style hook (written here) that, on
every batch and for the same ReLU modules, computes the mean, standard deviation, near-zero fraction
and a 40-bin histogram and reads them back to the host. Per fit, the step times (from
``on_train_batch_start`` to ``on_train_batch_end``, see ``benchmarks/step.py``) of ``--steps``
measured steps after ``--warmup-steps`` give two samples: their median (the per-step cost) and their
mean (the cost averaged over steps, which is what an every-N-steps monitor adds). With the defaults
(2 warm-up + 50 measured steps) the window holds exactly one UpdateRatioMonitor measurement (step 50).
Writes the ``monitoring`` section of ``benchmarks/RESULTS.md``.

Example:
    ``python -m benchmarks monitoring``   (``--quick`` for a smoke run)
"""

from __future__ import annotations

import gc
import logging
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import interleaved
from benchmarks.step import StepTimer
from lightning_tricks import DeadUnitMonitor, ImageClassifier, SyntheticDataModule, UpdateRatioMonitor
from lightning_tricks.monitoring import find_watched_modules

BASELINE = "baseline"


class PerBatchHistogramHook(Callback):
    """fastai ``ActivationStats``-style: every training batch, per module, mean/std/near-zero share and a histogram.

    Like fastai's hook it turns each statistic into a Python number (``.item()``) on every batch, so
    each one is a host synchronization on a GPU; the histograms (40 bins over [0, 10]) are kept on
    the host. It watches the same modules as ``DeadUnitMonitor``.
    """

    def __init__(self) -> None:
        self.stats: list[tuple[float, float, float, torch.Tensor]] = []
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for watched in find_watched_modules(pl_module):
            self._handles.append(watched.module.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            out = output.detach().float()
            self.stats.append((out.mean().item(), out.std().item(), (out <= 0.05).float().mean().item(),
                               out.histc(40, 0, 10).cpu()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


CASES: dict[str, Callable[[], list[Callback]]] = {
    BASELINE: lambda: [],
    "DeadUnitMonitor": lambda: [DeadUnitMonitor(plot=False)],
    "UpdateRatioMonitor(every_n_steps=50)": lambda: [UpdateRatioMonitor(every_n_steps=50)],
    "both": lambda: [DeadUnitMonitor(plot=False), UpdateRatioMonitor(every_n_steps=50)],
    "fastai-style per-batch histogram hook": lambda: [PerBatchHistogramHook()],
}


def measure(backbone: str, batch_size: int, steps: int, warmup_steps: int, repeats: int, quick: bool,
            accelerator: str, image_size: int = 32) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per case, one median and one mean step time (seconds) per repetition, interleaved."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    datamodule = SyntheticDataModule(num_samples=batch_size * (steps + warmup_steps), num_classes=10,
                                     image_shape=[3, image_size, image_size], batch_size=batch_size, seed=0)
    datamodule.setup("fit")
    medians: dict[str, list[float]] = {name: [] for name in CASES}

    def case(name: str) -> Callable[[], float]:
        def run() -> float:
            gc.collect()
            torch.manual_seed(0)
            model = ImageClassifier(backbone, num_classes=10, in_channels=3, image_size=image_size, schedule="none",
                                    lr=0.01)
            timer = StepTimer(warmup_steps)
            trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1,
                                 limit_train_batches=steps + warmup_steps, limit_val_batches=0, num_sanity_val_steps=0,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=timer.wrap(CASES[name]()))
            trainer.fit(model, datamodule=datamodule)
            if len(timer.times) != steps:
                raise RuntimeError(f"measured {len(timer.times)} steps, expected {steps}.")
            medians[name].append(statistics.median(timer.times))
            return statistics.fmean(timer.times)

        return run

    means = interleaved({name: case(name) for name in CASES}, repeats=repeats, warmup=1, quick=quick)
    return {name: values[-repeats:] for name, values in medians.items()}, means


def table(medians: dict[str, list[float]], means: dict[str, list[float]]) -> str:
    base_med = statistics.median(medians[BASELINE])
    base_mean = statistics.median(means[BASELINE])
    lines = ["| case | median step ms | ratio (per step) | mean step ms | ratio (averaged over steps) | "
             "min-max of means ms | repeats |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in CASES:
        med, mean = statistics.median(medians[name]), statistics.median(means[name])
        lines.append(f"| {name} | {1e3 * med:.1f} | {med / base_med:.3f} | {1e3 * mean:.1f} | {mean / base_mean:.3f} "
                     f"| {1e3 * min(means[name]):.1f}-{1e3 * max(means[name]):.1f} | {len(means[name])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the ``monitoring`` section of RESULTS.md."""
    # one thread by default: on a shared machine two threads waiting on each other at every barrier turn a busy
    # neighbour into a 10x slower step; one thread degrades smoothly
    parser = BenchmarkParser("monitoring", __doc__, quick="smoke run: resnet20, batch 16, few steps and repeats",
                             repeats=5, threads=1, device="--accelerator")
    parser.add_quick_default("--backbone", "resnet56", "resnet20", "zoo backbone")
    parser.add_step_options(batch_size=(64, 16), steps=(50, 6), warmup_steps=2)
    args = parser.parse_args(argv)
    steps = args.steps
    medians, means = measure(args.backbone, args.batch_size, steps, args.warmup_steps, args.repeats, args.quick,
                             args.accelerator, args.image_size)
    measured_steps = f"steps {args.warmup_steps}..{args.warmup_steps + steps - 1}"
    publish(args, "DeadUnitMonitor and UpdateRatioMonitor step overhead", [
        f"`ImageClassifier('{args.backbone}')`, SGD, synthetic 3x{args.image_size}x{args.image_size} data, batch "
        f"{args.batch_size}, accelerator `{args.accelerator}`, {torch.get_num_threads()} torch thread(s). Per fit "
        f"{args.warmup_steps} warm-up + {steps} measured steps ({measured_steps}; "
        "UpdateRatioMonitor measures the steps that are multiples of 50); per fit the median and the mean step "
        f"time are taken; 1 warm-up round, {args.repeats} interleaved repeats; the table shows the median over "
        "repeats and its ratio to the baseline. Targets: DeadUnitMonitor <= 1.05 per step, UpdateRatioMonitor(every "
        "50) <= 1.05 averaged over steps. DeadUnitMonitor's once-per-epoch reduction (and all-reduce) runs at the "
        "epoch end, outside these steps.",
        "",
        table(medians, means),
    ])
    return 0
