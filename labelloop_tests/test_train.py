"""core/train.py (fit, the default pipeline, save/load) on scikit-learn's digits, and core/metrics.py."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import polars as pl
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from labelloop_assets.core import metrics, store, train
from labelloop_assets.core.files import path_sha256
from labelloop_assets.core.pipelines import preset_spec

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


@pytest.fixture(scope="module")
def digits():
    features, target = load_digits(return_X_y=True)
    return features.astype(np.float64), NAMES[target]


@pytest.fixture(scope="module")
def fitted(digits):
    features, labels = digits
    model = train.fit(features, labels)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(features, labels)
    return model, reference


def sklearn_pipeline(features, labels):
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(features, labels)


# --------------------------------------------------------------------------- fit / predict


def test_predict_proba_equals_sklearn_pipeline(digits, fitted):
    features, _ = digits
    model, reference = fitted
    ours, theirs = model.predict_proba(features), reference.predict_proba(features)
    assert ours.shape == theirs.shape == (1797, 10)
    assert np.max(np.abs(ours - theirs)) < 1e-8
    assert np.allclose(ours.sum(axis=1), 1.0)
    assert list(model.classes) == list(reference.classes_) == sorted(NAMES)
    assert (model.predict(features) == reference.predict(features)).all()


def test_the_default_for_features_is_scaled_logistic_regression(fitted):
    model, _ = fitted
    assert model.spec.algorithm == "standard_scaler+logistic_regression"
    assert model.spec.input == "features" and model.feature_length == 64
    final = model.pipeline[-1]
    assert (final.C, final.max_iter) == (0.1, 2000)
    assert final.coef_.shape == (10, 64) and np.isfinite(final.coef_).all()
    assert model.classes.dtype.kind == "U"


def test_model_is_accurate_on_held_out_digits(digits):
    features, labels = digits
    model = train.fit(features[::2], labels[::2])
    scores = train.evaluate(model, features[1::2], labels[1::2])
    assert scores["accuracy"] > 0.93
    predicted = sklearn_pipeline(features[::2], labels[::2]).predict(features[1::2])
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels[1::2], predicted))
    assert scores["macro_f1"] == pytest.approx(f1_score(labels[1::2], predicted, average="macro"))


def test_evaluate_without_labels_is_nan(fitted):
    model, _ = fitted
    scores = train.evaluate(model, np.empty((0, 64)), np.array([], dtype=str))
    assert math.isnan(scores["accuracy"]) and math.isnan(scores["macro_f1"])


def test_fit_needs_two_labels(digits):
    features, _ = digits
    with pytest.raises(ValueError, match="at least two distinct labels"):
        train.fit(features[:20], np.array(["seven"] * 20))


def test_fit_params_are_used(digits):
    features, labels = digits
    loose = train.fit(features[:400], labels[:400], preset_spec("logistic_regression", "features", {"C": 100.0}))
    tight = train.fit(features[:400], labels[:400])
    assert np.abs(loose.pipeline[-1].coef_).max() > 2 * np.abs(tight.pipeline[-1].coef_).max()


def test_binary_predict_proba_equals_sklearn(digits):
    features, labels = digits
    mask = np.isin(labels, ["three", "eight"])
    model = train.fit(features[mask], labels[mask])
    reference = sklearn_pipeline(features[mask], labels[mask])
    assert list(model.classes) == list(reference.classes_) == ["eight", "three"]
    assert np.max(np.abs(model.predict_proba(features[mask]) - reference.predict_proba(features[mask]))) < 1e-8


def test_binary_predictions_equal_sklearn(digits):
    features, labels = digits
    mask = np.isin(labels, ["three", "eight"])
    model = train.fit(features[mask], labels[mask])
    reference = sklearn_pipeline(features[mask], labels[mask])
    assert model.predict_proba(features[mask]).shape == (mask.sum(), 2)
    assert (model.predict(features[mask]) == reference.predict(features[mask])).all()


def test_features_matrix_from_a_list_column(digits):
    frame = pl.DataFrame({"features": [[1.0, 2.0], [3.0, 4.5]]})
    matrix = train.features_matrix(frame)
    assert matrix.dtype == np.float64 and matrix.tolist() == [[1.0, 2.0], [3.0, 4.5]]
    features, _ = digits
    round_trip = train.features_matrix(pl.DataFrame({"features": features.tolist()}))
    assert np.array_equal(round_trip, features)
    assert train.features_matrix(pl.DataFrame({"features": []}, schema={"features": pl.List(pl.Float64)})).shape[0] == 0


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path, digits, fitted):
    features, _ = digits
    model, _ = fitted
    metadata = {"model_version": "m-001", "corpus_version": 3}
    folder = train.save(model, tmp_path / "models" / "m-001", metadata)
    assert folder == tmp_path / "models" / "m-001"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.skops"]
    assert [p.name for p in folder.parent.iterdir()] == ["m-001"]  # no staging folder left behind

    loaded, meta = train.load(folder)
    assert meta.items() >= metadata.items()
    assert meta["pipeline"] == model.spec.as_dict() and meta["classes"] == sorted(NAMES)
    assert loaded.spec == model.spec
    assert np.array_equal(loaded.predict_proba(features), model.predict_proba(features))
    assert (loaded.predict(features) == model.predict(features)).all()
    assert json.loads((folder / "metadata.json").read_text())["corpus_version"] == 3


class Payload:
    """Not a scikit-learn type: a model file holding it must not be loaded."""


def test_load_refuses_an_altered_file_and_foreign_types(tmp_path, fitted):
    import skops.io

    model, _ = fitted
    folder = train.save(model, tmp_path / "m-evil", {})
    with (folder / "model.skops").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(train.ModelFileError, match="SHA-256 differs"):
        train.load(folder)
    # The metadata rewritten to match a file that carries another type: still refused, unloaded.
    skops.io.dump({"model": Payload()}, folder / "model.skops")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["model_file_sha256"] = path_sha256(folder / "model.skops")
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(train.ModelFileError, match="types labelloop does not load.*Payload"):
        train.load(folder)


def _replace_model_file(folder, pipeline) -> None:
    """Write another pipeline as the model file and make metadata.json describe it (what an
    attacker who can write the folder would do)."""
    import skops.io

    skops.io.dump(pipeline, folder / "model.skops")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["model_file_sha256"] = path_sha256(folder / "model.skops")
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_a_function_or_a_foreign_step_in_a_model_file_is_never_loaded(tmp_path, digits, fitted):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, Normalizer
    from sklearn.utils import _testing

    model, _ = fitted
    folder = train.save(model, tmp_path / "m0001", {})
    registered = path_sha256(folder / "model.skops")
    # scikit-learn's test helpers import subprocess.check_output: a "sklearn." name that runs commands.
    shell = FunctionTransformer(func=_testing.check_output, kw_args={"shell": True})
    _replace_model_file(folder, Pipeline([("shell", shell), ("model", model.pipeline[-1])]))
    with pytest.raises(train.ModelFileError, match="holds types labelloop does not load.*check_output"):
        train.load(folder)
    # Only trusted types, but not the steps metadata.json records.
    _replace_model_file(folder, Pipeline([("normalizer", Normalizer()), ("model", model.pipeline[-1])]))
    with pytest.raises(train.ModelFileError, match="not the pipeline its metadata.json records "
                                                   r"\(Normalizer -> LogisticRegression\)"):
        train.load(folder)
    # A well-formed model (another fit), folder and metadata rewritten together: the registry's
    # hash refuses it.
    features, labels = digits
    _replace_model_file(folder, train.fit(features[:300], labels[:300]).pipeline)
    assert train.load(folder)[0].spec == model.spec
    with pytest.raises(train.ModelFileError, match="not the file the registry recorded"):
        train.load(folder, registered)


def test_load_names_a_model_saved_before_pipelines(tmp_path):
    folder = tmp_path / "m0001"
    folder.mkdir()
    (folder / "model.npz").write_bytes(b"old")
    (folder / "metadata.json").write_text("{}")
    with pytest.raises(train.ModelFileError, match="model.npz: saved by an earlier labelloop; train again"):
        train.load(folder)


def test_training_config_defaults_overrides_and_refusals(tmp_path):
    from labelloop_assets.core.settings import DEFAULTS_DIR, LabelloopConfigError

    shipped = train.TrainingConfig.load(DEFAULTS_DIR / "training.yaml")
    assert shipped.min_train_rows == 5
    assert shipped.spec("features").steps == (
        ("StandardScaler", {}), ("LogisticRegression", {"C": 0.1, "max_iter": 2000}),
    )
    path = tmp_path / "training.yaml"
    path.write_text("params:\n  C: 1\n")
    assert train.TrainingConfig.load(path).spec("features").steps[-1] == (
        "LogisticRegression", {"C": 1.0, "max_iter": 2000},
    )
    for text, message in (
        ("params:\n  penalty_typo: l1\n", "unknown parameters ['penalty_typo']; LogisticRegression takes"),
        ("params:\n  C: 0\n", "params.C must be above 0"),
        ("params:\n  C: .nan\n", "params.C must be a finite number"),
        ("params:\n  max_iter: 10.5\n", "params.max_iter must be a whole number"),
        ("params:\n  solver: newton\n", "The 'solver' parameter of LogisticRegression must be"),
        ("min_train_rows: 1\n", "min_train_rows must be at least 2"),
        ("params: [C]\n", "params must be a mapping"),
        ("solver: lbfgs\n", "unknown keys ['solver']"),
    ):
        path.write_text(text)
        with pytest.raises(LabelloopConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            train.TrainingConfig.load(path)


def test_current_pointer(tmp_path):
    assert train.current_version(tmp_path) is None
    train.set_current(tmp_path, "m-001")
    assert train.current_version(tmp_path) == "m-001"
    train.set_current(tmp_path, "m-002")
    assert train.current_version(tmp_path) == "m-002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_training_data_hash():
    def digest(item_ids, labels):
        return train.training_data_hash(pl.DataFrame({"item_id": item_ids, "label": labels}))

    value = digest(["b", "a", "c"], ["two", "one", "one"])
    assert re.fullmatch("[0-9a-f]{64}", value), value  # a SHA-256 in hex
    assert value == digest(["a", "c", "b"], ["one", "one", "two"])  # order does not matter
    assert value != digest(["a", "b", "c"], ["one", "two", "two"])  # a changed label does
    assert value != digest(["a", "b"], ["one", "two"])  # a dropped item does
    assert value != digest(["a", "b", "d"], ["one", "two", "one"])  # another item does


# --------------------------------------------------------------------------- metrics


@pytest.fixture
def con(tmp_path):
    with store.connect(tmp_path / "metrics.duckdb") as connection:
        yield connection


def test_metrics_of_an_empty_store(con):
    summary = metrics.summary(con)
    assert summary == {
        "corpus_version": None, "model_version": None, "n_items": 0, "n_gold_items": 0,
        "n_human_confirmed": 0, "coverage": None, "n_predictions": 0, "n_corrected_predictions": 0,
        "correction_rate": None, "n_corrections": 0, "n_quarantined": 0, "n_pending_items": 0,
        "n_escalated_items": 0, "model_gold_accuracy": None,
        "n_open_escalations": 0, "n_sla_breaches": 0,
    }
    by_label = metrics.by_label(con, ("one", "two"))
    assert by_label.select("label", "n_items", "n_corrections_to", "coverage").rows() == [
        ("one", 0, 0, None), ("two", 0, 0, None)
    ]


def _populate(con) -> None:
    con.execute("""
        INSERT INTO production_corpus (item_id, label, label_source, human_confirmed, since_version, updated_version)
        VALUES ('a', 'one', 'correction', true, 2, 2), ('b', 'two', 'vendor', false, 1, 1),
               ('c', 'two', 'correction', true, 1, 2), ('d', 'three', 'vendor', false, 1, 1);
        INSERT INTO items (seq, item_id, features, gold_label, payload_hash)
        VALUES (1, 'g1', [1.0], 'one', 'h'), (2, 'g2', [2.0], 'two', 'h'), (3, 'a', [3.0], NULL, 'h');
        INSERT INTO predictions (prediction_id, item_id, model_version, predicted_label, confidence, served_at, payload_hash)
        VALUES ('p1', 'a', 'm1', 'two', 0.6, '2024-01-01 00:00:00Z', 'h'), ('p2', 'b', 'm1', 'two', 0.9, '2024-01-01 00:00:00Z', 'h'),
               ('p3', 'c', 'm1', 'one', 0.7, '2024-01-01 00:00:00Z', 'h');
        INSERT INTO validated_labels (seq, event_id, item_id, corrected_label, predicted_label, prediction_id,
                                      prediction_found, user_pseudonym, user_role, source, vote_weight, created_at)
        VALUES (1, 'v1', 'a', 'one', 'two', 'p1', true, 'u_1', 'annotator', 'annotation', 2, '2024-01-02 00:00:00Z'),
               (2, 'v2', 'b', 'two', 'two', 'p2', true, 'u_1', 'annotator', 'annotation', 2, '2024-01-02 00:00:00Z'),
               (3, 'v3', 'c', 'two', 'one', 'p3', true, 'u_2', 'end_user', 'feedback_button', 1, '2024-01-02 00:00:00Z'),
               (4, 'v4', 'a', 'one', 'two', 'p1', true, 'u_2', 'end_user', 'feedback_button', 1, '2024-01-02 00:00:00Z'),
               (5, 'v5', 'd', 'one', NULL, 'p9', false, 'u_3', 'end_user', 'feedback_button', 1, '2024-01-02 00:00:00Z');
        INSERT INTO label_decisions (decision_id, item_id, proposed_label, support, total_weight, share, n_contributors, status, event_ids)
        VALUES (1, 'a', 'one', 1, 1, 1, 1, 'pending', ['v4']), (2, 'a', 'one', 3, 3, 1, 2, 'promote', ['v1', 'v4']),
               (3, 'e', 'two', 4, 8, 0.5, 3, 'escalate', []), (4, 'f', 'two', 1, 1, 1, 1, 'pending', []);
        INSERT INTO quarantine (kind, source_file, reason) VALUES ('corrections', 'f', 'no_consent'),
               ('items', 'g', 'malformed_json');
        INSERT INTO corpus_versions (corpus_version, n_new_items, n_label_changes, n_confirmations, n_items, label_changes_total)
        VALUES (1, 4, 0, 0, 4, 0), (2, 0, 1, 1, 4, 1);
        INSERT INTO models (model_version, corpus_version, trained_at, n_train_rows, n_classes, algorithm, params,
                            train_data_hash, gold_accuracy, n_gold, label_changes_total, path, status)
        VALUES ('m3', 2, '2024-03-01 00:00:00Z', 4, 3, 'x', '{}', 'h', 0.5, 2, 1, 'p', 'rejected'),
               ('m2', 2, '2024-02-01 00:00:00Z', 4, 3, 'x', '{}', 'h', 0.9, 2, 1, 'p', 'champion'),
               ('m1', 1, '2024-01-01 00:00:00Z', 4, 3, 'x', '{}', 'h', 0.8, 2, 0, 'p', 'retired');
    """)  # noqa: E501 -- long lines of this SQL script are kept: rewrapping them would change the string


def test_metrics_summary(con):
    _populate(con)
    summary = metrics.summary(con)
    assert summary == {
        "corpus_version": 2, "model_version": "m2", "n_items": 4, "n_gold_items": 2,
        "n_human_confirmed": 2, "coverage": 0.5, "n_predictions": 3, "n_corrected_predictions": 2,
        "correction_rate": pytest.approx(2 / 3), "n_corrections": 5, "n_quarantined": 2,
        "n_pending_items": 1, "n_escalated_items": 1, "model_gold_accuracy": 0.9,
        "n_open_escalations": 0, "n_sla_breaches": 0,
    }


def test_metrics_by_label(con):
    _populate(con)
    frame = metrics.by_label(con, ("one", "two", "three", "four"))
    assert frame.columns == ["label", "n_items", "n_human_confirmed", "coverage", "n_corrections_to",
                             "n_predicted", "n_predicted_corrected", "correction_rate"]
    assert frame.rows() == [
        ("four", 0, 0, None, 0, 0, 0, None),
        ("one", 1, 1, 1.0, 3, 1, 1, 1.0),
        ("three", 1, 0, 0.0, 0, 0, 0, None),
        ("two", 2, 1, 0.5, 2, 2, 1, 0.5),
    ]
