"""The command line every benchmark shares: one parser factory and one ``publish`` that writes its RESULTS.md section.

A benchmark's ``main(argv)`` reads::

    args = BenchmarkParser("cutout", __doc__, quick="smoke run: ...", repeats=7).parse_args(argv)
    ...  # measure, using args.repeats, args.quick, ...
    publish(args, "Cutout overhead and speed", [description, "", table])

The parser holds the standard options: ``--quick`` (where the benchmark has a smoke run), ``--repeats``
(where it repeats), ``--threads``, ``--device`` or ``--accelerator`` (where it picks one), ``--section``
and ``--no-write``; an option whose default shrinks for a smoke run is declared once with both values
(:meth:`BenchmarkParser.add_quick_default`). An effect benchmark measured on several datasets adds
``--data`` (:meth:`BenchmarkParser.add_data_option`): a dataset other than the first writes the section
``<section>-<data>``, and an option whose default depends on the dataset is declared once with one value
per dataset (:meth:`BenchmarkParser.add_data_default`). Parsing applies ``--threads``, fills those defaults and
records the reproducing command and the start time, which :func:`publish` puts in the section's header.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.harness import MIN_QUICK_REPEATS, RESULTS_PATH, machine_description, write_results

QUICK_MARK = " (quick smoke run, not a figure)"
"""Appended to a smoke run's section title; its section name also ends in ``-quick``."""


class BenchmarkParser(argparse.ArgumentParser):
    """``argparse`` parser of one benchmark, with the standard options already added.

    Args:
        name: the benchmark's name (``python -m benchmarks NAME``).
        doc: the module docstring; its first paragraph is the description.
        quick: help of ``--quick`` (a smoke run: not a figure); ``None``: no smoke run, ``args.quick`` is False.
        repeats: default of ``--repeats`` (interleaved repetitions; 3 with ``--quick``); ``None``: no option.
        threads: default of ``--threads`` (torch CPU threads, applied when parsing); ``None``: torch's choice.
        device: ``"--device"`` (a torch device) or ``"--accelerator"`` (a Lightning accelerator), default ``cpu``;
            ``None``: no option.
        section: default of ``--section`` (default ``name``); it may name other options in braces
            (``"lsuv-{backbone}"``). ``publish`` appends ``-quick`` for a smoke run.

    Example:
        >>> args = BenchmarkParser("demo", "A demo.", quick="smoke run", repeats=7).parse_args(["--quick"])
        >>> args.repeats, args.section, args.command
        (3, 'demo', 'python -m benchmarks demo --quick')
    """

    def __init__(self, name: str, doc: str | None, *, quick: str | None = None, repeats: int | None = None,
                 threads: int | None = None, device: str | None = None, section: str | None = None) -> None:
        super().__init__(prog=f"python -m benchmarks {name}", description=(doc or "").split("\n\n")[0])
        self.name = name
        self._quick_defaults: dict[str, tuple[Any, Any]] = {}
        self._data_defaults: dict[str, dict[str, Any]] = {}
        self._datasets: tuple[str, ...] = ()
        if quick is not None:
            self.add_argument("--quick", action="store_true", help=f"{quick} (not a figure)")
        self.set_defaults(quick=False)
        if repeats is not None:
            self.add_quick_default("--repeats", repeats, MIN_QUICK_REPEATS, "interleaved repetitions")
        torch_choice = "torch's choice"
        self.add_argument("--threads", type=int, default=threads,
                          help=f"torch CPU threads (default {threads or torch_choice})")
        if device is not None:
            if device not in ("--device", "--accelerator"):
                raise ValueError(f"`device`={device!r} is invalid: expected '--device', '--accelerator' or None.")
            what = "torch device" if device == "--device" else "Lightning accelerator"
            self.add_argument(device, default="cpu", help=f"{what} (default cpu)")
        self.add_argument("--section", default=section or name,
                          help=f"RESULTS.md section (default {section or name!r}; '-quick' appended with --quick)")
        self.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md (and figures) alone")

    def add_quick_default(self, flag: str, full: Any, quick: Any, help: str) -> None:
        """Add ``flag`` with default ``full``, or ``quick`` in a smoke run (an explicit value always wins)."""
        self.add_argument(flag, type=type(full), default=None,
                          help=f"{help} (default {full}" + ("" if full == quick else f"; {quick} with --quick") + ")")
        self._quick_defaults[flag.lstrip("-").replace("-", "_")] = (full, quick)

    def add_data_option(self, datasets: Sequence[str] = ("digits", "mnist1d")) -> None:
        """``--data``: the dataset an effect benchmark trains on (default the first of ``datasets``).

        Any other dataset writes the section ``<section>-<data>`` (unless ``--section`` is given), so the
        first dataset's section and its figures stay where the method cards include them.
        """
        self._datasets = tuple(datasets)
        self.add_argument("--data", choices=self._datasets, default=self._datasets[0],
                          help=f"dataset (default {self._datasets[0]}; another one writes section '<section>-<data>')")

    def add_data_default(self, flag: str, defaults: dict[str, Any], help: str, *, nargs: str | None = None) -> None:
        """Add ``flag`` whose default depends on ``--data`` (``defaults``: dataset -> value; an explicit value wins).

        A value may be a ``(full, quick)`` tuple, as in :meth:`add_quick_default`. Call :meth:`add_data_option`
        first; every dataset needs a default.
        """
        missing = [d for d in self._datasets if d not in defaults]
        if not self._datasets or missing:
            raise ValueError(f"`defaults` of {flag} must name every dataset of add_data_option(); missing: {missing}.")
        sample = next(iter(defaults.values()))
        kind = type(sample[0]) if isinstance(sample, (list, tuple)) else type(sample)

        def show(value: Any) -> str:
            if isinstance(value, tuple):
                return f"{value[0]} ({value[1]} with --quick)"
            return " ".join(map(str, value)) if isinstance(value, list) else str(value)

        shown = "; ".join(f"{show(v)} on {d}" for d, v in defaults.items())
        self.add_argument(flag, type=kind, nargs=nargs, default=None, help=f"{help} (default {shown})")
        self._data_defaults[flag.lstrip("-").replace("-", "_")] = dict(defaults)

    def add_seed_cache(self) -> None:
        """``--cache DIR``: keep each seed's results in ``DIR`` and reuse them (:func:`cached_seed`), so that the seeds
        of one measurement can run in parallel processes (``--seeds 1 --no-write``) and a last run with every seed
        publishes the table."""
        self.add_argument("--cache", default=None,
                          help="folder of per-seed results: a seed already measured with the same options is reused")

    def add_step_options(self, batch_size: int | tuple[int, int], steps: int | tuple[int, int],
                         warmup_steps: int | tuple[int, int], image_size: int = 32) -> None:
        """``--batch-size``, ``--image-size``, ``--steps``, ``--warmup-steps`` of a step-time benchmark.

        Each default is one value, or ``(full, quick)`` where a smoke run uses a smaller one.
        """
        for flag, value, help in (("--batch-size", batch_size, "training batch size"),
                                  ("--steps", steps, "measured steps per fit"),
                                  ("--warmup-steps", warmup_steps, "discarded steps at the start of each fit")):
            full, quick = value if isinstance(value, tuple) else (value, value)
            self.add_quick_default(flag, full, quick, help)
        self.add_argument("--image-size", type=int, default=image_size, help=f"image side (default {image_size})")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """Parse, fill the quick-dependent defaults, apply ``--threads``, record ``command`` and ``started``."""
        parsed = super().parse_args(args, namespace)
        for dest, (full, quick) in self._quick_defaults.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, quick if parsed.quick else full)
        for dest, by_data in self._data_defaults.items():
            if getattr(parsed, dest) is None:
                value = by_data[parsed.data]
                setattr(parsed, dest, value[parsed.quick] if isinstance(value, tuple) else value)
        if self._datasets and parsed.data != self._datasets[0] and parsed.section == self.get_default("section"):
            parsed.section = f"{parsed.section}-{parsed.data}"
        parsed.section = parsed.section.format(**vars(parsed))
        if parsed.threads:
            import torch

            torch.set_num_threads(parsed.threads)
        given = sys.argv[2:] if args is None else args
        parsed.command = shlex.join(["python", "-m", "benchmarks", self.name, *given])
        parsed.started = time.perf_counter()
        return parsed


_NOT_IN_KEY = ("seeds", "command", "started", "no_write", "section", "cache", "no_figure")


def cached_seed(args: argparse.Namespace, seed: int, measure: Callable[[], Any]) -> Any:
    """``measure()`` for ``seed``, or its result kept by an earlier run with the same options under ``--cache``.

    The key is the benchmark, the seed and every option but the seed list, the section and the output switches;
    the result must be JSON (numbers, strings, lists, dicts). Without ``--cache``, just ``measure()``.
    """
    folder = getattr(args, "cache", None)
    if not folder:
        return measure()
    options = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_IN_KEY}
    key = json.dumps({"benchmark": args.command.split()[3], "seed": seed, "options": options}, sort_keys=True,
                     default=str)
    path = Path(folder) / f"seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        print(f"seed {seed}: reusing {path}", flush=True)
        return json.loads(path.read_text())["result"]
    result = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": json.loads(key), "result": result}, indent=1))
    os.replace(tmp, path)
    return result


def section_name(args: argparse.Namespace, section: str | None = None) -> str:
    """The section a run writes: ``section`` (default ``--section``), with ``-quick`` appended for a smoke run."""
    section = section or args.section
    return f"{section}-quick" if args.quick else section


def publish(args: argparse.Namespace, title: str, body: Sequence[str], *, section: str | None = None,
            path: str | Path = RESULTS_PATH) -> str:
    """Print the section and, unless ``--no-write``, write it to the results file; returns its markdown.

    The section is a ``## NAME: title`` heading (marked quick for a smoke run), the reproducing command,
    the UTC date and the wall seconds since ``args.started`` (set when parsing), the machine, then ``body``.

    Args:
        args: what :meth:`BenchmarkParser.parse_args` returned.
        title: what the section measures.
        body: its lines (description, tables).
        section: the section's name, for a benchmark that writes several (default ``--section``).
        path: the results file (default ``benchmarks/RESULTS.md``).
    """
    section = section_name(args, section)
    markdown = "\n".join([
        f"## {section}: {title}{QUICK_MARK if args.quick else ''}",
        "",
        f"`{args.command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - args.started:.0f} s wall.",
        "",
        f"Machine: {machine_description()}.",
        "",
        *body,
    ])
    print(markdown)
    if not args.no_write:
        print(f"\nwrote section {section!r} of {write_results(section, markdown, path)}")
    return markdown
