"""A real, throw-away PostgreSQL server for the shared-study tests (never a mock).

:class:`PostgresServer` runs the distribution's server binaries (Debian's ``postgresql`` package:
``/usr/lib/postgresql/<version>/bin``, or ``initdb``/``pg_ctl`` on the PATH) on a fresh data folder, a free
localhost port and its own socket folder, with password authentication for the user ``tune`` (so a URL
with a password is what the tests use). PostgreSQL refuses to run as root: as root, the server runs as
the ``postgres`` user the package creates. ``.ci/run`` installs the package when it is missing;
:func:`find_binaries` returns ``None`` (the tests skip, saying why) only where it truly cannot be had.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD, DATABASE = "tune", "s3cret-pw", "tune"


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, newest version first; ``None`` if absent."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: float(Path(p).parent.name),
                        reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    for folder in candidates:
        if all((Path(folder) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def why_unavailable() -> str | None:
    """``None`` when a server can be started here, else the reason (for ``pytest.skip``)."""
    if find_binaries() is None:
        return "no PostgreSQL server binaries (Debian: apt-get install postgresql; .ci/run installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run the server as"
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy 2.x uses for postgresql://)
    except ImportError:
        return "psycopg is not installed (pip install -e '.[distributed]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` a server in a temporary folder, ``stop()``/``start()`` it again, ``close()`` removes it all."""

    def __init__(self) -> None:
        self.bin = find_binaries()
        assert self.bin is not None
        self.root = Path(tempfile.mkdtemp(prefix="lt-postgres-"))
        self.data, self.sockets, self.port = self.root / "data", self.root / "sockets", free_port()
        self.sockets.mkdir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            self._ids = (entry.pw_uid, entry.pw_gid)
            for path in (self.root, self.sockets):
                os.chown(path, *self._ids)
        pw_file = self.root / "pw"
        pw_file.write_text(PASSWORD + "\n")
        if self._as_postgres:
            os.chown(pw_file, *self._ids)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pw_file), "--auth", "scram-sha-256",
                  "--encoding", "UTF8", "--no-sync")
        self.start()
        self._psql_create_database()

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def _demote(self) -> None:  # pragma: no cover - runs in the child
        os.setgid(self._ids[1])
        os.setuid(self._ids[0])

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, cwd=self.root,
                              preexec_fn=self._demote if self._as_postgres else None,
                              env={**os.environ, "LC_ALL": "C"}, timeout=120)
        if check and proc.returncode != 0:
            log = self.root / "log.txt"
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
                               + (f"\nserver log: {log.read_text()[-2000:]}" if log.exists() else ""))
        return proc

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log.txt"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    def _psql_create_database(self) -> None:
        import psycopg

        deadline = time.time() + 30
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                                     dbname="postgres", autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
