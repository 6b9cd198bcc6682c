"""examples/deploy/dagster.yaml on a real PostgreSQL: the instance loads, and ingest_job runs on it.

The store is the default embedded one (LABELLOOP_CATALOG unset): what is on PostgreSQL here is
Dagster's own state -- runs, event log, asset records, concurrency slots.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster._utils.concurrency import ConcurrencySlotStatus
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import INGEST_JOB
from labelloop_tests import pg
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, write_jsonl

pytestmark = pytest.mark.postgres

DEPLOY_YAML = Path(__file__).resolve().parents[1] / "examples" / "deploy" / "dagster.yaml"


@pytest.fixture
def database() -> str:
    """A fresh database on the tests' PostgreSQL server (libpq string)."""
    pg.require_server()
    return pg.fresh_database("dagster_deploy")


@pytest.fixture
def instance(database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Dagster instance from the deployment's dagster.yaml, on that database."""
    database = pg.params(database)
    monkeypatch.setenv("DAGSTER_PG_HOST", database["host"])
    monkeypatch.setenv("DAGSTER_PG_PORT", database.get("port", "5432"))
    monkeypatch.setenv("DAGSTER_PG_DB", database["dbname"])
    monkeypatch.setenv("DAGSTER_PG_USERNAME", database["user"])
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", database.get("password", ""))
    monkeypatch.delenv("LABELLOOP_CATALOG", raising=False)  # the embedded store, not the lake
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(DEPLOY_YAML, dagster_home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with dg.DagsterInstance.get() as instance:
        yield instance


def test_the_deployment_instance_is_postgres_backed(instance, database):
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.run_monitoring_enabled
    concurrency = instance.get_concurrency_config()
    assert concurrency.run_queue_config.max_concurrent_runs == 4
    assert concurrency.pool_config.default_pool_limit == 4
    # Global concurrency slots, claimed and freed through PostgreSQL.
    storage = instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    storage.set_concurrency_slots("probe", 1)
    first = storage.claim_concurrency_slot("probe", "run-a", "step")
    second = storage.claim_concurrency_slot("probe", "run-b", "step")
    assert first.slot_status == ConcurrencySlotStatus.CLAIMED
    assert second.slot_status == ConcurrencySlotStatus.BLOCKED
    storage.free_concurrency_slots_for_run("run-a")
    retried = storage.claim_concurrency_slot("probe", "run-b", "step")
    assert retried.slot_status == ConcurrencySlotStatus.CLAIMED
    held = "SELECT run_id, step_key FROM concurrency_slots WHERE concurrency_key = 'probe'"
    assert pg.query(database, held) == [("run-b", "step")]  # the slot is a row in PostgreSQL


def test_ingest_job_runs_on_the_postgres_instance(instance, database, home: Home):
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction("e-1", "item-030", "one"),
        correction("e-2", "item-031", "two", user="bob"),
    ])
    job = build_definitions(home, RETRAIN).resolve_job_def(INGEST_JOB)
    result = job.execute_in_process(instance=instance)
    assert result.success

    # The materializations are read back from the instance, i.e. from PostgreSQL.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_corrections")), limit=5
    ).records
    assert [r.run_id for r in records] == [result.run_id]
    metadata = records[0].asset_materialization.metadata
    assert metadata["accepted"].value == 2 and metadata["dagster/row_count"].value == 2
    items = instance.fetch_materializations(dg.AssetKey("items"), limit=5).records
    # 45 landed items; the world's 15 gold items are declared in gold.jsonl, not landed.
    assert items[0].asset_materialization.metadata["accepted"].value == 45

    # The run row is in PostgreSQL's runs table, finished.
    assert pg.query(database, "SELECT run_id, status FROM runs") == [(result.run_id, "SUCCESS")]
    assert instance.get_run_by_id(result.run_id).is_success
    # Every step of the run is in the pool "duckdb": with default_limit 4 the pool was created with
    # four slots, and the run gave its slots back when it finished.
    assert "duckdb" in instance.event_log_storage.get_concurrency_keys()
    info = instance.event_log_storage.get_concurrency_info("duckdb")
    assert info.slot_count == 4 and info.active_slot_count == 0 and info.pending_step_count == 0
