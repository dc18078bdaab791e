"""WeightPenalty: training-step overhead on simple_cnn.

The median training step of the zoo's ``ImageClassifier("simple_cnn")`` (SGD) at batch 128, 3x32x32,
on CPU, with the optimizer's ``weight_decay=0``, in three configurations interleaved in one process,
median of >= 5 repetitions: no regularization, ``WeightPenalty(l2=2.5e-4)`` (the gradient of SGD's
``weight_decay=5e-4`` on the weights, biases and batch-norm excluded, plus the logged value), and
``WeightPenalty(l1=1e-5, l2=2.5e-4)`` (elastic net).

Example:
    ``python -m benchmarks weight_penalty`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, ratios
from benchmarks.step import measure_step


def _penalty(**kwargs):  # a factory: benchmarks.step builds callbacks afresh for every fit
    from lightning_tricks import WeightPenalty

    return WeightPenalty(**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and write the ``weight_penalty`` section of RESULTS.md."""
    args = BenchmarkParser("weight_penalty", __doc__, quick="smoke run: fewer steps and repeats",
                           repeats=7).parse_args(argv)
    q, repeats = args.quick, args.repeats
    batch, steps, warmup_steps = (32, 5, 2) if q else (128, 20, 3)
    samples = measure_step({
        "no regularization": [],
        "WeightPenalty(l2=2.5e-4)": [lambda: _penalty(l2=2.5e-4)],
        "WeightPenalty(l1=1e-5, l2=2.5e-4)": [lambda: _penalty(l1=1e-5, l2=2.5e-4)],
    }, batch_size=batch, steps=steps, warmup_steps=warmup_steps, repeats=repeats, quick=q,
        model_kwargs={"weight_decay": 0.0})
    overhead = ratios(samples, "no regularization")["WeightPenalty(l2=2.5e-4)"]
    publish(args, "WeightPenalty overhead", [
        f"Training step, `ImageClassifier('simple_cnn')` with SGD, batch {batch}, 3x32x32, CPU; each sample is the "
        f"median step of a fit, {repeats} interleaved repeats; the optimizer's weight_decay is 0. **WeightPenalty(l2) / no regularization: "
        f"{overhead:.3f}x.**",
        "",
        format_table(samples, "no regularization"),
    ])
    return 0
