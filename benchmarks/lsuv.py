"""LSUV initialization time as a ratio to one forward+backward step of the same model and batch.

Cases, interleaved: ``forward+backward`` (train mode, cross-entropy, ``backward()``: the baseline),
``lsuv`` (:func:`lightning_tricks.init.lsuv`: orthonormal pre-init and the single-pass scaling), and
with ``--reference`` also ``lsuv, paper's multi-pass`` (:func:`lsuv_reference`: a full forward pass
per layer and per iteration, as the paper describes it). Target: ``lsuv`` under 10x the baseline on
ResNet-56, batch 128, 32x32.

Example:
    ``python -m benchmarks lsuv`` (ResNet-56) or ``python -m benchmarks lsuv --backbone resnet20 --reference``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved
from lightning_tricks.init import LSUVLayer, lsuv, select_modules
from lightning_tricks.init._measure import measurement_mode
from lightning_tricks.init.lsuv_init import output_variance
from lightning_tricks.init.schemes import apply_scheme, resolve_scheme
from lightning_tricks.zoo import build_backbone


def lsuv_reference(module: nn.Module, inputs: torch.Tensor, tol: float = 0.1, max_iters: int = 10,
                   generator: torch.Generator | None = None) -> list[LSUVLayer]:
    """The paper's LSUV, literally: for each layer in forward order, re-run the whole network until
    ``|Var - 1| < tol`` or ``max_iters`` rescalings. Same pre-init draws and variance as :func:`lsuv`,
    so both give the same weights; this one costs a forward pass per layer and per iteration.
    """
    layers = select_modules(module)
    apply_scheme(module, resolve_scheme("lsuv"), generator=generator)
    order: list[str] = []
    names = {id(m): n for n, m in layers}
    captured: dict[str, torch.Tensor] = {}

    def capture(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        name = names[id(layer)]
        if name not in captured:
            captured[name] = output
            if name not in order:
                order.append(name)

    handles = [m.register_forward_hook(capture) for _, m in layers]
    report = []
    try:
        with torch.no_grad(), measurement_mode(module):
            module(inputs)
            by_name = dict(layers)
            for name in list(order):
                iterations = 0
                while True:
                    captured.clear()
                    module(inputs)
                    variance = output_variance(captured[name])
                    if abs(variance - 1.0) < tol or iterations == max_iters or variance == 0.0:
                        break
                    by_name[name].weight.mul_(variance**-0.5)
                    iterations += 1
                report.append(LSUVLayer(name, variance, iterations, abs(variance - 1.0) < tol))
    finally:
        for handle in handles:
            handle.remove()
    return report


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("lsuv", __doc__, quick="smoke run: 3 repeats, batch 32", repeats=5, section="lsuv-{backbone}")
    p.add_argument("--backbone", default="resnet56")
    p.add_quick_default("--batch-size", 128, 32, "batch size")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--reference", action="store_true", help="also time the paper's multi-pass LSUV")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: measure, print the ratio table, write the section of RESULTS.md."""
    args = _parser().parse_args(argv)
    batch_size, repeats = args.batch_size, args.repeats
    torch.manual_seed(0)
    model = build_backbone(args.backbone, num_classes=10, in_channels=3, image_size=args.image_size)
    x = torch.randn(batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (batch_size,))
    layers = len(select_modules(model))
    iterations: dict[str, int] = {}

    def step() -> None:
        model.train()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def run_lsuv() -> None:
        iterations["lsuv"] = sum(r.iterations for r in lsuv(model, x, generator=torch.Generator().manual_seed(0)))

    def run_reference() -> None:
        report = lsuv_reference(model, x, generator=torch.Generator().manual_seed(0))
        iterations["reference"] = sum(r.iterations for r in report)

    cases = {"forward+backward": step, "lsuv": run_lsuv}
    if args.reference:
        cases["lsuv, paper's multi-pass"] = run_reference
    samples = interleaved(cases, repeats=repeats, quick=args.quick)
    publish(args, "LSUV vs one forward+backward step", [
        f"Backbone `{args.backbone}` ({layers} conv/linear layers), batch {batch_size}, 3x{args.image_size}x"
        f"{args.image_size}, CPU. `lsuv` = orthonormal pre-init + single-pass scaling ({iterations['lsuv']} rescalings "
        f"in all, tol 0.1)" + (f"; the paper's multi-pass procedure made {iterations['reference']}" if args.reference
                               else "") + f". 1 warm-up round, {repeats} interleaved repeats.",
        "",
        format_table(samples, "forward+backward"),
    ])
    return 0
