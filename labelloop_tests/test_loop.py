"""The loop through Dagster: assets materialized on a real instance over a real DuckDB file."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from labelloop_assets.core import store, train
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, write_jsonl

ALL = ["items", "predictions", "raw_corrections", "validated_labels", "production_corpus",
       "retrained_model", "model_evaluation", "label_quality_metrics"]


def _assets(defs: dg.Definitions, names: list[str]):
    graph = defs.resolve_asset_graph()
    return [graph.get(dg.AssetKey(n)).assets_def for n in names]


def _materialize(defs, instance, names=ALL, **kwargs) -> dg.ExecuteInProcessResult:
    selection = dg.AssetSelection.assets(*names)
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance, asset_selection=list(selection.resolve(defs.resolve_asset_graph())),
        **kwargs,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = [
        e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
        if e.step_materialization_data.materialization.asset_key == dg.AssetKey(asset)
    ]
    assert events, f"{asset} was not materialized"
    return {k: v.value for k, v in events[-1].metadata.items()}


def _rows(home, sql, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def test_first_run_builds_corpus_model_and_metrics(home, defs, instance):
    records, truth = make_items()
    land_items(home, records)

    result = _materialize(defs, instance)

    assert result.success
    items = _metadata(result, "items")
    # The 15 gold items are declared in gold.jsonl (evaluation set 1); 45 items landed.
    assert (items["accepted"], items["evaluation_set"], items["n_gold"]) == (45, 1, 15)
    corpus = _metadata(result, "production_corpus")
    assert corpus["corpus_version"] == 1
    assert corpus["dagster/row_count"] == 45  # gold items never enter the corpus
    model = _metadata(result, "retrained_model")
    assert model["model_version"] == "m0001"
    assert model["n_gold"] == 15 and model["gold_accuracy"] == pytest.approx(1.0)
    folder = home.models / "m0001"
    loaded, metadata = train.load(folder)
    assert metadata["corpus_version"] == 1 and metadata["n_train_rows"] == 45
    assert train.current_version(home.models) == "m0001"
    metrics = _metadata(result, "label_quality_metrics")
    assert metrics["model_gold_accuracy"] == pytest.approx(1.0)
    assert metrics["coverage"] == 0.0  # nothing human-confirmed yet
    # Asking again for a model of the same corpus version reuses it: one training per version.
    again = _materialize(defs, instance, ["retrained_model"])
    assert _metadata(again, "retrained_model")["model_version"] == "m0001"
    assert _metadata(again, "retrained_model")["reused"] is True
    assert _rows(home, "SELECT count(*) AS n FROM models")["n"][0] == 1


@pytest.mark.slow
def test_corrections_flow_to_a_new_corpus_version_with_lineage(home, defs, instance):
    records, _ = make_items()
    land_items(home, records)
    assert _materialize(defs, instance).success
    write_jsonl(home.landing_dir("predictions"), "p1.jsonl", [{
        "prediction_id": "p-1", "item_id": "item-030", "model_version": "m0001",
        "predicted_label": "zero", "confidence": 0.55, "served_at": "2026-03-02T09:00:00Z",
    }])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        # item-030 is a "zero" in the corpus; a reviewer says "one" and explains why.
        correction("e-1", "item-030", "one", user="ann@corp.example", role="reviewer",
                   prediction_id="p-1", rationale="stroke is vertical, ask ann@corp.example"),
        # A lone end user cannot flip a label.
        correction("e-2", "item-033", "two", user="bob", role="end_user"),
        # Rows without consent never reach training.
        correction("e-3", "item-036", "two", user="carol", role="annotator", consent=False),
        "{not json",
    ])

    result = _materialize(defs, instance, ["predictions", "raw_corrections", "validated_labels",
                                           "production_corpus", "label_quality_metrics"])

    assert result.success
    raw = _metadata(result, "raw_corrections")
    assert (raw["records_in"], raw["accepted"], raw["quarantined"]) == (4, 2, 2)
    staged = _metadata(result, "validated_labels")
    assert (staged["promote"], staged["pending"]) == (1, 1)
    corpus = _metadata(result, "production_corpus")
    assert corpus["corpus_version"] == 2 and corpus["label_changes_this_run"] == 1
    current = _rows(home, "SELECT label, human_confirmed, since_version FROM production_corpus "
                          "WHERE item_id IN ('item-030', 'item-033', 'item-036') ORDER BY item_id")
    assert current.rows() == [("one", True, 2), ("zero", False, 1), ("zero", False, 1)]
    lineage = _rows(home, "SELECT * FROM label_lineage WHERE item_id = 'item-030'")
    assert lineage.height == 1
    row = lineage.row(0, named=True)
    assert row["event_id"] == "e-1" and row["previous_label"] == "zero"
    assert row["corrected_model_version"] == "m0001" and row["predicted_label"] == "zero"
    assert row["user_pseudonym"].startswith("u_") and "ann@" not in row["rationale"]
    assert row["models_trained_with_label"] is None or row["models_trained_with_label"] == []
    quarantine = _rows(home, "SELECT reason FROM quarantined_corrections ORDER BY reason")
    assert quarantine["reason"].to_list() == ["malformed_json", "no_consent"]


@pytest.mark.slow
def test_repeated_runs_and_repeated_files_add_nothing(home, defs, instance):
    records, _ = make_items()
    land_items(home, records)
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one")])
    assert _materialize(defs, instance).success
    before = _rows(home, "SELECT (SELECT count(*) FROM raw_corrections) AS raw, "
                         "(SELECT count(*) FROM label_history) AS history, "
                         "(SELECT count(*) FROM corpus_versions) AS versions")

    again = _materialize(defs, instance, [a for a in ALL if a != "retrained_model"])
    assert again.success
    assert _metadata(again, "raw_corrections")["files_ingested"] == 0
    assert not _metadata(again, "production_corpus")["new_version_published"]
    # The same events re-sent under a new file name are recognized as replays.
    write_jsonl(home.landing_dir("corrections"), "c1-resent.jsonl", [correction("e-1", "item-030", "one")])
    resent = _materialize(defs, instance, ["raw_corrections", "validated_labels", "production_corpus"])
    assert _metadata(resent, "raw_corrections")["quarantined"] == 1
    after = _rows(home, "SELECT (SELECT count(*) FROM raw_corrections) AS raw, "
                        "(SELECT count(*) FROM label_history) AS history, "
                        "(SELECT count(*) FROM corpus_versions) AS versions")
    assert after.rows() == before.rows()


@pytest.mark.slow
def test_failing_blocking_check_stops_everything_downstream(home, defs, instance):
    records, _ = make_items()
    land_items(home, records)
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "two")])
    assert _materialize(defs, instance, ["items", "raw_corrections"]).success
    # The ontology drops "two" with no rename: the staged correction now breaks the schema.
    original = home.ontology_file.read_text()
    home.ontology_file.write_text("labels: [zero, one, three]\nrenames: {}\n")

    result = _materialize(
        defs, instance, ["validated_labels", "production_corpus", "retrained_model"],
        raise_on_error=False,
    )

    assert not result.success
    checks = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }
    failed = checks["validated_labels_schema"]
    assert not failed.passed
    assert "corrected_label" in failed.metadata["failing_rules"].value
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "production_corpus" not in materialized and "retrained_model" not in materialized
    assert _rows(home, "SELECT count(*) AS n FROM validated_labels")["n"][0] == 0

    home.ontology_file.write_text(original)  # fixed: the held batch flows on the next run
    fixed = _materialize(defs, instance, ["validated_labels", "production_corpus"])
    assert fixed.success
    assert _metadata(fixed, "production_corpus")["label_changes_this_run"] == 1


def test_bad_ontology_fails_with_a_clear_message(home, defs, instance):
    home.ontology_file.write_text("labels: [a, b]\nrenames: {c: d}\n")
    land_items(home, make_items()[0])
    result = _materialize(defs, instance, ["items"], raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE][0]
    assert "rename 'c' -> 'd' does not end at a current label" in failure.step_failure_data.error.message


def test_definitions_load_with_descriptions_groups_and_pools(home):
    defs = build_definitions(home, RETRAIN)
    graph = defs.resolve_asset_graph()
    groups = {k.path[-1]: graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {
        "items": "ingest", "predictions": "ingest", "raw_corrections": "ingest",
        "review_decisions": "ingest", "validated_labels": "curation",
        "production_corpus": "curation", "escalations": "curation",
        "label_quality_metrics": "monitoring", "published_views": "monitoring",
        "retrained_model": "training", "contributor_reliability": "training",
        "correction_bursts": "curation", "label_issue_candidates": "monitoring",
        "guideline_report": "monitoring", "label_quality_signals": "monitoring", "review_tasks": "monitoring",
        "model_evaluation": "training", "release_notes": "training",
        "store_maintenance": "maintenance",
        # The landing zone, as external assets the ingest assets depend on.
        "item_files": "landing", "prediction_files": "landing", "correction_files": "landing",
        "review_files": "landing", "gold_file": "landing",
    }
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and "\n" not in node.description.strip()
        # Every step shares the DuckDB pool; the landing files are written by producers, not steps.
        assert node.pools == {"duckdb"} if node.is_materializable else key.path[0] == "landing"
    blocking = {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert blocking == {"validated_labels_schema", "production_corpus_schema",
                        "raw_corrections_counts_reconcile"}
    json.dumps([s.name for s in defs.sensors])


def test_shipped_samples_run_through_the_whole_loop(tmp_path, instance):
    """The README's walk-through, as a new user follows it: a new home (nobody granted anything),
    the sample landing files, and the samples' gold, directory and training files copied in."""
    import shutil
    from pathlib import Path

    samples = Path(__file__).resolve().parent.parent / "data" / "samples"
    home = Home(tmp_path / "home").ensure()
    shutil.copytree(samples / "landing", home.landing, dirs_exist_ok=True)
    for name in ("gold.jsonl", "contributors.yaml", "training.yaml"):
        shutil.copyfile(samples / name, home.root / name)

    result = _materialize(build_definitions(home, RETRAIN), instance)

    assert result.success
    raw = _metadata(result, "raw_corrections")
    assert (raw["records_in"], raw["accepted"], raw["quarantined"]) == (6, 3, 3)
    assert _metadata(result, "predictions")["accepted"] == 2  # baseline-v1 is declared
    corpus = _metadata(result, "production_corpus")
    assert (corpus["dagster/row_count"], corpus["label_changes_total"]) == (9, 1)
    labels = dict(_rows(home, "SELECT item_id, label FROM production_corpus").iter_rows())
    # kim is a reviewer in the samples' contributors.yaml: that correction counts. Two end users
    # nobody has seen before (dana, eli) are newcomers, whose agreeing votes (2 x 0.25) leave
    # sample-04 pending.
    assert labels["sample-04"] == "two" and labels["sample-07"] == "zero"
    decisions = dict(_rows(home, "SELECT item_id, status FROM latest_label_decisions").iter_rows())
    assert decisions["sample-04"] == "pending"
    assert _metadata(result, "retrained_model")["n_gold"] == 3


def test_ontology_rename_migrates_stored_labels_and_a_dropped_label_holds_training(
    home, defs, instance
):
    records, _ = make_items()
    land_items(home, records)
    assert _materialize(defs, instance).success
    n_two = _rows(home, "SELECT count(*) AS n FROM production_corpus WHERE label = 'two'")["n"][0]
    assert n_two == 15

    # "two" becomes "deux": stored labels follow in a new corpus version, traceably.
    home.ontology_file.write_text("labels: [zero, one, deux]\nrenames: {two: deux}\n")
    renamed = _materialize(defs, instance, ["production_corpus"])
    assert renamed.success
    assert _metadata(renamed, "production_corpus")["corpus_version"] == 2
    history = _rows(home, "SELECT change_kind, approved_by, previous_label, label FROM label_history "
                          "WHERE corpus_version = 2")
    assert history.height == n_two
    assert set(history.rows()) == {("rename", "ontology:renames", "two", "deux")}
    assert _rows(home, "SELECT count(*) AS n FROM production_corpus WHERE label = 'deux'")["n"][0] == n_two

    # "one" dropped with no rename: the corpus check fails and no model trains on it.
    home.ontology_file.write_text("labels: [zero, deux]\nrenames: {two: deux}\n")
    held = _materialize(defs, instance, ["production_corpus", "retrained_model"], raise_on_error=False)
    assert not held.success
    materialized = {e.asset_key.path[-1] for e in held.get_asset_materialization_events()}
    assert "retrained_model" not in materialized


def test_a_changed_pseudonymization_key_is_refused(home, defs, instance, monkeypatch):
    records, _ = make_items()
    land_items(home, records)
    monkeypatch.setenv("LABELLOOP_SECRET", "KaqWilIXlyK0_QhDb_kgAY42zHjcylg9JwCqjpgv5e4")
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl",
                [correction("e-1", "item-030", "one", user="zed", role="end_user")])
    assert _materialize(defs, instance, ["items", "raw_corrections"]).success

    monkeypatch.setenv("LABELLOOP_SECRET", "OSIU6DsezO7acN7CueZskuQGTgJ9jywsR1Y9EEVQHYc")
    write_jsonl(home.landing_dir("corrections"), "c2.jsonl",
                [correction("e-2", "item-030", "one", user="zed", role="end_user")])
    result = _materialize(defs, instance, ["raw_corrections"], raise_on_error=False)

    assert not result.success
    failure = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE][0]
    assert "LABELLOOP_SECRET is not the key" in failure.step_failure_data.error.message
    assert _rows(home, "SELECT count(*) AS n FROM raw_corrections")["n"][0] == 1
