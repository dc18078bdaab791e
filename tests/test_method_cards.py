"""Method cards follow the template: the claim line, a Cost vs effect section, figures by reference.

A card listed in ``CARDS`` must open with the claim line, have a ``## Cost vs effect`` section, and
include every RESULTS.md section it shows by name (``--8<-- "benchmarks/RESULTS.md:NAME"``), not copy
it; a number in the claim line must be printed by one of the sections the card includes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.figures import section_text
from benchmarks.harness import RESULTS_PATH

DOCS = Path(__file__).resolve().parents[1] / "docs"
CARDS = [
    "activations",
    "babysit",
    "bn_folding",
    "cutout",
    "dropconnect",
    "early_stopping",
    "ensemble",
    "exact_evaluation",
    "fractional_pooling",
    "init",
    "large_batch",
    "mixup",
    "monitoring",
    "weight_penalty",
    "preprocessing",
    "recipe",
    "stochastic_depth",
    "transfer",
    "tta",
    "tune",
]
"""Cards converted to the by-reference form (append the others as they are converted)."""
INCLUDE = re.compile(r'^--8<-- "benchmarks/RESULTS\.md:([-\w]+)"$', re.MULTILINE)
NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+(?:e-?\d+)?%?|e-?\d+%?|%|(?=x\b))")
"""A measured figure: a decimal, an exponent, a percentage or a ratio like ``30x`` (not ``CIFAR-10``,
``2-process`` or ``10 classes``, which are setup)."""


def _claim(text: str) -> str:
    body = text.split("\n", 1)[1].lstrip("\n")
    return " ".join(body.split("\n\n", 1)[0].split())


@pytest.mark.parametrize("card", CARDS)
def test_card_has_claim_line_cost_vs_effect_and_included_figures(card: str) -> None:
    text = (DOCS / f"{card}.md").read_text()
    claim = _claim(text)
    assert claim.startswith("*The lecture's claim:*") and "*What we measured on our data:*" in claim
    assert "\n## Cost vs effect\n" in text
    sections = INCLUDE.findall(text)
    included = "".join(section_text(name, RESULTS_PATH) for name in sections)  # KeyError names a missing one
    for number in NUMBER.findall(claim):
        assert number in included, f"{card}: the claim line's {number} is not in its included sections {sections}"
    results = RESULTS_PATH.read_text()
    copied = [line for line in text.splitlines()
              if line.startswith("| ") and line.count("|") >= 4 and line in results and not line.startswith("| case |")]
    assert not copied, f"{card} copies rows of RESULTS.md instead of including the section: {copied[:2]}"


def test_claim_numbers_and_copies_are_detected() -> None:
    assert _claim("# T\n\n*The lecture's claim:* a. *What we measured on our data:* 0.97x, 12%.\n\n## X") == (
        "*The lecture's claim:* a. *What we measured on our data:* 0.97x, 12%.")
    assert NUMBER.findall("within 1e-6 and 0.97x, 12%, 30x of 3 seeds; CIFAR-10 ResNet-56, 2-process") == [
        "1e-6", "0.97", "12%", "30"]
