"""DropConnect: training-step time of the zoo simple_cnn with DropConnect on its Linear layers vs without.

Each configuration is a short ``trainer.fit`` of the zoo's ``ImageClassifier`` (``simple_cnn``) on
synthetic 3x32x32 data (``benchmarks.step.measure_step``: interleaved repetitions, median step time).
DropConnect converts the hidden Linear layer (the default: every Linear but the classifier head);
``all-linear`` also converts the head; ``p=0`` shows the cost when off (no layer is converted).

Target (issue 5): the whole step <= 1.2x the plain step.

Example:
    ``python -m benchmarks dropconnect``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from functools import partial

import torch

from benchmarks._structural import add_common_options, apply_common_options, publish
from benchmarks.harness import format_table, ratios
from benchmarks.step import measure_step
from lightning_tricks import DropConnect


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dropconnect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=float, default=0.5)
    add_common_options(parser, steps=20, batch_size=128)
    args = parser.parse_args(argv)
    apply_common_options(args)
    configs = {
        "baseline": [],
        "step": [partial(DropConnect, args.p, seed=0)],
        "sample": [partial(DropConnect, args.p, mode="sample", seed=0)],
        "all-linear": [partial(DropConnect, args.p, layers=["*head.*"], seed=0)],
        "p=0": [partial(DropConnect, 0.0, seed=0)],
    }
    start = time.perf_counter()
    samples = measure_step(configs, backbone="simple_cnn", batch_size=args.batch_size, image_size=args.image_size,
                           channels=3, steps=args.steps, repeats=args.repeats, warmup_steps=args.warmup_steps,
                           quick=args.quick)
    wall = time.perf_counter() - start
    r = ratios(samples, "baseline")
    lines = [
        f"Backbone `simple_cnn` (zoo: hidden Linear 64->128, head 128->10), batch {args.batch_size}, "
        f"3x{args.image_size}x{args.image_size}, CPU, p={args.p}, torch threads {torch.get_num_threads()}; per fit "
        f"{args.warmup_steps} warm-up + {args.steps} measured steps, sample = median step; 1 warm-up round, "
        f"{args.repeats} interleaved repeats. Cases: `step` = one mask per step on the hidden Linear (default); "
        "`sample` = one mask per example (batched matmul); `all-linear` = hidden Linear and head; `p=0` = off.",
        "",
        format_table(samples, "baseline"),
        "",
        f"Default DropConnect / plain = **{r['step']:.3f}** (target <= 1.2); per-example masks {r['sample']:.3f}; "
        f"off (p=0) {r['p=0']:.3f}.",
    ]
    publish("dropconnect", "training-step time, DropConnect vs plain simple_cnn", argv, wall, lines, args.quick,
            args.no_write)
    return 0
