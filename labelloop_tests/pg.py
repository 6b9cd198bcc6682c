"""A real PostgreSQL server for tests: the one named by LABELLOOP_TEST_PG, or a private one.

`server()` returns a libpq key=value string for a superuser. With `LABELLOOP_TEST_PG` set (a libpq
string, key=value or URI) that server is used as it is. Otherwise the first call starts a private
server for this process: `initdb` into a fresh folder under /tmp, `pg_ctl start` listening on a free
port of 127.0.0.1 only (its unix socket inside that folder), trust authentication, durability off
(fsync, synchronous_commit, full_page_writes) since the data is thrown away. It is stopped and its
folder removed when the interpreter exits; every later call in the process shares it. Each pytest-
xdist worker is its own process, so each gets its own folder and port. A private server left by a
process that was killed (no atexit) is stopped by the next process that starts one.

initdb refuses to run as root, so under root (CI) initdb, pg_ctl and postgres run as the `postgres`
system user (runuser, or setpriv), and the folder belongs to that user.

The binaries are Debian's (/usr/lib/postgresql/<version>/bin, the highest version wins), else the
ones on PATH; `scripts/install-postgres.sh` installs them (`make test` runs it). A test calls
`require_server()`: where no server can be had it skips, except under CI (CI=true) where it fails.

`fresh_database(prefix)` creates a new uniquely named database and returns its libpq string;
`create_role(...)` creates a role. Databases and roles made on a LABELLOOP_TEST_PG server are
dropped at exit (set LABELLOOP_TEST_PG_KEEP=1 to keep them for a look).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

ENV = "LABELLOOP_TEST_PG"
KEEP_ENV = "LABELLOOP_TEST_PG_KEEP"
INSTALL_HINT = (
    "run `sudo bash scripts/install-postgres.sh` (or `make postgres` as root), "
    "or set LABELLOOP_TEST_PG to a server's libpq string"
)
DIR_PREFIX = "labelloop-pg-"
SERVER_USER = "postgres"  # the system user the private server runs as when this process is root
START_TIMEOUT_S = 60
PORT_ATTEMPTS = 5

_lock = threading.RLock()
_server: str | None = None
_failure: str | None = None  # why the first attempt failed: later calls fail at once, same reason
_private: _PrivateServer | None = None
# Made on a LABELLOOP_TEST_PG server (which outlives the tests), so dropped at exit.
_made_databases: list[str] = []
_made_roles: list[str] = []
_counter = itertools.count(1)


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server can be had here; the message says why and what to do."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class PostgresServerNotice(UserWarning):
    """Which PostgreSQL server this test process uses (a notice, not a problem)."""


def _announce(message: str) -> None:
    """Once per server. Under pytest as a warning, the one channel that reaches the test log even
    from an xdist worker with output captured (it is listed in the warnings summary); otherwise on
    stderr."""
    if "pytest" in sys.modules:
        warnings.warn(PostgresServerNotice(message), stacklevel=3)
    else:
        print(f"labelloop_tests.pg: {message}", file=sys.stderr, flush=True)


# --- the server ---------------------------------------------------------------------------------


def server() -> str:
    """A libpq string for a superuser on a real PostgreSQL server, shared by the whole process."""
    global _server, _failure, _private
    with _lock:
        if _server is not None:
            return _server
        if _failure is not None:
            raise ServerUnavailable(_failure)
        try:
            external = os.environ.get(ENV, "").strip()
            if external:
                try:  # a URI becomes key=value; a malformed string is refused here, not mid-test
                    dsn = make_dsn(**parse_dsn(external))
                except psycopg2.ProgrammingError as exc:
                    raise ServerUnavailable(f"{ENV} is not a libpq string: {exc}") from exc
                version = _check_reachable(dsn, f"{ENV} ({_describe(dsn)})")
                _announce(f"using {ENV}: {_describe(dsn)}, PostgreSQL {version}")
                atexit.register(_drop_made_objects, dsn, os.getpid())
                _server = dsn
            else:
                private = _PrivateServer.start()
                _private = private
                atexit.register(_stop_at_exit, private, os.getpid())
                _announce(
                    f"started a private PostgreSQL {private.version} on port {private.port} "
                    f"(data in {private.data_dir}; {private.start_seconds:.1f} s to start)"
                )
                _server = private.dsn
        except ServerUnavailable as exc:
            _failure = str(exc)
            raise
        return _server


def require_server() -> str:
    """`server()` for a test: skips without one, except under CI, where the test fails instead."""
    try:
        return server()
    except ServerUnavailable as exc:
        unavailable(f"no PostgreSQL server: {exc}")
        raise  # not reached: unavailable() raises


def unavailable(reason: str) -> None:
    """Skip the calling test, or fail it under CI (CI=true): CI installs PostgreSQL, so it must
    be there."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def start_private() -> _PrivateServer:
    """A new private server, not the shared one; the caller stops it (`.stop()`). `.dsn`,
    `.port`, `.folder` and `.data_dir` say where it is. `server()` starts its own the same way."""
    return _PrivateServer.start()


def private_server() -> _PrivateServer | None:
    """The private server `server()` started, if it started one (None under LABELLOOP_TEST_PG)."""
    return _private


def _describe(dsn: str) -> str:
    """host, port, user and dbname of a libpq string; never its password."""
    p = parse_dsn(dsn)
    return " ".join(f"{k}={p[k]}" for k in ("host", "hostaddr", "port", "user", "dbname") if k in p)


def _check_reachable(dsn: str, what: str) -> str:
    try:
        with connect(dsn, connect_timeout=10) as con, con.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), rolsuper FROM pg_roles"
                        " WHERE rolname = current_user")
            version, superuser = cur.fetchone()
    except psycopg2.OperationalError as exc:
        raise ServerUnavailable(f"cannot connect to {what}: {str(exc).strip()}") from exc
    if not superuser:
        raise ServerUnavailable(
            f"{what} does not log in as a superuser (tests create databases and roles)")
    return version


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: Debian's newest version, else the ones on PATH."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(path).parents[1].name)) or (0,)

    debian = [p for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if os.access(p, os.X_OK)]
    if debian:
        return Path(max(debian, key=version)).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl", path=str(Path(on_path).parent)):
        return Path(on_path).parent
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _PrivateServer:
    """A throwaway cluster in its own folder: data/, server.log, and owner.pid (our process)."""

    def __init__(self, bindir: Path, folder: Path, as_user: list[str]):
        self.bindir = bindir
        self.folder = folder
        self.data_dir = folder / "data"
        self.log = folder / "server.log"
        self.as_user = as_user  # the command prefix that runs a binary as the server's user
        self.port = 0
        self.version = ""
        self.start_seconds = 0.0
        self._stopped = False

    @property
    def dsn(self) -> str:
        return make_dsn(host="127.0.0.1", port=str(self.port), user="postgres", dbname="postgres")

    @classmethod
    def start(cls) -> _PrivateServer:
        bindir = find_bindir()
        if bindir is None:
            raise ServerUnavailable(
                f"PostgreSQL's server binaries (initdb, pg_ctl) are not installed: {INSTALL_HINT}")
        as_user, owner = cls._server_user()
        base = Path("/tmp") if os.geteuid() == 0 else Path(tempfile.gettempdir())
        _reap_abandoned(base, bindir, as_user)
        folder = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
        (folder / "owner.pid").write_text(str(os.getpid()))
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        started = time.monotonic()
        server = cls(bindir, folder, as_user)
        try:
            server._initdb()
            server._start()
        except BaseException:
            server.stop()
            raise
        server.start_seconds = time.monotonic() - started
        return server

    @staticmethod
    def _server_user() -> tuple[list[str], pwd.struct_passwd | None]:
        if os.geteuid() != 0:
            return [], None
        try:
            owner = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise ServerUnavailable(
                f"running as root, and initdb refuses root, but there is no `{SERVER_USER}` "
                f"system user to run it as: {INSTALL_HINT}"
            ) from None
        if shutil.which("runuser"):
            return ["runuser", "-u", SERVER_USER, "--"], owner
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}",
                    "--init-groups", "--reset-env"], owner
        raise ServerUnavailable("running as root, and neither runuser nor setpriv is here to "
                                f"drop to the `{SERVER_USER}` user (initdb refuses root)")

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        command = [*self.as_user, *args]
        # No stray PGDATA, PGPORT, ... from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(command, cwd=self.folder, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def _initdb(self) -> None:
        result = self._run(str(self.bindir / "initdb"), "-D", str(self.data_dir),
                           "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                           "--no-sync", "--no-instructions")
        if result.returncode != 0:
            raise ServerUnavailable(f"initdb failed (exit {result.returncode}): "
                                    f"{(result.stderr or result.stdout).strip()[-2000:]}")
        self.version = (self.data_dir / "PG_VERSION").read_text().strip()

    def _start(self) -> None:
        last = ""
        for _ in range(PORT_ATTEMPTS):  # another process may take the free port before we bind it
            self.port = free_port()
            options = " ".join([
                "-c listen_addresses=127.0.0.1", f"-c port={self.port}",
                f"-c unix_socket_directories={self.folder}",
                "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                "-c shared_buffers=32MB", "-c max_connections=100", "-c max_wal_size=1GB",
                "-c log_min_messages=warning", "-c logging_collector=off",
            ])
            result = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir),
                               "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
                               "-o", options, "start", timeout=START_TIMEOUT_S + 10)
            if result.returncode == 0:
                _check_reachable(self.dsn, f"the private server on port {self.port}")
                return
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            last = (f"pg_ctl start failed (exit {result.returncode}): "
                    f"{result.stderr.strip()} {log.strip()[-2000:]}")
            if "Address already in use" not in log and "could not bind" not in log:
                break
        raise ServerUnavailable(last)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if (self.data_dir / "postmaster.pid").exists():
            # immediate: the data is thrown away, so there is nothing to flush
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir),
                      "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def _reap_abandoned(base: Path, bindir: Path, as_user: list[str]) -> None:
    """Stop and remove private servers whose process is gone (killed before its atexit ran)."""
    for folder in base.glob(f"{DIR_PREFIX}*"):
        try:
            owner_pid = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner_pid):
            continue
        leftover = _PrivateServer(bindir, folder, as_user)
        try:
            leftover.stop()
        except (OSError, subprocess.SubprocessError):
            pass


# --- databases and roles ------------------------------------------------------------------------


@contextmanager
def connect(dsn: str, **kwargs) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit psycopg2 connection, closed on the way out."""
    con = psycopg2.connect(dsn, **kwargs)
    con.autocommit = True
    try:
        yield con
    finally:
        con.close()


def query(dsn: str, statement: str, params: tuple | dict | None = None) -> list[tuple]:
    """Run one statement (autocommit) and return its rows ([] when it returns none)."""
    with connect(dsn) as con, con.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description is not None else []


def with_params(dsn: str, **overrides: str) -> str:
    """The same libpq string with some parameters replaced (e.g. dbname, user, password)."""
    return make_dsn(dsn, **overrides)


def params(dsn: str) -> dict[str, str]:
    """A libpq string's parameters as a dict (host, port, user, dbname, password, ...)."""
    return parse_dsn(dsn)


def unique_name(prefix: str) -> str:
    """A lower-case identifier unique on the server: prefix, process id, counter, random tail."""
    clean = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_") or "t"
    tail = f"_{os.getpid()}_{next(_counter)}_{secrets.token_hex(3)}"
    return clean[: 63 - len(tail)] + tail


def fresh_database(prefix: str, owner: str | None = None) -> str:
    """CREATE DATABASE with a unique name on `server()`; returns a libpq string for it."""
    admin = server()
    name = unique_name(prefix)
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if owner:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    with connect(admin) as con, con.cursor() as cur:
        cur.execute(statement)
    if _private is None:  # on a LABELLOOP_TEST_PG server
        _made_databases.append(name)
    return with_params(admin, dbname=name)


def create_role(dsn_admin: str, role: str, password: str | None = None, login: bool = True) -> str:
    """CREATE ROLE (LOGIN unless login=False, with a password if given); returns the role's name."""
    statement = sql.SQL("CREATE ROLE {} WITH {}").format(
        sql.Identifier(role), sql.SQL("LOGIN" if login else "NOLOGIN"))
    args: tuple = ()
    if password is not None:
        statement += sql.SQL(" PASSWORD %s")
        args = (password,)
    with connect(dsn_admin) as con, con.cursor() as cur:
        cur.execute(statement, args)
    if _private is None and _server is not None and _same_server(dsn_admin, _server):
        _made_roles.append(role)
    return role


def drop_database(dsn_admin: str, name: str) -> None:
    """DROP DATABASE IF EXISTS ... WITH (FORCE): connections still open to it are ended."""
    with connect(dsn_admin) as con, con.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    .format(sql.Identifier(name)))


def _same_server(a: str, b: str) -> bool:
    pa, pb = parse_dsn(a), parse_dsn(b)
    return all(pa.get(k) == pb.get(k) for k in ("host", "hostaddr", "port"))


def _stop_at_exit(private: _PrivateServer, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked child that inherited the atexit hook
        private.stop()


def _drop_made_objects(admin: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid or os.environ.get(KEEP_ENV, "").strip() not in ("", "0"):
        return
    for name in reversed(_made_databases):
        try:
            drop_database(admin, name)
        except psycopg2.Error:
            pass
    for role in reversed(_made_roles):  # after the databases: a role that owns objects cannot go
        try:
            with connect(admin) as con, con.cursor() as cur:
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        except psycopg2.Error:
            pass
