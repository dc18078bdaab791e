"""Ensemble inference: 5 homogeneous members, vmap fast path vs loop vs auto, and vs torchensemble's VotingClassifier.

For each configuration (zoo backbone, input shape, batch size) five members of the same architecture
(batch-norm statistics randomized, eval mode) answer the same batches through:

* ``loop``: ``Ensemble(fast_path="loop")``, the members one after another (the baseline);
* ``vmap``: ``Ensemble(fast_path="vmap")``, the members stacked and run as one ``torch.func.vmap`` call;
* ``auto``: ``Ensemble(fast_path="auto")``, the default: the loop on CPU, a first-batch timing probe on
  accelerators (its choice is printed);
* ``probe``: ``Ensemble(fast_path="probe")``, the first-batch timing probe on any device (its choice is
  printed);
* ``torchensemble``: ``torchensemble.VotingClassifier.predict`` with the same five modules as its
  ``estimators_`` (soft voting: a loop of softmaxes, averaged).

A sample is the wall time of enough ensemble forwards (soft voting included) to last about
``--sample-seconds`` with the loop (at least ``--batches``), the same count for every case; cases are
interleaved, one warm-up round discarded (it also holds the one-time probe, whose cost is reported
separately as the first batch of a fresh ensemble over a steady loop batch). The summary ratios are
medians of the per-round ratios over ``--repeats`` rounds (paired: the two runs of a round are adjacent in
time, so load drift on a shared machine cancels); the tables also give each case's median. The target:
auto is never more than 5% slower than the loop.

Example:
    ``python -m benchmarks ensemble``
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians
from lightning_tricks.ensemble import Ensemble
from lightning_tricks.zoo import build_backbone

CONFIGS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    "simple_cnn digits 1x8x8 b256": ("simple_cnn", (1, 8, 8), 256),
    "simple_cnn cifar 3x32x32 b64": ("simple_cnn", (3, 32, 32), 64),
    "resnet20 cifar 3x32x32 b64": ("resnet20", (3, 32, 32), 64),
    "mlp digits 1x8x8 b256": ("mlp", (1, 8, 8), 256),
}
QUICK = ("simple_cnn digits 1x8x8 b256", "mlp digits 1x8x8 b256")
MEMBERS = 5


def _members(backbone: str, shape: tuple[int, int, int], device: torch.device) -> list[torch.nn.Module]:
    members = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        model = build_backbone(backbone, num_classes=10, in_channels=shape[0], image_size=shape[1])
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        members.append(model.eval().to(device))
    return members


def _torchensemble(members: list[torch.nn.Module], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchensemble import VotingClassifier

    voting = VotingClassifier(estimator=torch.nn.Identity, n_estimators=MEMBERS, cuda=device.type == "cuda")
    voting.estimators_ = torch.nn.ModuleList(members)  # the same trained members; its predict() is no_grad + eval
    return voting.predict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batches: int, repeats: int, quick: bool, device: torch.device,
            sample_seconds: float) -> tuple[str, dict[str, Any]]:
    """One configuration: the ratio table (markdown) and a summary (auto's choice, probe cost, ratios)."""
    backbone, shape, batch_size = CONFIGS[name]
    x = torch.randn(batch_size, *shape, device=device)
    ensembles = {mode: Ensemble(members=_members(backbone, shape, device), fast_path=mode, num_classes=10)
                 for mode in ("loop", "vmap", "auto", "probe")}
    peer = _torchensemble(_members(backbone, shape, device), device)

    # the outputs agree before anything is timed
    with torch.no_grad():
        reference = ensembles["loop"](x)
        for mode in ("vmap", "auto", "probe"):
            torch.testing.assert_close(ensembles[mode](x), reference, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(peer(x).to(device), reference, rtol=1e-4, atol=1e-5)

    # one-time cost: the first batch of a fresh ensemble (decision included), in steady loop batches
    first_batch: dict[str, list[float]] = {"auto": [], "probe": []}
    for _ in range(3):
        for mode, times in first_batch.items():
            fresh = Ensemble(members=_members(backbone, shape, device), fast_path=mode, num_classes=10)
            fresh.load_members()
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                fresh(x)
            _sync(device)
            times.append(time.perf_counter() - start)

    loop_times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            ensembles["loop"](x)
        _sync(device)
        loop_times.append(time.perf_counter() - start)
    batches = max(batches, math.ceil(sample_seconds / statistics.median(loop_times)))

    def case(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def timed() -> None:
            with torch.no_grad():
                for _ in range(batches):
                    run(x)
            _sync(device)
        return timed

    samples = interleaved({"loop": case(ensembles["loop"]), "vmap": case(ensembles["vmap"]),
                           "auto": case(ensembles["auto"]), "probe": case(ensembles["probe"]),
                           "torchensemble": case(peer)},
                          repeats=repeats, quick=quick)
    meds = medians(samples)
    loop_batch = meds["loop"] / batches

    def paired(case: str, baseline: str = "loop") -> float:
        """Median of the per-round ratios: each round's two runs are adjacent in time, so drift cancels."""
        return statistics.median(a / b for a, b in zip(samples[case], samples[baseline], strict=True))

    summary: dict[str, Any] = {
        "auto": paired("auto"), "probe": paired("probe"), "vmap": paired("vmap"),
        "torchensemble": paired("torchensemble"), "te_over_auto": paired("torchensemble", "auto"),
        "auto_first": statistics.median(first_batch["auto"]) / loop_batch,
        "probe_first": statistics.median(first_batch["probe"]) / loop_batch,
        "choice": ensembles["auto"].execution_plan()[0], "probe_choice": ensembles["probe"].execution_plan()[0]}
    markdown = "\n".join([
        f"### {name}: {MEMBERS} x `{backbone}`, batch {batch_size}; auto chose `{summary['choice']}`, probe chose "
        f"`{summary['probe_choice']}`",
        "",
        f"auto / loop = **{summary['auto']:.3f}**; probe / loop = {summary['probe']:.3f}; vmap / loop = "
        f"{summary['vmap']:.3f}; torchensemble / ours (auto) = **{summary['te_over_auto']:.3f}**. First batch of a "
        f"fresh ensemble, decision included: auto {summary['auto_first']:.1f}, probe {summary['probe_first']:.1f} "
        "steady loop batches (once).",
        "",
        format_table(samples, "loop"),
    ])
    return markdown, summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: measure every configuration, print the tables, write the RESULTS.md section."""
    parser = BenchmarkParser("ensemble", __doc__, quick="smoke run: two small configurations, few repeats",
                             repeats=9, device="--device")
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="configurations (default: all)")
    parser.add_quick_default("--batches", 5, 2, "forwards per sample at least")
    parser.add_argument("--sample-seconds", type=float, default=0.5, help="a sample's length with the loop")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    names = args.config or (list(QUICK) if args.quick else list(CONFIGS))
    parts, summaries = [], {}
    for name in names:
        markdown, summary = measure(name, args.batches, args.repeats, args.quick, torch.device(args.device),
                                    args.sample_seconds)
        print(f"{name}: auto / loop {summary['auto']:.3f}, vmap / loop {summary['vmap']:.3f}", flush=True)
        parts.append(markdown)
        summaries[name] = summary
    worst = max(s["auto"] for s in summaries.values())
    publish(args, "ensemble inference, fast path vs loop vs torchensemble", [
        f"{MEMBERS} members of one architecture (random weights, randomized batch-norm statistics, eval mode) on "
        f"device `{args.device}`; a sample is >= {args.batches} ensemble forwards with soft voting, no gradients, "
        f"lasting about {args.sample_seconds} s with the loop; 1 warm-up round, {args.repeats} interleaved repeats. "
        "Ratios in this summary and the lines under each heading are medians of per-round (paired) ratios; the "
        "tables give ratios of medians. Outputs of all five agree (rtol 1e-4, atol 1e-5) before "
        "timing. Target: auto never more than 5% slower than the loop.",
        "",
        "| configuration | auto chose | auto / loop | probe chose | probe / loop | probe first batch | vmap / loop "
        "| torchensemble / loop | torchensemble / auto |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
        *(f"| {n} | {s['choice']} | {s['auto']:.3f} | {s['probe_choice']} | {s['probe']:.3f} | "
          f"{s['probe_first']:.1f} loop batches | {s['vmap']:.3f} | {s['torchensemble']:.3f} | {s['te_over_auto']:.3f} |"
          for n, s in summaries.items()),
        "",
        f"Worst auto / loop: **{worst:.3f}** ({'within' if worst <= 1.05 else 'OUTSIDE'} the 5% target).",
        "",
        *parts,
    ])
    return 0
