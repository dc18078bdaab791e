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

import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians
from lightning_tricks.early_stopping import StoppingRule, WeightSnapshot
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


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the ``early_stopping`` section of RESULTS.md."""
    parser = BenchmarkParser("early_stopping", __doc__, quick="smoke run: smaller batch, 3 repeats", repeats=7,
                             device="--device")
    parser.add_argument("--backbone", default="resnet56")
    parser.add_quick_default("--batch-size", 128, 32, "training batch size")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--inner", type=int, default=20, help="calls averaged per sample of the short cases")
    args = parser.parse_args(argv)
    batch_size = args.batch_size
    samples, nbytes, params = measure(args.backbone, batch_size, args.image_size, args.device, args.repeats,
                                      args.inner, quick=args.quick)
    meds = medians(samples)
    steps_per_epoch = -(-50_000 // batch_size)
    publish(args, "cost of keeping the best weights", [
        f"`ImageClassifier({args.backbone!r})`, {params:,} parameters, state_dict copy {nbytes / 2**20:.2f} MiB; "
        f"batch {batch_size} of 3x{args.image_size}x{args.image_size} on `{args.device}`. Baseline `train_step`: one "
        f"SGD step (forward, cross-entropy, backward, update). `capture`: refresh the host copy in place (each "
        f"improving check); `capture_first`: first copy, allocating; `restore`: load it back (once per fit); "
        f"`rule_step`: the stopping decision. Short cases: mean of {args.inner} calls per sample; "
        f"{args.repeats} interleaved repeats after 1 warm-up round, medians.",
        "",
        format_table(samples, "train_step"),
        "",
        f"One improving check costs {meds['capture'] / meds['train_step']:.2%} of one training step, i.e. "
        f"{meds['capture'] / (meds['train_step'] * steps_per_epoch):.4%} of a CIFAR-10 epoch "
        f"({steps_per_epoch} steps at batch {batch_size}); a check without improvement copies nothing.",
    ])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
