"""Benchmarks of lightning-tricks: ratios against a baseline, interleaved in one process (see DESIGN.md, Performance).

Run ``python -m benchmarks --list`` from the repository root; results go to ``benchmarks/RESULTS.md``.
"""
