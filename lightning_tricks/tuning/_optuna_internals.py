"""Every access to Optuna's private or undocumented state, in one place (listed in ``docs/internals.md``).

Each function says why Optuna has no public route and what happens where the attribute is missing: a
feature that only adds information (the reason a trial failed, SQLite's faster journal) is skipped; the
others fail with one :class:`~lightning_tricks.errors.ConfigError` line. Checked on Optuna 5.1.0 (and 4.x,
5.0 before); everything else in ``tuning/`` uses Optuna's public API, including ``BaseStorage``'s methods
(the interface Optuna documents for storage implementations) to turn a trial number into its id.
"""

from __future__ import annotations

from typing import Any

VERIFIED_OPTUNA = ("4.", "5.0.", "5.1.")
"""Optuna versions these accesses were checked against (prefixes)."""


def study_storage(study: Any) -> Any | None:
    """The storage object of ``study`` (``Study._storage``), or None where a version has no such attribute.

    Why: recording a user attribute on *another* trial (why a dead worker's trial failed) goes through the
    storage; ``Study`` exposes no storage, and a ``Trial`` object exists only for the trial being run.
    """
    return getattr(study, "_storage", None)


def trial_id(storage: Any, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of study ``study_name``, through ``BaseStorage``'s public methods
    (instead of ``FrozenTrial._trial_id``/``Trial._trial_id``)."""
    study_id = storage.get_study_id_from_name(study_name)
    return int(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def set_trial_user_attr(study: Any, number: int, key: str, value: Any) -> bool:
    """Record ``key``=``value`` on trial ``number`` of ``study`` (not finished yet: Optuna refuses to change a
    finished trial, so record before ``study.tell``); False where the storage is not
    reachable (an Optuna without ``Study._storage``: the attribute is skipped, nothing else changes)."""
    storage = study_storage(study)
    if storage is None:
        return False
    storage.set_trial_user_attr(trial_id(storage, study.study_name, number), key, value)
    return True


def rdb_engine(storage: Any) -> Any | None:
    """The SQLAlchemy engine of an ``RDBStorage`` (``RDBStorage.engine``: an attribute without a leading
    underscore, but not documented API), or None where it is missing (SQLite then keeps its default journal).

    Why: switching SQLite to write-ahead logging (``docs/tune.md``'s per-trial overhead) needs a listener on
    the engine's connections; ``RDBStorage`` takes ``engine_kwargs`` but no connection hook.
    """
    return getattr(storage, "engine", None)


__all__ = ["VERIFIED_OPTUNA", "rdb_engine", "set_trial_user_attr", "study_storage", "trial_id"]
