"""The demo at small scale, end to end through Dagster: sensors request runs, accuracies rise."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import pytest

from labelloop_assets.core import store
from labelloop_assets.core.settings import DEFAULTS_DIR, RetrainPolicy
from labelloop_assets.demo.run import DemoRefused, prepare_home, run_demo
from labelloop_assets.demo.simulator import DemoConfig


@pytest.mark.slow
def test_demo_loop_raises_corpus_and_model_accuracy(tmp_path, instance):
    home = prepare_home(tmp_path / "demo-home")
    # The demo's annotators are listed staff, exempt from newcomer weighting (prepare_home).
    assert "exempt_roles: [annotator, reviewer, domain_expert]" in home.governance_file.read_text()
    config = DemoConfig(served_per_day=400, annotator_items_per_day=100, weak_training_day=2)
    rows = run_demo(
        home, instance, days=3, config=config,
        retrain=RetrainPolicy(min_label_changes=10, min_interval_seconds=0), echo=lambda _: None,
    )

    assert [r["day"] for r in rows] == [0, 1, 2, 3]
    first, last = rows[0], rows[-1]
    assert last["corpus_label_accuracy"] > first["corpus_label_accuracy"]
    assert last["model_gold_accuracy"] > first["model_gold_accuracy"]
    assert last["model_version"] != first["model_version"]
    assert all(r["corrections_quarantined"] > 0 for r in rows[1:])  # malformed lines, replays...
    assert json.loads((home.reports / "demo.json").read_text()) == rows
    # Every run came from a sensor, the morning's review-task schedule or the engineer's one retraining,
    # and ran through Dagster on the instance.
    runs = instance.get_runs()
    assert {r.tags.get("dagster/sensor_name") or r.tags.get("dagster/schedule_name")
            or r.tags.get("labelloop/launched_by") for r in runs} == {
        "landing_sensor", "retrain_sensor", "review_tasks_job_schedule", "engineer"}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    with store.connect(home.database, read_only=True) as con:
        files = store.frame(con, "SELECT sum(records_in) AS n, sum(accepted) AS a, "
                                 "sum(quarantined) AS q FROM ingested_files WHERE kind = 'corrections'")
        raw = store.scalar(con, "SELECT count(*) FROM raw_corrections")
        quarantined = store.scalar(con, "SELECT count(*) FROM quarantined_corrections")
    n, accepted, q = files.row(0)
    assert n == accepted + q == sum(r["corrections_received"] for r in rows)
    assert (accepted, q) == (raw, quarantined)
    # Disagreements open escalations; each day the reviewers decide the oldest
    # reviews_per_day of those open, the next day's ingest applies the decisions and closes them;
    # the intern's unsigned try on day 2 is refused on day 3.
    assert any(r["open_escalations"] > 0 for r in rows[1:])
    assert [r["reviews_applied"] for r in rows] == [0, 0] + [
        min(config.reviews_per_day, r["open_escalations"]) for r in rows[1:-1]
    ]
    assert [r["reviews_refused"] for r in rows] == [0, 0, 0, 1]
    with store.connect(home.database, read_only=True) as con:
        decided = set(store.frame(con, "SELECT escalation_id FROM review_decisions")["escalation_id"])
        still_open = set(store.frame(con, "SELECT escalation_id FROM escalations")["escalation_id"])
    assert len(decided) == sum(r["reviews_applied"] for r in rows) and not decided & still_open
    assert rows[-1]["open_escalations"] == len(still_open)
    # Day 2's weaker training configuration is rejected by the plan; the shipped one is back for day 3.
    decisions = [(r["day"], e["decision"]) for r in rows for e in r["model_evaluations"]]
    assert decisions[0] == (0, "promote") and decisions[-1] == (3, "promote")
    assert [d for d in decisions if d[0] == 2][0] == (2, "reject")  # then the engineer trains again
    rejected = rows[2]["model_evaluations"][0]
    assert (home.reports / "release-notes" / f"{rejected['challenger']}.md").exists()
    assert home.training_file.read_text() == (DEFAULTS_DIR / "training.yaml").read_text()
    # The annotators answered the loop's tasks, and its arm fixed more wrong labels per answer than
    # the controls.
    efficacy = last["routing_efficacy"]
    assert efficacy["loop"]["answers"] > 100 and efficacy["loop"]["fixed"] > 20
    assert efficacy["loop"]["fixed_per_100_answers"] > 3 * max(
        efficacy["random"]["fixed_per_100_answers"], efficacy["least_confidence"]["fixed_per_100_answers"], 1)
    assert last["clean_label_ceiling"] > last["model_gold_accuracy"] - 0.02
    _assert_lineage_is_complete(home)


def _assert_lineage_is_complete(home):
    """For sampled corrected items, the trail accounts for every label the item has had."""
    from labelloop_assets.core.lineage import item_trail

    with store.connect(home.database, read_only=True) as con:
        sample = store.frame(
            con, "SELECT DISTINCT item_id FROM label_history WHERE change_kind IN "
                 "('correction', 'review') ORDER BY item_id LIMIT 20",
        )["item_id"].to_list()
        models = set(store.frame(con, "SELECT model_version FROM models")["model_version"].to_list())
        assert sample
        for item_id in sample:
            trail = item_trail(con, item_id, datetime.now(UTC))
            versions = trail["versions"]
            current = store.frame(con, "SELECT label FROM production_corpus WHERE item_id = ?", [item_id])
            assert versions["label"][-1] == current["label"][0], item_id
            assert versions["valid_to_version"][-1] is None
            assert trail["item"]["initial_label"][0] == versions["label"][0]
            events = set(trail["corrections"]["event_id"].to_list())
            for ids in versions["event_ids"].drop_nulls().to_list():
                assert set(ids) <= events, item_id
            for trained in versions["models_trained"].drop_nulls().to_list():
                assert set(trained) <= models
            reviewed = versions.filter(versions["change_kind"] == "review")
            assert reviewed.height <= trail["reviews"].height


def test_demo_never_wipes_a_home_it_did_not_create(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "labelloop.duckdb").write_text("someone's data")
    with pytest.raises(DemoRefused, match="did not create"):
        prepare_home(precious)
    assert (precious / "labelloop.duckdb").read_text() == "someone's data"
    again = prepare_home(tmp_path / "fresh")
    (again.root / "leftover").write_text("x")
    assert not (prepare_home(again.root).root / "leftover").exists()
