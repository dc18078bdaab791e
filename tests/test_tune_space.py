"""Search-space files, key resolution against a config, narrowing, stage positions: pure logic, no training."""

import math
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from lightning_tricks.core.validation import ConfigError
from lightning_tricks.tuning.space import (
    Distribution,
    apply_params,
    grid_values,
    load_search_space,
    narrow,
    parse_distribution,
    resolve_space,
)
from lightning_tricks.tuning.study import (
    TuneSettings,
    position,
    split_trials,
    stage_of,
    stage_space,
    stages_before_finished,
)

CONFIG = {
    "trainer": {"max_epochs": 5, "callbacks": [
        {"class_path": "lightning_tricks.Cutout", "init_args": {"length": 4, "p": 1.0}},
        {"class_path": "lightning_tricks.EarlyStopping", "init_args": {"monitor": "val_acc"}}]},
    "model": {"class_path": "lightning_tricks.zoo.ImageClassifier",
              "init_args": {"lr": 0.05, "weight_decay": 0.0005, "momentum": 0.9}},
    "data": {"class_path": "lightning_tricks.zoo.DigitsDataModule", "init_args": {"batch_size": 64}},
}


def test_parse_every_kind():
    space = load_search_space({
        "model.init_args.lr": {"log_uniform": [1e-4, 1e-1]}, "model.init_args.momentum": {"uniform": [0.5, 0.99]},
        "data.init_args.batch_size": {"choice": [32, 64]}, "trainer.callbacks.Cutout.length": {"int": [2, 6]},
        "trainer.max_epochs": {"log_int": [1, 8]}})
    assert space["model.init_args.lr"] == Distribution("log_uniform", 1e-4, 1e-1)
    assert space["data.init_args.batch_size"].choices == (32, 64)
    assert space["trainer.callbacks.Cutout.length"].kind == "int" and space["trainer.max_epochs"].log


@pytest.mark.parametrize("spec,message", [
    ({"log_uniform": [0, 1]}, "needs low > 0"),
    ({"uniform": [1, 0.5]}, "needs low < high"),
    ({"loguniform": [1e-4, 1e-1]}, "did you mean 'log_uniform'"),
    ({"int": [1.5, 3]}, "bounds must be integers"),
    ({"choice": []}, "non-empty list"),
    ({"uniform": [0, "a"]}, "two finite numbers"),
    (0.1, "is not a distribution"),
])
def test_malformed_distribution_is_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_distribution("model.init_args.lr", spec)
    assert "\n" not in str(err.value) and "model.init_args.lr" in str(err.value)


def test_keys_resolve_with_or_without_init_args_and_callbacks_by_name():
    params = {k: Distribution("uniform", 0.1, 0.9) for k in
              ("model.init_args.lr", "model.weight_decay", "callbacks.Cutout.length", "trainer.max_epochs")}
    space = resolve_space(CONFIG, params)
    assert space.paths["model.weight_decay"] == ("model", "init_args", "weight_decay")
    assert space.paths["callbacks.Cutout.length"] == ("trainer", "callbacks", "Cutout", "length")
    out = apply_params(CONFIG, space, {"model.init_args.lr": 0.2, "model.weight_decay": 0.0,
                                       "callbacks.Cutout.length": 6, "trainer.max_epochs": 3})
    assert out["model"]["init_args"] == {"lr": 0.2, "weight_decay": 0.0, "momentum": 0.9}
    assert out["trainer"]["callbacks"][0]["init_args"] == {"length": 6, "p": 1.0} and out["trainer"]["max_epochs"] == 3
    assert CONFIG["model"]["init_args"]["lr"] == 0.05  # the base config is not modified


@pytest.mark.parametrize("key,nearby", [
    ("model.init_args.lrr", "model.init_args.lr"),
    ("model.init_args.wieght_decay", "model.init_args.weight_decay"),
    ("trainer.callbacks.Cutout.lenght", "trainer.callbacks.Cutout.length"),
    ("trainer.callbacks.Mixup.alpha", "trainer.callbacks"),
])
def test_unknown_key_names_valid_keys_nearby(key, nearby):
    with pytest.raises(ConfigError) as err:
        resolve_space(CONFIG, {key: Distribution("uniform", 0.1, 0.9)})
    message = str(err.value)
    assert "\n" not in message and f"`{key}` is not in the config" in message and nearby in message


def test_narrow_in_log_space_inside_the_original_range():
    d = Distribution("log_uniform", 1e-4, 1e-1)
    n = narrow(d, [1e-2, 4e-2])
    span = math.log(4e-2) - math.log(1e-2)
    assert math.isclose(math.log(n.low), math.log(1e-2) - 0.25 * span)
    assert math.isclose(math.log(n.high), math.log(4e-2) + 0.25 * span)
    edge = narrow(d, [1e-4, 2e-4])  # clipped to the original range
    assert edge.low == 1e-4 and edge.high < 1e-3
    single = narrow(Distribution("uniform", 0.0, 1.0), [0.5])  # one value: a window of 5% each side
    assert math.isclose(single.low, 0.45) and math.isclose(single.high, 0.55)
    ints = narrow(Distribution("int", 1, 100), [10, 20])
    assert (ints.low, ints.high) == (5, 25)  # pad max(0.25 * 10, 0.05 * 99) = 4.95, then floor/ceil
    choice = Distribution("choice", choices=(1, 2, 3))
    assert narrow(choice, [2]) == choice  # Optuna keeps one set of choices per parameter


def test_grid_values_log_spaced():
    assert grid_values(Distribution("log_uniform", 1e-4, 1e-1), 4) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert grid_values(Distribution("int", 1, 3), 5) == [1, 2, 3]
    assert grid_values(Distribution("choice", choices=("a", "b")), 7) == ["a", "b"]


def test_split_trials_and_stage_of_positions():
    assert split_trials(12, 2) == [8, 4] and sum(split_trials(13, 3)) == 13
    assert [stage_of(p, [8, 4]) for p in (0, 7, 8, 11, 12)] == [1, 1, 2, 2, 3]


def _t(number, state, value=None, **params):
    return SimpleNamespace(number=number, state=state, value=value, params=params)


def test_failed_trials_free_their_position_and_stage_two_waits_for_stage_one():
    trials = [_t(0, TrialState.COMPLETE), _t(1, TrialState.FAIL), _t(2, TrialState.RUNNING), _t(3, TrialState.RUNNING)]
    assert [position(trials, n) for n in (0, 2, 3, 4)] == [0, 1, 2, 3]
    assert not stages_before_finished(trials, 2, [3, 1])  # trial 3 (position 2, stage 1) still runs
    trials[3] = _t(3, TrialState.PRUNED)
    trials[2] = _t(2, TrialState.COMPLETE)
    assert stages_before_finished(trials, 2, [3, 1])


def test_stage_two_ranges_surround_the_best_of_stage_one():
    params = load_search_space({"lr": {"log_uniform": [1e-4, 1.0]}, "wd": {"choice": [0, 1e-4]}})
    settings = TuneSettings(config_args=[], space=resolve_space({"lr": 1, "wd": 0}, params), trials=6, stages=2,
                            stage_epochs=[1, 2], stage_trials=[4, 2], metric="val_acc", direction="maximize")
    study = optuna.create_study(direction="maximize")
    dists = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
             "wd": optuna.distributions.CategoricalDistribution([0, 1e-4])}
    for lr, value in ((1e-4, 0.2), (1e-2, 0.9), (2e-2, 0.95), (0.9, 0.1)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "wd": 0}, distributions=dists, value=value))
    ranges = stage_space(study.get_trials(), 2, settings)
    assert 1e-3 < ranges["lr"].low < 1e-2 and 2e-2 < ranges["lr"].high < 0.1
    assert ranges["wd"] == params["wd"]
    assert stage_space(study.get_trials(), 1, settings)["lr"] == params["lr"]


def test_example_search_space_fits_the_digits_config(tmp_path, monkeypatch):
    from lightning_tricks.tuning.cli import load_config
    from tests.helpers import REPO

    monkeypatch.chdir(tmp_path)
    base = load_config(["--config", str(REPO / "examples" / "digits.yaml")])
    space = resolve_space(base, load_search_space(REPO / "examples" / "search.yaml"))
    assert space.params["model.init_args.lr"].log and space.paths["data.init_args.batch_size"][-1] == "batch_size"
