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


def test_write_results_replaces_only_its_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_results("step", "old step", path)
    write_results("cutout", "cutout figures", path)
    text = path.read_text()
    assert text.startswith(RESULTS_HEADER)
    assert "<!-- section:step -->\nold step\n<!-- /section:step -->" in text

    write_results("step", "new step with \\1 backslash", path)
    text = path.read_text()
    assert "old step" not in text
    assert "<!-- section:step -->\nnew step with \\1 backslash\n<!-- /section:step -->" in text
    assert "<!-- section:cutout -->\ncutout figures\n<!-- /section:cutout -->" in text
    assert text.index("<!-- section:step -->") < text.index("<!-- section:cutout -->")  # replaced in place
    assert text.count("<!-- section:") == 2


def test_write_results_keeps_hand_written_text_and_prefixed_names(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Mine\n\nnotes\n\n<!-- section:step-quick -->\nq\n<!-- /section:step-quick -->\n")
    write_results("step", "full", path)
    write_results("step", "full2", path)
    text = path.read_text()
    assert text.startswith("# Mine\n\nnotes\n")
    assert "<!-- section:step-quick -->\nq\n<!-- /section:step-quick -->" in text
    assert "<!-- section:step -->\nfull2\n<!-- /section:step -->" in text
    with pytest.raises(ValueError, match="section"):
        write_results("bad name", "x", path)


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
