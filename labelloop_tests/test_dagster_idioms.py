"""The code location as Dagster sees it: attributes, schemas, lineage, checks and automation."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets.core import store
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import INGEST_JOB, SCHEDULED_CHECKS_JOB
from labelloop_tests.conftest import correction, land_items, make_items, set_yaml, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _graph(defs: dg.Definitions):
    return defs.resolve_asset_graph()


def _materializable(defs: dg.Definitions) -> list:
    graph = _graph(defs)
    return [graph.get(key) for key in graph.materializable_asset_keys]


def test_every_asset_declares_its_code_version_owners_and_pool(defs):
    assets = _materializable(defs)
    assert len(assets) >= 18
    for node in assets:
        name = node.key.to_user_string()
        assert node.code_version, f"{name} has no code_version"
        assert node.owners == ["team:labelloop"], name
        assert node.pools == {"duckdb"}, name
    groups = {node.key.to_user_string(): node.group_name for node in assets}
    # Each keeps its own group while sharing the rest.
    assert (groups["items"], groups["production_corpus"], groups["retrained_model"],
            groups["label_quality_metrics"], groups["store_maintenance"]) == (
        "ingest", "curation", "training", "monitoring", "maintenance")


# ----------------------------------------------------------------------------- the home from the environment


def test_the_code_location_loads_without_labelloop_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LABELLOOP_HOME"}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import labelloop_assets.definitions as d\n"
        "print(sorted(d.defs.resources))\n"
        "print(d.defs.resources['labelloop'].root.env_var_name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[1] == "LABELLOOP_HOME"
    assert not (tmp_path / "data").exists()  # nothing was created where it was loaded


def test_a_run_reads_labelloop_home_when_it_starts(home, instance, monkeypatch):
    defs = build_definitions()  # the deployment's: no home given
    land_items(home, make_items()[0])
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    result = defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    assert result.success
    assert home.database_file.exists()

    monkeypatch.delenv("LABELLOOP_HOME")
    with pytest.raises(dg.DagsterInvalidConfigError, match='environment variable "LABELLOOP_HOME" which is not set'):
        defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)


def test_the_retrain_cadence_is_read_from_the_environment_when_the_sensor_evaluates(monkeypatch):
    from labelloop_assets.resources import build_resources

    cadence = build_resources()["retrain_cadence"]  # the deployment's: nothing read yet
    monkeypatch.setenv("LABELLOOP_RETRAIN_MIN_CHANGES", "7")
    monkeypatch.setenv("LABELLOOP_RETRAIN_MIN_INTERVAL_SECONDS", "90")
    policy = cadence.policy()
    assert (policy.min_label_changes, policy.min_interval_seconds) == (7, 90.0)
    monkeypatch.delenv("LABELLOOP_RETRAIN_MIN_CHANGES")
    monkeypatch.delenv("LABELLOOP_RETRAIN_MIN_INTERVAL_SECONDS")
    assert (cadence.policy().min_label_changes, cadence.policy().min_interval_seconds) == (50, 3600.0)


def test_a_run_cannot_move_the_home_the_environment_names(home, instance, monkeypatch, tmp_path):
    defs = build_definitions()
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    evil = Home(tmp_path / "evil").ensure()
    for config, refusal in (
        ({"labelloop": {"config": {"root": str(evil.root)}}}, "refused: this run's config points labelloop at"),
        ({"database": {"config": {"home_root": str(home.root), "database": str(evil.database_file)}}},
         "refused: this run's config sets the database resource"),
        ({"database": {"config": {"home_root": str(evil.root)}}}, "refused: this run's config points labelloop at"),
    ):
        result = defs.resolve_job_def(INGEST_JOB).execute_in_process(
            instance=instance, run_config={"resources": config}, raise_on_error=False
        )
        failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        assert refusal in failure.step_failure_data.user_failure_data.description
    assert not evil.database_file.exists()


# ----------------------------------------------------------------------------- lineage from the files


def test_lineage_starts_at_the_landing_files(defs):
    graph = _graph(defs)
    landing = {key for key in graph.get_all_asset_keys() if key.path[0] == "landing"}
    assert {key.to_user_string() for key in landing} == {
        "landing/item_files", "landing/prediction_files", "landing/correction_files", "landing/review_files",
        "landing/gold_file"}
    for key in landing:
        node = graph.get(key)
        assert not node.is_materializable and node.description, key  # producers write them, not labelloop
    parents = {name: {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys}
               for name in ("items", "predictions", "raw_corrections", "review_decisions")}
    assert {"landing/item_files", "landing/gold_file"} <= parents["items"]
    assert "landing/prediction_files" in parents["predictions"]
    assert "landing/correction_files" in parents["raw_corrections"]
    assert "landing/review_files" in parents["review_decisions"]
    # The jobs materialize labelloop's assets only; the files are never in a run's selection.
    for job in defs.resolve_all_job_defs():
        assert not {k for k in job.asset_layer.selected_asset_keys if k.path[0] == "landing"}, job.name


# ----------------------------------------------------------------------------- freshness


def test_the_corpus_and_the_metrics_declare_how_fresh_they_should_be(defs):
    graph = _graph(defs)

    def windows(name):
        policy = graph.get(dg.AssetKey(name)).freshness_policy
        assert isinstance(policy, dg.FreshnessPolicy), name
        return policy.fail_window.to_timedelta(), policy.warn_window.to_timedelta()

    day = timedelta(days=1)
    assert windows("production_corpus") == (day, day / 2)
    assert windows("label_quality_metrics") == (day, day / 2)
    assert windows("label_quality_signals") == (7 * day, 2 * day)
    # A model is not expected on a clock: training follows label changes.
    assert graph.get(dg.AssetKey("retrained_model")).freshness_policy is None


# ----------------------------------------------------------------------------- column schemas


def _columns(defs, name: str) -> dict:
    schema = _graph(defs).get(dg.AssetKey(name)).metadata["dagster/column_schema"]
    return {column.name: column for column in schema.columns}


def test_the_gated_tables_show_their_pandera_columns_before_any_run(defs):
    from labelloop_assets.core import schemas

    labels = ("zero", "one", "two")
    for name, pandera in (("raw_corrections", schemas.raw_corrections_schema(labels)),
                          ("validated_labels", schemas.validated_labels_schema(labels)),
                          ("production_corpus", schemas.production_corpus_schema(labels))):
        shown = _columns(defs, name)
        assert list(shown) == list(pandera.columns), name  # the same columns, in the same order
        for column, rule in pandera.columns.items():
            assert shown[column].constraints.nullable == rule.nullable, (name, column)
            assert shown[column].constraints.unique == rule.unique, (name, column)
            assert shown[column].description, (name, column)
    corpus = _columns(defs, "production_corpus")
    assert corpus["item_id"].constraints.unique and not corpus["item_id"].constraints.nullable
    assert corpus["label"].constraints.other == ["a label of the ontology (ontology.yaml)"]
    assert corpus["since_version"].type == "int32" and corpus["since_version"].constraints.other == ["at least 1"]
    raw = _columns(defs, "raw_corrections")
    assert raw["original_label"].constraints.nullable
    assert raw["consent"].constraints.other == ["always True"]
    assert raw["user_role"].constraints.other == ["one of end_user, annotator, reviewer, domain_expert"]


# ----------------------------------------------------------------------------- checks on the clock


def _check_results(result: dg.ExecuteInProcessResult) -> dict:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}


def test_an_escalation_past_its_sla_fails_the_hourly_check_while_no_files_land(home, defs, instance):
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    land_items(home, make_items()[0])
    # Two against two on item-030: a tie the resolver escalates to a reviewer (48 hours SLA).
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction(f"e-{k}", "item-030", label, user=f"user{k}", role="end_user")
        for k, label in enumerate(["one", "one", "two", "two"])])
    ingest = defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    assert ingest.success
    assert _check_results(ingest)["escalations_within_sla"].passed  # it runs with its asset too
    # Three days pass and nothing lands: the escalation is now older than its SLA.
    with store.connect(home.database) as con:
        con.execute("UPDATE label_decisions SET decided_at = decided_at - INTERVAL 3 DAY WHERE item_id = 'item-030'")

    job = defs.resolve_job_def(SCHEDULED_CHECKS_JOB)
    checked = job.execute_in_process(instance=instance)
    assert checked.success
    assert not checked.get_asset_materialization_events()  # a check-only run: nothing rematerialized
    results = _check_results(checked)
    assert set(results) == {"escalations_within_sla", "no_held_bursts"}
    sla = results["escalations_within_sla"]
    assert not sla.passed and sla.severity == dg.AssetCheckSeverity.WARN
    assert sla.metadata["breached"].value == 1
    assert "esc-item-030-1" in sla.metadata["breached_escalations"].value
    assert results["no_held_bursts"].passed
    latest = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("escalations"), "escalations_within_sla"))
    assert latest.run_id == checked.run_id and latest.status.value == "FAILED"


def test_the_clock_checks_run_hourly(defs):
    schedule = defs.resolve_schedule_def("scheduled_checks_job_schedule")
    assert schedule.job_name == SCHEDULED_CHECKS_JOB
    assert schedule.cron_schedule == "7 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
