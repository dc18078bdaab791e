"""The study's database: open Optuna's RDB storage (SQLite or a server), tell storage errors apart, mask passwords.

Split from :mod:`lightning_tricks.tuning.study`, which re-exports every name here.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any

from lightning_tricks.core.validation import ConfigError
from lightning_tricks.errors import error_chain
from lightning_tricks.tuning._optuna_internals import rdb_engine

HEARTBEAT_INTERVAL = 10
"""Seconds between a running trial's heartbeats in the database."""
GRACE_PERIOD = 60
"""A RUNNING trial without a heartbeat for this long is failed by the next worker (any machine)."""
SCHEMA_RACE_ATTEMPTS = 6
"""Workers that open a fresh database together: the losers open it again, up to this many times."""


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages).

    Examples:
        >>> masked_url("postgresql://tune:secret@db.example:5432/tune")
        'postgresql://tune:***@db.example:5432/tune'
        >>> masked_url("sqlite:///runs/study.db")
        'sqlite:///runs/study.db'
    """
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask what looks like user:password@
        import re

        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def storage_error_line(url: str, err: BaseException) -> str:
    """The first line of a storage error, with the URL's password (should a driver echo it) masked."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    return first.replace(str(password), "***") if password else first


def storage_cause(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that says the study's database cannot be reached or used, else ``None``."""
    import optuna
    from sqlalchemy.exc import DBAPIError, OperationalError

    chain = error_chain(err)
    # the driver's own error first (Optuna wraps it in StorageInternalError, "An exception is raised during the commit")
    for kinds in ((OperationalError, DBAPIError), (optuna.exceptions.StorageInternalError, ConnectionError)):
        found = next((c for c in chain if isinstance(c, kinds)), None)
        if found is not None:
            return found
    return None


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the study's database cannot be reached or used."""
    return storage_cause(err) is not None


def lost_schema_race(err: BaseException) -> bool:
    """Whether ``err`` says another process created Optuna's tables at the same moment as this one.

    SQLAlchemy's ``create_all`` checks for each table, then creates it; that is not atomic. Two workers
    opening a fresh PostgreSQL database together collide in the catalog (``UniqueViolation`` on
    ``pg_type_typname_nsp_index``); MySQL says the table already exists. The tables are there by then,
    so opening again succeeds.
    """
    from sqlalchemy.exc import DBAPIError, IntegrityError

    return any(isinstance(cause, IntegrityError) or (isinstance(cause, DBAPIError) and "already exists" in str(cause))
               for cause in error_chain(err))


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats; an unreachable URL is one ConfigError line (password masked)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 300}}  # concurrent workers wait for the lock
    try:
        for attempt in range(SCHEMA_RACE_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
                    storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL,
                                                         grace_period=GRACE_PERIOD, **kwargs)
                break
            except Exception as err:
                if attempt + 1 == SCHEMA_RACE_ATTEMPTS or not lost_schema_race(err):
                    raise
                time.sleep(0.05 * 2**attempt * (1 + random.SystemRandom().random()))  # jitter, off the seeded generators
    except Exception as err:  # sqlalchemy's, a missing driver, a bad URL: all one line for the user
        first = storage_error_line(url, err)
        hint = ""
        if ("DB access module" in first or "No module named" in first) and url.startswith("postgresql"):
            hint = (" (this URL asks for psycopg2: pip install psycopg2-binary, or write postgresql:// and pip install "
                    "'lightning-tricks[distributed]')" if url.startswith("postgresql+psycopg2") else
                    " (PostgreSQL needs its driver: pip install 'lightning-tricks[distributed]', i.e. psycopg[binary])")
        raise ConfigError(f"cannot open the study storage {masked_url(url)!r}: {first}{hint}") from None
    if url.startswith("sqlite"):
        _write_ahead_log(storage)
    return storage


def _write_ahead_log(storage: Any) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a commit without an fsync (about 9x faster here).

    Still safe when a process is killed (only an OS crash can lose the last commits), and readers do not
    block the writer, which helps concurrent workers. WAL needs a local file system (not NFS): use a
    server database for workers on several machines. The storage's SQLAlchemy engine comes from
    :func:`~lightning_tricks.tuning._optuna_internals.rdb_engine` (not documented API; skipped where missing).
    """
    from sqlalchemy import event

    def on_connect(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine = rdb_engine(storage)
    if engine is not None:
        event.listen(engine, "connect", on_connect)
        engine.dispose()  # connections opened before the listener reconnect with it
