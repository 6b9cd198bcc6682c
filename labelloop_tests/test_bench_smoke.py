"""A small run of the benchmark harness, so `make bench` cannot rot (measurements live there)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run, soak
from labelloop_tests import pg


@pytest.mark.slow
@pytest.mark.postgres
def test_benchmark_harness_smoke(tmp_path):
    pg.require_server()
    results = run.suite(
        [2_000], tmp_path / "work", n_items=1_000, log=lambda _: None,
        increment=500, sensor_files=200, component_rows=5_000, component_votes=4_000,
        workers=None, import_runs=1,
    )

    entry = results["scales"]["2000"]
    loop = entry["loop"]
    assert loop["records_in"] == 2_000 == loop["accepted"] + loop["quarantined"]
    assert 0.03 < loop["quarantined"] / 2_000 < 0.12  # ~5% bad rows, plus corrections of gold items
    # The hand-written baseline applies the same rules and must accept exactly the same rows.
    assert entry["pandas"]["accepted"] == loop["accepted"]
    assert entry["increment"]["records_in"] == 500
    assert results["sensor"]["new_files"] == 10
    assert results["train"]["n_train_rows"] > 900
    assert (results["components"]["votes"], results["components"]["contributors"]) == (4_000, 200)
    table = run.markdown(results)
    assert "| 2,000 |" in table and "raw floor" in table
    assert "| feature drift, 5,000 rows" in table and "| reliability of 200 contributors from 4,000 votes" in table
    # The lake is measured on a real PostgreSQL (the workers' comparison: test_lake_workers.py).
    assert results["lake"]["loop"]["records_in"] == 2_000 and results["lake"]["lake_vs_embedded"] > 0
    assert "within 1.5x the embedded file" in table
    # Where the time goes: the profiler's tree names the assets that ran.
    assert "raw_corrections" in run.profile_markdown(results)
    assert results["import"]["median_seconds"] > 0
    json.dumps(results)


@pytest.mark.slow
def test_soak_harness_smoke(tmp_path):
    """A few seconds of the soak: files keep landing (with replays and bad rows) and all reconciles."""
    result = soak.soak(tmp_path / "home", seconds=3, n_items=1_000, events_per_file=100, interval=0.2,
                       retrain_every=50)
    assert result["files"] >= 2 and result["lines"] == result["accepted"] + result["quarantined"]
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["failed_runs"] == 0 and result["runs"]["ingest_job"]["count"] >= 1
    assert "| reconciled | yes" in soak.markdown(result)
