"""labelloop_tests/pg.py: the real PostgreSQL the tests use, private or named by LABELLOOP_TEST_PG.

`server()` caches its choice for the whole process, so each path is exercised in a child Python
process with the environment it needs; the child's exit also shows that atexit cleans up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from labelloop_tests import pg

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]
MACHINE_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _child(code: str, **env: str) -> tuple[dict, str]:
    """Run `code` in a fresh interpreter; returns the JSON line it prints last, and its stderr."""
    environ = {k: v for k, v in os.environ.items() if k not in (pg.ENV, pg.KEEP_ENV)}
    environ.update(env)
    prelude = "import json, sys\nfrom labelloop_tests import pg\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _refuses(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return True
    return False


def _require_binaries() -> None:
    if pg.find_bindir() is None:
        pg.unavailable(f"PostgreSQL's server binaries are not installed: {pg.INSTALL_HINT}")


PROBE = """
dsn = pg.server()
db = pg.fresh_database("probe")
row = pg.query(db, "SELECT current_setting('port'), current_setting('data_directory'),"
                   " current_database(), current_setting('fsync'),"
                   " current_setting('listen_addresses')")[0]
print(json.dumps({"dsn": dsn, "db": db, "port": row[0], "data_directory": row[1],
                  "database": row[2], "fsync": row[3], "listen": row[4],
                  "same": pg.server() is dsn}))
"""


def test_without_the_variable_a_private_server_is_started_and_removed_at_exit():
    _require_binaries()
    out, log = _child(PROBE)
    assert "started a private PostgreSQL" in log and f"on port {out['port']}" in log
    assert out["port"] != "5432" and out["listen"] == "127.0.0.1" and out["fsync"] == "off"
    data = Path(out["data_directory"])
    assert data.name == "data" and data.parent.name.startswith(pg.DIR_PREFIX)  # our folder
    assert out["database"].startswith("probe_")
    assert pg.params(out["db"])["dbname"] == out["database"]
    assert out["same"]  # one server per process
    # The child's atexit stopped the server and removed its folder.
    assert not data.parent.exists()
    assert _refuses(out["dsn"])


def test_the_variable_names_the_server_to_use():
    target = os.environ.get(pg.ENV) or MACHINE_SERVER
    if _refuses(target):
        pg.unavailable(f"no server at {target} to point {pg.ENV} at")
    out, log = _child(PROBE, **{pg.ENV: target})
    assert f"using {pg.ENV}" in log and "started a private" not in log
    expected = pg.params(target)
    assert {k: pg.params(out["dsn"])[k] for k in expected} == expected
    assert out["port"] == expected.get("port", "5432")
    # A database made on a shared server is dropped when the process exits.
    left = pg.query(target, "SELECT count(*) FROM pg_database WHERE datname = %s",
                    (out["database"],))
    assert left == [(0,)]


def test_a_private_server_on_its_own_is_isolated_and_stops():
    _require_binaries()
    private = pg.start_private()
    try:
        assert private.folder.name.startswith(pg.DIR_PREFIX)
        assert pg.query(private.dsn, "SHOW unix_socket_directories") == [(str(private.folder),)]
        assert pg.query(private.dsn, "SHOW data_directory") == [(str(private.data_dir),)]
        # Roles and databases: a role that owns a database logs in and writes to it.
        pg.create_role(private.dsn, "writer", password="not-checked-under-trust")
        pg.query(private.dsn, 'CREATE DATABASE "owned" OWNER "writer"')
        as_writer = pg.with_params(private.dsn, user="writer", dbname="owned")
        pg.query(as_writer, "CREATE TABLE t (x int)")
        pg.query(as_writer, "INSERT INTO t VALUES (1)")
        assert pg.query(as_writer, "SELECT current_user, sum(x) FROM t") == [("writer", 1)]
    finally:
        private.stop()
    assert not private.folder.exists() and _refuses(private.dsn)


REQUIRE = """
import _pytest.outcomes as outcomes
try:
    pg.require_server()
    outcome = "returned"
except outcomes.Skipped as exc:
    outcome = "skipped: " + str(exc.msg)
except outcomes.Failed as exc:
    outcome = "failed: " + str(exc.msg)
print(json.dumps({"outcome": outcome}))
"""


def test_an_unreachable_server_skips_locally_and_fails_under_ci():
    closed = f"host=127.0.0.1 port={pg.free_port()} user=postgres dbname=postgres"
    local, _ = _child(REQUIRE, **{pg.ENV: closed, "CI": "false"})
    ci, _ = _child(REQUIRE, **{pg.ENV: closed, "CI": "true"})
    assert local["outcome"].startswith(
        "skipped: no PostgreSQL server: cannot connect to LABELLOOP_TEST_PG")
    assert ci["outcome"].startswith("failed: no PostgreSQL server") and "CI=true" in ci["outcome"]
    # Without the binaries (and without the variable) the message says how to install them.
    missing, _ = _child("pg.find_bindir = lambda: None\n" + REQUIRE, CI="true")
    assert missing["outcome"].startswith("failed:")
    assert "scripts/install-postgres.sh" in missing["outcome"]
