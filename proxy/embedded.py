"""A throwaway Postgres cluster from the local server binaries, for the demo and the test suite.

It runs as the `postgres` system user when started by root (initdb and postgres refuse to run as
root), listens on 127.0.0.1 and a private socket directory, and is removed on stop.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path:
    """The directory holding initdb and postgres: `pg_config --bindir`, else the newest Debian install."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in versions]
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise RuntimeError("no Postgres server binaries found (install postgresql, or put pg_config on PATH)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """One temporary cluster. Superuser `postgres` connects over the socket without a password;
    TCP connections use SCRAM-SHA-256 unless `hba` lines (placed first in pg_hba.conf) say otherwise."""

    def __init__(
        self, port: int | None = None, settings: dict[str, str] | None = None, hba: list[str] | None = None
    ) -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.settings = settings or {}
        self.hba = hba or []
        self.root = Path(tempfile.mkdtemp(prefix="pgtp-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.logfile = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {"cwd": self.root, "capture_output": True, "text": True}
        if self._as_postgres:
            kwargs.update(user="postgres", group="postgres", extra_groups=[])
        result = subprocess.run(list(args), check=False, **kwargs)  # type: ignore[call-overload]
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def start(self) -> EmbeddedPostgres:
        self.socket_dir.mkdir()
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            **self.settings,
        }
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            for name, value in options.items():
                conf.write(f"{name} = '{value}'\n")
        hba = self.data / "pg_hba.conf"
        hba.write_text("".join(line + "\n" for line in self.hba) + hba.read_text())
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")
        except RuntimeError as exc:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{exc}\n{log[-2000:]}") from None
        return self

    def halt(self, mode: str = "fast") -> None:
        """Stop the server (`pg_ctl stop -m mode`) and keep the cluster, to `resume` it later: an outage."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def resume(self) -> None:
        """Start a cluster `halt` stopped, on the same port."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m mode`: `immediate` is a crash, recovered from at the start."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-m", mode, "-w", "-t", "60",
                  "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as `user` over the socket (trust) and return psql's unaligned output."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", database, "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={database}"
