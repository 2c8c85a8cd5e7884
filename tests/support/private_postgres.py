"""A private PostgreSQL cluster for fault tests: initdb + pg_ctl on a free loopback port, so a test may
stop and restart the server under load without touching the shared server on 5432.

The cluster listens on 127.0.0.1 only (no Unix socket), trusts local connections and keeps PostgreSQL's
durable defaults (fsync, synchronous_commit, full_page_writes on): what the node's commits rely on is
what a restart exercises. initdb and the server refuse to run as root; under root (a container) they run
as the `postgres` system user (or `nobody`) in a data directory that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from dicom_ai_node.devtools.ports import free_port
from tests.support.tools import require

INSTALL_HINT = "apt-get install postgresql (initdb and pg_ctl under /usr/lib/postgresql/*/bin)"
_UNPRIVILEGED_USERS = ("postgres", "nobody")
# pg_ctl -w waits at most this long for start and stop.
_PG_CTL_WAIT_S = 60


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (Debian's layout), else
    the directory of an initdb on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass
class PrivatePostgres:
    """One cluster: `start()`, `url(database)`, `restart()` / `stop()`; `close()` removes it."""

    bin_dir: Path
    base_dir: Path
    port: int = field(default_factory=free_port)
    # Set under root: the user the server runs as (it refuses root).
    run_as: str | None = None
    # Set when base_dir was made here (under root, outside the test's private tmp dir): removed by close().
    owns_base_dir: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout_s: float = _PG_CTL_WAIT_S + 30) -> subprocess.CompletedProcess[str]:
        user = pwd.getpwnam(self.run_as) if self.run_as else None
        proc = subprocess.run(
            list(args),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.log_tail()}"
            )
        return proc

    def init(self) -> PrivatePostgres:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            # initdb's own fsync of the new files only; the running server keeps fsync on.
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "max_connections": "50",
            "shared_buffers": "16MB",
            "logging_collector": "off",
        }
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/support/private_postgres.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        return self

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(_PG_CTL_WAIT_S),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"
        )

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m fast`: open connections are terminated, the server comes back."""
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-m",
            mode,
            "-w",
            "-t",
            str(_PG_CTL_WAIT_S),
            "restart",
        )

    @property
    def running(self) -> bool:
        user = pwd.getpwnam(self.run_as) if self.run_as else None
        proc = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        return proc.returncode == 0

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its URL."""
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Return once a connection succeeds (pg_ctl -w already waits; this is for a caller's own start)."""
        engine = sa.create_engine(self.url(), poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2})
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("SELECT 1"))
                    return
                except sa.exc.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            engine.dispose()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no postgres log>"

    def close(self) -> None:
        """Stop the server (immediate: nothing in it needs to survive) and remove the cluster."""
        if self.data_dir.joinpath("postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # already down; the files are removed all the same
        if self.owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _unprivileged_user() -> str:
    for name in _UNPRIVILEGED_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError(
        f"running as root and none of the users {_UNPRIVILEGED_USERS} exists to run PostgreSQL"
    )


@contextmanager
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A started private cluster; stopped and removed afterwards. Fails in CI (skips elsewhere) when the
    PostgreSQL server programs are not installed."""
    bin_dir = postgres_bin_dir()
    require(bin_dir is not None, "PostgreSQL server programs (initdb, pg_ctl)", INSTALL_HINT)
    assert bin_dir is not None
    if os.geteuid() == 0:
        # pytest's tmp_path is private to root (mode 0700): the server's user could not enter it.
        user = _unprivileged_user()
        base = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        cluster = PrivatePostgres(bin_dir, base, run_as=user, owns_base_dir=True)
    else:
        base = tmp_path / "postgres"
        base.mkdir()
        cluster = PrivatePostgres(bin_dir, base)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()
