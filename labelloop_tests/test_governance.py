"""Governance end to end: escalations, reviewer decisions under sensors, audit, SLA, corpus as of."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import corpus, store, train
from labelloop_assets.jobs import INGEST_JOB, RETRAIN_JOB
from labelloop_assets.sensors import landing_sensor
from labelloop_tests.conftest import correction, give_keys, land_items, make_items, set_yaml, write_jsonl
from labelloop_tests.test_loop import _materialize, _metadata, _rows


def _tick_and_run(defs, instance, resources, cursor):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
        result = landing_sensor(ctx)
    runs = [
        defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance, tags={"dagster/run_key": r.run_key})
        for r in (result.run_requests if isinstance(result, dg.SensorResult) else [])
    ]
    assert all(r.success for r in runs)
    return (result.cursor if isinstance(result, dg.SensorResult) else cursor), runs


def _tie_on_item_030(home, name="c1.jsonl", start=0):
    # Fresh end-user ids count fully here (newcomers' weight is test_trust's subject): 2 v 2 is a tie.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    votes = [correction(f"e-{start + k}", "item-030", label, user=f"user{start + k}", role="end_user")
             for k, label in enumerate(["one", "one", "two", "two"])]
    write_jsonl(home.landing_dir("corrections"), name, votes)


@pytest.mark.slow
def test_conflict_escalates_and_a_reviewer_decision_is_promoted_under_sensors(
    home, defs, instance, resources, monkeypatch, capsys
):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text(
        "reviewers:\n  - {id: reviewer-0, role: reviewer}\n  - {id: ann-1, role: annotator}\n"
    )
    # Both sign what they submit: ann-1's refused attempt is then audited as hers, for its role.
    give_keys(home, "reviewer-0", "ann-1")
    land_items(home, make_items()[0])
    _tie_on_item_030(home)
    cursor, _ = _tick_and_run(defs, instance, resources, None)

    assert cli.main(["review", "list", "--json"]) == 0
    open_escalations = json.loads(capsys.readouterr().out)
    assert [(e["escalation_id"], e["reason"]) for e in open_escalations] == [("esc-item-030-1", "tie")]
    assert cli.main(["review", "show", "esc-item-030-1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["votes"]) == 4

    # Refused: unknown identity, a role that may not decide, a label outside the ontology.
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "two", "--rationale", "x",
                     "--as", "mallory"]) == 3
    assert "'mallory' is not a reviewer" in capsys.readouterr().err
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "two", "--rationale", "x",
                     "--as", "ann-1"]) == 3
    assert "role annotator may not decide a tie escalation" in capsys.readouterr().err
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "purple", "--rationale", "x",
                     "--as", "reviewer-0"]) == 3
    # Accepted: the decision travels as a landing file.
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "two",
                     "--rationale", "the loop is open at the top", "--as", "reviewer-0"]) == 0
    capsys.readouterr()

    cursor, runs = _tick_and_run(defs, instance, resources, cursor)
    assert len(runs) == 1
    current = _rows(home, "SELECT label, reviewer_confirmed FROM production_corpus WHERE item_id = 'item-030'")
    assert current.rows() == [("two", True)]
    last = _rows(home, "SELECT change_kind, approved_by, rationale FROM label_history "
                       "WHERE item_id = 'item-030' ORDER BY corpus_version DESC, change_order DESC LIMIT 1")
    kind, approver, rationale = last.row(0)
    assert kind == "review" and approver.startswith("reviewer:u_") and "loop is open" in rationale
    assert _rows(home, "SELECT count(*) AS n FROM escalations")["n"][0] == 0
    audit = _rows(home, "SELECT outcome, reason FROM audit_log WHERE action LIKE 'review.%' "
                        "ORDER BY outcome, reason")
    publications = _rows(home, "SELECT target FROM audit_log WHERE action = 'corpus.publish' ORDER BY 1")
    assert publications["target"].to_list() == ["v1", "v2"]
    assert audit.rows() == [
        ("accepted", None), ("refused", "role_not_allowed"), ("refused", "unknown_label"),
        ("refused", "unknown_reviewer"),
    ]
    quarantined = _rows(home, "SELECT reason FROM quarantine WHERE kind = 'reviews' ORDER BY reason")
    assert quarantined["reason"].to_list() == ["role_not_allowed", "unknown_label", "unknown_reviewer"]

    # A decision on the closed escalation, or on none at all, changes nothing and is audited.
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "one", "--rationale", "again",
                     "--as", "reviewer-0"]) == 3
    assert cli.main(["review", "reject", "esc-nope-1", "--rationale", "?", "--as", "reviewer-0"]) == 3
    # The crowd cannot overturn a reviewer-confirmed label: it escalates instead.
    write_jsonl(home.landing_dir("corrections"), "c2.jsonl", [
        correction(f"e-crowd-{k}", "item-030", "one", user=f"crowd{k}", role="end_user") for k in range(4)
    ])
    cursor, _ = _tick_and_run(defs, instance, resources, cursor)
    assert _rows(home, "SELECT label FROM production_corpus WHERE item_id = 'item-030'")["label"][0] == "two"
    reasons = _rows(home, "SELECT reason FROM quarantine WHERE kind = 'reviews' ORDER BY reason")
    assert {"escalation_closed", "unknown_escalation"} <= set(reasons["reason"].to_list())
    escalations = _rows(home, "SELECT escalation_id, reason FROM escalations")
    assert escalations.rows() == [("esc-item-030-2", "contradicts_confirmed")]


def test_sla_breach_is_flagged_and_warned(home, defs, instance):
    set_yaml(home.governance_file, {"escalation": {"sla_hours": 0.000001}})
    land_items(home, make_items()[0])
    _tie_on_item_030(home)
    result = _materialize(defs, instance, ["items", "review_decisions", "raw_corrections", "validated_labels",
                                           "production_corpus", "escalations"])
    assert result.success
    meta = _metadata(result, "escalations")
    assert (meta["open_escalations"], meta["sla_breaches"]) == (1, 1)
    check = [e.asset_check_evaluation_data for e in result.all_events
             if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
             and e.asset_check_evaluation_data.check_name == "escalations_within_sla"][0]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN


@pytest.mark.slow
def test_corpus_as_of_reproduces_what_a_model_saw(home, defs, instance):
    land_items(home, make_items()[0])
    assert _materialize(defs, instance).success  # corpus v1, model m0001
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction("e-1", "item-030", "one"), correction("e-2", "item-031", "zero"),
    ])
    assert defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance).success  # v2
    assert defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance).success  # m0002
    with store.connect(home.database, read_only=True) as con:
        models = store.frame(con, "SELECT model_version, corpus_version, train_data_hash FROM models ORDER BY 1")
        for version, corpus_version, data_hash in models.rows():
            seen = corpus.corpus_as_of(con, corpus_version)
            assert train.training_data_hash(seen) == data_hash, version
        assert corpus.corpus_as_of(con, 1).filter(item_id="item-030")["label"][0] == "zero"
        assert corpus.corpus_as_of(con, 2).filter(item_id="item-030")["label"][0] == "one"
    assert models["corpus_version"].to_list() == [1, 2]


def test_reliability_is_estimated_on_the_training_cadence(home, defs, instance):
    land_items(home, make_items()[0])
    # Newcomer weights are test_trust_votes' subject: here ann may flip alone once proven.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    votes = []
    for k in range(15, 45):  # a reviewer relabels 30 items; ann agrees on all, bob on none
        label = ["one", "two", "zero"][k % 3]  # each item's label was ["zero", "one", "two"][k % 3]
        wrong = ["two", "zero", "one"][k % 3]  # neither: blind votes, so they are evidence
        item = f"item-{k:03d}"
        votes += [
            correction(f"r-{k}", item, label, user="rev", role="reviewer"),
            correction(f"a-{k}", item, label, user="ann", role="annotator"),
            correction(f"b-{k}", item, wrong, user="bob", role="annotator"),
        ]
    votes.append(correction("a-solo", "item-050", "zero", user="ann", role="annotator"))
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", votes)
    assert _materialize(defs, instance).success
    solo = "SELECT label FROM production_corpus WHERE item_id = 'item-050'"
    assert _rows(home, solo)["label"][0] == "two"  # a new annotator cannot flip a label alone
    result = _materialize(defs, instance, ["contributor_reliability"])
    assert _metadata(result, "contributor_reliability")["contributors"] == 3
    accuracy = dict(_rows(home, "SELECT r.user_pseudonym, r.accuracy FROM contributor_reliability r").rows())
    ann = _rows(home, "SELECT DISTINCT user_pseudonym FROM validated_labels WHERE event_id = 'a-15'")[0, 0]
    bob = _rows(home, "SELECT DISTINCT user_pseudonym FROM validated_labels WHERE event_id = 'b-15'")[0, 0]
    assert accuracy[ann] > 0.85 and accuracy[bob] < 0.2
    # With a proven record, ann's pending correction is decided again and promoted.
    assert defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance).success
    assert _rows(home, solo)["label"][0] == "zero"


def _near_duplicates_check(result):
    return [e.asset_check_evaluation_data for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
            and e.asset_check_evaluation_data.check_name == "near_duplicates_agree"][0]


def test_near_duplicates_with_conflicting_labels_are_flagged(home, defs, instance):
    records, _ = make_items()
    twin = dict(records[40], item_id="twin-of-40", initial_label="zero")  # item-040 is "one"
    land_items(home, [*records, twin])
    check = _near_duplicates_check(_materialize(defs, instance, ["items", "production_corpus"]))
    assert not check.passed and check.metadata["conflicting_groups"].value == 1
    assert "twin-of-40" in check.metadata["groups"].value


def test_a_twin_landed_later_is_found_against_the_shapes_already_kept(home, defs, instance):
    records, _ = make_items()
    land_items(home, records)
    first = _near_duplicates_check(_materialize(defs, instance, ["items", "production_corpus"]))
    assert first.passed and first.metadata["conflicting_groups"].value == 0
    # Only the new items' shapes are worked out by the next run; the old ones are read as kept.
    twin = dict(records[40], item_id="twin-of-40", initial_label="zero")  # item-040 is "one"
    agreeing = dict(records[41], item_id="agreeing-twin-of-41")  # the same label as item-041
    write_jsonl(home.landing_dir("items"), "later.jsonl", [twin, agreeing])
    later = _near_duplicates_check(_materialize(defs, instance, ["items", "production_corpus"]))
    assert not later.passed and later.metadata["conflicting_groups"].value == 1
    assert "twin-of-40" in later.metadata["groups"].value and "agreeing-twin" not in later.metadata["groups"].value
    shapes = _rows(home, "SELECT count(*) AS n, count(DISTINCT item_id) AS items FROM item_shapes")
    assert shapes.row(0) == (len(records) + 2, len(records) + 2)


def test_near_twins_agree_to_two_decimals_and_shapes_kept_another_way_are_worked_out_again(home, defs, instance):
    records, _ = make_items()
    # A twin whose features differ from the original's below the second decimal: each moved
    # halfway to its rounded value (an original with a third decimal of 5 could round either way).
    original = next(r for r in records[15:] if all(round(abs(v) * 1000) % 10 != 5 for v in r["features"]))
    near = dict(original, item_id="near-twin", initial_label="two" if original["initial_label"] != "two" else "one",
                features=[v + (round(v, 2) - v) / 2 for v in original["features"]])
    assert near["features"] != original["features"]
    land_items(home, [*records, near])
    check = _near_duplicates_check(_materialize(defs, instance, ["items", "production_corpus"]))
    assert not check.passed and check.metadata["conflicting_groups"].value == 1
    assert "near-twin" in check.metadata["groups"].value and original["item_id"] in check.metadata["groups"].value
    # Shapes kept under another way of working them out (an older labelloop's, or a store
    # upgraded from before they were kept) are all worked out again by the next run.
    with store.connect(home.database) as con:
        con.execute("UPDATE item_shapes SET shape = 'stale'")
        con.execute("UPDATE pipeline_state SET value = 0 WHERE name = 'item_shapes.format'")
    again = _near_duplicates_check(_materialize(defs, instance, ["production_corpus"]))
    assert again.metadata["conflicting_groups"].value == 1 and "near-twin" in again.metadata["groups"].value
    assert _rows(home, "SELECT count(*) FILTER (WHERE shape = 'stale') AS stale, count(*) AS n FROM item_shapes"
                 ).row(0) == (0, len(records) + 1)


def test_published_views_are_readable_while_a_writer_holds_the_database(home, defs, instance):
    import duckdb

    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one")])
    assert defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance).success
    views = home.published / "views.sql"
    assert "production_corpus" in views.read_text() and "label_versions" not in views.read_text()
    # Whole-history views follow the training cadence.
    assert defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance).success
    assert "label_versions" in views.read_text()
    # A run holds the store open for writing (the embedded file, or the lake's writer locks)...
    writer = store.connect(home.database)
    try:
        writer.execute("BEGIN TRANSACTION")
        writer.execute("DELETE FROM production_corpus")  # uncommitted: readers must not see this
        # ...and an analyst still reads the published snapshot, unblocked and consistent.
        reader = duckdb.connect()
        reader.execute(views.read_text())
        assert reader.execute("SELECT count(*) FROM production_corpus").fetchall() == [(45,)]
        assert reader.execute(
            "SELECT label FROM label_versions WHERE item_id = 'item-030' AND valid_to_version IS NULL"
        ).fetchall() == [("one",)]
        reader.close()
        writer.execute("ROLLBACK")
    finally:
        writer.close()
