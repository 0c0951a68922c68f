"""A throwaway PostgreSQL server for the registry tests: initdb + pg_ctl in a temp dir.

It listens on a unix socket only (no TCP port to collide with), runs as the `postgres` user via
`runuser` when the tests run as root (PostgreSQL refuses to run as root), and is stopped and
deleted at the end of the session. Missing binaries are an error naming `.ci/services.d/10-postgres.sh`
— never a skip, so a CI without PostgreSQL cannot go green by testing one backend.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: see .ci/services.d/10-postgres.sh "
                "(installs the Debian package `postgresql`) or put them on PATH")


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return cands[-1] if cands else None


@dataclass
class PgServer:
    root: Path
    sock: Path
    port: int
    user: str
    _as_postgres: bool

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{db}?host={self.sock}&port={self.port}"

    def create_db(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.sock), port=self.port, user=self.user,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        pg_ctl = find_bin("pg_ctl")
        if pg_ctl:
            _run([pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "stop"],
                 self._as_postgres, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cmd: list[str], as_postgres: bool, check: bool = True) -> subprocess.CompletedProcess[str]:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def start() -> PgServer:
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError(INSTALL_HINT)
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="trustmoe-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_postgres:
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root needs `runuser` to start PostgreSQL as postgres")
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("no `postgres` user: see .ci/services.d/10-postgres.sh") from None
        os.chmod(root, 0o755)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
    user = "trustmoe"
    _run([initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync",
          "--locale=C"], as_postgres)
    port = 5432
    opts = f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
    _run([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60",
          "start"], as_postgres)
    return PgServer(root, sock, port, user, as_postgres)
