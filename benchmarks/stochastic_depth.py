"""Stochastic depth: training-step time of batch mode (skips branches) and row mode vs the plain zoo ResNet-56.

Each configuration is a short ``trainer.fit`` of the zoo's ``ImageClassifier`` on synthetic 3x32x32
data (``benchmarks.step.measure_step``: interleaved repetitions, median step time). ``batch`` is
``StochasticDepth(p, mode="batch")`` with its default inverted scaling (a kept branch times
1/(1-p) in training), which does not run a skipped branch; ``batch-test-scaling`` is the same with the
paper's ``scaling="test"`` (no training-time multiply), to show what inverted scaling costs; ``row`` drops per
example (every branch computed); ``torchvision-batch`` applies ``torchvision.ops.stochastic_depth(...,
mode="batch")`` to the same blocks, which computes the branch and then multiplies it by 0 or 1/(1-p).
The expected-compute limit is the fraction of conv/linear multiply-accumulates left when block l is
skipped with probability p_l (the linear rule), measured with forward hooks.

Target (issue 5): ``batch`` <= 0.80x the plain step with drop_rate 0.5, batch 64, 32x32, CPU.

Example:
    ``python -m benchmarks stochastic_depth``
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, medians
from benchmarks.step import measure_step_options, step_protocol
from lightning_tricks import StochasticDepth
from lightning_tricks.core.surgery import SwappableMixin, swap_class
from lightning_tricks.regularization.stochastic_depth import drop_probabilities
from lightning_tricks.zoo import BasicBlock, build_backbone


class _TorchvisionDepth(SwappableMixin):
    """The peer: torchvision's stochastic_depth on the computed branch (no compute saved)."""

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.stochastic_depth(super().residual(x), self.tv_p, "batch", self.training)


class TorchvisionStochasticDepth(Callback):
    """Converts the zoo's BasicBlocks to ``torchvision.ops.stochastic_depth(mode="batch")`` with the linear rule."""

    def __init__(self, drop_rate: float = 0.5) -> None:
        self.drop_rate = drop_rate

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        blocks = [m for m in pl_module.modules() if isinstance(m, BasicBlock)]
        for block, p in zip(blocks, drop_probabilities(len(blocks), self.drop_rate), strict=True):
            swap_class(block, _TorchvisionDepth)
            block.tv_p = p


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


def expected_compute_ratio(backbone: str, drop_rate: float, image_size: int) -> float:
    """Fraction of the plain model's multiply-accumulates left on average when blocks are skipped."""
    model = build_backbone(backbone, num_classes=10, in_channels=3)
    macs = conv_linear_macs(model, torch.zeros(1, 3, image_size, image_size))
    blocks = [n for n, m in model.named_modules() if isinstance(m, BasicBlock)]
    probs = drop_probabilities(len(blocks), drop_rate)
    total = sum(macs.values())
    saved = sum(p * sum(v for k, v in macs.items() if k.startswith(block + ".")) for block, p in zip(blocks, probs, strict=True))
    return (total - saved) / total


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("stochastic_depth", __doc__, quick="smoke run: 3 repeats, 3 steps", repeats=5)
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--scaling-only", action="store_true",
                        help="only plain, batch (inverted scaling) and batch-test-scaling: what inverted scaling costs "
                             "(section stochastic_depth-scaling)")
    parser.add_step_options(batch_size=64, steps=(10, 3), warmup_steps=2)
    args = parser.parse_args(argv)
    configs = {
        "baseline": [],
        "batch": [partial(StochasticDepth, args.drop_rate, mode="batch", seed=0)],
        "batch-test-scaling": [partial(StochasticDepth, args.drop_rate, mode="batch", scaling="test", seed=0)],
        "row": [partial(StochasticDepth, args.drop_rate, mode="row", seed=0)],
        "torchvision-batch": [partial(TorchvisionStochasticDepth, args.drop_rate)],
    }
    if args.scaling_only:
        configs = {k: v for k, v in configs.items() if k in ("baseline", "batch", "batch-test-scaling")}
    samples = measure_step_options(configs, args)
    limit = expected_compute_ratio(args.backbone, args.drop_rate, args.image_size)
    meds = medians(samples)
    ratio = meds["batch"] / meds["baseline"]
    inverted = meds["batch"] / meds["batch-test-scaling"]
    title = ("training-step time, inverted vs test-time scaling" if args.scaling_only
             else "training-step time, StochasticDepth vs plain ResNet")
    publish(args, title, [
        f"Backbone `{args.backbone}` (zoo), batch {args.batch_size}, 3x{args.image_size}x{args.image_size}, CPU, "
        f"drop_rate {args.drop_rate} (linear rule; `batch` and `row` with the default inverted scaling), torch threads "
        f"{torch.get_num_threads()}; {step_protocol(args)}.",
        "",
        format_table(samples, "baseline"),
        "",
        f"`batch` / plain = **{ratio:.3f}** (target <= 0.80; expected-compute limit {limit:.3f}, the conv/linear "
        f"multiply-accumulates left on average). Inverted scaling (`batch`) / the paper's test-time scaling "
        f"(`batch-test-scaling`) = **{inverted:.3f}**."
        + ("" if args.scaling_only else " `torchvision-batch` computes every branch, so it saves nothing."),
    ], section=f"{args.section}-scaling" if args.scaling_only else None)
    return 0
