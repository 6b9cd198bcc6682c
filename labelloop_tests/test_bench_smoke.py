"""A small run of the benchmark harness, so `make bench` cannot rot (measurements live there)."""

from __future__ import annotations

import itertools
import json

import pytest

from benchmarks import label_issues, run, soak
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
    # Dagster alone runs the ingest job's own steps, each doing nothing.
    assert entry["dagster_floor"]["steps"] == entry["dagster_floor"]["real_steps"] == len(loop["steps"])
    assert results["sensor"]["new_files"] == 10
    assert results["train"]["n_train_rows"] > 900
    assert (results["components"]["votes"], results["components"]["contributors"]) == (4_000, 200)
    table = run.markdown(results)
    assert "| 2,000 |" in table and "raw floor" in table
    assert "| feature drift, 5,000 rows" in table and "| reliability of 200 contributors from 4,000 votes" in table
    # The lake is measured on a real PostgreSQL (the workers' comparison: test_lake_workers.py).
    assert results["lake"]["loop"]["records_in"] == 2_000 and results["lake"]["lake_vs_embedded"] > 0
    assert "within 1.5x the embedded file" in table
    assert "Dagster alone: `ingest_job`'s" in table
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


def test_label_issue_benchmark_smoke():
    """The cleanlab comparison's whole path on small data: tuning split, held-out image and text, the table."""
    result = label_issues.run(
        datasets=("digits", "rotten-tomatoes"), tune_seeds=(0,), report_seeds=(3, 4), text_items=400
    )
    tuning = result["tuning"]
    assert tuning["split"] == {"datasets": ["digits"], "seeds": [0], "noises": result["noises"], "cases": 4}
    assert len(tuning["grid"]) == len(list(itertools.product(*label_issues.GRID.values())))
    assert tuning["best"]["objective"] >= tuning["defaults"]["objective"]
    digits, text = result["datasets"]["digits"], result["datasets"]["rotten-tomatoes"]
    assert digits["role"] == "tuning data set, held-out seeds" and text["role"] == "held out"
    assert text["kind"] == "text" and text["n_items"] == 400 and text["n_classes"] == 3
    for noise in result["noises"]:
        at_k = digits["noises"][noise]["summary"]["k"]
        assert len(at_k["ours passive"]["precision"]["per_seed"]) == 2
        # Digits are easy: with 10-15% planted noise, both rankings find mostly real flips.
        assert at_k["cleanlab"]["precision"]["mean"] > 0.6 and at_k["ours passive"]["precision"]["mean"] > 0.6
        assert 0.08 < digits["noises"][noise]["summary"]["noise_rate_mean"] < 0.17
    # The held-out mean is over the held-out data sets only (here: the text one).
    text_k = [p for n in text["noises"].values() for p in n["summary"]["k"]["cleanlab"]["precision"]["per_seed"]]
    assert result["held_out_mean_precision_at_k"]["cleanlab"] == round(sum(text_k) / len(text_k), 4)
    table = run.label_issues_markdown({**result, "seconds": 1.0})
    assert "| rotten-tomatoes (text) | uniform 10% |" in table and "digits (image; tuned on other seeds)" in table
    assert "Held-out data sets, all noises and seeds" in table and "Tuning (digits, seeds 0," in table
    json.dumps(result)
