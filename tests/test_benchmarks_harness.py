"""Pure logic of the benchmark harness: interleaving, medians/ratios, RESULTS.md sections, registry. No timing."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_main
from benchmarks.harness import RESULTS_HEADER, format_table, interleaved, medians, ratios, write_results


def test_interleaved_runs_cases_alternately_and_drops_warmup() -> None:
    calls: list[str] = []
    counter = {"A": 0, "B": 0}

    def make(name: str):
        def run() -> float:
            calls.append(name)
            counter[name] += 1
            return float(counter[name])  # the k-th call returns k

        return run

    samples = interleaved({"A": make("A"), "B": make("B")}, repeats=5, warmup=2)
    assert calls == ["A", "B"] * 7
    assert samples == {"A": [3.0, 4.0, 5.0, 6.0, 7.0], "B": [3.0, 4.0, 5.0, 6.0, 7.0]}


def test_interleaved_times_cases_returning_none() -> None:
    calls: list[str] = []
    samples = interleaved({"A": lambda: calls.append("A"), "B": lambda: calls.append("B"), "C": lambda: calls.append("C")},
                          repeats=5, warmup=0)
    assert calls == ["A", "B", "C"] * 5
    assert all(len(v) == 5 and all(t >= 0 for t in v) for v in samples.values())


def test_interleaved_enforces_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"A": lambda: 1.0}, repeats=4)
    assert interleaved({"A": lambda: 1.0}, repeats=3, quick=True) == {"A": [1.0, 1.0, 1.0]}
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"A": lambda: 1.0}, repeats=2, quick=True)
    with pytest.raises(ValueError, match="empty"):
        interleaved({}, repeats=5)


def test_medians_and_ratios_against_hand_values() -> None:
    samples = {"base": [0.010, 0.030, 0.020, 0.050, 0.040], "slow": [0.06, 0.01, 0.03, 0.09, 0.05, 0.07]}
    assert medians(samples) == pytest.approx({"base": 0.030, "slow": 0.055})
    assert ratios(samples, "base") == pytest.approx({"base": 1.0, "slow": 0.055 / 0.030})
    with pytest.raises(KeyError, match="nope"):
        ratios(samples, "nope")


def test_format_table_puts_baseline_first_in_ms() -> None:
    table = format_table({"x": [0.004, 0.006, 0.005, 0.005, 0.005], "base": [0.002] * 5}, "base")
    lines = table.splitlines()
    assert lines[0] == "| case | median ms | ratio vs base | min-max ms | repeats |"
    assert lines[2] == "| base | 2.00 | 1.000 | 2.00-2.00 | 5 |"
    assert lines[3] == "| x | 5.00 | 2.500 | 4.00-6.00 | 5 |"


def _block(name: str, body: str) -> str:
    return f"<!-- --8<-- [start:{name}] -->\n{body}\n<!-- --8<-- [end:{name}] -->"


def test_write_results_replaces_only_its_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_results("step", "old step", path)
    write_results("cutout", "cutout figures", path)
    text = path.read_text()
    assert text.startswith(RESULTS_HEADER)
    assert _block("step", "old step") in text

    write_results("step", "new step with \\1 backslash", path)
    text = path.read_text()
    assert "old step" not in text
    assert _block("step", "new step with \\1 backslash") in text
    assert _block("cutout", "cutout figures") in text
    assert text.index("[start:step]") < text.index("[start:cutout]")  # replaced in place
    assert text.count("<!-- --8<-- [start:") == 2


def test_write_results_keeps_hand_written_text_and_prefixed_names(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Mine\n\nnotes\n\n{_block('step-quick', 'q')}\n")
    write_results("step", "full", path)
    write_results("step", "full2", path)
    text = path.read_text()
    assert text.startswith("# Mine\n\nnotes\n")
    assert _block("step-quick", "q") in text
    assert _block("step", "full2") in text
    for bad in ("bad name", "1st", "v1.2", "_x"):  # names snippets could not include
        with pytest.raises(ValueError, match="section"):
            write_results(bad, "x", path)


def test_write_results_migrates_sections_in_the_older_format(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n<!-- section:step -->\nold\n<!-- /section:step -->\n\n"
                    "<!-- section:tta-effect -->\nkept\n<!-- /section:tta-effect -->\n")
    write_results("step", "new", path)
    text = path.read_text()
    assert _block("step", "new") in text and "old" not in text
    assert _block("tta-effect", "kept") in text
    assert "section:" not in text and text.count("<!-- --8<-- [start:") == 2


def test_docs_include_a_written_section_by_name(tmp_path: Path) -> None:
    """What the method cards rely on: pymdownx.snippets (configured as in mkdocs.yml) includes exactly
    one section's text by its name, without the markers, and fails on a name that is not there."""
    markdown = pytest.importorskip("markdown")
    snippets = pytest.importorskip("pymdownx.snippets")
    path = tmp_path / "RESULTS.md"
    write_results("cutout", "| case | ratio |\n|---|---:|\n| cutout | 0.97 |", path)
    write_results("mixup", "mixup text", path)

    def render(source: str) -> str:
        md = markdown.Markdown(extensions=["tables", "pymdownx.snippets"], extension_configs={
            "pymdownx.snippets": {"base_path": [str(tmp_path)], "check_paths": True}})
        return md.convert(source)

    html = render('Card.\n\n--8<-- "RESULTS.md:cutout"\n')
    assert "<td>cutout</td>" in html and ">0.97</td>" in html
    assert "mixup text" not in html and "8&lt;" not in html and "Benchmark results" not in html
    with pytest.raises(snippets.SnippetMissingError, match="dropout"):
        render('--8<-- "RESULTS.md:dropout"\n')


def test_registry_dispatches_to_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("fake_bench")
    fake.__doc__ = "A fake benchmark.\n\nMore."
    fake.main = lambda argv: received.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setattr(bench_main, "BENCHMARKS", {"fake": "fake_bench"})

    assert bench_main.main(["fake", "--quick", "-x"]) == 0
    assert received == [["--quick", "-x"]]
    assert bench_main.main(["--list"]) == 0
    assert "fake" in capsys.readouterr().out.split("A fake benchmark.")[0]
    assert bench_main.main(["missing"]) == 2


def test_step_timer_skips_warmup_steps_and_builds_cases() -> None:
    import torch

    from benchmarks.step import NoOpCallback, StepTimer, _case_names, resolve_callback

    timer = StepTimer(warmup_steps=2)
    module = types.SimpleNamespace(device=torch.device("cpu"))
    for i in range(5):
        timer.first.on_train_batch_start(None, module, None, i)  # type: ignore[arg-type]
        timer.last.on_train_batch_end(None, module, None, None, i)  # type: ignore[arg-type]
    assert len(timer.times) == 3
    assert timer.wrap([cb := NoOpCallback()]) == [timer.first, cb, timer.last]

    assert _case_names(["a.b.NoOp", "x.Timer,y.Other"]) == {
        "baseline": [], "NoOp": ["a.b.NoOp"], "Timer+Other": ["x.Timer", "y.Other"]}
    assert isinstance(resolve_callback("benchmarks.step.NoOpCallback"), NoOpCallback)
    with pytest.raises(ValueError, match="importable"):
        resolve_callback("no.such.Callback")
