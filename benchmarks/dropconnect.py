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

from collections.abc import Sequence
from functools import partial

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, ratios
from benchmarks.step import measure_step_options, step_protocol
from lightning_tricks import DropConnect


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("dropconnect", __doc__, quick="smoke run: 3 repeats, 3 steps", repeats=5)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_step_options(batch_size=128, steps=(20, 3), warmup_steps=2)
    args = parser.parse_args(argv)
    configs = {
        "baseline": [],
        "step": [partial(DropConnect, args.p, seed=0)],
        "sample": [partial(DropConnect, args.p, mode="sample", seed=0)],
        "all-linear": [partial(DropConnect, args.p, include=["*head.*"], seed=0)],
        "p=0": [partial(DropConnect, 0.0, seed=0)],
    }
    samples = measure_step_options(configs, args, backbone="simple_cnn")
    r = ratios(samples, "baseline")
    publish(args, "training-step time, DropConnect vs plain simple_cnn", [
        f"Backbone `simple_cnn` (zoo: hidden Linear 64->128, head 128->10), batch {args.batch_size}, "
        f"3x{args.image_size}x{args.image_size}, CPU, p={args.p}, torch threads {torch.get_num_threads()}; "
        f"{step_protocol(args)}. Cases: `step` = one mask per step on the hidden Linear (default); "
        "`sample` = one mask per example (batched matmul); `all-linear` = hidden Linear and head; `p=0` = off.",
        "",
        format_table(samples, "baseline"),
        "",
        f"Default DropConnect / plain = **{r['step']:.3f}** (target <= 1.2); per-example masks {r['sample']:.3f}; "
        f"off (p=0) {r['p=0']:.3f}.",
    ])
    return 0
