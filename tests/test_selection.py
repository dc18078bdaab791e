"""The one selector every trick uses (`lightning_tricks.core.selection`), against a brute-force reference."""

from __future__ import annotations

import fnmatch
import itertools

import pytest
from torch import nn

from lightning_tricks.core.selection import check_layer_types, is_of_types, name_matches, select
from lightning_tricks.errors import InvalidArgumentError


def _net() -> nn.Module:
    block = lambda: nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU())  # noqa: E731
    return nn.Sequential(nn.ModuleDict({"layer1": block(), "layer2": block()}),
                         nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def _reference(names: list[str], include: list[str] | None, exclude: list[str], eligible: set[str]) -> list[str]:
    """Brute force: a pattern selects a name when it matches any prefix of its dotted parts."""
    def hit(name: str, pattern: str) -> bool:
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:k]), pattern) for k in range(1, len(parts) + 1))
    return [n for n in names if n in eligible and (include is None or any(hit(n, p) for p in include))
            and not any(hit(n, p) for p in exclude)]


@pytest.mark.parametrize("include", [None, ["0"], ["0.layer*"], ["*.layer2"], ["1"], ["0.layer1", "1.1"]])
@pytest.mark.parametrize("exclude", [[], ["0.layer2"], ["*.0"]])
def test_select_equals_the_brute_force_rule(include, exclude):
    net = _net()
    names = [n for n, _ in net.named_modules() if n]
    weights = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    why_not = lambda m: None if isinstance(m, (nn.Conv2d, nn.Linear)) else "no weight"  # noqa: E731
    expected = _reference(names, include, exclude, weights)
    try:
        got = [n for n, _ in select(net.named_modules(), include=include, exclude=exclude, why_not=why_not, owner="T")]
    except InvalidArgumentError as err:  # only when a pattern selects nothing eligible or nothing at all
        assert any(not _reference(names, [p], [], weights) for p in include or ()) or any(
            not _reference(names, [p], [], set(names)) for p in exclude), err
        return
    assert got == expected


def test_parameters_are_selected_by_their_module_names_too():
    net = _net()
    got = [n for n, _ in select(net.named_parameters(), include=["1"], what="parameter", owner="T")]
    assert got == ["1.1.weight", "1.1.bias"]


@pytest.mark.parametrize(("name", "pattern", "expected"), [
    ("head.0.weight", "head", True), ("backbone.head", "head", False), ("layer2.1.conv1", "layer*.*.conv1", True),
    ("layer2.1.conv1.weight", "layer?.1", True), ("a.b", "a.b.c", False)])
def test_name_matches(name, pattern, expected):
    assert name_matches(name, pattern) is expected


def test_errors_name_the_argument_the_pattern_and_real_names():
    net = _net()
    with pytest.raises(InvalidArgumentError, match=r"T: `layers` pattern 'layer9' matches no module: names look like '0'"):
        select(net.named_modules(), include=["layer9"], include_arg="layers", owner="T")
    with pytest.raises(InvalidArgumentError, match=r"`exclude` pattern 'nope'"):
        select(net.named_modules(), exclude=["nope"], owner="T")
    with pytest.raises(InvalidArgumentError, match=r"matches only modules T cannot act on: '0.layer1.2' \(ReLU: x\)"):
        select(net.named_modules(), include=["0.layer1.2"], why_not=lambda m: None if isinstance(m, nn.Conv2d) else "x",
               owner="T")
    for bad in ("head", [], [""], [3]):
        with pytest.raises(InvalidArgumentError, match="`include`="):
            select(net.named_modules(), include=bad, owner="T")


def test_layer_types_by_name_qualified_name_and_base_class():
    class MyConv(nn.Conv2d):
        pass

    net = nn.Sequential(MyConv(1, 1, 1), nn.Linear(2, 2))
    for types, expected in ((["Conv2d"], [True, False]), (["torch.nn.modules.linear.Linear"], [False, True]),
                            ([nn.Conv2d], [True, False]), (["MyConv", "Linear"], [True, True])):
        assert [is_of_types(m, types) for m in net] == expected
        assert check_layer_types(net, types, "T") == types
    with pytest.raises(InvalidArgumentError, match=r"T: `layer_types` entry 'Conv1d' matches no module of Sequential"):
        check_layer_types(net, ["Conv1d"], "T")


def test_no_other_module_matches_names_with_fnmatch():
    """One selector: the package matches glob patterns on names in core/selection.py only."""
    from tests.helpers import REPO

    offenders = [str(p.relative_to(REPO)) for p in (REPO / "lightning_tricks").rglob("*.py")
                 if "fnmatch" in p.read_text() and p.name != "selection.py"]
    assert offenders == []


MOVED_MODULES = {"lightning_tricks.distributed": "lightning_tricks.core.distributed",
                 "lightning_tricks.stochastic": "lightning_tricks.core.stochastic",
                 "lightning_tricks.surgery": "lightning_tricks.core.surgery",
                 "lightning_tricks.scaling": "lightning_tricks.large_batch",
                 "lightning_tricks.evaluation": "lightning_tricks.exact_evaluation",
                 "lightning_tricks.regularization.penalty": "lightning_tricks.regularization.weight_penalty",
                 "lightning_tricks.stopping": "lightning_tricks.early_stopping"}


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_moved_public_modules_still_import_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        moved = importlib.import_module(old)
    target = importlib.import_module(new)
    public = getattr(target, "__all__", None) or [
        n for n in dir(target) if not n.startswith("_") and getattr(getattr(target, n), "__module__", "") == new]
    assert public and all(getattr(moved, n) is getattr(target, n) for n in itertools.islice(public, 60))
