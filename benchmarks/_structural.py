"""Shared by the structural-trick benchmarks: command-line options, thread setting, the RESULTS.md section."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from benchmarks.harness import machine_description, write_results


def add_common_options(parser: argparse.ArgumentParser, steps: int, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help=f"measured steps per fit (default {steps})")
    parser.add_argument("--warmup-steps", type=int, default=2, help="discarded steps per fit (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 3 steps (not a figure)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")


def apply_common_options(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.steps = 3, 3


def publish(name: str, title: str, argv: Sequence[str] | None, wall: float, lines: Sequence[str], quick: bool,
            no_write: bool, section: str | None = None) -> None:
    """Print the section and write it to RESULTS.md (``section``, default ``NAME``; ``-quick`` appended)."""
    section = f"{section or name}-quick" if quick else section or name
    command = shlex.join(["python", "-m", "benchmarks", name, *(sys.argv[2:] if argv is None else argv)])
    markdown = "\n".join([
        f"## {section}: {title}{' (quick smoke run, not a figure)' if quick else ''}",
        "",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {wall:.0f} s wall.",
        "",
        f"Machine: {machine_description()}.",
        "",
        *lines,
    ])
    print(markdown)
    if not no_write:
        print(f"\nwrote section {section!r} of {write_results(section, markdown)}")


def conv_linear_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each Conv/Linear module in one forward of ``example``, by module name."""
    macs: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(m, args, out, name=name):
                macs[name] = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            hooks.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: macs.__setitem__(name, out.numel() * m.in_features)))
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    return macs


def train_digits(backbone: str, callbacks: list, seed: int, epochs: int, lr: float, resize_to: int | None = None,
                 batch_size: int = 64) -> tuple[Any, Any, float]:
    """Train the zoo ImageClassifier on digits (no validation, logging or checkpoints); returns model, data, seconds."""
    import logging
    import warnings

    import lightning.pytorch as pl

    from lightning_tricks.zoo import DigitsDataModule, ImageClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|val_dataloader).*")
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=batch_size, resize_to=resize_to)
    model = ImageClassifier(backbone, num_classes=10, in_channels=1, image_size=resize_to or 8, lr=lr,
                            schedule="cosine")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    data.setup("test")
    return model.eval(), data, seconds


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std) of percentages."""
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"
