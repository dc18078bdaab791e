"""Shared pieces of the Cutout / Mixup / WeightPenalty benchmarks (not a benchmark itself)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from benchmarks.harness import write_results


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A case for ``interleaved`` whose sample is the median time of ``calls`` calls of ``fn``."""

    def run() -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every one of these benchmarks takes."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps and repeats")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 7; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p


def command(name: str, args: argparse.Namespace) -> str:
    flags = (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats else "")
    return f"python -m benchmarks {name}{flags}" + (f" --threads {args.threads}" if args.threads else "")


def publish(section: str, markdown: str, no_write: bool) -> None:
    """Print the section and, unless ``no_write``, write it to RESULTS.md."""
    print(markdown)
    if not no_write:
        print(f"\nwrote section {section!r} of {write_results(section, markdown)}")
