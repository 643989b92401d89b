"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temporary folder, Unix socket only.

Debian's ``postgresql`` package puts its programs in /usr/lib/postgresql/<version>/bin
(not on PATH); they are looked for there too. As root the server runs as ``postgres``
(PostgreSQL refuses to run as root). Authentication: trust, on the socket only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

__all__ = ["pg_bindir", "PostgresServer"]


def pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's newest version), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """One cluster in *root*: ``start()``, ``stop()`` (fast: connections are cut), ``dsn(db)``."""

    def __init__(self, root: Path) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (initdb, pg_ctl): apt-get install postgresql")
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.log = root / "postgres.log"
        self._as: list[str] = []
        self._uid: int | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self._uid, self._gid = user.pw_uid, user.pw_gid
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._uid is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self._uid, self._gid)
            self.root.chmod(0o755)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.socket_dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")

    def start(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql:///{db}?host={self.socket_dir}&user=postgres"

    def create_db(self, db: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn().replace("postgresql:", "postgresql:", 1), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}"')
        return self.dsn(db)
