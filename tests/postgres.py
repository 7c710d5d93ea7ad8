"""A real PostgreSQL cluster for the tests, started in a temp dir.

``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package (under
/usr/lib/postgresql/*/bin; ./bootstrap test installs it). The server listens on
127.0.0.1 on a free port and on a socket in the temp dir, accepts password logins
(scram-sha-256) over TCP and trusts the socket, where the tests act as its superuser.
PostgreSQL refuses to run as root, so run as root the cluster belongs to the
``postgres`` user the package creates. Each test gets a database and a user with a
password of its own (``PostgresCluster.new_database``); a test module starts one cluster
with ``postgres_cluster()`` in a module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import free_port

SUPERUSER = "tester"


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin folder that has initdb and pg_ctl, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for folder in reversed(found):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


@dataclass
class PostgresCluster:
    bin: Path
    data: Path
    socket_dir: Path
    port: int
    log: Path
    run_as: list[str]
    # Addresses besides 127.0.0.1 it listens on (e.g. a network containers reach).
    also_listen: tuple[str, ...] = ()

    @property
    def admin_url(self) -> str:
        """The superuser over the socket (no password)."""
        return f"postgresql://{SUPERUSER}@/postgres?host={self.socket_dir}&port={self.port}"

    def sql(self, statement: str, *params: object, dbname: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser; its rows (empty for none)."""
        import psycopg

        with psycopg.connect(self.admin_url, dbname=dbname, autocommit=True) as conn:
            cursor = conn.execute(statement, params or None)
            return cursor.fetchall() if cursor.description else []

    def new_database(self, password: str | None = None, host: str = "127.0.0.1") -> str:
        """A fresh database owned by a fresh user (who may create databases, for the hub's)
        with a password; its ``postgresql://`` URL over TCP on 127.0.0.1."""
        import psycopg
        from psycopg import sql

        name = "bb_" + uuid.uuid4().hex[:10]
        password = password or "pw-" + uuid.uuid4().hex
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(name)
                )
            )
        return f"postgresql://{name}:{password}@{host}:{self.port}/{name}"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        listen = ",".join(["127.0.0.1", *self.also_listen])
        options = (
            f"-k {self.socket_dir} -c listen_addresses={listen} "
            f"-p {self.port} "
            "-c fsync=off -c max_connections=50"
        )
        self.pg_ctl("-w", "-l", str(self.log), "-o", options, "start")

    def stop(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "stop")


@contextlib.contextmanager
def postgres_cluster(also_listen: tuple[str, ...] = ()) -> Iterator[PostgresCluster]:
    """Start a cluster in a temp dir; stop it and remove the folder afterwards. With
    ``also_listen``, it listens there too and takes password logins from anywhere."""
    folder_bin = postgres_bin()
    if folder_bin is None:
        pytest.skip(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql, or run ./bootstrap test"
        )
    root = Path(tempfile.mkdtemp(prefix="binderbox-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root.
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    cluster = PostgresCluster(
        bin=folder_bin,
        data=root / "data",
        socket_dir=root,
        port=free_port(),
        log=root / "postgres.log",
        run_as=run_as,
        also_listen=also_listen,
    )
    started = False
    try:
        subprocess.run(
            [
                *run_as,
                str(folder_bin / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=root,
        )
        if also_listen:
            with (cluster.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
        cluster.start()
        started = True
        yield cluster
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError):
                cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
