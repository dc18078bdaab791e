"""``python -m benchmarks NAME [ARGS]`` runs one benchmark; ``python -m benchmarks --list`` lists them.

A benchmark is a module of this package with a ``main(argv: Sequence[str] | None) -> int`` function
and a module docstring whose first line describes it. Modules are discovered by name: adding
``benchmarks/cutout.py`` with a ``main`` makes ``python -m benchmarks cutout`` work.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_NOT_BENCHMARKS = {"harness", "__main__"}


def _discover() -> dict[str, str]:
    package = Path(__file__).resolve().parent
    names = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_") and p.stem not in _NOT_BENCHMARKS)
    return {name: f"benchmarks.{name}" for name in names
            if re.search(r"^def main\(", (package / f"{name}.py").read_text(), re.MULTILINE)}


BENCHMARKS: dict[str, str] = _discover()
"""Benchmark name -> module with a ``main(argv)`` function (every ``benchmarks/<name>.py`` that has one)."""

USAGE = "usage: python -m benchmarks NAME [ARGS ...] | --list   (python -m benchmarks NAME --help for a benchmark's options)"


def _load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def list_benchmarks() -> str:
    """One line per registered benchmark: its name and the first line of its module docstring."""
    lines = []
    for name in BENCHMARKS:
        doc = (_load(name).__doc__ or "").strip().splitlines()
        lines.append(f"{name:<12} {doc[0] if doc else ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a registered benchmark's ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print(list_benchmarks())
        return 0
    if args[0] == "--list":
        print(list_benchmarks())
        return 0
    if args[0] not in BENCHMARKS:
        print(f"unknown benchmark {args[0]!r}; expected one of {', '.join(BENCHMARKS)}.\n{USAGE}", file=sys.stderr)
        return 2
    return int(_load(args[0]).main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
