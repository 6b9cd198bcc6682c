"""Champion and challenger: every trained model must earn its promotion on the validation plan."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import store, train
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import RETRAIN_JOB
from labelloop_assets.sensors import _latest_metadata, retrain_decision
from labelloop_tests.conftest import RETRAIN, correction, give_keys, land_and_train, land_items, make_items, write_jsonl

# Each test trains and evaluates models through Dagster runs (5 to 10 s each).
pytestmark = pytest.mark.slow


def _rows(home, sql, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _run(defs, instance, job: str) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _evaluation(result) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key == dg.AssetKey("model_evaluation"):
            return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError("model_evaluation did not materialize")


def _new_corpus_version(home, defs, instance, tag: str) -> None:
    """A reviewer confirms two labels: a new corpus version (same data) for the next challenger."""
    write_jsonl(home.landing_dir("corrections"), f"{tag}.jsonl", [
        correction(f"{tag}-1", "item-020", "two", user="rita"),
        correction(f"{tag}-2", "item-021", "zero", user="rita"),
    ])
    _run(defs, instance, "ingest_job")


def _harmful_batch(home, defs, instance) -> None:
    """A reviewer account relabels every item of class 'one' as 'zero': a harmful batch that
    slipped past review. A model trained on it cannot recognize 'one'."""
    ones = [f"item-{i:03d}" for i in range(15, 60) if i % 3 == 1]
    write_jsonl(home.landing_dir("corrections"), "harm.jsonl", [
        correction(f"harm-{k}", item, "zero", user="rita") for k, item in enumerate(ones)
    ])
    _run(defs, instance, "ingest_job")


@pytest.fixture
def loop(trained_world, home, defs, instance):
    """Items landed, ingest_job and retrain_job (m0001 promoted); its result. Built once for the
    module (conftest.TrainedWorld): `home` and `instance` are a fresh copy of it for each test."""
    if trained_world is not None:
        return trained_world.trained
    return land_and_train(home, defs, instance)[1]


def test_the_first_model_is_promoted_and_the_pointer_follows(home, loop):
    evaluation = _evaluation(loop)
    assert (evaluation["decision"], evaluation["champion"]) == ("promote", "m0001")
    assert train.current_version(home.models) == "m0001"
    assert _rows(home, "SELECT status FROM models")["status"].to_list() == ["champion"]
    row = _rows(home, "SELECT champion, decision, plan, confirm_below FROM model_evaluations").row(0, named=True)
    assert row["champion"] is None and row["decision"] == "promote" and '"tolerance": 0.005' in row["plan"]
    assert 0 < row["confirm_below"] < 1
    audit = _rows(home, "SELECT action, target, outcome FROM audit_log WHERE action LIKE 'model.%'")
    assert audit.rows() == [("model.promote", "m0001", "promoted")]


def test_a_challenger_that_fails_the_plan_is_rejected_and_the_champion_stays(home, defs, instance, loop):
    _harmful_batch(home, defs, instance)
    result = _run(defs, instance, RETRAIN_JOB)
    evaluation = _evaluation(result)
    assert (evaluation["decision"], evaluation["challenger"], evaluation["champion"]) == ("reject", "m0002", "m0001")
    assert train.current_version(home.models) == "m0001"
    statuses = dict(_rows(home, "SELECT model_version, status FROM models").iter_rows())
    assert statuses == {"m0001": "champion", "m0002": "rejected"}
    reasons = _rows(home, "SELECT reasons FROM model_evaluations WHERE challenger = 'm0002'")["reasons"][0].to_list()
    assert "recall of 'one' is 0.000, under its floor 0.50" in reasons
    assert any(r.startswith("accuracy fell from 1.0000") for r in reasons)
    assert _rows(home, "SELECT count(*) AS n FROM audit_log WHERE action = 'model.reject'")["n"][0] == 1
    # The metrics report the champion, not the newest model.
    metrics = _rows(home, "SELECT model_version FROM label_quality_metrics ORDER BY computed_at DESC LIMIT 1")
    assert metrics["model_version"][0] == "m0001"


def _failure(result) -> str:
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    data = failure.step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def test_a_weaker_configuration_is_rejected_once_and_the_shipped_one_then_promoted(home, defs, instance, loop):
    shipped = home.training_file.read_text()
    home.training_file.write_text("params:\n  C: 0.0005\n")
    _new_corpus_version(home, defs, instance, "v2")
    weak = _evaluation(_run(defs, instance, RETRAIN_JOB))
    assert (weak["decision"], weak["challenger"]) == ("reject", "m0002")
    reasons = _rows(home, "SELECT reasons FROM model_evaluations WHERE challenger = 'm0002'")["reasons"][0]
    assert any(r.startswith("calibration_error rose from") for r in reasons)
    notes = (home.reports / "release-notes" / "m0002.md").read_text()
    assert ("Trained with StandardScaler() -> LogisticRegression(C=0.0005, max_iter=2000); the champion with "
            "StandardScaler() -> LogisticRegression(C=0.1, max_iter=2000).") in notes
    assert json.loads(_rows(home, "SELECT params FROM models WHERE model_version = 'm0002'")["params"][0]) == {
        "input": "features", "preset": "logistic_regression",
        "steps": [{"StandardScaler": {}}, {"LogisticRegression": {"C": 0.0005, "max_iter": 2000}}],
    }
    # One training per corpus version: the sensor does not retry a rejected version.
    run_key, reason = retrain_decision(
        _latest_metadata(instance, "production_corpus"), _latest_metadata(instance, "retrained_model"),
        RETRAIN, now=1e12,
    )
    assert run_key is None and "already trained on corpus v2" in reason
    # The same version under the shipped configuration is a new challenger, and it is promoted.
    home.training_file.write_text(shipped)
    restored = _evaluation(_run(defs, instance, RETRAIN_JOB))
    assert (restored["decision"], restored["challenger"]) == ("promote", "m0003")
    assert ("Trained with StandardScaler() -> LogisticRegression(C=0.1, max_iter=2000) (unchanged)."
            in (home.reports / "release-notes" / "m0003.md").read_text())
    assert train.current_version(home.models) == "m0003"


def test_a_failed_evaluation_fails_the_run_and_leaves_the_champion(home, defs, instance, loop):
    (home.models / "m0001" / "model.skops").write_bytes(b"not a model")  # the champion's file is damaged
    _new_corpus_version(home, defs, instance, "v2")
    result = defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    assert "evaluation of m0002 failed" in _failure(result) and "the champion is untouched" in _failure(result)
    assert train.current_version(home.models) == "m0001"
    statuses = dict(_rows(home, "SELECT model_version, status FROM models").iter_rows())
    assert statuses == {"m0001": "champion", "m0002": "challenger"}


def test_too_few_rows_to_train_fails_with_the_counts_and_writes_no_model(home, defs, instance):
    home.training_file.write_text("min_train_rows: 20\n")
    records, _ = make_items(n=25, n_gold=15)  # 10 labelled items
    land_items(home, records)
    _run(defs, instance, "ingest_job")
    result = defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    assert "corpus v1 has 10 labelled item(s)" in _failure(result)
    assert "training needs at least 20 items (training.yaml min_train_rows)" in _failure(result)
    assert _rows(home, "SELECT count(*) AS n FROM models")["n"][0] == 0
    assert train.current_version(home.models) is None


def test_a_wrong_plan_fails_the_step_and_leaves_the_champion(home, defs, instance, loop):
    home.validation_file.write_text("tolerance: lots\n")
    _new_corpus_version(home, defs, instance, "v2")
    result = defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "validation file" in failure.step_failure_data.error.message
    assert train.current_version(home.models) == "m0001"
    # Training reads the plan too (its gold_copy_distance keeps copies of gold out): nothing trained.
    assert failure.step_key == "retrained_model"
    assert _rows(home, "SELECT model_version FROM models")["model_version"].to_list() == ["m0001"]


def test_rollback_restores_a_retired_champion_and_is_audited(home, defs, instance, loop, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    give_keys(home, "reviewer-0")
    _new_corpus_version(home, defs, instance, "v2")
    assert _evaluation(_run(defs, instance, RETRAIN_JOB))["decision"] == "promote"
    assert train.current_version(home.models) == "m0002"

    assert cli.main(["model", "list", "--json"]) == 0
    listed = {m["model_version"]: m for m in __import__("json").loads(capsys.readouterr().out)}
    assert (listed["m0001"]["status"], listed["m0002"]["status"]) == ("retired", "champion")
    assert listed["m0002"]["decision"] == "promote" and listed["m0001"]["train_data_hash"]

    # Refused, with the reason, and audited: a non-reviewer, an unknown version, the champion itself.
    assert cli.main(["model", "rollback", "m0001", "--rationale", "x", "--as", "intern-7"]) == 3
    assert cli.main(["model", "rollback", "m0042", "--rationale", "x", "--as", "reviewer-0"]) == 3
    assert cli.main(["model", "rollback", "m0002", "--rationale", "x", "--as", "reviewer-0"]) == 3
    errors = capsys.readouterr().err
    assert "not a reviewer" in errors and "no model 'm0042'" in errors and "already the champion" in errors
    assert train.current_version(home.models) == "m0002"

    assert cli.main(["model", "rollback", "m0001", "--rationale", "m0002 confuses ones", "--as", "reviewer-0"]) == 0
    assert train.current_version(home.models) == "m0001"
    statuses = dict(_rows(home, "SELECT model_version, status FROM models").iter_rows())
    assert statuses == {"m0001": "champion", "m0002": "retired"}
    audit = _rows(home, "SELECT target, outcome, reason FROM audit_log WHERE action = 'model.rollback' "
                        "ORDER BY logged_at")
    assert audit.rows()[-1] == ("m0001", "rolled_back", "m0002 confuses ones")
    assert [r[1] for r in audit.rows()] == ["refused", "refused", "refused", "rolled_back"]
    # The rollback was signed with reviewer-0's key; the audit row names the key and keeps the signature.
    detail = json.loads(_rows(home, "SELECT detail FROM audit_log WHERE outcome = 'rolled_back'")["detail"][0])
    assert detail["from"] == "m0002" and detail["key_id"].startswith("ed25519:") and len(detail["signature"]) == 88


def test_a_home_moved_elsewhere_still_finds_its_models(home, instance, loop, tmp_path, monkeypatch, capsys):
    """The registry records model folders relative to the home: a moved or restored home works,
    and so do rows written before, which hold the absolute folder of the home's old place."""
    assert _rows(home, "SELECT path FROM models")["path"].to_list() == ["models/m0001"]
    give_keys(home, "reviewer-0")  # registered in the home, so it moves with it; the key stays outside
    assert _rows(home, "SELECT path FROM release_notes")["path"].to_list() == ["reports/release-notes/m0001.md"]
    with store.connect(home.database) as con:
        con.execute("UPDATE models SET path = ?", [str(home.models / "m0001")])
    moved = Home(home.root.rename(tmp_path / "restored-home"))
    moved_defs = build_definitions(moved, RETRAIN)
    _new_corpus_version(moved, moved_defs, instance, "v2")
    # The evaluation loads the champion, and a rollback checks a model's files, at the new place.
    assert _evaluation(_run(moved_defs, instance, RETRAIN_JOB))["decision"] == "promote"
    monkeypatch.setenv("LABELLOOP_HOME", str(moved.root))
    assert cli.main(["model", "rollback", "m0001", "--rationale", "moved", "--as", "reviewer-0"]) == 0, (
        capsys.readouterr().err)
    assert train.current_version(moved.models) == "m0001"


def test_a_rejected_model_cannot_be_rolled_back_to(home, defs, instance, loop, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    give_keys(home, "reviewer-0")
    _harmful_batch(home, defs, instance)
    assert _evaluation(_run(defs, instance, RETRAIN_JOB))["decision"] == "reject"
    assert cli.main(["model", "rollback", "m0002", "--rationale", "x", "--as", "reviewer-0"]) == 3
    assert "m0002 is rejected: only a retired champion can be restored" in capsys.readouterr().err
    assert train.current_version(home.models) == "m0001"


def test_release_notes_explain_a_rejection_and_blame_the_harmful_group(home, defs, instance, loop):
    _harmful_batch(home, defs, instance)
    _run(defs, instance, RETRAIN_JOB)
    notes = _rows(home, "SELECT challenger, decision, n_label_changes, attribution, markdown, path "
                        "FROM release_notes ORDER BY evaluation_id")
    assert notes["challenger"].to_list() == ["m0001", "m0002"]
    first, second = notes.row(0, named=True), notes.row(1, named=True)
    assert first["decision"] == "promote" and "# m0001: promoted (first model)" in first["markdown"]
    assert second["decision"] == "reject" and second["n_label_changes"] == 15
    text = second["markdown"]
    assert "# m0002: rejected against m0001" in text
    assert "recall of 'one' is 0.000, under its floor 0.50" in text
    assert "**By source:** annotation 15" in text and "**By label set:** zero 15" in text
    assert "**Classes that got worse:** one" in text
    # Removing the harmful group makes the model better: its benefit is negative.
    attribution = {row["group"]: row for row in __import__("json").loads(second["attribution"])}
    assert attribution["source annotation"]["benefit"] < 0
    assert attribution["source annotation"]["accuracy_without"] == pytest.approx(1.0)
    assert (home.reports / "release-notes" / "m0002.md").read_text() == text
