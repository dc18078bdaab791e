"""Every public trick on every project of :mod:`tests.public_projects`: it serves, checked against a reference, or refuses.

:data:`EXPECTED` is the contract, one entry per (trick, project): ``"serves"`` means the trick runs and its
effect equals an independent reference (computed in ``tests/matrix_checks.py`` and
``tests/matrix_checks_training.py``: a formula, a brute-force recomputation with our own
hooks, the plain model); ``"refuses"`` means it raises a :class:`~lightning_tricks.core.validation.ConfigError`
whose message is one line that says what to do. No cell is skipped. Cells that other branches are fixing
carry a strict ``xfail`` (:data:`KNOWN_WRONG`) with what they do wrong today; the lead removes the entry when
the fix is merged, and the strict mark fails the run if a cell passes while still marked.

Each cell builds its tiny module and trains at most a few batches of 8 samples on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import lightning_tricks as lt
from lightning_tricks.core.validation import ConfigError
from tests.matrix_checks import (
    check_activation_statistics,
    check_dead_unit_monitor,
    check_drop_connect,
    check_exact_distributed_evaluation,
    check_fold_batch_norm,
    check_fractional_max_pooling,
    check_large_batch_scaling,
    check_lsuv,
    check_standardize,
    check_stochastic_depth,
    check_update_ratio_monitor,
    check_weight_init,
    check_weight_penalty,
)
from tests.matrix_checks_training import (
    check_activation_swap,
    check_batch_augment,
    check_cutout,
    check_divergence_stop,
    check_early_stopping,
    check_ema_members,
    check_ensemble,
    check_finetune,
    check_initial_loss,
    check_mixup,
    check_snapshot_ensemble,
    check_tta,
)
from tests.public_projects import PROJECTS

PROJECT_NAMES = tuple(PROJECTS)

S, R = "serves", "refuses"


def _row(**cells: str) -> dict[str, str]:
    assert set(cells) == set(PROJECT_NAMES), set(PROJECT_NAMES) ^ set(cells)
    return cells


def _all(outcome: str) -> dict[str, str]:
    return dict.fromkeys(PROJECT_NAMES, outcome)


EXPECTED_ROWS: dict[str, dict[str, str]] = {
    "WeightPenalty": _all(S),
    "DropConnect": _row(multilabel=R, segmentation=R, gan=S, dict=R, pl_package=R, softmax=S, plain=R),
    "StochasticDepth": _row(multilabel=R, segmentation=R, gan=R, dict=R, pl_package=R, softmax=R, plain=S),
    "FractionalMaxPooling": _row(multilabel=S, segmentation=R, gan=R, dict=S, pl_package=S, softmax=S, plain=S),
    "WeightInit": _all(S),
    "WeightInit[lsuv]": {**_all(S), "gan": R},
    "ActivationStatistics": {**_all(S), "gan": R},
    "DeadUnitMonitor": _all(S),
    "UpdateRatioMonitor": _all(S),
    "LargeBatchScaling": _all(S),
    "Standardize": _all(S),
    "ExactDistributedEvaluation": _all(S),
    "fold_batch_norm": _all(S),
    "ActivationSwap": {**_all(S), "gan": R},
    "BatchAugment": _all(S),
    "Cutout": _all(S),
    "Mixup": {**_all(S), "gan": R},
    "TestTimeAugmentation": _all(S),
    "EarlyStopping": _all(S),
    "Ensemble": {**_all(S), "segmentation": R, "gan": R},
    "SnapshotEnsemble": _all(S),
    "EMAMembers": {**_all(S), "pl_package": R},
    "DivergenceStop": _all(S),
    "InitialLossCheck": {**_all(S), "gan": R},
    "Finetune": {**_all(S), "gan": R},
}
EXPECTED: dict[tuple[str, str], str] = {(t, p): o for t, row in EXPECTED_ROWS.items() for p, o in row.items()}
"""(trick, project) -> ``"serves"`` | ``"refuses"``: the contract a reader can check at a glance."""

KNOWN_WRONG: dict[tuple[str, str], str] = {
}
"""Cells other branches own that are wrong today: strict xfail with what is wrong."""

REFUSAL_TYPES: dict[tuple[str, str], type[Exception]] = {
}
"""Refusals that must name the task (a generic ConfigError is not enough)."""

FIX_WORDS = ("pass", "use", "set", "add", "remove", "give", "select", "return", "choose", "call", "make")


CHECKS: dict[str, Callable[..., None]] = {
    "WeightPenalty": check_weight_penalty,
    "DropConnect": check_drop_connect,
    "StochasticDepth": check_stochastic_depth,
    "FractionalMaxPooling": check_fractional_max_pooling,
    "WeightInit": check_weight_init,
    "WeightInit[lsuv]": check_lsuv,
    "ActivationStatistics": check_activation_statistics,
    "DeadUnitMonitor": check_dead_unit_monitor,
    "UpdateRatioMonitor": check_update_ratio_monitor,
    "LargeBatchScaling": check_large_batch_scaling,
    "Standardize": check_standardize,
    "ExactDistributedEvaluation": check_exact_distributed_evaluation,
    "fold_batch_norm": check_fold_batch_norm,
    "ActivationSwap": check_activation_swap,
    "BatchAugment": check_batch_augment,
    "Cutout": check_cutout,
    "Mixup": check_mixup,
    "TestTimeAugmentation": check_tta,
    "EarlyStopping": check_early_stopping,
    "Ensemble": check_ensemble,
    "SnapshotEnsemble": check_snapshot_ensemble,
    "EMAMembers": check_ema_members,
    "DivergenceStop": check_divergence_stop,
    "InitialLossCheck": check_initial_loss,
    "Finetune": check_finetune,
}


NOT_ROWS: dict[str, str] = {
    "BatchTransformMixin": "the mixin Cutout/Mixup name in their refusals; exercised through those rows",
    "DropConnectConv2d": "DropConnect's layer (its row converts the model's layers)",
    "DropConnectLinear": "DropConnect's layer (its row converts the model's layers)",
    "SeededFractionalMaxPool2d": "FractionalMaxPooling's layer (its row checks the converted layer)",
    "Maxout": "a layer users build into their own model; no model here has one to swap",
    "MaxoutConv2d": "a layer users build into their own model; no model here has one to swap",
    "swap_activations": "ActivationSwap's functional core (its row)",
    "DeadUnitTracker": "DeadUnitMonitor's functional core (its row)",
    "TTAConfig": "TestTimeAugmentation's configuration (its row)",
    "TTAWrapper": "TestTimeAugmentation's functional core (its row)",
    "FoldReport": "fold_batch_norm's report (its row)",
    "overfit_check": "babysit's sanity step (training-styles' scope); tests/test_babysit.py",
    "apply_recorded_tricks": "checkpoint loading, not a trick; tests/test_checkpoint.py",
    "load_from_checkpoint": "checkpoint loading, not a trick; tests/test_checkpoint.py",
    "infer_num_classes": "a probe the tricks use, not a trick; tests/test_model_probe.py",
    "MNIST1DDataModule": "zoo data", "CIFAR10DataModule": "zoo data", "DigitsDataModule": "zoo data", "SyntheticDataModule": "zoo data",
    "errors": "the error hierarchy every refusal here raises; tests/test_errors.py",
    "ImageClassifier": "zoo model", "CALLBACKS": "the list of callbacks", "__version__": "the version",
}
"""Public names that are not rows of the matrix, and why: a new public trick must be added to one or the other."""


def test_matrix_covers_every_public_trick() -> None:
    covered = {name.split("[")[0] for name in EXPECTED_ROWS}
    assert set(lt.CALLBACKS) <= covered, set(lt.CALLBACKS) - covered
    assert set(lt.__all__) == covered | set(NOT_ROWS), set(lt.__all__) ^ (covered | set(NOT_ROWS))
    assert set(CHECKS) == set(EXPECTED_ROWS)
    assert set(KNOWN_WRONG) <= set(EXPECTED)


def _cells() -> list[Any]:
    cells = []
    for trick, project in EXPECTED:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[(trick, project)])] \
            if (trick, project) in KNOWN_WRONG else []
        cells.append(pytest.param(trick, project, marks=marks, id=f"{trick}-{project}"))
    return cells


@pytest.mark.parametrize(("trick", "project"), _cells())
def test_cell(trick: str, project: str, tmp_path: Any) -> None:
    check = CHECKS[trick]
    args = (project, tmp_path) if trick == "SnapshotEnsemble" else (project,)
    if EXPECTED[(trick, project)] == S:
        check(*args)
        return
    with pytest.raises(ConfigError) as info:
        check(*args)
    assert isinstance(info.value, REFUSAL_TYPES.get((trick, project), ConfigError)), repr(info.value)
    message = str(info.value)
    assert "\n" not in message.strip() and len(message) < 600, message
    assert any(word in message.lower() for word in FIX_WORDS), message
