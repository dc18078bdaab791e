"""Test-time augmentation: cost of K views against plain evaluation, speed against ttach, peak memory bounded by max_batch.

Three measurements, written to the ``tta`` section of RESULTS.md:

1. **K-view cost.** Plain evaluation ``model(x)`` of a batch against :class:`~lightning_tricks.TTAWrapper`
   with K same-size views (``hflip`` K=2, ``hflip`` x ``vflip`` K=4, ``translate`` K=9), all under
   ``torch.inference_mode``; the figure is (TTA time / plain time) / K, target <= 1.1.
2. **Against ttach.** ``ttach.ClassificationTTAWrapper`` with ``Compose([HorizontalFlip(), FiveCrops(c, c)])``
   and its ``mean`` merge against ours with ``views=["ten_crop"]`` (the same 10 views), on the same
   model and batch. ttach averages raw outputs, so both wrap the model with a softmax head for this
   comparison and their outputs are checked to agree (mean of probabilities) before timing.
3. **Peak memory with K=10**, each case in 3 fresh processes: the peak resident memory added by one
   evaluation (Linux ``VmHWM`` after resetting it with ``/proc/self/clear_refs``, minus the resident
   memory before), and the largest batch the model saw (a forward pre-hook), for plain evaluation,
   ten-crop TTA without a bound, with ``max_batch`` = the batch size, and ttach.

Example:
    ``python -m benchmarks tta`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks._cli import BenchmarkParser, publish
from benchmarks.harness import format_table, interleaved, medians
from lightning_tricks import TTAWrapper
from lightning_tricks.zoo import build_backbone

CROP = 28
SAME_SIZE_VIEWS = {"hflip (K=2)": ["hflip"], "hflip x vflip (K=4)": ["hflip", "vflip"], "translate (K=9)": ["translate"]}


def _model(backbone: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(backbone, 10, 3, 32).eval()


def _ttach(model: nn.Module) -> nn.Module:
    import ttach

    transforms = ttach.Compose([ttach.HorizontalFlip(), ttach.FiveCrops(CROP, CROP)])
    return ttach.ClassificationTTAWrapper(nn.Sequential(model, nn.Softmax(dim=-1)), transforms, merge_mode="mean")


def _timed(fn: Callable[[], object], iters: int, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            for _ in range(iters):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def measure_speed(backbone: str, batch_size: int, repeats: int, iters: int, quick: bool,
                  device_name: str = "cpu") -> tuple[str, str, float]:
    """Interleaved timings of one backbone; returns the markdown table, a summary line, ttach parity error."""
    device = torch.device(device_name)
    model = _model(backbone).to(device)
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    ours_ten = TTAWrapper(model, views=["ten_crop"], crop_size=CROP)
    peer = _ttach(model) if importlib.util.find_spec("ttach") is not None else None
    with torch.inference_mode():
        parity = 0.0 if peer is None else (ours_ten(x).exp() - peer(x)).abs().max().item()
    cases: dict[str, Callable[[], None]] = {"plain": _timed(lambda: model(x), iters, device)}
    for name, views in SAME_SIZE_VIEWS.items():
        wrapper = TTAWrapper(model, views=views, translate=2)
        cases[name] = _timed(lambda w=wrapper: w(x), iters, device)
    cases["ten_crop ours (K=10)"] = _timed(lambda: ours_ten(x), iters, device)
    if peer is not None:
        cases["ten_crop ttach (K=10)"] = _timed(lambda: peer(x), iters, device)
    samples = interleaved(cases, repeats=repeats, quick=quick)
    meds = medians(samples)
    per_view = [f"{name}: {meds[name] / meds['plain'] / int(name.split('K=')[1].rstrip(')')):.3f}"
                for name in SAME_SIZE_VIEWS]
    summary = (f"`{backbone}`, batch {batch_size}: cost per view relative to plain evaluation, (TTA / plain) / K = "
               f"{'; '.join(per_view)}.")
    if peer is None:
        summary += " ttach is not installed: no peer comparison."
    else:
        speedup = meds["ten_crop ttach (K=10)"] / meds["ten_crop ours (K=10)"]
        summary += (f" Ten-crop: ours / ttach = {1 / speedup:.3f} (ours {speedup:.2f}x faster); "
                    f"max |ours - ttach| on merged probabilities = {parity:.1e}.")
    return format_table({k: [v / iters for v in vals] for k, vals in samples.items()}, "plain"), summary, parity


# -- peak memory, one case per fresh process -------------------------------------------------------------------

MEMORY_CASES = ("plain", "ten_crop unbounded", "ten_crop max_batch=B", "ten_crop ttach")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(case: str, backbone: str, batch_size: int) -> dict[str, float]:
    """Run one evaluation of ``case`` and report the peak resident memory it added and its largest batch."""
    torch.set_num_threads(1)  # the same allocation pattern whatever the machine's load
    model = _model(backbone)
    largest = [0]
    model.register_forward_pre_hook(lambda _, args: largest.__setitem__(0, max(largest[0], args[0].shape[0])))
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run: Callable[[], object] = {
        "plain": lambda: model(x),
        "ten_crop unbounded": lambda: TTAWrapper(model, views=["ten_crop"], crop_size=CROP)(x),
        "ten_crop max_batch=B": lambda: TTAWrapper(model, views=["ten_crop"], crop_size=CROP, max_batch=batch_size)(x),
        "ten_crop ttach": lambda: _ttach(model)(x),
    }[case]
    with torch.inference_mode():
        model(x[:2])  # load kernels and allocator pools before the measurement
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        before = _status_kb("VmRSS")
        run()
        peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024, "largest_batch": largest[0]}


def measure_memory(backbone: str, batch_size: int, repeats: int) -> str:
    rows = ["| case | peak added memory, median (MB) | min-max (MB) | largest batch the model saw |", "|---|---:|---:|---:|"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    for case in MEMORY_CASES:
        peaks, largest = [], set()
        for _ in range(repeats):  # the allocator's reuse of freed blocks varies from process to process
            proc = subprocess.run([sys.executable, "-m", "benchmarks", "tta", "--memory-probe", case, "--backbone",
                                   backbone, "--memory-batch", str(batch_size)], capture_output=True, text=True,
                                  env=env, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks.append(result["peak_mb"])
            largest.add(result["largest_batch"])
        rows.append(f"| {case} | {statistics.median(peaks):.0f} | {min(peaks):.0f}-{max(peaks):.0f} | "
                    f"{', '.join(map(str, sorted(largest)))} |")
    return "\n".join(rows)


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("tta", __doc__, quick="smoke run: small batches, 3 repeats", repeats=7, device="--device")
    p.add_argument("--backbone", action="append", default=None, help="zoo backbone(s) (default simple_cnn and resnet20)")
    p.add_quick_default("--batch-size", 64, 16, "evaluation batch")
    p.add_argument("--iters", type=int, default=1, help="batches per timed sample (default 1)")
    p.add_quick_default("--memory-batch", 256, 32, "batch of the memory cases (measured on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory cases")
    p.add_argument("--memory-probe", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and write the ``tta`` (or ``tta-quick``) section of RESULTS.md."""
    args = _parser().parse_args(argv)
    q = args.quick
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, (args.backbone or ["resnet20"])[0], args.memory_batch)))
        return 0
    backbones = args.backbone or ["simple_cnn", "resnet20"]
    batch_size, iters, repeats = args.batch_size, args.iters, args.repeats
    sections = []
    for backbone in backbones:
        table, summary, parity = measure_speed(backbone, batch_size, repeats, iters, q, args.device)
        if parity > 1e-4:
            raise AssertionError(f"ours and ttach disagree on the same views ({parity:.2e}): the comparison is void")
        sections += [f"### `{backbone}`, batch {batch_size}, 3x32x32 (time per batch)", "", table, "", summary, ""]
    memory = None if args.no_memory else measure_memory("resnet20", args.memory_batch, 1 if q else 3)
    publish(args, "test-time augmentation", [
        f"Every case evaluates the same batch under `torch.inference_mode` ({iters} batch(es) per sample); 1 warm-up "
        f"round, {repeats} interleaved repeats, medians. TTA views: `hflip`, `hflip`+`vflip`, `translate` (2 px, "
        f"replicate) keep the 32x32 size; ten-crop = five {CROP}x{CROP} crops and their mirrors. ttach: "
        f"`ClassificationTTAWrapper(Compose([HorizontalFlip(), FiveCrops({CROP}, {CROP})]), merge_mode='mean')` on the "
        "model with a softmax head, which loops over the views (one forward of B rows each); ours runs one forward "
        "of 10B rows.",
        "",
        f"Device: `{args.device}`.",
        "",
        *sections,
        *([] if memory is None else [
            f"### Peak memory, ten-crop (K=10), `resnet20`, batch {args.memory_batch}",
            "",
            f"Each case in {1 if q else 3} fresh processes with 1 thread: resident memory added at the peak of one "
            "evaluation (Linux `VmHWM` reset through `/proc/self/clear_refs`, minus the resident memory before), "
            "and the largest batch the model was called with (a forward pre-hook).",
            "",
            memory,
        ]),
    ])
    return 0
