"""The deployment's proof: two workers that share nothing local ingest into one lake at the same
moment while an analyst reads; one is SIGKILLed while it holds the lake and is run again. Every line
ends up accepted or quarantined exactly once, versions stay contiguous, one champion serves, and
the analyst never sees a half-written version."""

from __future__ import annotations

import json

import pytest

from benchmarks.workers import prove
from labelloop_tests import pg

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_two_workers_sharing_only_postgres_and_the_data_path_survive_a_kill_and_reconcile(tmp_path):
    pg.require_server()
    result = prove(tmp_path, pg.fresh_database("workers"), n_files=2, events_per_file=300, n_items=300, kill=True)

    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2, default=str)
    assert result["killed"]["returncode"] == -9  # it died by the signal, holding the lake
    assert result["lines"] == result["accepted"] + result["quarantined"] == 2 * 2 * 300
    assert result["quarantined"] > 0  # the generated feed has bad rows: they are accounted for too
    # Both workers ran ingest jobs; the killed one's work was done by the runs after it.
    assert len({r["pid"] for r in result["runs"] if r["job"] == "ingest_job"}) >= 2
