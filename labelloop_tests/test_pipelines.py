"""training.yaml names any scikit-learn pipeline: presets that follow what items carry, steps
lists checked strictly, and model files that load only what is trusted."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.datasets import load_digits

from labelloop_assets.core import pipelines, train
from labelloop_assets.core.settings import LabelloopConfigError

POSITIVE = ["great", "wonderful", "superb", "moving", "delightful", "brilliant"]
NEGATIVE = ["dull", "awful", "tedious", "clumsy", "boring", "lifeless"]
FILLER = ["the", "film", "plot", "cast", "story", "was", "and", "its", "ending"]


def reviews(n: int, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Short texts whose label is carried by a few sentiment words among filler."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["fresh", "rotten"], size=n)
    texts = []
    for label in labels:
        words = list(rng.choice(FILLER, size=6)) + list(rng.choice(POSITIVE if label == "fresh" else NEGATIVE, 2))
        rng.shuffle(words)
        texts.append(" ".join(words))
    lengths = np.array([[len(t), t.count(" ")] for t in texts], dtype=float)
    frame = pl.DataFrame({"item_id": [f"r{i}" for i in range(n)], "text": texts,
                          "features": lengths.tolist()})
    return frame, labels


def choose(tmp_path, text: str) -> train.TrainingConfig:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    return train.TrainingConfig.load(path)


def test_auto_trains_text_with_tfidf_and_logistic_regression(tmp_path):
    items, labels = reviews(300, seed=1)
    spec = choose(tmp_path, "pipeline: auto\n").spec("text")
    assert spec.algorithm == "tfidf_vectorizer+logistic_regression" and spec.input == "text"
    model = train.fit(items[:200].select("text"), labels[:200], spec)
    assert train.evaluate(model, items[200:], labels[200:])["accuracy"] > 0.9
    # Saved and loaded: the same probabilities, and a new text is read as text.
    folder = train.save(model, tmp_path / "m0001", {"model_version": "m0001"})
    loaded, _ = train.load(folder)
    assert np.array_equal(loaded.predict_proba(items[200:]), model.predict_proba(items[200:]))
    assert loaded.predict(pl.DataFrame({"text": ["a wonderful, brilliant film"]})).tolist() == ["fresh"]


def test_items_with_text_and_features_get_both_blocks_side_by_side(tmp_path):
    items, labels = reviews(200, seed=2)
    spec = choose(tmp_path, "params:\n  C: 2.0\n").spec("text+features")
    assert spec.algorithm == "tfidf_vectorizer+standard_scaler+logistic_regression"
    model = train.fit(items, labels, spec)
    blocks = model.pipeline[0]
    assert [name for name, _, _ in blocks.transformers] == ["tfidf_vectorizer", "standard_scaler"]
    assert blocks.transformers[1][2] == ["f0", "f1"] and model.pipeline[-1].C == 2.0
    assert model.predict_proba(items).shape == (200, 2)


def test_hist_gradient_boosting_for_features_is_deterministic_and_loads(tmp_path):
    features, target = load_digits(return_X_y=True)
    labels = np.array([str(t) for t in target])
    spec = choose(tmp_path, "pipeline: hist_gradient_boosting\nparams:\n  max_iter: 30\n").spec("features")
    assert spec.algorithm == "hist_gradient_boosting_classifier"
    first = train.fit(features[:800], labels[:800], spec)
    again = train.fit(features[:800], labels[:800], spec)
    assert np.array_equal(first.predict_proba(features[800:]), again.predict_proba(features[800:]))
    assert train.evaluate(first, features[800:], labels[800:])["accuracy"] > 0.85
    # Its tree predictors are scikit-learn types: trusted, loaded, same answers.
    loaded, _ = train.load(train.save(first, tmp_path / "m0002", {}))
    assert np.array_equal(loaded.predict_proba(features[800:]), first.predict_proba(features[800:]))


def test_a_steps_list_is_built_as_written(tmp_path):
    config = choose(tmp_path, (
        "input: text\n"
        "pipeline:\n"
        "  - CountVectorizer: {ngram_range: [1, 2], min_df: 1}\n"
        "  - MultinomialNB: {alpha: 0.5}\n"
    ))
    spec = config.spec("text+features")
    assert spec.input == "text" and spec.algorithm == "count_vectorizer+multinomial_nb"
    assert spec.steps == (("CountVectorizer", {"ngram_range": (1, 2), "min_df": 1}), ("MultinomialNB", {"alpha": 0.5}))
    items, labels = reviews(240, seed=3)
    model = train.fit(items[:160], labels[:160], spec)
    assert model.pipeline[0].ngram_range == (1, 2)
    assert train.evaluate(model, items[160:], labels[160:])["accuracy"] > 0.9
    # What the registry records rebuilds the same pipeline (release notes refit with it).
    assert pipelines.PipelineSpec.from_recorded(spec.recorded()) == spec
    assert "CountVectorizer(min_df=1, ngram_range=(1, 2)) -> MultinomialNB(alpha=0.5)" == spec.describe()


def test_models_recorded_before_pipelines_rebuild_as_the_old_default():
    spec = pipelines.PipelineSpec.from_recorded('{"C": 0.01, "max_iter": 2000}')
    assert spec.steps == (("StandardScaler", {}), ("LogisticRegression", {"C": 0.01, "max_iter": 2000}))


@pytest.mark.parametrize(("text", "content", "message"), [
    ("pipeline: xgboost\n", "features",
     "'xgboost' is not a preset (auto, logistic_regression, hist_gradient_boosting)"),
    ("pipeline:\n  - system: {}\n", "features", "'system' is not a scikit-learn estimator in"),
    ("pipeline:\n  - Popen: {args: ls}\n", "features", "'Popen' is not a scikit-learn estimator"),
    ("pipeline:\n  - StandardScaler: {}\n  - LogisticRegression: {Cee: 1}\n", "features",
     "pipeline step 2 (LogisticRegression): unknown parameters ['Cee']"),
    ("pipeline:\n  - LogisticRegression: {C: -1}\n", "features",
     "The 'C' parameter of LogisticRegression must be a float in the range (0.0, inf]"),
    ("pipeline:\n  - StandardScaler: {}\n", "features", "the last step (StandardScaler) must be a classifier"),
    ("pipeline:\n  - SVC: {}\n", "features", "set probability: true"),
    ("pipeline:\n  - LinearRegression: {}\n", "features", "must be a classifier that gives probabilities"),
    ("pipeline:\n  - LogisticRegression: {}\n  - LogisticRegression: {}\n", "features",
     "step LogisticRegression must be a transformer"),
    ("pipeline:\n  - StandardScaler: {}\n  - LogisticRegression: {}\n", "text",
     "input text: the first step must turn text into numbers"),
    ("pipeline:\n  - TfidfVectorizer: {}\n  - LogisticRegression: {}\n", "features",
     "TfidfVectorizer reads text, and this pipeline's input is features"),
    ("pipeline:\n  - TfidfVectorizer: {}\n  - LogisticRegression: {}\n", "text+features",
     "a steps list takes one input"),
    ("pipeline: hist_gradient_boosting\n", "text", "pipeline 'hist_gradient_boosting' takes features"),
    ("input: text\n", "features", "input text asks for what this home's items do not carry"),
    ("pipeline:\n  - VotingClassifier: {}\n", "features", "needs other estimators as arguments"),
    ("pipeline:\n  - LogisticRegression: {C: {a: 1}}\n", "features", "C must be a number, text"),
    ("pipeline: [LogisticRegression]\n", "features", "step 1 must be one mapping"),
    ("pipeline:\n  - LogisticRegression: {}\nparams: {C: 1}\n", "features", "params go with a preset"),
    ("input: pictures\n", "features", "input must be one of text, features, text+features"),
    ("pipeline:\n  - TfidfVectorizer: {input: filename}\n  - LogisticRegression: {}\n", "text",
     "input must be content: the items' text is what is read, never a file it names"),
])
def test_a_wrong_pipeline_is_refused_with_the_reason(tmp_path, text, content, message):
    with pytest.raises(LabelloopConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        choose(tmp_path, text).spec(content)
