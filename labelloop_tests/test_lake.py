"""The lake backend (DuckLake on a real PostgreSQL): the same loop, time travel, upkeep, analysts'
read-only access, a copy from an embedded home, and the writer lock."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import lake, store
from labelloop_assets.core.lake import Lake
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_tests import pg
from labelloop_tests.conftest import (
    RETRAIN,
    correction,
    land_items,
    make_items,
    prepared_home,
    umask_kept,
    write_jsonl,
)

pytestmark = pytest.mark.postgres

LOOP = ["items", "predictions", "raw_corrections", "review_decisions", "validated_labels",
        "production_corpus", "retrained_model", "model_evaluation", "label_quality_metrics"]

# What a user sees of a run's outcome, without times and run ids.
COMPARED = {
    "production_corpus": "SELECT item_id, label, label_source, human_confirmed, reviewer_confirmed, "
                         "since_version, updated_version FROM production_corpus ORDER BY item_id",
    "label_history": "SELECT item_id, corpus_version, change_order, label, previous_label, change_kind, "
                     "event_ids, approved_by FROM label_history ORDER BY item_id, corpus_version, change_order",
    "raw_corrections": "SELECT seq, event_id, item_id, corrected_label, user_pseudonym, rationale "
                       "FROM raw_corrections ORDER BY seq",
    "quarantine": "SELECT kind, source_file, line_no, reason FROM quarantine ORDER BY ALL",
    "ingested_files": "SELECT path, kind, records_in, accepted, quarantined, blank_lines "
                      "FROM ingested_files ORDER BY path",
    "label_decisions": "SELECT decision_id, item_id, proposed_label, status FROM label_decisions ORDER BY decision_id",
    "corpus_versions": "SELECT corpus_version, n_new_items, n_label_changes, n_items, label_changes_total "
                       "FROM corpus_versions ORDER BY corpus_version",
    "models": "SELECT model_version, corpus_version, n_train_rows, status, round(gold_accuracy, 6) AS acc "
              "FROM models ORDER BY model_version",
    "model_evaluations": "SELECT evaluation_id, challenger, champion, decision FROM model_evaluations ORDER BY 1",
}


@pytest.fixture
def catalog(monkeypatch) -> str:
    """A fresh, empty catalog database; LABELLOOP_CATALOG points at it, so the lake is the store."""
    pg.require_server()
    dsn = pg.fresh_database("lake")
    monkeypatch.setenv(lake.CATALOG_ENV, dsn)
    return dsn


def _materialize(defs: dg.Definitions, instance, names=LOOP, **kwargs) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    keys = list(dg.AssetSelection.assets(*names).resolve(defs.resolve_asset_graph()))
    return job.execute_in_process(instance=instance, asset_selection=keys, **kwargs)


def _world(home: Home, day: int) -> None:
    """Day 0: items; day 1: predictions and corrections with a replay, a bad line and no consent."""
    if day == 0:
        records, _ = make_items()
        land_items(home, records)
        return
    write_jsonl(home.landing_dir("predictions"), f"p{day}.jsonl", [{
        "prediction_id": f"p-{day}", "item_id": "item-030", "model_version": "m0001",
        "predicted_label": "zero", "confidence": 0.55, "served_at": "2026-03-02T09:00:00Z",
    }])
    write_jsonl(home.landing_dir("corrections"), f"c{day}.jsonl", [
        correction(f"e-{day}-1", "item-030", "one", prediction_id=f"p-{day}", rationale="mail ann@corp.example"),
        correction(f"e-{day}-2", f"item-0{30 + 3 * day}", "two", user="ann"),
        correction(f"e-{day}-3", f"item-0{31 + 3 * day}", "two", user="bob", role="end_user"),
        correction(f"e-{day}-4", "item-036", "two", user="carol", role="annotator", consent=False),
        correction(f"e-{day}-2", f"item-0{30 + 3 * day}", "two", user="ann"),  # a replay
        "{not json",
    ])


def _run_days(home: Home, instance, days: int = 3) -> None:
    defs = build_definitions(home, RETRAIN)
    for day in range(days):
        _world(home, day)
        assert _materialize(defs, instance).success


def _tables(home: Home) -> dict[str, list]:
    with store.connect(home.database, read_only=True) as con:
        return {name: con.execute(sql).fetchall() for name, sql in COMPARED.items()}


def embedded_reference(root: Path) -> tuple[Home, dict[str, list]]:
    """The same days on an embedded home (call before setting LABELLOOP_CATALOG): what the lake must give."""
    home = prepared_home(root)
    with dg.instance_for_test() as instance:
        _run_days(home, instance)
    return home, _tables(home)


def assert_same_tables(found: dict[str, list], expected: dict[str, list]) -> None:
    for name in COMPARED:
        assert found[name] == expected[name], name
    assert len(expected["corpus_versions"]) == 3 and expected["models"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Home, dict[str, list]]:
    """embedded_reference, run once for the module: its tables are only read; its home is used
    (and changed) by test_an_embedded_home_is_copied_into_the_lake alone."""
    pg.require_server()
    with umask_kept():
        return embedded_reference(tmp_path_factory.mktemp("embedded") / "home")


@pytest.fixture(scope="module")
def three_days_on_the_lake(tmp_path_factory) -> tuple[Home, str]:
    """The same three days on a fresh lake, once for the module: (its home, its catalog). The tests
    that use it only read it, each with LABELLOOP_CATALOG pointing at it."""
    pg.require_server()
    dsn = pg.fresh_database("lake_same")
    with umask_kept(), pytest.MonkeyPatch.context() as env:
        env.setenv(lake.CATALOG_ENV, dsn)
        on_lake = prepared_home(tmp_path_factory.mktemp("lake-days") / "home")
        assert isinstance(on_lake.database, Lake)
        with dg.instance_for_test() as instance:
            _run_days(on_lake, instance)
    return on_lake, dsn


def test_the_loop_on_the_lake_gives_what_it_gives_on_the_embedded_store(embedded, three_days_on_the_lake,
                                                                         monkeypatch):
    _, expected = embedded
    on_lake, dsn = three_days_on_the_lake
    monkeypatch.setenv(lake.CATALOG_ENV, dsn)
    assert isinstance(on_lake.database, Lake)

    assert_same_tables(_tables(on_lake), expected)
    # Nothing of the store is on the home's disk but the lake's data folder.
    assert not on_lake.database_file.exists()
    assert any((on_lake.root / "lake").rglob("*.parquet"))


def test_corpus_versions_are_lake_snapshots_analysts_can_time_travel_to(three_days_on_the_lake, monkeypatch):
    home, dsn = three_days_on_the_lake
    monkeypatch.setenv(lake.CATALOG_ENV, dsn)
    with store.connect(home.database, read_only=True) as con:
        versions = con.execute(
            "SELECT corpus_version, lake_snapshot, n_items FROM corpus_versions ORDER BY 1"
        ).fetchall()
        assert [v for v, _, _ in versions] == [1, 2, 3]
        assert all(snapshot is not None for _, snapshot, _ in versions)
        for version, snapshot, n_items in versions:
            as_of = con.execute(
                f"SELECT item_id, label FROM production_corpus AT (VERSION => {snapshot}) ORDER BY 1"
            ).fetchall()
            macro = con.execute(
                "SELECT item_id, label FROM corpus_as_of(?) ORDER BY 1", [version]
            ).fetchall()
            assert as_of == macro and len(as_of) == n_items
        # The commit of each version is named after it in the lake's own log.
        named = con.execute(
            "SELECT commit_message FROM lake.snapshots() WHERE author = 'labelloop' ORDER BY snapshot_id"
        ).fetchall()
        assert [m for (m,) in named if m.startswith("corpus")] == ["corpus v1", "corpus v2", "corpus v3"]
        # Each model's training data: the snapshot of the corpus version it was trained on.
        trained = con.execute(
            "SELECT m.model_version, v.lake_snapshot FROM models m JOIN corpus_versions v USING (corpus_version)"
        ).fetchall()
        assert trained and all(snapshot is not None for _, snapshot in trained)


def test_upkeep_expires_only_snapshots_no_corpus_version_needs(home, catalog, instance, monkeypatch):
    _run_days(home, instance)
    with store.connect(home.database, read_only=True) as con:
        before = con.execute("SELECT count(*) FROM lake.snapshots()").fetchone()[0]
        kept = con.execute("SELECT corpus_version, lake_snapshot, n_items FROM corpus_versions").fetchall()
    monkeypatch.setenv("LABELLOOP_LAKE_RETAIN_DAYS", "0")
    defs = build_definitions(home, RETRAIN)
    result = _materialize(defs, instance, ["store_maintenance"])
    assert result.success
    done = {k: v.value for k, v in result.get_asset_materialization_events()[0]
            .step_materialization_data.materialization.metadata.items()}
    assert done["backend"] == "lake" and done["snapshots_expired"] > 0
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    with store.connect(home.database, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM lake.snapshots()").fetchone()[0] < before
        for _, snapshot, n_items in kept:
            assert con.execute(
                f"SELECT count(*) FROM production_corpus AT (VERSION => {snapshot})"
            ).fetchone()[0] == n_items
    # A key written twice behind labelloop's back is caught by the check.
    with store.connect(home.database) as con:
        con.execute("INSERT INTO models SELECT * FROM models WHERE model_version = 'm0001'")
    again = _materialize(defs, instance, ["store_maintenance"])
    [check] = again.get_asset_check_evaluations()
    assert not check.passed and "m0001" in str(check.metadata["duplicates"].value)


def test_analysts_read_with_a_role_the_server_refuses_writes_to(home, catalog, instance, monkeypatch, capsys):
    _run_days(home, instance, days=2)
    admin = pg.server()
    reader = pg.unique_name("analyst")
    pg.create_role(admin, reader)
    database = pg.params(catalog)["dbname"]
    with pg.connect(catalog) as con, con.cursor() as cur:
        cur.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{reader}"')
        cur.execute(f'GRANT USAGE ON SCHEMA public TO "{reader}"')
        cur.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{reader}"')
    reader_catalog = pg.with_params(catalog, user=reader)
    monkeypatch.setenv(lake.READER_CATALOG_ENV, reader_catalog)

    assert cli.main(["sql", "SELECT count(*) AS n FROM production_corpus", "--json"]) == 0
    assert '"n": 45' in capsys.readouterr().out
    # Through labelloop, a write is refused (one SELECT only, on a lake attached read-only) ...
    assert cli.main(["sql", "DELETE FROM production_corpus"]) == 3
    assert "exactly one SELECT" in capsys.readouterr().err
    # ... and the server itself refuses the reader's writes, whoever attaches with that role.
    con = lake.attach(Lake(reader_catalog, str(home.root / "lake")))
    with pytest.raises(duckdb.Error, match="permission denied"):
        con.execute("INSERT INTO audit_log (actor, action, outcome) VALUES ('x', 'y', 'z')")
    con.close()
    with store.connect(home.database, read_only=True) as con:
        assert store.scalar(con, "SELECT count(*) FROM audit_log WHERE actor = 'x'") == 0


def test_an_embedded_home_is_copied_into_the_lake(embedded, monkeypatch, capsys):
    home, expected = embedded
    monkeypatch.setenv(lake.CATALOG_ENV, pg.fresh_database("migrate"))
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))

    assert cli.main(["migrate"]) == 0
    assert "copied" in capsys.readouterr().out
    assert _tables(home) == expected
    # Copying twice would double every row: refused.
    assert cli.main(["migrate"]) == 1
    assert "already holds labelloop data" in capsys.readouterr().err
    # The loop goes on from the copy: a new day lands and becomes corpus version 4.
    with dg.instance_for_test() as instance:
        _world(home, 3)
        assert _materialize(build_definitions(home, RETRAIN), instance).success
    with store.connect(home.database, read_only=True) as con:
        assert store.scalar(con, "SELECT max(corpus_version) FROM corpus_versions") == 4


def test_a_second_writer_waits_for_the_lock_and_a_killed_holder_frees_it(home, catalog, monkeypatch):
    target = home.database
    store.connect(target).close()  # the schema in place
    monkeypatch.setenv("LABELLOOP_DB_WAIT_SECONDS", "1")
    heard: list[str] = []
    with store.connect(target):
        with pytest.raises(lake.LakeBusy, match=r"labelloop writer \(PID \d+"):
            store.connect(target, on_wait=heard.append)
        # Readers are never held up by a writer.
        with store.connect(target, read_only=True) as reader:
            assert store.scalar(reader, "SELECT count(*) FROM items") == 0
    assert heard and "waiting up to 1 s" in heard[0]

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from labelloop_assets.core import store
            from labelloop_assets.core.lake import Lake
            con = store.connect(Lake({target.catalog!r}, {target.data_path!r}))
            print("holding", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(lake.LakeBusy):
            store.connect(target)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        # Freed at once, not after the wait runs out: far apart, so a busy machine cannot blur them.
        monkeypatch.setenv("LABELLOOP_DB_WAIT_SECONDS", "60")
        started = time.monotonic()
        store.connect(target).close()
        assert time.monotonic() - started < 30
    finally:
        holder.kill()


def test_a_step_that_waits_for_the_lake_says_who_holds_it(home, catalog, instance, monkeypatch):
    _world(home, 0)
    target = home.database
    store.connect(target).close()
    monkeypatch.setenv("LABELLOOP_DB_WAIT_SECONDS", "30")
    holding = store.connect(target)
    said = "the lake's writer lock (intake tables) is held by labelloop writer"
    # Held until the step says it waits, however long the run takes to get there (at most 25 s).
    released = threading.Thread(target=_close_once_logged, args=(instance, holding, said), daemon=True)
    released.start()
    try:
        result = _materialize(build_definitions(home, RETRAIN), instance, ["items"])
    finally:
        released.join()
        holding.close()
    assert result.success
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any(said in m for m in logs)


def _close_once_logged(instance: dg.DagsterInstance, connection, text: str, within: float = 25.0) -> None:
    def logged() -> bool:
        try:
            return any(text in (record.message or "")
                       for run in instance.get_runs() for record in instance.all_logs(run.run_id))
        except Exception:  # the instance's SQLite is busy with the run's own writes: look again
            return False

    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline and not logged():
            time.sleep(0.05)
    finally:
        connection.close()


@pytest.mark.parametrize("form", ["key=value", "uri"])
def test_a_missing_catalog_is_a_clear_error_that_never_shows_the_password(tmp_path, monkeypatch, form):
    pg.require_server()
    where = pg.params(pg.server())
    name, secret = pg.unique_name("absent"), "s3cret-Pw0rd"
    missing = (pg.with_params(pg.server(), dbname=name, password=secret) if form == "key=value" else
               f"postgresql://{where['user']}:{secret}@{where['host']}:{where.get('port', 5432)}/{name}")
    monkeypatch.setenv(lake.CATALOG_ENV, missing)
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status"])
    message = str(exit_info.value)
    assert "cannot open" in message and "DuckLake catalog" in message and name in message
    assert secret not in message and "Traceback" not in message
    # A run's step fails with the same care (its message lands in Dagster's event log).
    home = Home(tmp_path / "home").ensure()
    _world(home, 0)
    with dg.instance_for_test() as instance:
        result = _materialize(build_definitions(home, RETRAIN), instance, ["items"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    description = failure.step_failure_data.user_failure_data.description
    assert "labelloop cannot open its database" in description and secret not in description


def test_a_writer_that_lost_its_lock_commits_nothing(home, catalog):
    with store.connect(home.database) as con:
        store.append(con, "items", pl.DataFrame({"item_id": ["a"], "features": [[1.0]], "payload_hash": ["x"]}))
        with pg.connect(catalog) as admin, admin.cursor() as cur:  # the lock's session ends
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'labelloop writer (PID %%'")
        with pytest.raises(lake.LakeError, match="lost the lake's writer lock"):
            with store.transaction(con):
                store.append(con, "items", pl.DataFrame({"item_id": ["b"], "features": [[2.0]], "payload_hash": ["y"]}))
    with store.connect(home.database, read_only=True) as reader:
        assert store.frame(reader, "SELECT item_id FROM items").rows() == [("a",)]


def test_sql_runs_one_select_and_refuses_everything_else(home, catalog, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    store.connect(home.database).close()
    assert cli.main(["sql", "SELECT count(*) AS n FROM items", "--json"]) == 0
    assert '"n": 0' in capsys.readouterr().out
    leak = tmp_path / "leak.csv"
    for query in (f"COPY (SELECT 1) TO '{leak}'", "SELECT 1; SELECT 2", f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
                  "SET threads = 1", "DELETE FROM items"):
        assert cli.main(["sql", query]) == 3, query
        assert "exactly one SELECT" in capsys.readouterr().err
    assert not leak.exists() and not (tmp_path / "x.duckdb").exists()
    assert cli.main(["sql", "SELECT * FROM no_such_table"]) == 1
    assert "the query failed" in capsys.readouterr().err


def test_the_demo_refuses_to_run_on_a_lake(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(lake.CATALOG_ENV, "dbname=anything")
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert cli.main(["demo", "--days", "1"]) != 0
    assert "unset LABELLOOP_CATALOG" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_the_frame_helpers_work_on_a_lake_connection(home, catalog):
    with store.connect(home.database) as con:
        assert isinstance(con, lake.LakeConnection)
        store.append(con, "items", pl.DataFrame({
            "item_id": ["a", "b"], "features": [[1.0], [2.0]], "payload_hash": ["x", "y"],
        }))
        store.append(con, "items", pl.DataFrame({"item_id": ["c"], "features": [[3.0]], "payload_hash": ["z"]}))
        assert store.frame(con, "SELECT item_id, seq FROM items ORDER BY seq").rows() == [("a", 1), ("b", 2), ("c", 3)]
        store.set_state(con, "mark", 3)
        store.set_state(con, "mark", 4)
        assert store.get_state(con, "mark") == 4
        assert store.duplicate_keys(con) == {}


def test_a_file_from_a_newer_duckdb_is_refused_with_what_to_do(tmp_path, monkeypatch):
    home = Home(tmp_path / "home").ensure()
    # Made by DuckDB 2.0.1 (what labelloop pinned before 1.5.5): CREATE TABLE t (a INTEGER).
    written = Path(__file__).parent / "fixtures" / "written-by-duckdb-2.0.1.duckdb.gz"
    home.database_file.write_bytes(gzip.decompress(written.read_bytes()))
    with pytest.raises(store.NewerDatabaseFile, match=r"newer DuckDB.*EXPORT DATABASE.*make clean demo"):
        store.connect(home.database_file)
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    with pytest.raises(SystemExit) as refused:
        cli.main(["status"])
    assert "newer DuckDB" in str(refused.value) and "Traceback" not in str(refused.value)


def test_writers_of_different_table_groups_commit_side_by_side(home, catalog, monkeypatch):
    store.connect(home.database).close()
    monkeypatch.setenv("LABELLOOP_DB_WAIT_SECONDS", "0.5")
    with store.connect(home.database, groups=("intake",)) as ingesting, \
         store.connect(home.database, groups=("curation",)) as curating:  # no wait: another group
        # Both transactions open at once and commit one after the other (DuckLake's optimistic
        # commits: an append and a merge into other tables do not conflict).
        with store.transaction(ingesting):
            store.append(
                ingesting, "items", pl.DataFrame({"item_id": ["a"], "features": [[1.0]], "payload_hash": ["x"]})
            )
            with store.transaction(curating):
                store.set_state(curating, "mark", 7)
                store.append(curating, "corpus_versions", pl.DataFrame({
                    "corpus_version": [1], "n_new_items": [1], "n_label_changes": [0], "n_confirmations": [0],
                    "n_items": [1], "label_changes_total": [0]}))
        # The same group, or all of them, waits for the holder and then fails naming the group.
        with pytest.raises(lake.LakeBusy, match=r"\(intake tables\) is held by labelloop writer"):
            store.connect(home.database, groups=("intake",))
        with pytest.raises(lake.LakeBusy, match="curation tables"):
            store.connect(home.database, groups=("training", "curation"))
    with store.connect(home.database, read_only=True) as reader:
        assert store.scalar(reader, "SELECT count(*) FROM items") == 1
        assert store.get_state(reader, "mark") == 7
        assert store.scalar(reader, "SELECT count(*) FROM corpus_versions") == 1
    with pytest.raises(ValueError, match="unknown table groups"):
        lake.WriterLock("dbname=x", ("everything",))


def test_the_scheduled_checks_go_on_while_another_worker_trains(home, catalog, instance, monkeypatch):
    """The hourly checks read curation tables: another worker's training step, holding only the
    training tables' writer lock, must not make them wait (and fail past the wait)."""
    from labelloop_assets.jobs import SCHEDULED_CHECKS_JOB

    store.connect(home.database).close()  # the lake, created
    other_worker = lake.WriterLock(catalog, ("training",))
    other_worker.acquire(5, print)
    monkeypatch.setenv(store.WAIT_ENV, "3")
    try:
        started = time.monotonic()
        result = build_definitions(home, RETRAIN).resolve_job_def(SCHEDULED_CHECKS_JOB).execute_in_process(
            instance=instance, raise_on_error=False)
        took = time.monotonic() - started
    finally:
        other_worker.release()
    failures = [e.step_failure_data.user_failure_data.description for e in result.all_events
                if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert result.success, failures
    evaluations = {e.asset_check_key.name for e in result.get_asset_check_evaluations()}
    assert evaluations == {"escalations_within_sla", "no_held_bursts"}
    assert took < 3, f"the checks waited {took:.1f} s for a lock they do not need"
