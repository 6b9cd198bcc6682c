"""The `labelloop` command line on a real home."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from labelloop_assets import cli
from labelloop_tests.conftest import set_yaml
from labelloop_tests.test_loop import _materialize

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples" / "landing"


def _loaded_home(home, defs, instance, monkeypatch):
    shutil.copytree(SAMPLES, home.landing, dirs_exist_ok=True)
    # The samples' two end users are new; here they may flip sample-04 (newcomers: test_trust_votes).
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    assert _materialize(defs, instance).success
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))


@pytest.mark.slow
def test_status_quarantine_and_lineage(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)

    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    tables = {t["table_name"]: t["rows"] for t in status["tables"]}
    assert tables["production_corpus"] == 9 and tables["quarantine"] == 3
    assert [m["model_version"] for m in status["models"]] == ["m0001"]

    assert cli.main(["quarantine", "--kind", "corrections", "--json"]) == 0
    reasons = sorted(r["reason"] for r in json.loads(capsys.readouterr().out))
    assert reasons == ["malformed_json", "no_consent", "unknown_label"]
    assert cli.main(["quarantine", "--reason", "no_consent", "--json"]) == 0
    assert [r["record_id"] for r in json.loads(capsys.readouterr().out)] == ["evt-4"]

    assert cli.main(["lineage", "sample-04", "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    versions = lineage["versions"]
    assert [(v["label"], v["valid_from_version"], v["valid_to_version"]) for v in versions] == [
        ("two", 1, 1), ("one", 1, None)
    ]
    assert sorted(versions[1]["event_ids"]) == ["evt-1", "evt-2"]
    assert versions[1]["models_trained"] == ["m0001"]
    assert lineage["item"][0]["initial_label"] == "two" and lineage["item"][0]["label_source"] == "vendor"
    assert [p["model_version"] for p in lineage["predictions"]] == ["baseline-v1"]  # the model that served it, declared as external
    assert {c["user_role"] for c in lineage["corrections"]} == {"end_user"}
    assert [d["status"] for d in lineage["decisions"]] == ["promote"]
    assert "dana@example.org" not in json.dumps(lineage)


@pytest.mark.slow
def test_lineage_of_unknown_item_and_missing_database(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)
    assert cli.main(["lineage", "no-such-item"]) == 1
    assert "no label history for item 'no-such-item'" in capsys.readouterr().err

    monkeypatch.setenv("LABELLOOP_HOME", str(home.root.parent / "empty"))
    try:
        cli.main(["status"])
    except SystemExit as exit_:
        assert "no database at" in str(exit_.code)
    else:
        raise AssertionError("status without a database must exit with a message")


def test_demo_needs_a_dagster_home(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    assert cli.main(["demo", "--days", "1"]) == 2
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err
