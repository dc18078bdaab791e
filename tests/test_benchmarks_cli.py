"""The command line every benchmark shares (benchmarks/_cli.py): options, their defaults, the RESULTS.md header."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks._cli import QUICK_MARK, BenchmarkParser, publish, section_name
from benchmarks.harness import (
    RESULTS_HEADER,
    RESULTS_PATH,
    machine_description,
    mean_std,
    per_call,
    write_results,
)


def _parser(**kwargs) -> BenchmarkParser:
    return BenchmarkParser("demo", "A demo benchmark.\n\nMore text.", **kwargs)


def test_standard_options_and_their_defaults() -> None:
    parser = _parser(quick="smoke run", repeats=7, device="--device")
    args = parser.parse_args([])
    assert (args.quick, args.repeats, args.threads, args.device, args.section, args.no_write) == (
        False, 7, None, "cpu", "demo", False)
    assert parser.description == "A demo benchmark."
    assert parser.prog == "python -m benchmarks demo"

    quick = parser.parse_args(["--quick", "--device", "cuda", "--section", "gpu-demo", "--no-write"])
    assert (quick.quick, quick.repeats, quick.device, quick.section, quick.no_write) == (True, 3, "cuda", "gpu-demo",
                                                                                          True)
    assert parser.parse_args(["--quick", "--repeats", "9"]).repeats == 9  # an explicit value wins over the smoke default


def test_options_a_benchmark_does_not_take_are_absent() -> None:
    parser = _parser()
    args = parser.parse_args([])
    assert args.quick is False  # publish reads it whatever the benchmark
    assert not hasattr(args, "repeats") and not hasattr(args, "device")
    for flag in ("--quick", "--repeats", "--device"):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args([flag, "1"] if flag != "--quick" else [flag])
    assert _parser(device="--accelerator").parse_args(["--accelerator", "gpu"]).accelerator == "gpu"
    with pytest.raises(ValueError, match="device"):
        _parser(device="--gpu")


def test_quick_defaults_and_step_options() -> None:
    parser = _parser(quick="smoke run")
    parser.add_step_options(batch_size=(128, 32), steps=(20, 3), warmup_steps=2, image_size=16)
    parser.add_quick_default("--backbone", "resnet56", "resnet20", "zoo backbone")
    full, quick = parser.parse_args([]), parser.parse_args(["--quick"])
    assert (full.batch_size, full.steps, full.warmup_steps, full.image_size, full.backbone) == (128, 20, 2, 16,
                                                                                                "resnet56")
    assert (quick.batch_size, quick.steps, quick.warmup_steps, quick.image_size, quick.backbone) == (32, 3, 2, 16,
                                                                                                     "resnet20")
    assert parser.parse_args(["--quick", "--steps", "7", "--backbone", "mlp"]).steps == 7
    assert "(default 128; 32 with --quick)" in parser.format_help().replace("\n", " ").replace("  ", " ")


def test_section_may_name_other_options_and_quick_runs_get_their_own() -> None:
    parser = _parser(quick="smoke run", section="demo-{backbone}")
    parser.add_argument("--backbone", default="resnet56")
    assert section_name(parser.parse_args([])) == "demo-resnet56"
    assert section_name(parser.parse_args(["--backbone", "mlp", "--quick"])) == "demo-mlp-quick"


def test_data_option_names_the_section_and_fills_per_dataset_defaults() -> None:
    parser = _parser(quick="smoke run")
    parser.add_data_option()
    parser.add_data_default("--lr", {"digits": 0.05, "mnist1d": 0.01}, "learning rate")
    parser.add_data_default("--shots", {"digits": [5, 20], "mnist1d": [10]}, "images per class", nargs="+")
    digits, mnist1d = parser.parse_args([]), parser.parse_args(["--data", "mnist1d"])
    assert (digits.data, digits.lr, digits.shots, section_name(digits)) == ("digits", 0.05, [5, 20], "demo")
    assert (mnist1d.data, mnist1d.lr, mnist1d.shots, section_name(mnist1d)) == ("mnist1d", 0.01, [10], "demo-mnist1d")
    assert parser.parse_args(["--data", "mnist1d", "--lr", "0.3", "--shots", "1", "2"]).lr == 0.3
    parser.add_data_default("--epochs", {"digits": (8, 1), "mnist1d": (30, 2)}, "epochs")
    assert [parser.parse_args(a).epochs for a in ([], ["--quick"], ["--data", "mnist1d"], ["--data", "mnist1d", "--quick"],
                                                  ["--quick", "--epochs", "5"])] == [8, 1, 30, 2, 5]
    assert "(default 8 (1 with --quick) on digits; 30 (2 with --quick) on mnist1d)" in " ".join(parser.format_help().split())
    assert section_name(parser.parse_args(["--data", "mnist1d", "--quick"])) == "demo-mnist1d-quick"
    assert parser.parse_args(["--data", "mnist1d", "--section", "mine"]).section == "mine"  # an explicit name wins
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--data", "cifar"])
    with pytest.raises(ValueError, match="mnist1d"):
        parser.add_data_default("--steps", {"digits": 3}, "steps")


def test_seed_cache_reuses_a_seed_measured_with_the_same_options(tmp_path: Path) -> None:
    from benchmarks._cli import cached_seed

    parser = _parser()
    parser.add_seed_cache()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=0.1)
    calls = []

    def measure(seed: int, value: float) -> dict[str, float]:
        calls.append(seed)
        return {"acc": value}

    cache = ["--cache", str(tmp_path)]
    one = parser.parse_args([*cache, "--seeds", "1", "--no-write"])
    assert cached_seed(one, 1, lambda: measure(1, 0.5)) == {"acc": 0.5}
    every = parser.parse_args([*cache, "--seeds", "0", "1"])  # another seed list and output switch: same key
    assert cached_seed(every, 1, lambda: measure(1, 0.9)) == {"acc": 0.5} and calls == [1]
    assert cached_seed(every, 0, lambda: measure(0, 0.7)) == {"acc": 0.7} and calls == [1, 0]
    other = parser.parse_args([*cache, "--lr", "0.2"])  # another option: measured again
    assert cached_seed(other, 1, lambda: measure(1, 0.3)) == {"acc": 0.3} and calls == [1, 0, 1]
    assert cached_seed(parser.parse_args([]), 1, lambda: measure(1, 0.1)) == {"acc": 0.1}  # no cache: always measured
    assert len(list(tmp_path.glob("seed*.json"))) == 3


def test_threads_are_applied_when_parsing() -> None:
    before = torch.get_num_threads()
    try:
        _parser(threads=1).parse_args([])
        assert torch.get_num_threads() == 1
        _parser().parse_args(["--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_command_reproduces_the_arguments() -> None:
    parser = _parser(quick="smoke run")
    parser.add_argument("--name", default="")
    args = parser.parse_args(["--quick", "--name", "two words"])
    assert args.command == "python -m benchmarks demo --quick --name 'two words'"


def test_publish_writes_the_header_and_replaces_only_its_section(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "RESULTS.md"
    write_results("other", "someone else's figures", path)
    parser = _parser(quick="smoke run")
    markdown = publish(parser.parse_args(["--section", "mine"]), "what it measures", ["first body", "", "| a | b |"], path=path)
    lines = markdown.splitlines()
    assert lines[0] == "## mine: what it measures"
    assert re.fullmatch(r"`python -m benchmarks demo --section mine`, \d{4}-\d\d-\d\d \d\d:\d\d UTC, \d+ s wall\.",
                        lines[2])
    assert lines[4] == f"Machine: {machine_description()}."
    assert lines[6:] == ["first body", "", "| a | b |"]
    assert lines[1] == lines[3] == lines[5] == ""
    printed = capsys.readouterr().out
    assert printed.startswith(markdown) and f"wrote section 'mine' of {path}" in printed

    publish(parser.parse_args(["--section", "mine"]), "what it measures", ["second"], path=path)
    publish(parser.parse_args(["--section", "mine", "--quick"]), "what it measures", ["smoke"], path=path)
    publish(parser.parse_args(["--section", "mine"]), "a second table", ["part two"], section="mine-part", path=path)
    text = path.read_text()
    assert text.startswith(RESULTS_HEADER)
    assert "[start:other] -->\nsomeone else's figures\n<!-- --8<-- [end:other] -->" in text
    assert text.count("[start:mine]") == 1 and "first body" not in text
    assert re.search(r"\[start:mine\] -->\n## mine: what it measures\n.*\nsecond\n<!-- --8<-- \[end:mine\]", text,
                     re.DOTALL)
    assert f"## mine-quick: what it measures{QUICK_MARK}\n" in text
    assert "<!-- --8<-- [start:mine-part] -->\n## mine-part: a second table\n" in text
    assert text.index("[start:other]") < text.index("[start:mine]") < text.index("[start:mine-quick]")


def test_publish_with_no_write_leaves_the_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "RESULTS.md"
    markdown = publish(_parser().parse_args(["--no-write"]), "title", ["body"], path=path)
    assert not path.exists()
    assert capsys.readouterr().out.strip() == markdown.strip()


def test_per_call_sample_is_the_median_call(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # calls of 1, 3 and 2 seconds
    monkeypatch.setattr("benchmarks.harness.time.perf_counter", lambda: next(clock))
    calls: list[int] = []
    assert per_call(lambda: calls.append(1), calls=3)() == 2.0
    assert len(calls) == 3


def test_mean_std_of_fractions_in_percent() -> None:
    assert mean_std([0.5, 0.7]) == "60.00 ± 14.14"
    assert mean_std([0.5, 0.7], digits=1) == "60.0 ± 14.1"
    assert mean_std([0.25]) == "25.00 ± 0.00"


NOT_MEASURING = {"figures"}
"""Registered commands that write no RESULTS.md section (``figures`` draws PNGs from it)."""


def test_every_benchmark_takes_the_standard_options() -> None:
    for name in set(bench_main.BENCHMARKS) - NOT_MEASURING:
        out = io.StringIO()
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out):
            bench_main._load(name).main(["--help"])
        assert exit_.value.code == 0, name
        assert out.getvalue().startswith(f"usage: python -m benchmarks {name} "), name
        for flag in ("--threads", "--section", "--no-write"):
            assert flag in out.getvalue(), (name, flag)


def test_a_benchmark_run_prints_the_shared_header(capsys: pytest.CaptureFixture[str]) -> None:
    before = RESULTS_PATH.read_text()
    argv = ["--quick", "--no-write", "--backbone", "mlp", "--batch-size", "4", "--image-size", "8", "--inner", "1"]
    threads = torch.get_num_threads()
    try:
        assert bench_main.main(["early_stopping", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"## early_stopping-quick: cost of keeping the best weights{QUICK_MARK}"
    assert lines[2].startswith(f"`python -m benchmarks early_stopping {' '.join(argv)}`, ")
    assert lines[4].startswith("Machine: ")
    assert any(line.startswith("| train_step |") for line in lines)
    assert RESULTS_PATH.read_text() == before
