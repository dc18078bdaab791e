"""Early stopping: per-check cost of keeping the best weights (host copy of the state_dict) relative to a training step.

`EarlyStopping(restore_best_weights=True)` copies the LightningModule's ``state_dict`` to host memory
at every check that improves the monitored value (never at the others), and loads it back once when
training ends. This benchmark times, interleaved in one process on the same model:

* ``train_step``: one optimizer step of ``ImageClassifier(backbone)`` (forward, ``F.cross_entropy``,
  backward, SGD step) on a batch of ``batch_size`` images: the baseline;
* ``capture``: :meth:`WeightSnapshot.capture`, refreshing an existing copy in place (every
  improvement after the first);
* ``capture_first``: the first capture, which also allocates the host tensors;
* ``restore``: :meth:`WeightSnapshot.restore` (once per fit);
* ``rule_step``: :meth:`StoppingRule.step`, the decision itself.

Each sample of the short cases is the mean over ``--inner`` calls. The ratio column is each
median over the median training step, so ``capture`` at 0.002 means one improving check costs 0.2%
of one training step (an epoch of CIFAR-10 at batch 128 has 391 steps).

Example:
    ``python -m benchmarks early_stopping`` (resnet56, batch 128, 3x32x32)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from benchmarks.harness import format_table, interleaved, machine_description, medians, write_results
from lightning_tricks.stopping import StoppingRule, WeightSnapshot
from lightning_tricks.zoo import ImageClassifier


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backbone: str = "resnet56", batch_size: int = 128, image_size: int = 32, device: str = "cpu",
            repeats: int = 5, inner: int = 20, quick: bool = False) -> tuple[dict[str, list[float]], int, int]:
    """Samples (seconds) of every case, the copy's size in bytes and the model's parameter count."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = ImageClassifier(backbone, num_classes=10, in_channels=3, image_size=image_size).to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    snapshot = WeightSnapshot()
    snapshot.capture(model)
    rule = StoppingRule(mode="min", patience=10**9)
    values = iter(torch.rand(10**7).tolist())
    epoch = iter(range(10**9))

    def train_step() -> float:
        _sync(dev)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        _sync(dev)
        return time.perf_counter() - start

    def repeated(fn: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            _sync(dev)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(dev)
            return (time.perf_counter() - start) / inner

        return run

    cases = {
        "train_step": train_step,
        "capture": repeated(lambda: snapshot.capture(model)),
        "capture_first": repeated(lambda: WeightSnapshot().capture(model)),
        "restore": repeated(lambda: snapshot.restore(model)),
        "rule_step": repeated(lambda: rule.step(next(values), next(epoch))),
    }
    samples = interleaved(cases, repeats=repeats, quick=quick)
    return samples, snapshot.nbytes, sum(p.numel() for p in model.parameters())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks early_stopping", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet56")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (32 with --quick)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 7; 3 with --quick)")
    p.add_argument("--inner", type=int, default=20, help="calls averaged per sample of the short cases")
    p.add_argument("--quick", action="store_true", help="smoke run: smaller batch, 3 repeats (not a figure)")
    p.add_argument("--section", default="early_stopping")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the ``early_stopping`` section of RESULTS.md."""
    args = _parser().parse_args(argv)
    q = args.quick
    batch_size = args.batch_size or (32 if q else 128)
    repeats = args.repeats or (3 if q else 7)
    start = time.perf_counter()
    samples, nbytes, params = measure(args.backbone, batch_size, args.image_size, args.device, repeats,
                                      args.inner, quick=q)
    wall = time.perf_counter() - start
    meds = medians(samples)
    steps_per_epoch = -(-50_000 // batch_size)
    section = f"{args.section}-quick" if q else args.section
    command = shlex.join(["python", "-m", "benchmarks", "early_stopping", *(sys.argv[2:] if argv is None else argv)])
    markdown = "\n".join([
        f"## {section}: cost of keeping the best weights{' (quick smoke run, not a figure)' if q else ''}",
        "",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {wall:.0f} s wall.",
        "",
        f"`ImageClassifier({args.backbone!r})`, {params:,} parameters, state_dict copy {nbytes / 2**20:.2f} MiB; "
        f"batch {batch_size} of 3x{args.image_size}x{args.image_size} on `{args.device}`. Baseline `train_step`: one "
        f"SGD step (forward, cross-entropy, backward, update). `capture`: refresh the host copy in place (each "
        f"improving check); `capture_first`: first copy, allocating; `restore`: load it back (once per fit); "
        f"`rule_step`: the stopping decision. Short cases: mean of {args.inner} calls per sample; "
        f"{repeats} interleaved repeats after 1 warm-up round, medians.",
        "",
        f"Machine: {machine_description()}.",
        "",
        format_table(samples, "train_step"),
        "",
        f"One improving check costs {meds['capture'] / meds['train_step']:.2%} of one training step, i.e. "
        f"{meds['capture'] / (meds['train_step'] * steps_per_epoch):.4%} of a CIFAR-10 epoch "
        f"({steps_per_epoch} steps at batch {batch_size}); a check without improvement copies nothing.",
    ])
    print(markdown)
    if not args.no_write:
        print(f"\nwrote section {section!r} of {write_results(section, markdown)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
