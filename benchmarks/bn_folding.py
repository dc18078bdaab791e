"""BatchNorm folding: eval-mode inference time of each model with its BatchNorm folded vs unfolded.

For every model, the unfolded model (eval mode) and ``fold_batch_norm``'s copy run the same batch
under ``torch.inference_mode``; the two are interleaved (plain, folded, plain, folded, ...), each
sample is the median of ``--iters`` forward passes, and the figure is the median over ``--repeats``.
The largest output difference between the two, relative to the largest output, is reported next to the
speed-up.

Example:
    ``python -m benchmarks bn_folding``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import interleaved, medians
from lightning_tricks import fold_batch_norm
from lightning_tricks.zoo.backbones import build_backbone

MODELS = ("resnet20", "resnet56", "tv:resnet18", "timm:resnet18", "tv:mobilenet_v3_small", "timm:efficientnet_b0")


def _forward_time(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("bn_folding", __doc__, quick="smoke run: 3 repeats, 2 iterations", repeats=5,
                             device="--device")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo/torchvision/timm names")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_quick_default("--iters", 5, 2, "forward passes per sample (median)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    rows = ["| model | BatchNorm layers folded | unfolded ms | folded ms | folded / unfolded | max output diff / max output |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in args.models:
        model = build_backbone(name, num_classes=10).to(args.device).eval()
        folded, report = fold_batch_norm(model, x[:2], return_report=True)
        with torch.inference_mode():
            reference = model(x)
            diff = float((folded(x) - reference).abs().max() / reference.abs().max())
        samples = interleaved({"plain": lambda m=model: _forward_time(m, x, args.iters),
                               "folded": lambda m=folded: _forward_time(m, x, args.iters)},
                              repeats=args.repeats, quick=args.quick)
        med = medians(samples)
        rows.append(f"| {name} | {len(report.folded)} of {len(report.folded) + len(report.skipped)} | "
                    f"{med['plain'] * 1e3:.2f} | {med['folded'] * 1e3:.2f} | **{med['folded'] / med['plain']:.3f}** | "
                    f"{diff:.1e} |")
    lines = [
        f"Batch {args.batch_size} of 3x{args.image_size}x{args.image_size}, device `{args.device}`, eval mode, `torch.inference_mode`, "
        f"torch threads {torch.get_num_threads()}; sample = median of {args.iters} forward passes; 1 warm-up round, "
        f"{args.repeats} interleaved repeats; randomly initialized models (folding does not depend on the values).",
        "",
        *rows,
    ]
    publish(args, "inference time with BatchNorm folded into the preceding conv/linear", lines)
    return 0
