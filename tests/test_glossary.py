"""One name per idea (docs/glossary.md), over every public signature, and one scheme for the tricks' metrics."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

import lightning_tricks as lt
from lightning_tricks.core.deprecation import RENAMED
from lightning_tricks.errors import InvalidArgumentError
from tests.helpers import REPO

GLOSSARY = (REPO / "docs" / "glossary.md").read_text()


def _table(title: str) -> list[list[str]]:
    section = GLOSSARY.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


CANONICAL = {name for row in _table("Arguments") for name in _codes(row[1])}
OLD_NAMES = {name for row in _table("Arguments") for name in _codes(row[3]) if not name.startswith('"')
             and name.isidentifier()}
# names other libraries use for a glossary idea: a trick must not introduce them (under any owner)
SYNONYMS = {"prob", "probability", "drop_prob", "drop_path_rate", "rate", "image_key", "x_key", "y_key", "label_key",
            "key", "figure", "save_plot", "plot_path", "fig_dir", "patterns", "module_names", "modules", "types",
            "module_types", "verbosity", "stage", "phases", "random_seed", "rng_seed", "n_classes", "classes"}


def _public() -> list[tuple[str, Any]]:
    out = []
    for name in lt.__all__:
        obj = getattr(lt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((name, obj))
    return out


def _parameters(obj: Any) -> list[inspect.Parameter]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_the_glossary_table_parses():
    assert {"input_key", "target_key", "p", "include", "exclude", "layer_types", "plot", "plot_dir", "stages",
            "seed", "task"} <= CANONICAL
    assert {"batch_key", "drop_rate", "blocks", "save_figure", "figure_dir", "replace", "layers"} <= OLD_NAMES
    assert not CANONICAL & OLD_NAMES


def test_every_public_signature_uses_the_glossary():
    offenders = []
    for owner, obj in _public():
        for param in _parameters(obj):
            if param.name in SYNONYMS:
                offenders.append(f"{owner}.{param.name}: a synonym of a glossary name")
            elif param.name in OLD_NAMES and param.name not in RENAMED.get(owner, {}):
                offenders.append(f"{owner}.{param.name}: an old name that is not a registered deprecated alias")
    assert offenders == []


def test_every_registered_alias_is_in_the_signature_next_to_its_new_name():
    publics = dict(_public())
    for owner, renames in RENAMED.items():
        names = {p.name: p for p in _parameters(publics[owner])} if owner in publics else {}
        if owner not in publics:
            continue  # a functional entry point checked by its own trick's tests
        for old, new in renames.items():
            assert new in CANONICAL, (owner, new)
            assert old in names and new in names, (owner, old, new)
            assert names[old].default is None, f"{owner}.{old}: a deprecated alias defaults to None"


# a value each new name accepts at construction, different from its default
VALUES = {"input_key": "image", "p": 0.3, "include": ["model.*"], "activations": ["relu", "gelu"],
          "preactivation_layers": ["model.0"], "plot": True, "plot_dir": "figures"}
OWNER_VALUES = {("DeadUnitTracker", "preactivation_layers"): ["0"], ("find_watched_modules", "preactivation_layers"): ["0"],
                ("swap_activations", "include"): ["2"], ("resolve_swap", "include"): ["2"],
                ("swap_activations", "activations"): ["relu"]}
REQUIRED = {"DropConnectLinear": {"in_features": 2, "out_features": 2},
            "DeadUnitTracker": {"model": nn.Sequential(nn.Linear(2, 2))}, "ActivationSwap": {"to": "gelu"},
            "WeightInit": {"scheme": "lsuv"}}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def _swap(**kwargs: Any) -> nn.Module:
    from lightning_tricks.setup.activations import swap_activations

    model = _net()
    swap_activations(model, "gelu", **kwargs)
    return model


def _watched(**kwargs: Any) -> list:
    from lightning_tricks.monitoring.watched_modules import find_watched_modules

    return [(w.name, w.kind, w.source) for w in find_watched_modules(_net(), **kwargs)]


def _resolve(**kwargs: Any) -> Any:
    from lightning_tricks.setup.activations import resolve_swap

    return resolve_swap("gelu", **kwargs)


# the functional entry points that register renames: a callable of keyword arguments only
FUNCTIONS = {"swap_activations": _swap, "find_watched_modules": _watched, "resolve_swap": _resolve}


def _state(obj: Any) -> Any:
    if isinstance(obj, (list, tuple, nn.Module)):
        return repr(obj)
    if not hasattr(obj, "__dict__"):
        return repr(obj)
    return {k: re.sub(r" at 0x[0-9a-f]+", "", repr(v)) for k, v in vars(obj).items() if not k.startswith("_")}


@pytest.mark.parametrize("owner,old,new", sorted((o, old, new) for o, r in RENAMED.items() for old, new in r.items()))
def test_a_deprecated_alias_warns_and_builds_the_same_trick(owner, old, new):
    cls = FUNCTIONS.get(owner) or dict(_public()).get(owner)
    assert cls is not None, f"{owner} registers renames but is neither public nor in FUNCTIONS"
    value = OWNER_VALUES.get((owner, new), VALUES.get(new, VALUES.get(old)))
    if value is None:
        pytest.fail(f"add a value for `{new}` to VALUES")
    base = REQUIRED.get(owner, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = _state(cls(**base, **{new: value}))
    with pytest.warns(DeprecationWarning, match=rf"`{old}` is renamed `{new}`"):
        got = _state(cls(**base, **{old: value}))
    assert got == expected
    other = {"p": 0.1, "plot": False, "plot_dir": "elsewhere", "input_key": "x", "include": ["other.*"],
             "activations": ["elu"], "preactivation_layers": ["other"]}.get(new)
    if other is not None:
        with pytest.raises(InvalidArgumentError, match=rf"`{old}`=.* and `{new}`=.* are the same argument"):
            cls(**base, **{old: value, new: other})


def test_stages_use_lightnings_stage_names():
    allowed = {"train", "validate", "test", "predict", "fit", "both"}
    for owner, obj in _public():
        for param in _parameters(obj):
            if param.name == "stages" and param.default is not inspect.Parameter.empty:
                default = param.default
                values = {default} if isinstance(default, str) else set(default or ())
                assert values <= allowed, (owner, default)


# ------------------------------------------------------------------------------------------------ metrics

METRIC_ROWS = {row[0]: _codes(row[1]) for row in _table("Metrics")}
PREFIXES = {name: {m.split("/", 1)[0] for m in metrics} for name, metrics in METRIC_ROWS.items()}


def test_metric_names_follow_one_scheme_in_the_glossary():
    for trick, metrics in METRIC_ROWS.items():
        assert trick in lt.__all__, trick
        assert metrics and all(re.fullmatch(r"[a-z_]+/[<>a-z_/]+", m) for m in metrics), (trick, metrics)
        assert len(PREFIXES[trick]) == 1, trick
    prefixes = [next(iter(p)) for p in PREFIXES.values()]
    assert len(prefixes) == len(set(prefixes)), "two tricks share a metric prefix"


def _fit(callbacks: list, root) -> dict[str, float]:
    torch.manual_seed(0)
    model = lt.ImageClassifier(backbone="resnet20", num_classes=4, in_channels=1, image_size=8, lr=0.05)
    data = lt.SyntheticDataModule(num_samples=64, num_classes=4, image_shape=(1, 8, 8), batch_size=16, seed=0)
    trainer = Trainer(max_epochs=1, limit_val_batches=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=root)
    trainer.fit(model, datamodule=data)
    return dict(trainer.callback_metrics)


def test_the_tricks_metrics_reach_callback_metrics_under_their_prefix(tmp_path):
    """Every metric a trick logs is ``<its prefix>/...`` in ``callback_metrics`` (so a callback can monitor it)."""
    tricks = [lt.WeightPenalty(l2=1e-3), lt.LargeBatchScaling(reference_batch_size=8), lt.DropConnect(p=0.2, include=["model.fc"]),
              lt.StochasticDepth(p=0.2), lt.Cutout(length=2), lt.Mixup(alpha=0.2),
              lt.UpdateRatioMonitor(every_n_steps=1), lt.DeadUnitMonitor(), lt.InitialLossCheck(num_classes=4)]
    plain = set(_fit([], tmp_path))
    logged = set(_fit(tricks, tmp_path)) - plain
    owners = {type(t).__name__ for t in tricks}
    for key in logged:
        prefix = key.split("/", 1)[0]
        assert any(prefix in PREFIXES.get(owner, ()) for owner in owners), key
    for owner in owners:
        assert any(key.split("/", 1)[0] in PREFIXES[owner] for key in logged), f"{owner} logged nothing: {logged}"


def test_a_deprecated_name_is_shown_by_default_at_the_users_line():
    import subprocess
    import sys

    code = "import lightning_tricks as lt\nlt.StochasticDepth(drop_rate=0.3)\nimport lightning_tricks.distributed\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = [line for line in proc.stderr.splitlines() if "LightningTricksDeprecationWarning" in line]
    assert proc.returncode == 0 and [line.split(": ")[0] for line in lines] == ["<string>:2", "<string>:3"], proc.stderr
