"""Card figures: parsing RESULTS.md tables, and the committed PNGs match the numbers they plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.figures import FIGURES, draw, first_table, mean_std, section_text, stale
from benchmarks.harness import write_results

TABLE = """## regularization-effect: a title

| configuration | val accuracy % (mean ± std) | per seed | test accuracy % (mean ± std) |
|---|---:|---|---:|
| baseline | 98.5 ± 0.7 | 97.8, 99.3 | 96.5 ± 1.3 |
| Cutout(length=4) | 97.8 ± 0.4 | 98.1, 97.4 | 98.0 ± 0.9 |

Text after the table.
"""


def test_section_table_is_parsed_by_header(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    write_results("other", "| a |\n|---|\n| 1 |", results)
    write_results("regularization-effect", TABLE, results)
    rows = first_table(section_text("regularization-effect", results))
    assert [row["configuration"] for row in rows] == ["baseline", "Cutout(length=4)"]
    assert rows[1]["per seed"] == "98.1, 97.4"
    assert mean_std(rows[0]["test accuracy % (mean ± std)"]) == (96.5, 1.3)
    assert mean_std("95.43 ± 1.40 (-0.12)") == (95.43, 1.40)
    with pytest.raises(ValueError, match="mean ± std"):
        mean_std("n/a")
    with pytest.raises(KeyError, match="missing"):
        section_text("missing", results)
    with pytest.raises(ValueError, match="no markdown table"):
        first_table("no table here")


def test_a_figure_goes_stale_when_its_numbers_change(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results, png = tmp_path / "RESULTS.md", tmp_path / "fig.png"
    write_results("regularization-effect", TABLE, results)
    figure = next(f for f in FIGURES if f.section == "regularization-effect")
    assert stale(figure, results, png)  # not drawn yet
    draw(figure, png, results)
    assert png.read_bytes().startswith(b"\x89PNG") and not stale(figure, results, png)
    write_results("regularization-effect", TABLE.replace("96.5 ± 1.3", "96.9 ± 1.3"), results)
    assert stale(figure, results, png)
    write_results("regularization-effect", TABLE.replace("Text after", "Other text after"), results)
    assert not stale(figure, results, png)  # only the plotted table counts


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_committed_figures_match_results(figure) -> None:
    assert not stale(figure), (f"docs/img/{figure.name}.png was drawn from other numbers than section "
                               f"{figure.section!r} of benchmarks/RESULTS.md: run python -m benchmarks figures")
