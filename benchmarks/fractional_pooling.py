"""Fractional max pooling: training-step time vs MaxPool2d on the zoo simple_cnn, and the pooling layer alone.

Whole step: a short ``trainer.fit`` of the zoo's ``ImageClassifier`` (``simple_cnn``) on synthetic
3x32x32 data (``benchmarks.step.measure_step``), plain (two ``MaxPool2d(2)``) vs ``FractionalMaxPooling()``
(ratio 1/sqrt(2): the layers after each pool see a map about 1.4x wider, so the network itself does
more work). Layer alone: forward + backward of one pooling layer on a (batch, 32, 32, 32) tensor:
``nn.MaxPool2d(2)``, torch's ``nn.FractionalMaxPool2d`` and ours (same regions rule, owned generator).

Example:
    ``python -m benchmarks fractional_pooling``
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, ratios
from benchmarks.step import measure_step_options, step_protocol
from lightning_tricks import FractionalMaxPooling, SeededFractionalMaxPool2d
from lightning_tricks.core.randomness import LayerRandomness


def _layer_case(layer: nn.Module, x: torch.Tensor, calls: int):
    def run() -> None:
        for _ in range(calls):
            inp = x.detach().requires_grad_()
            layer(inp).sum().backward()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("fractional_pooling", __doc__, quick="smoke run: 3 repeats, 3 steps", repeats=5)
    parser.add_step_options(batch_size=128, steps=(20, 3), warmup_steps=2)
    parser.add_argument("--layer-calls", type=int, default=20, help="forward+backward calls per layer sample")
    args = parser.parse_args(argv)
    samples = measure_step_options({"baseline": [], "fractional": [FractionalMaxPooling]}, args, backbone="simple_cnn")
    x = torch.randn(args.batch_size, 32, 32, 32)
    ratio = 1 / math.sqrt(2)
    ours = SeededFractionalMaxPool2d(2, ratio, LayerRandomness(0))
    layers = {"MaxPool2d": nn.MaxPool2d(2), "torch FractionalMaxPool2d": nn.FractionalMaxPool2d(2, output_ratio=ratio),
              "SeededFractionalMaxPool2d": ours}
    layer_samples = interleaved({name: _layer_case(layer, x, args.layer_calls) for name, layer in layers.items()},
                                repeats=args.repeats, quick=args.quick)
    r, lr = ratios(samples, "baseline"), ratios(layer_samples, "MaxPool2d")
    publish(args, "training-step time, FractionalMaxPooling vs MaxPool2d", [
        f"Whole step: backbone `simple_cnn`, batch {args.batch_size}, 3x{args.image_size}x{args.image_size}, CPU, "
        f"torch threads {torch.get_num_threads()}; {step_protocol(args)}. With ratio 1/sqrt(2) the maps "
        f"after the pools are {int(args.image_size * ratio)}x{int(args.image_size * ratio)} and "
        f"{int(int(args.image_size * ratio) * ratio)}x{int(int(args.image_size * ratio) * ratio)} instead of "
        f"{args.image_size // 2}x{args.image_size // 2} and {args.image_size // 4}x{args.image_size // 4}.",
        "",
        format_table(samples, "baseline"),
        "",
        f"Pooling layer alone: forward + backward on ({args.batch_size}, 32, 32, 32), {args.layer_calls} calls per "
        f"sample, {args.repeats} interleaved repeats (sample = time of the calls).",
        "",
        format_table(layer_samples, "MaxPool2d"),
        "",
        f"FractionalMaxPooling step / plain step = **{r['fractional']:.3f}**; our layer / torch's layer = "
        f"{lr['SeededFractionalMaxPool2d'] / lr['torch FractionalMaxPool2d']:.3f}.",
    ])
    return 0
