"""The lake backend: DuckLake with its catalog in PostgreSQL and its data files on shared storage.

`LABELLOOP_CATALOG` (a libpq string, e.g. `dbname=labelloop host=db user=labelloop`) selects it;
`LABELLOOP_DATA_PATH` names where data files go (a shared folder or `s3://bucket/prefix/`; by
default the catalog's own, and for a new catalog `$LABELLOOP_HOME/lake`). Every run attaches the
same catalog, so a run may start on any host: nothing it needs is on its local disk.

Writers of one table group are serialized by that group's PostgreSQL advisory lock, held for the
connection's lifetime (Dagster's pools are not atomic on PostgreSQL either); the server frees it
when the holder's session ends, a killed process included, and a writer checks before each commit
that it still holds it. Readers take no lock: DuckLake gives each query a snapshot.
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

CATALOG_ENV = "LABELLOOP_CATALOG"
DATA_PATH_ENV = "LABELLOOP_DATA_PATH"
READER_CATALOG_ENV = "LABELLOOP_READER_CATALOG"
ALIAS = "lake"

# The extensions ship as registry wheels holding DuckDB's signed binaries, so no run downloads
# anything; a deployment with network may instead INSTALL them from DuckDB's repository.
EXTENSIONS = {
    "postgres_scanner": "duckdb_extension_postgres_scanner",
    "ducklake": "duckdb_extension_ducklake",
    "httpfs": "duckdb_extension_httpfs",
}
# Writers take the advisory lock (two 32-bit keys) of each table group they write. Each table
# belongs to one group, except the append-only audit_log and quarantine and the pipeline_state
# marks, which DuckLake's optimistic commits handle (concurrent appends succeed; a conflicting
# update is retried or fails the step, and its rerun succeeds). Schema changes and upkeep take all.
LOCK_CLASS = 0x4C4C
TABLE_GROUPS = {
    "intake": 1,      # items, predictions, raw_corrections, review_decisions, ingested_files
    "curation": 2,    # validated_labels, label_decisions, production_corpus, label_history, corpus_versions,
                      # escalations, correction_volume, correction_bursts, item_shapes
    "training": 3,    # models, model_evaluations, release_notes, contributor_reliability
    "monitoring": 4,  # label_quality_*, label_agreement*, label_drift, label_issue_candidates, guideline_pairs,
                      # review_tasks
}
ALL_GROUPS = tuple(TABLE_GROUPS)


class LakeError(RuntimeError):
    """The lake cannot be reached or used; the message says what to fix."""


@dataclass(frozen=True)
class Lake:
    """Where the lake is: the catalog's libpq string and where its data files go.

    `data_path` is the deployment's LABELLOOP_DATA_PATH, or None: then the catalog's own (it
    records its data path when it is created, at `new_data_path`, the home's `lake/` folder).
    """

    catalog: str
    data_path: str | None = None
    reader_catalog: str | None = None
    new_data_path: str | None = None

    @classmethod
    def from_env(cls, home_root: Path) -> Lake | None:
        catalog = os.environ.get(CATALOG_ENV, "").strip()
        if not catalog:
            return None
        data_path = os.environ.get(DATA_PATH_ENV, "").strip() or None
        reader = os.environ.get(READER_CATALOG_ENV, "").strip() or None
        return cls(catalog, data_path, reader, str(home_root / "lake"))

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """The catalog without secrets, for messages."""
        where = f" (data in {self.data_path})" if self.data_path else ""
        return f"DuckLake catalog '{without_password(self.catalog)}'{where}"


def without_password(catalog: str) -> str:
    """A libpq string (key=value or URI) with its password left out."""
    from psycopg2.extensions import make_dsn

    parts = _parts(catalog)
    if parts is None:  # not parseable: show nothing of it rather than a secret
        return "(unparseable connection string)"
    parts.pop("password", None)
    return make_dsn(**parts)


def redact(text: str, *catalogs: str | None) -> str:
    """An error's text with each catalog string in it replaced by its password-less form."""
    for catalog in filter(None, catalogs):
        text = text.replace(catalog, without_password(catalog))
        password = (_parts(catalog) or {}).get("password")
        if password:
            text = text.replace(password, "***")
    return text


def _parts(catalog: str) -> dict | None:
    from psycopg2.extensions import parse_dsn

    try:
        return parse_dsn(catalog)
    except Exception:
        return None


def extension_file(name: str) -> Path | None:
    """The extension binary inside its installed registry package, if that package is here."""
    try:
        module = importlib.import_module(EXTENSIONS[name])
    except ImportError:
        return None
    found = sorted(Path(module.__file__).parent.glob(f"extensions/v{duckdb.__version__}/{name}.duckdb_extension"))
    return found[0] if found else None


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    path = extension_file(name)
    try:
        if path is not None:
            con.execute(f"LOAD '{_quote(str(path))}'")
        else:
            con.execute(f"INSTALL {name}")
            con.execute(f"LOAD {name}")
    except duckdb.Error as error:
        raise LakeError(
            f"DuckDB's {name} extension could not be loaded ({error}); install the package "
            f"{EXTENSIONS[name].replace('_', '-')}=={duckdb.__version__} or give DuckDB network "
            "access to its extension repository"
        ) from None


def _quote(text: str) -> str:
    return text.replace("'", "''")


def _s3_secret(con: duckdb.DuckDBPyConnection) -> None:
    """S3 credentials from the standard AWS environment variables (an endpoint for S3-compatible stores)."""
    options = {"TYPE": "s3"}
    for env, option in (("AWS_ACCESS_KEY_ID", "KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "SECRET"),
                        ("AWS_SESSION_TOKEN", "SESSION_TOKEN"), ("AWS_REGION", "REGION")):
        if os.environ.get(env):
            options[option] = os.environ[env]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["ENDPOINT"] = endpoint.split("://", 1)[-1].rstrip("/")
        options["USE_SSL"] = "false" if endpoint.startswith("http://") else "true"
        options["URL_STYLE"] = "path"
    body = ", ".join(
        f"{key} {value}" if key in ("TYPE", "USE_SSL") else f"{key} '{_quote(value)}'"
        for key, value in options.items()
    )
    con.execute(f"CREATE OR REPLACE SECRET labelloop_s3 ({body})")


# One DuckDB instance per process and catalog, with the extensions loaded and the lake attached:
# every connection is a cursor on it. Attaching costs a few hundred milliseconds (catalog reads
# over the network), and DuckLake starts each transaction from the catalog's newest snapshot, so
# a long-lived attachment still sees every other process's commits.
_attached: dict[tuple, duckdb.DuckDBPyConnection] = {}
_attached_lock = threading.Lock()


def attach(lake: Lake, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the lake attached as `lake` and in use."""
    catalog = lake.reader_catalog if read_only and lake.reader_catalog else lake.catalog
    key = (os.getpid(), catalog, lake.data_path, lake.new_data_path, read_only,
           tuple(os.environ.get(v, "") for v in _S3_ENV))
    with _attached_lock:
        base = _attached.get(key)
        if base is not None:
            try:
                return _in_lake(base.cursor())
            except duckdb.Error:  # the attachment went bad (a server restart): attach again
                _attached.pop(key, None).close()
        base = _attach_new(lake, catalog, read_only)
        _attached[key] = base
        return _in_lake(base.cursor())


def _in_lake(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    con.execute(f"USE {ALIAS}")
    con.execute(f"SELECT 1 FROM {ALIAS}.current_snapshot()").fetchall()  # the catalog answers
    return con


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _attach_new(lake: Lake, catalog: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    try:
        for name in ("postgres_scanner", "ducklake", "httpfs"):
            load_extension(con, name)
        if any(os.environ.get(name) for name in _S3_ENV):
            _s3_secret(con)
        flags = ["READ_ONLY"] if read_only else []
        try:
            _attach(con, catalog, lake.data_path, flags)
        except duckdb.Error as error:
            if lake.data_path is not None or lake.new_data_path is None or _NEW_CATALOG not in str(error):
                raise LakeError(f"cannot attach the {lake.describe()}: {redact(str(error), catalog)}") from None
            try:  # a new catalog: its data goes where the home says
                _attach(con, catalog, lake.new_data_path, flags)
            except duckdb.Error as error:
                raise LakeError(f"cannot create the {lake.describe()}: {redact(str(error), catalog)}") from None
        # Commits are optimistic: one that loses a race (upkeep against a writer) is retried.
        con.execute("SET ducklake_max_retry_count = 100")
        return con
    except BaseException:
        con.close()
        raise


_NEW_CATALOG = "data_path is not set"


def _attach(con: duckdb.DuckDBPyConnection, catalog: str, data_path: str | None, flags: list[str]) -> None:
    options = ([f"DATA_PATH '{_quote(data_path)}'"] if data_path else []) + flags
    suffix = f" ({', '.join(options)})" if options else ""
    con.execute(f"ATTACH 'ducklake:postgres:{_quote(catalog)}' AS {ALIAS}{suffix}")


class WriterLock:
    """The catalog's writer locks for some table groups: session-level advisory locks on a
    PostgreSQL connection of their own, taken in one fixed order (so two writers never wait on
    each other in a circle)."""

    def __init__(self, catalog: str, groups: tuple[str, ...] = ALL_GROUPS) -> None:
        unknown = set(groups) - set(TABLE_GROUPS)
        if unknown or not groups:
            raise ValueError(f"unknown table groups {sorted(unknown)}; known: {list(TABLE_GROUPS)}")
        self.catalog = catalog
        self.groups = tuple(g for g in TABLE_GROUPS if g in groups)
        self._pg: Any = None

    def acquire(self, wait_seconds: float, on_wait: Callable[[str], None]) -> None:
        import psycopg2

        try:
            # Keepalives: a lock session cut off by the network is noticed, and the server frees it.
            self._pg = psycopg2.connect(
                self.catalog, application_name=f"labelloop writer (PID {os.getpid()} on {socket.gethostname()})",
                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
            )
        except psycopg2.Error as error:
            raise LakeError(
                f"cannot connect to the lake's catalog for its writer lock: {redact(str(error), self.catalog)}".strip()
            ) from None
        self._pg.autocommit = True
        deadline, told = time.monotonic() + wait_seconds, False
        with self._pg.cursor() as cursor:
            for group in self.groups:
                pause = 0.05
                while True:
                    cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, TABLE_GROUPS[group]))
                    if cursor.fetchone()[0]:
                        break
                    who = self.holder(group)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.release()
                        raise LakeBusy(
                            f"the lake's writer lock ({group} tables) is held by {who}; retried for "
                            f"{wait_seconds:g} s. Try again when it has finished (or wait longer: "
                            "LABELLOOP_DB_WAIT_SECONDS)"
                        )
                    if not told:
                        on_wait(f"the lake's writer lock ({group} tables) is held by {who}; waiting up to "
                                f"{wait_seconds:g} s for it")
                        told = True
                    time.sleep(min(pause, remaining))
                    pause = min(pause * 2, 0.5)

    def holder(self, group: str) -> str:
        with self._pg.cursor() as cursor:
            cursor.execute(
                "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (LOCK_CLASS, TABLE_GROUPS[group]),
            )
            row = cursor.fetchone()
        if not row:
            return "another writer"
        return f"{row[0] or 'another writer'}" + (f" from {row[1]}" if row[1] else "")

    def still_held(self) -> bool:
        """Whether this session still holds its locks (a terminated session or a failover loses them)."""
        import psycopg2

        try:
            with self._pg.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND classid = %s AND objid = ANY(%s)",
                    (LOCK_CLASS, [TABLE_GROUPS[g] for g in self.groups]),
                )
                return cursor.fetchone()[0] == len(self.groups)
        except (psycopg2.Error, AttributeError):
            return False

    def release(self) -> None:
        if self._pg is not None:
            # Closing the session frees its advisory locks.
            self._pg.close()
            self._pg = None


class LakeBusy(LakeError):
    """Another writer held the lake for longer than labelloop waits."""


class LakeConnection:
    """A DuckDB connection to the lake that holds its writer locks until it is closed.

    Behaves as the DuckDB connection it wraps (`execute`, `sql`, `register`, ...).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, lock: WriterLock | None, lake: Lake) -> None:
        self._con = con
        self._lock = lock
        self.lake = lake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def check_writer(self) -> None:
        """Before a commit: fail if the writer lock was lost (another writer may hold it now)."""
        if self._lock is not None and not self._lock.still_held():
            raise LakeError(
                "this run lost the lake's writer lock (its PostgreSQL session ended); nothing of the "
                "open transaction is committed. Run it again"
            )

    def close(self) -> None:
        try:
            self._con.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> LakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    lake: Lake, read_only: bool, wait_seconds: float, on_wait: Callable[[str], None],
    groups: tuple[str, ...] = ALL_GROUPS,
) -> LakeConnection:
    """Attach the lake; a writer first takes the writer locks of the table groups it writes
    (waiting up to `wait_seconds`)."""
    lock = None
    if not read_only:
        lock = WriterLock(lake.catalog, groups)
        lock.acquire(wait_seconds, on_wait)
    try:
        return LakeConnection(attach(lake, read_only), lock, lake)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def is_lake(con: Any) -> bool:
    return isinstance(con, LakeConnection)


CORPUS_COMMIT = "corpus v{version}"
CLEANUP_GRACE_MINUTES = 10


def name_commit(con: Any, message: str) -> None:
    """Name the lake commit of the open transaction (it shows in `lake.snapshots()`); no-op when embedded."""
    if is_lake(con):
        con.execute(f"CALL {ALIAS}.set_commit_message('labelloop', '{_quote(message)}')")


def stamp_corpus_snapshots(con: Any) -> int:
    """Record in `corpus_versions.lake_snapshot` the snapshot that committed each version.

    The commit itself is named `corpus vN` atomically with the version; this copies the name's
    snapshot into the table afterwards (again after a crash in between). Returns rows stamped;
    versions copied from an embedded file have no such commit and stay unstamped.
    """
    if not is_lake(con):
        return 0
    missing = con.execute("SELECT count(*) FROM corpus_versions WHERE lake_snapshot IS NULL").fetchone()[0]
    if not missing:
        return 0
    stamped = con.execute(
        f"""
        UPDATE corpus_versions c SET lake_snapshot = s.snapshot_id
        FROM (SELECT snapshot_id, commit_message FROM {ALIAS}.snapshots()
              WHERE author = 'labelloop' AND commit_message LIKE 'corpus v%') s
        WHERE c.lake_snapshot IS NULL AND s.commit_message = 'corpus v' || c.corpus_version
        """
    ).fetchone()
    return int(stamped[0]) if stamped else 0


def maintain(con: Any, retain_days: float) -> dict:
    """Compact the lake's small files and expire snapshots nobody needs; returns what was done.

    Kept whatever their age: the current snapshot and every snapshot that committed a corpus
    version (models and lineage time-travel to them). Others older than `retain_days` are
    expired, and the files only they used are deleted.
    """
    stamp_corpus_snapshots(con)
    con.execute(f"CALL ducklake_flush_inlined_data('{ALIAS}')")
    merged = con.execute(f"CALL ducklake_merge_adjacent_files('{ALIAS}')").fetchall()
    expired = [
        int(r[0]) for r in con.execute(
            f"""
            SELECT snapshot_id FROM {ALIAS}.snapshots()
            WHERE snapshot_time < now() - to_microseconds(CAST(? * 86400e6 AS BIGINT))
              AND snapshot_id < (SELECT id FROM {ALIAS}.current_snapshot())
              AND snapshot_id NOT IN (SELECT lake_snapshot FROM corpus_versions WHERE lake_snapshot IS NOT NULL)
              AND NOT coalesce(author = 'labelloop' AND commit_message LIKE 'corpus v%', false)
            ORDER BY snapshot_id
            """,
            [retain_days],
        ).fetchall()
    ]
    if expired:
        con.execute(f"CALL ducklake_expire_snapshots('{ALIAS}', versions => ?)", [expired])
    # Files of expired snapshots are deleted only after a grace period: a query that started on an
    # older snapshot may still be reading them.
    deleted = con.execute(
        f"CALL ducklake_cleanup_old_files('{ALIAS}', older_than => now() - INTERVAL {CLEANUP_GRACE_MINUTES} MINUTE)"
    ).fetchall()
    kept = con.execute(f"SELECT count(*) FROM {ALIAS}.snapshots()").fetchone()[0]
    return {
        "files_merged": len(merged),
        "snapshots_expired": len(expired),
        "snapshots_kept": int(kept),
        "files_deleted": len(deleted),
    }
