"""The MNIST-1D paper's table with our zoo: test accuracy of logistic regression, MLP, CNN and GRU, plain and shuffled.

Greydanus & Kobak (2020), "Scaling down deep learning with MNIST-1D", report test accuracies of 32% (logistic
regression), 68% (MLP), 94% (CNN) and 91% (GRU) on the default dataset, and 32 / 68 / 56 / 57% when the 40 steps
of every signal are shuffled by one fixed permutation (``shuffle_seq``): the CNN and GRU lose their spatial
prior, the flat models do not care. Each row here trains the zoo's backbone (``mnist1d_logistic``,
``mnist1d_mlp``, ``mnist1d_cnn``, ``mnist1d_gru``; ``resnet1d`` on request) on ``MNIST1DDataModule``'s 4,000
training signals (``val_size=0``, as the paper) with the paper's recipe: Adam, learning rate 1e-2, no weight
decay, batch 100, 6,000 steps, cross-entropy, and reports the final test accuracy on the 1,000 test signals,
mean ± std over seeds. The loop is plain PyTorch on the datamodule's tensors (one shuffled pass per epoch), so
that the figure is the models' and the data's, not the trainer's.

Example:
    ``python -m benchmarks mnist1d_table --seeds 0 1 2``
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import mean_std

PAPER = {"mnist1d_logistic": (32, 32), "mnist1d_mlp": (68, 68), "mnist1d_cnn": (94, 56), "mnist1d_gru": (91, 57)}
"""The paper's test accuracies (%): (default, shuffled)."""
LABELS = {"mnist1d_logistic": "logistic regression", "mnist1d_mlp": "MLP", "mnist1d_cnn": "CNN",
          "mnist1d_gru": "GRU", "resnet1d": "ResNet1d-20 (ours, not in the paper)"}


def train_and_test(backbone: str, shuffle_seq: bool, seed: int, steps: int, lr: float = 1e-2,
                   batch_size: int = 100) -> tuple[float, float]:
    """Train one zoo backbone on MNIST-1D with the paper's recipe; returns (final test accuracy, seconds)."""
    from lightning_tricks.zoo import MNIST1DDataModule, build_backbone

    data = MNIST1DDataModule(batch_size=batch_size, val_size=0, shuffle_seq=shuffle_seq)
    x, y = data.tensors("train")
    xt, yt = data.tensors("test")
    torch.manual_seed(seed)
    model = build_backbone(backbone, 10, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    start, pos = time.perf_counter(), 0
    model.train()
    for _ in range(steps):
        if pos + batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return accuracy, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser("mnist1d_table", __doc__, quick="smoke run: 100 steps, one seed", threads=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; 0 with --quick)")
    parser.add_quick_default("--steps", 6000, 100, "training steps (the paper: 6000)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (the paper: 1e-2)")
    parser.add_argument("--models", nargs="+", default=list(PAPER), choices=list(LABELS),
                        help="backbones (default: the paper's four)")
    parser.add_argument("--variants", nargs="+", default=["default", "shuffled"], choices=["default", "shuffled"])
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    results: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    for variant in args.variants:
        for name in args.models:
            for seed in seeds:
                acc, secs = train_and_test(name, variant == "shuffled", seed, args.steps, args.lr)
                results.setdefault((name, variant), []).append(acc)
                seconds.setdefault((name, variant), []).append(secs)
                print(f"{variant} {name} seed {seed}: test acc {100 * acc:.2f}% ({secs:.0f} s)", flush=True)
    header = "| model | " + " | ".join(f"{v}: ours % (mean ± std) | {v}: paper % | {v}: ours - paper"
                                        for v in args.variants) + " | per seed % | training s (mean) |"
    table = [header, "|---|" + "---:|---:|---:|" * len(args.variants) + "---|---:|"]
    for name in args.models:
        cells = []
        for variant in args.variants:
            accs = results[(name, variant)]
            paper = PAPER.get(name, (None, None))[0 if variant == "default" else 1]
            mean = 100 * sum(accs) / len(accs)
            cells += [mean_std(accs, 1), "–" if paper is None else str(paper),
                      "–" if paper is None else f"{mean - paper:+.1f}"]
        per_seed = "; ".join(f"{v}: " + ", ".join(f"{100 * a:.1f}" for a in results[(name, v)]) for v in args.variants)
        secs = [s for v in args.variants for s in seconds[(name, v)]]
        table.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {per_seed} | {sum(secs) / len(secs):.0f} |")
    lines = [
        f"Zoo backbones on `MNIST1DDataModule` (the `mnist1d` package's `make_dataset`, default arguments, "
        f"generated locally; 4,000 training / 1,000 test signals of 40 steps), Adam lr {args.lr:g}, no weight "
        f"decay, batch 100, {args.steps} steps, final test accuracy; seeds {seeds}; plain PyTorch loop, "
        f"{torch.get_num_threads()} torch thread(s). Paper: Greydanus & Kobak (2020), table 1.",
        "",
        *table,
    ]
    publish(args, "the MNIST-1D paper's table, our zoo vs the paper", lines)
    return 0
