"""Sensors tick by tick on a real Dagster instance."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from labelloop_assets.checks.schema_checks import BLOCKING_CHECKS
from labelloop_assets.core.settings import RetrainPolicy
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import INGEST_JOB, RETRAIN_JOB
from labelloop_assets.resources import RetrainCadence
from labelloop_assets.sensors import landed_files, landing_sensor, retrain_decision, retrain_sensor
from labelloop_tests.conftest import correction, land_items, make_items, write_jsonl


def _tick(sensor, instance, resources, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def test_landing_sensor_requests_each_new_file_once(home, instance, resources):
    assert isinstance(_tick(landing_sensor, instance, resources), dg.SkipReason)

    land_items(home, make_items()[0])
    (home.landing_dir("corrections") / ".half-written.jsonl.tmp").write_text('{"event_id":')
    first = _tick(landing_sensor, instance, resources)
    assert isinstance(first, dg.SensorResult) and len(first.run_requests) == 1
    # Temp files are not landed: only the items folder changed.
    assert first.run_requests[0].tags["labelloop/changed_kinds"] == "items"
    assert list(landed_files(home)) == ["items/items.jsonl"]
    # The same tick evaluated again (a retry, or a restart before the cursor was stored)
    # asks for the same run_key, which Dagster launches only once.
    again = _tick(landing_sensor, instance, resources)
    assert again.run_requests[0].run_key == first.run_requests[0].run_key
    # After the cursor is stored, nothing new means no run.
    skipped = _tick(landing_sensor, instance, resources, cursor=first.cursor)
    assert isinstance(skipped, dg.SkipReason) and "1 already seen" in skipped.skip_message

    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one")])
    second = _tick(landing_sensor, instance, resources, cursor=first.cursor)
    assert len(second.run_requests) == 1
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert second.run_requests[0].tags["labelloop/changed_kinds"] == "corrections"
    assert sorted(landed_files(home)) == ["corrections/c1.jsonl", "items/items.jsonl"]
    # A symbolic link, even a dangling one, is landed too: the ingest run quarantines it.
    (home.landing_dir("corrections") / "link.jsonl").symlink_to(home.root / "elsewhere.jsonl")
    third = _tick(landing_sensor, instance, resources, cursor=second.cursor)
    assert len(third.run_requests) == 1 and third.run_requests[0].tags["labelloop/changed_kinds"] == "corrections"
    assert "corrections/link.jsonl" in landed_files(home)
    assert isinstance(_tick(landing_sensor, instance, resources, cursor=third.cursor), dg.SkipReason)


def _ingest_as_the_demo_does(defs, instance, resources, cursor=None):
    """The demo's way: a tick of the landing sensor with the demo's own cursor, then the run it
    asks for, executed in process, with the sensor's tags (nothing written to the instance's
    sensor state)."""
    result = _tick(landing_sensor, instance, resources, cursor=cursor)
    for request in result.run_requests:
        tags = {**request.tags, "dagster/sensor_name": "landing_sensor", "dagster/run_key": request.run_key}
        assert defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance, tags=tags).success
    return result.cursor


def test_after_the_demo_the_daemon_requests_nothing_already_ingested(home, instance, resources, defs):
    land_items(home, make_items()[0])
    cursor = _ingest_as_the_demo_does(defs, instance, resources)
    for day in range(3):
        write_jsonl(home.landing_dir("corrections"), f"day{day}.jsonl",
                    [correction(f"d{day}-{k}", f"item-0{30 + k}", "one", user=f"u{day}{k}") for k in range(3)])
        write_jsonl(home.landing_dir("predictions"), f"day{day}.jsonl", [])
        cursor = _ingest_as_the_demo_does(defs, instance, resources, cursor)
    # The daemon's sensor starts with no cursor of its own: what the demo's runs read is seen.
    idle = _tick(landing_sensor, instance, resources)
    assert isinstance(idle, dg.SkipReason), idle
    assert "no new or changed landing files (7 already seen)" in idle.skip_message

    write_jsonl(home.landing_dir("corrections"), "late.jsonl", [correction("late-1", "item-040", "two")])
    late = _tick(landing_sensor, instance, resources)
    assert len(late.run_requests) == 1
    assert late.run_requests[0].tags["labelloop/changed_kinds"] == "corrections"
    # Its cursor holds it: the next tick asks for nothing more, the run then reads it, and a
    # sensor that lost its cursor also asks for nothing once the run has read it.
    assert isinstance(_tick(landing_sensor, instance, resources, cursor=late.cursor), dg.SkipReason)
    defs.resolve_job_def(INGEST_JOB).execute_in_process(
        instance=instance, tags={"dagster/run_key": late.run_requests[0].run_key})
    assert isinstance(_tick(landing_sensor, instance, resources), dg.SkipReason)


def test_the_landing_cursor_does_not_grow_with_the_files_landed(home, instance, resources):
    folder = home.landing_dir("corrections")
    sizes = []
    cursor = None
    for batch in (1, 10, 200):
        for n in range(batch):
            write_jsonl(folder, f"b{batch}-{n:04d}.jsonl", [correction(f"b{batch}-{n}", "item-030", "one")])
        result = _tick(landing_sensor, instance, resources, cursor=cursor)
        assert len(result.run_requests) == 1
        cursor = result.cursor
        sizes.append(len(cursor))
    assert len(landed_files(home)) == 211
    assert sizes[0] == sizes[1] == sizes[2], sizes


def test_an_edited_gold_file_is_ingested_once(home, instance, resources, defs):
    land_items(home, make_items()[0])
    _ingest_as_the_demo_does(defs, instance, resources)
    assert isinstance(_tick(landing_sensor, instance, resources), dg.SkipReason)
    with home.gold_file.open("a", encoding="utf-8") as gold:
        gold.write(json.dumps({"item_id": "item-900", "features": [6.0, 0.0, 0.0, 0.0], "gold_label": "zero"}) + "\n")
    edited = _tick(landing_sensor, instance, resources)
    assert edited.run_requests[0].tags == {"labelloop/trigger": "landing_sensor", "labelloop/gold_changed": "true"}
    _ingest_as_the_demo_does(defs, instance, resources)
    assert isinstance(_tick(landing_sensor, instance, resources), dg.SkipReason)


@pytest.mark.slow
def test_sensor_run_ingests_exactly_once_even_when_the_run_is_retried(home, instance, resources, defs):
    land_items(home, make_items()[0])
    request = _tick(landing_sensor, instance, resources).run_requests[0]
    job = defs.resolve_job_def(INGEST_JOB)
    first = job.execute_in_process(instance=instance, tags={"dagster/run_key": request.run_key})
    retried = job.execute_in_process(instance=instance, tags={"dagster/run_key": request.run_key})
    counts = [
        {k: v.value for k, v in e.step_materialization_data.materialization.metadata.items()}
        for r in (first, retried)
        for e in r.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("items")
    ]
    # 45 landed items, and the 15 gold items gold.jsonl declared (evaluation set 1) once.
    assert [c["accepted"] for c in counts] == [45, 0]
    assert [c["n_gold_added"] for c in counts] == [15, 0]
    assert [c["dagster/row_count"] for c in counts] == [60, 60]


@pytest.mark.slow
def test_retrain_sensor_follows_the_cadence(home, instance, resources, defs):
    assert "no corpus version" in _tick(retrain_sensor, instance, resources).skip_message
    land_items(home, make_items()[0])
    defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)

    first = _tick(retrain_sensor, instance, resources)
    assert isinstance(first, dg.RunRequest) and first.run_key == "retrain-corpus-v1"
    defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance)
    assert "already trained on corpus v1" in _tick(retrain_sensor, instance, resources).skip_message

    # One label change: below the threshold of 2 configured for tests.
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one")])
    defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    waiting = _tick(retrain_sensor, instance, resources)
    assert "1 label changes since the last training, fewer than the threshold of 2" in waiting.skip_message

    write_jsonl(home.landing_dir("corrections"), "c2.jsonl", [correction("e-2", "item-031", "zero")])
    defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    due = _tick(retrain_sensor, instance, resources)
    assert isinstance(due, dg.RunRequest) and due.run_key == "retrain-corpus-v3"


@pytest.mark.slow
def test_retrain_sensor_asks_once_per_corpus_version_and_waits_out_the_interval(home, instance, resources, defs):
    land_items(home, make_items()[0])
    defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    # Ticks before the run starts ask again with the same run_key, which Dagster launches once.
    first, again = (_tick(retrain_sensor, instance, resources) for _ in range(2))
    assert first.run_key == again.run_key == "retrain-corpus-v1"
    defs.resolve_job_def(RETRAIN_JOB).execute_in_process(
        instance=instance, tags={"dagster/run_key": first.run_key}
    )
    for landed, item, label in (("c1", "item-030", "one"), ("c2", "item-031", "zero")):
        write_jsonl(home.landing_dir("corrections"), f"{landed}.jsonl", [correction(f"{landed}-e", item, label)])
        defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    # Enough label changes, but the model trained moments ago and the cadence wants an hour.
    patient = {**resources, "retrain_cadence": RetrainCadence(min_label_changes=2, min_interval_seconds=3600)}
    waiting = _tick(retrain_sensor, instance, patient)
    assert isinstance(waiting, dg.SkipReason)
    assert "2 label changes are waiting, but only" in waiting.skip_message
    assert "(minimum 3600s)" in waiting.skip_message
    due = _tick(retrain_sensor, instance, resources)
    assert due.run_key == "retrain-corpus-v3"


@pytest.mark.slow
def test_a_failing_blocking_check_holds_retraining_until_it_passes(home, instance, resources, defs):
    land_items(home, make_items()[0])
    ingest = defs.resolve_job_def(INGEST_JOB)
    ingest.execute_in_process(instance=instance)
    assert _tick(retrain_sensor, instance, resources).run_key == "retrain-corpus-v1"
    # A correction is staged, then the ontology drops its label with no rename.
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "two")])
    ingest.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_corrections")])
    original = home.ontology_file.read_text()
    home.ontology_file.write_text("labels: [zero, one, three]\nrenames: {}\n")
    assert not ingest.execute_in_process(instance=instance, raise_on_error=False).success

    held = _tick(retrain_sensor, instance, resources)
    assert isinstance(held, dg.SkipReason)
    assert "retraining is held: blocking check validated_labels.validated_labels_schema" in held.skip_message
    assert "re-run ingest_job" in held.skip_message
    # A manual run is refused too, and no model is written.
    manual = defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance, raise_on_error=False)
    failure = next(e for e in manual.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "retrained_model"
    assert "training is held: blocking check validated_labels.validated_labels_schema" in (
        failure.step_failure_data.user_failure_data.description
    )
    assert not home.models.exists() or not any(home.models.iterdir())

    home.ontology_file.write_text(original)  # fixed; the next ingest re-runs the check
    assert ingest.execute_in_process(instance=instance).success
    resumed = _tick(retrain_sensor, instance, resources)
    assert isinstance(resumed, dg.RunRequest) and resumed.run_key == "retrain-corpus-v2"


def test_the_hold_covers_every_blocking_check_in_the_definitions(home):
    graph = build_definitions(home, RetrainPolicy(2, 0)).resolve_asset_graph()
    blocking = {key for key in graph.asset_check_keys if graph.get_check_spec(key).blocking}
    assert blocking == set(BLOCKING_CHECKS)


def test_retrain_decision_respects_the_minimum_interval():
    corpus = ({"corpus_version": 5, "label_changes_total": 120}, 1000.0)
    model = ({"corpus_version": 3, "label_changes_total": 20}, 1000.0)
    policy = RetrainPolicy(min_label_changes=50, min_interval_seconds=3600)
    run_key, reason = retrain_decision(corpus, model, policy, now=1000.0 + 600)
    assert run_key is None and "only 600s passed" in reason
    run_key, reason = retrain_decision(corpus, model, policy, now=1000.0 + 3600)
    assert run_key == "retrain-corpus-v5" and "100 label changes" in reason


def test_the_retrain_job_refreshes_reliability_with_the_model(defs):
    assets = {n.name for n in defs.resolve_job_def(RETRAIN_JOB).graph.node_defs}
    assert assets == {
        "contributor_reliability", "retrained_model", "model_evaluation", "release_notes", "label_issue_candidates",
        "guideline_report",
        "label_quality_metrics", "label_quality_signals", "published_views",
    }
