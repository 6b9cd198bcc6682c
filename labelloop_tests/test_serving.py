"""The serving handoff: `labelloop model current` and `labelloop_assets.serving` load the champion the
loop promoted, predict as the loop's own model does, and land prediction logs the next ingest accepts."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from labelloop_assets import cli, serving
from labelloop_assets.core import store, train
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import RETRAIN_JOB
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, prepared_home, set_yaml, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two homes trained through real Dagster runs, shared by the module (about 20 s in all).
pytestmark = pytest.mark.slow


def _rows(home: Home, sql: str, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _run(home: Home, job: str) -> None:
    with dg.instance_for_test() as instance:
        result = build_definitions(home, RETRAIN).resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]


def _trained_home(root: Path, min_eval_items: int) -> Home:
    """Items landed, ingested and a first model trained and judged by the validation plan. No
    external model versions are declared: a prediction log is accepted only for a model the loop trained."""
    home = prepared_home(root)
    home.training_file.write_text(
        "".join(line + "\n" for line in home.training_file.read_text().splitlines()
                if not line.startswith("external_model_versions"))
    )
    set_yaml(home.validation_file, {"min_eval_items": min_eval_items})
    land_items(home, make_items()[0])
    _run(home, "ingest_job")
    _run(home, RETRAIN_JOB)
    return home


@pytest.fixture(scope="module")
def champion_home(tmp_path_factory) -> Home:
    """m0001 promoted on the 15 gold items (the plan asks for 10)."""
    return _trained_home(tmp_path_factory.mktemp("serving") / "home", min_eval_items=10)


@pytest.fixture
def own_home(champion_home: Home, tmp_path: Path, monkeypatch) -> Home:
    """A copy of the champion's home this test may change; LABELLOOP_HOME points at it."""
    home = Home(tmp_path / "home")
    shutil.copytree(champion_home.root, home.root)
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    return home


def _features(home: Home, item_ids: list[str]) -> np.ndarray:
    frame = _rows(home, "SELECT item_id, features FROM items WHERE item_id IN ? ORDER BY item_id", [item_ids])
    assert frame["item_id"].to_list() == sorted(item_ids)
    return train.features_matrix(frame)


def test_model_current_names_the_registry_champion(champion_home, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(champion_home.root))
    assert cli.main(["model", "current", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    row = _rows(champion_home, "SELECT * FROM models WHERE status = 'champion'").row(0, named=True)
    assert set(shown) == {"model_version", "path", "corpus_version", "trained_at", "classes", "reads", "pipeline",
                          "feature_length", "confirm_below", "gold_metrics", "trainer", "reference", "command"}
    assert (shown["trainer"], shown["reference"], shown["command"]) == ("built-in", None, None)
    assert shown["model_version"] == row["model_version"] == train.current_version(champion_home.models) == "m0001"
    assert Path(shown["path"]) == champion_home.root / row["path"]
    assert (Path(shown["path"]) / "model.skops").is_file()
    assert shown["reads"] == "features" and shown["pipeline"].startswith("StandardScaler() -> LogisticRegression(")
    assert shown["corpus_version"] == row["corpus_version"]
    assert datetime.fromisoformat(shown["trained_at"]) == row["trained_at"]
    assert sorted(shown["classes"]) == ["one", "two", "zero"] and shown["feature_length"] == 4
    assert shown["confirm_below"] == pytest.approx(row["confirm_below"]) and 0 < shown["confirm_below"] < 1
    assert shown["gold_metrics"] == {"accuracy": pytest.approx(row["gold_accuracy"]),
                                     "macro_f1": pytest.approx(row["gold_macro_f1"]), "n_gold": 15}

    assert cli.main(["model", "current"]) == 0
    text = capsys.readouterr().out
    assert "champion m0001" in text and "confirm_below" in text
    assert "reads:         features (4 numbers per item)" in text


def test_the_champion_predicts_what_the_loops_model_predicts(champion_home):
    champion = serving.Champion.load(champion_home.root)
    reference, _ = train.load(champion.folder)
    item_ids = [f"item-{i:03d}" for i in range(20, 40)]
    features = _features(champion_home, item_ids)

    assert np.allclose(champion.predict_proba(features), reference.predict_proba(features))
    labels, confidences = champion.predict(features)
    assert labels == reference.predict(features).tolist()
    assert np.allclose(confidences, reference.predict_proba(features).max(axis=1))
    assert champion.classes == reference.classes.tolist() and champion.is_current()
    # One item alone, as a plain list, is one row.
    assert champion.predict(features[0].tolist())[0] == labels[:1]
    assert [champion.needs_review(c) for c in confidences] == [c < champion.confirm_below for c in confidences]

    with pytest.raises(serving.ServingError, match="item 0: features must be 4 numbers"):
        champion.predict([[1.0, 2.0, 3.0]])
    with pytest.raises(serving.ServingError, match="finite"):
        champion.predict([[1.0, float("nan"), 3.0, 4.0]])
    assert champion.prediction_records([], []) == []
    with pytest.raises(serving.ServingError, match="2 item ids for 3 items"):
        champion.prediction_records(["item-020", "item-021"], features[:3])


def test_a_landed_prediction_log_is_accepted_by_the_next_ingest(own_home):
    champion = serving.Champion.load()  # LABELLOOP_HOME
    item_ids = [f"item-{i:03d}" for i in range(20, 26)]
    records = champion.prediction_records(item_ids, _features(own_home, item_ids),
                                          served_at=datetime(2026, 3, 1, 9, 30, tzinfo=UTC))
    path = serving.write_prediction_log(own_home.root, records, name="served-1.jsonl")
    assert path == own_home.landing_dir("predictions") / "served-1.jsonl"
    assert [p.name for p in path.parent.iterdir()] == ["served-1.jsonl"]  # no temp file left behind
    with pytest.raises(serving.ServingError, match="exists already"):
        serving.write_prediction_log(own_home.root, records, name="served-1.jsonl")
    with pytest.raises(serving.ServingError, match="plain file name ending in .jsonl"):
        serving.write_prediction_log(own_home.root, records, name="../items/x.jsonl")
    # A user corrects the first prediction, naming it and the model that served it.
    first = records[0]
    write_jsonl(own_home.landing_dir("corrections"), "fix.jsonl", [correction(
        "fix-1", first["item_id"], "two" if first["predicted_label"] != "two" else "one", user="rita",
        prediction_id=first["prediction_id"], model_version=first["model_version"],
        original_label=first["predicted_label"])])
    _run(own_home, "ingest_job")

    assert _rows(own_home, "SELECT kind, reason, detail FROM quarantine").rows() == []
    landed = _rows(own_home, "SELECT prediction_id, item_id, model_version, predicted_label, confidence "
                   "FROM predictions ORDER BY item_id")
    assert landed.rows() == [(r["prediction_id"], r["item_id"], "m0001", r["predicted_label"],
                              pytest.approx(r["confidence"])) for r in records]
    # Curation joined the correction to the prediction it names, with the model that served it.
    vote = _rows(own_home, "SELECT item_id, prediction_found, predicted_label, model_version FROM validated_labels "
                 "WHERE event_id = 'fix-1'")
    assert vote.rows() == [(first["item_id"], True, first["predicted_label"], "m0001")]


def test_no_champion_exits_1_with_the_latest_evaluations_reason(tmp_path, monkeypatch, capsys):
    home = _trained_home(tmp_path / "home", min_eval_items=30)  # the shipped plan: 30 gold items
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    assert cli.main(["model", "current", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no champion yet: m0001 rejected: only 15 evaluation items; the plan needs 30" in captured.err
    with pytest.raises(serving.NoChampion, match="m0001 rejected"):
        serving.Champion.load(home)
    with pytest.raises(serving.ServingError, match="m0001 is rejected: only a champion or a retired champion"):
        serving.Champion.load(home, version="m0001")


def test_a_pinned_version_loads_and_an_unknown_one_is_refused(champion_home):
    assert serving.Champion.load(champion_home, version="m0001").version == "m0001"
    with pytest.raises(serving.ServingError, match="no model 'm0042' in the registry"):
        serving.Champion.load(champion_home, version="m0042")


def _refused(capsys, *messages: str) -> None:
    assert cli.main(["model", "current"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(message in err for message in messages), err
    with pytest.raises(serving.ServingError) as raised:
        serving.Champion.load()
    assert all(message in str(raised.value) for message in messages)


def test_a_tampered_metadata_file_is_refused(own_home, capsys):
    metadata_file = own_home.models / "m0001" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "corpus_version": metadata["corpus_version"] + 7}))
    _refused(capsys, "metadata.json", "does not match the registry", "corpus_version")
    metadata_file.write_text("{not json")
    _refused(capsys, "metadata.json", "not readable JSON")


def test_a_missing_or_unsafe_model_file_is_refused(own_home, capsys):
    model_file = own_home.models / "m0001" / "model.skops"
    saved = model_file.read_bytes()
    model_file.unlink()
    _refused(capsys, "m0001: model.skops is missing")
    # Another file in its place (here the same bytes, one appended): its SHA-256 is not the recorded one.
    model_file.write_bytes(saved + b"\0")
    _refused(capsys, "model.skops", "not the file its metadata.json describes")
    # Another file with metadata.json rewritten to match it: the registry's hash still refuses it.
    model_file.write_bytes(b"not a zip")
    metadata_file = own_home.models / "m0001" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "model_file_sha256": hashlib.sha256(b"not a zip").hexdigest()}))
    _refused(capsys, "m0001: the model in", "is not the file the registry recorded")


def test_a_pointer_that_disagrees_with_the_registry_is_refused(own_home, capsys):
    train.set_current(own_home.models, "m0042")
    _refused(capsys, "models/CURRENT names 'm0042' but the registry's champion is m0001")
    (own_home.models / train.CURRENT_POINTER).unlink()
    _refused(capsys, "models/CURRENT is missing but the registry's champion is m0001")


def test_the_documented_serving_script_runs_and_its_log_is_accepted(own_home, tmp_path, capsys):
    """docs/serving.md's example, run as written against a real home."""
    page = (REPO_ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    script = next(block for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "def serve(" in block)
    item_ids = [f"item-{i:03d}" for i in range(15, 60)]
    features = _features(own_home, item_ids)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"item_id": i, "features": f.tolist()}) + "\n"
                                for i, f in zip(item_ids, features, strict=True)))
    namespace = {"__name__": "serve_batch"}
    exec(compile(script, "serve_batch.py", "exec"), namespace)
    records, to_review = namespace["serve"](str(requests))

    threshold = serving.Champion.load().confirm_below
    assert [r["item_id"] for r in records] == item_ids
    assert to_review == [r for r in records if r["confidence"] < threshold]
    assert f"m0001: {len(item_ids)} predictions, {len(to_review)} to review" in capsys.readouterr().out
    _run(own_home, "ingest_job")
    assert _rows(own_home, "SELECT count(*) AS n FROM quarantine")["n"].item() == 0
    assert _rows(own_home, "SELECT count(*) AS n FROM predictions WHERE model_version = 'm0001'")["n"].item() == 45
