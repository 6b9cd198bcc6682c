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
from labelloop_assets.sensors import landing_sensor, retrain_decision, retrain_sensor
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
    assert list(json.loads(first.cursor)["seen"]) == ["items/items.jsonl"]  # temp files are not landed
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
    assert sorted(json.loads(second.cursor)["seen"]) == ["corrections/c1.jsonl", "items/items.jsonl"]
    # A symbolic link, even a dangling one, is landed too: the ingest run quarantines it.
    (home.landing_dir("corrections") / "link.jsonl").symlink_to(home.root / "elsewhere.jsonl")
    third = _tick(landing_sensor, instance, resources, cursor=second.cursor)
    assert len(third.run_requests) == 1 and "corrections/link.jsonl" in json.loads(third.cursor)["seen"]


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
