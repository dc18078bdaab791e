"""Initialization: the lectures' activation-statistics table and a deep plain ReLU MLP trained per init.

Runs the two init examples and writes their tables to ``benchmarks/RESULTS.md``, where
``docs/init.md`` includes them: section ``init-statistics`` (``examples/init_statistics.py``: the std
of each layer's activations of a 6-layer, 4096-unit net for the lectures' five cases; seconds) and
section ``init-training`` (``examples/init_training.py``: final accuracies of the zoo MLP on digits
for four inits over seeds; about a minute on 2 cores). The histogram figure stays with the example
(``python examples/init_statistics.py --out docs/img/init_statistics.png``).

Example:
    ``python -m benchmarks init_effect``                   (both sections)
    ``python -m benchmarks init_effect --part statistics`` (the table only)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from benchmarks._cli import BenchmarkParser, publish

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples are scripts, not a package) to reuse its table code."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    p = BenchmarkParser("init_effect", __doc__, section="init")
    p.add_argument("--part", choices=["statistics", "training", "all"], default="all")
    p.add_argument("--seed", type=int, default=0, help="seed of the statistics table (default 0)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--lr", type=float, default=0.01, help="training learning rate (default 0.01)")
    args = p.parse_args(argv)
    if args.part in ("statistics", "all"):
        example = _example("init_statistics")
        table = example.statistics_table(example.lecture_statistics(args.seed))
        publish(args, "activation std per layer, the lectures' five initializations", [
            f"6 bias-free layers of 4096 units, batch 16, x ~ N(0, 1), seed {args.seed}; the std of each "
            "layer's activations; 'saturated' is the mean fraction with |tanh| > 0.99.", "", table],
            section=f"{args.section}-statistics")
    if args.part in ("training", "all"):
        example, args.started = _example("init_training"), time.perf_counter()  # this section's own wall time
        depth, width = 12, 128
        table = example.training_table(args.seeds, args.epochs, depth, width, args.lr)
        publish(args, "a deep plain ReLU MLP on digits, per initialization", [
            f"Zoo MLP with {depth} hidden layers of {width} ReLU units, no normalization, SGD lr {args.lr}, "
            f"momentum 0.9, cosine, {args.epochs} epochs, digits batch 64; seeds 0..{args.seeds - 1}; only the "
            "init differs (the first row has no WeightInit callback).", "", table],
            section=f"{args.section}-training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
