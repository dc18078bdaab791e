"""`lightning-tricks recipe`: a tiny recipe end to end on digits, checked against hand-computed references; a re-run
resumes; a run killed (SIGKILL) in the search and again in the final run ends with the same report; wrong inputs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_tricks.recipe import RecipeStopped, run_recipe
from lightning_tricks.recipe.cli import main, parse_duration
from tests.helpers import REPO

DIGITS = str(REPO / "examples" / "digits.yaml")
TINY = {"trials": 3, "epochs": [1, 1], "max_epochs": 2, "members": 2,
        "babysit": "--lr-steps 20 --overfit-epochs 10 --overfit-batches 1 --overfit-target 0.5 --lrs 0.1"}


def _argv(out) -> list[str]:
    return ["recipe", "--config", DIGITS, "--out", str(out), "--trials", "3", "--epochs", "1", "1", "--max-epochs",
            "2", "--members", "2", "--babysit", TINY["babysit"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    lines: list[str] = []
    results = run_recipe(DIGITS, out=str(out), echo=lines.append, **TINY)
    return out, results, lines


def _loader_outputs(members, loader):
    """Every member's logits and the targets over a loader, computed here without the Ensemble module."""
    logits, targets = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(torch.stack([m.eval()(x) for m in members]))
            targets.append(y)
    return torch.cat(logits, dim=1), torch.cat(targets)


def test_tiny_recipe_runs_every_step_and_its_numbers_match_hand_computed_ones(uninterrupted):
    from lightning_tricks.ensemble import load_member
    from lightning_tricks.zoo import DigitsDataModule

    out, results, _ = uninterrupted
    state = json.loads((out / "recipe.json").read_text())
    assert all(state["steps"][s]["done"] for s in ("baseline", "babysit", "tune", "final", "ensemble", "tta"))
    data = DigitsDataModule(batch_size=64)  # the config's datamodule
    data.setup("fit")
    data.setup("test")
    # baseline and final: the saved model's accuracy on the test and validation sets, by hand
    for step in ("baseline", "final"):
        model = load_member(out / results[step]["members"][0])
        for split, loader in (("test", data.test_dataloader()), ("val", data.val_dataloader())):
            logits, y = _loader_outputs([model], loader)
            assert results[step][f"{split}_acc"] == pytest.approx((logits[0].argmax(-1) == y).float().mean().item())
    # the ensemble: mean of the members' softmax, argmax
    members = [load_member(out / p) for p in results["ensemble"]["ensemble_members"]]
    assert len(members) == 2 and all(torch.equal(a, b) for a, b in zip(
        members[0].state_dict().values(), load_member(out / results["final"]["members"][0]).state_dict().values(), strict=True))
    logits, y = _loader_outputs(members, data.val_dataloader())
    probs = logits.softmax(-1).mean(0)
    assert results["ensemble"]["val_acc"] == pytest.approx((probs.argmax(-1) == y).float().mean().item())
    assert results["ensemble"]["val_loss"] == pytest.approx(-probs[torch.arange(len(y)), y].log().mean().item(),
                                                            rel=1e-4)
    final, ens = results["final"], results["ensemble"]
    assert ens["adopted"] == (ens["val_acc"] > final["val_acc"] or
                              (ens["val_acc"] == final["val_acc"] and ens["val_loss"] < final["val_loss"]))
    # the search: 3 finished trials, the best one's values in the final config, trained with restore-best stopping
    tune = results["tune"]
    assert tune["finished"] == 3 and tune["val_metric"] == max(t["value"] for t in tune["trials"])
    import yaml

    config = yaml.safe_load((out / "final" / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == tune["best_params"]["model.init_args.lr"]
    assert config["trainer"]["max_epochs"] == 2
    stops = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
    assert stops and stops[0]["class_path"] == "lightning_tricks.EarlyStopping"
    assert stops[0]["init_args"]["restore_best_weights"] is True
    # the report and the figure
    report = (out / "report.md").read_text()
    for title in ("1. baseline", "2. babysit", "3. tune", "4. best trial", "5. ensemble", "6. test-time"):
        assert title in report
    assert f"{100 * results['baseline']['test_acc']:.2f}%" in report
    assert (out / "recipe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_running_the_same_command_again_resumes_after_the_last_step(uninterrupted):
    out, results, _ = uninterrupted
    before = (out / "report.md").read_text()
    lines: list[str] = []
    again = run_recipe(DIGITS, out=str(out), echo=lines.append, **TINY)
    assert sum("done before" in line for line in lines) == 6
    assert {k: v for k, v in again.items()} == results
    assert (out / "report.md").read_text() == before
    with pytest.raises(Exception, match="other settings .*trials"):
        run_recipe(DIGITS, out=str(out), echo=lines.append, **{**TINY, "trials": 4})


def _normalized(report: str) -> str:
    report = re.sub(r"Command: .*", "", report)
    report = re.sub(r"\d+\.\d s \|", "T |", report)
    return re.sub(r"Total time: .*", "", report)


@pytest.mark.slow
@pytest.mark.timeout(900)  # one whole tiny recipe in three processes, on CI's 2 shared cores
def test_killed_in_the_search_and_in_the_final_run_ends_with_the_same_report(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lightning_tricks", *_argv(out)]
    for marker in (out / "tune" / "trials" / "trial-0001", out / "final" / "config.yaml"):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the recipe ended before the kill point"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "recipe.json").read_text())
    ref_out, results, _ = uninterrupted
    for step in ("baseline", "final", "ensemble", "tta"):
        for key in ("val_acc", "test_acc", "val_loss", "test_loss"):
            assert state["steps"][step]["result"].get(key) == results[step].get(key), (step, key)
    assert state["steps"]["tune"]["result"]["trials"] == results["tune"]["trials"]
    assert _normalized((out / "report.md").read_text()) == _normalized((ref_out / "report.md").read_text())


@pytest.mark.parametrize(("args", "expected"), [
    (["--ensemble", "all"], "invalid choice: 'all' (choose from 'top', 'snapshot', 'none')"),
    (["--tta", "flip"], "invalid choice: 'flip' (choose from 'auto', 'none')"),
    (["--trials", "0"], "`--trials`=0 is invalid: expected an integer >= 1."),
    (["--epochs", "1"], "`--epochs`=[1] is invalid: expected 2 integers >= 1 (coarse, fine)."),
    (["--time", "soon"], "`--time`='soon' is invalid: expected a duration such as 300, 300s, 20m or 1h30m."),
])
def test_wrong_inputs_are_one_line_with_the_valid_choices(args, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", DIGITS, "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "recipe.json").exists()


def test_parse_duration():
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45


def test_a_failed_babysit_check_stops_the_recipe_with_the_diagnosis(tmp_path):
    lines: list[str] = []
    with pytest.raises(RecipeStopped, match="learning rate: .*learning rate too high"):
        run_recipe(["--config", DIGITS, "--model.init_args.lr=5.0"], out=str(tmp_path), echo=lines.append,
                   trials=2, epochs=[1, 1], max_epochs=1, babysit="--lr-steps 10 --overfit-epochs 5 "
                   "--overfit-batches 1 --overfit-target 0.0 --lrs 0.1")
    state = json.loads((tmp_path / "recipe.json").read_text())
    assert not state["steps"]["babysit"]["result"]["passed"] and "tune" not in state["steps"]
    assert "FAILED" in (tmp_path / "report.md").read_text()


def test_the_search_draws_a_trials_values_from_its_position_so_a_killed_trials_replacement_draws_them_again():
    import optuna
    from optuna.trial import TrialState

    from lightning_tricks.recipe.search import PositionSampler

    def objective(trial):
        return trial.suggest_float("lr", 1e-4, 1e-1, log=True) + trial.suggest_categorical("wd", [0, 1e-5, 1e-4])

    plain = optuna.create_study(sampler=PositionSampler(3))
    plain.optimize(objective, n_trials=4)
    killed = optuna.create_study(sampler=PositionSampler(3))
    killed.optimize(objective, n_trials=2)
    doomed = killed.ask()  # drawn, then its process is killed: the trial is failed and frees position 2
    doomed.suggest_float("lr", 1e-4, 1e-1, log=True)
    killed.tell(doomed, state=TrialState.FAIL)
    killed.sampler = PositionSampler(3)  # a new process: a new sampler object
    killed.optimize(objective, n_trials=2)
    done = [t.params for t in killed.trials if t.state == TrialState.COMPLETE]
    assert done == [t.params for t in plain.trials]
    assert killed.trials[2].params["lr"] == plain.trials[2].params["lr"]
    lrs = [t.params["lr"] for t in plain.trials]
    assert len(set(lrs)) == 4 and all(1e-4 <= v <= 1e-1 for v in lrs)


def test_the_recipe_is_a_subcommand_of_lightning_tricks(capsys, tmp_path):
    from lightning_tricks.commands import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["recipe", "--config", DIGITS, "--out", str(tmp_path), "--members", "1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == ("lightning-tricks recipe: error: `--members`=1 is invalid: expected "
                                                 "an integer >= 2.")


def test_babysit_stops_the_recipe_on_a_broken_set_up_and_leaves_a_slow_drop_to_the_search():
    from lightning_tricks.recipe.steps import must_stop
    from lightning_tricks.tuning.babysit import StepResult

    ok = [StepResult(1, "initial loss", True, ""), StepResult(2, "overfit a small sample", True, "")]

    def lr_step(first, last, diagnosis):
        return StepResult(3, "learning rate", False, "", diagnosis,
                          {"own_lr": 0.01, "tried": [{"lr": 0.1, "first": 2.3, "last": 9.0},
                                                     {"lr": 0.01, "first": first, "last": last}]})

    assert not must_stop([*ok, lr_step(2.30, 1.24, "loss barely changes ...: learning rate too low.")])  # MNIST-1D
    assert must_stop([*ok, lr_step(2.30, 2.25, "loss barely changes ...: learning rate too low.")])
    assert must_stop([*ok, lr_step(2.30, float("nan"), "loss explodes (inf/NaN ...): learning rate too high.")])
    assert must_stop([StepResult(1, "initial loss", False, "", "badly scaled"), ok[1]])
    assert not must_stop(ok)


def test_tta_candidates_shift_sequences_along_their_length_and_images_by_one_pixel():
    """A [N, 1, 40] batch of a 1D model gets shifts of 1 and 2 steps along the length, and the wrapped model's
    prediction is the mean of the softmax over the signal shifted by -t, 0, +t with the edge value repeated
    (computed here by hand); a 2D model's image batch gets the one-pixel shift; a 3D batch of a model with
    neither 1D nor 2D layers gets none (nothing is guessed)."""
    from lightning_tricks.recipe.steps import tta_candidates
    from lightning_tricks.tta import TTAWrapper
    from lightning_tricks.zoo import ImageClassifier

    torch.manual_seed(0)
    seq_model = ImageClassifier(backbone="mnist1d_cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 40)
    cands = tta_candidates(x, seq_model)
    assert cands == [{"views": ["translate"], "translate": 1}, {"views": ["translate"], "translate": 2}]
    for kwargs in cands:
        t = kwargs["translate"]
        padded = torch.cat([x[..., :1].expand(-1, -1, t), x, x[..., -1:].expand(-1, -1, t)], dim=-1)
        views = [padded[..., t - dx: t - dx + 40] for dx in (-t, 0, t)]
        with torch.no_grad():
            expected = torch.stack([seq_model(v).softmax(-1) for v in views]).mean(0)
            got = TTAWrapper(seq_model, **kwargs)(x)
        got = got.exp()  # the wrapper returns log-probabilities
        assert torch.allclose(got, expected, atol=1e-5)
    image_model = ImageClassifier(backbone="simple_cnn", num_classes=10, in_channels=1)
    assert tta_candidates(torch.randn(2, 1, 8, 8), image_model) == [{"views": ["translate"], "translate": 1}]
    assert tta_candidates(torch.randn(2, 1, 40), torch.nn.Linear(40, 10)) == []
    assert tta_candidates(torch.randn(2, 40), seq_model) == []


def test_a_config_with_a_companion_search_file_is_searched_over_it(tmp_path):
    """`recipe --config examples/mnist1d.yaml` searches examples/mnist1d_search.yaml (the architecture among the
    zoo's sequence models, lr and weight decay on log scales, the schedule), every key a key of the config;
    `--search` overrides it; a config without a companion file keeps babysit's space (None here)."""
    from lightning_tricks.recipe.cli import build_context, parser
    from lightning_tricks.tuning.space import load_search_space, resolve_space

    def ctx(*argv):
        args, config_args = parser().parse_known_args(["--out", str(tmp_path), *argv])
        return build_context(args, config_args, lambda line: None)

    mnist1d = str(REPO / "examples" / "mnist1d.yaml")
    found = ctx("--config", mnist1d)
    assert found.search == str(REPO / "examples" / "mnist1d_search.yaml")
    space = resolve_space(found.base, load_search_space(found.search))
    dists = {key.rsplit(".", 1)[-1]: dist for key, dist in space.params.items()}
    assert dists["backbone"].choices == ("mnist1d_cnn", "resnet1d")
    assert dists["lr"].log and dists["weight_decay"].log
    assert ctx("--config", mnist1d, "--search", str(REPO / "examples" / "search.yaml")).search.endswith("/search.yaml")
    assert ctx("--config", DIGITS).search is None


def test_lightning_tricks_help_names_recipe_next_to_tune_and_babysit():
    result = subprocess.run([sys.executable, "-m", "lightning_tricks", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for command in ("babysit", "tune", "recipe"):
        assert f"lightning-tricks {command} --help" in text
