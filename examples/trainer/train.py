"""An example external trainer for labelloop: the team's own training code, run through Dagster Pipes.

labelloop runs this script when training.yaml names it:

    trainer:
      command: [python, trainer/train.py]    # relative to the home, which is the working directory
      timeout_seconds: 3600

and hands it, as Pipes extras:

    corpus_version   the corpus version the training rows come from
    training_items   a Parquet file: item_id, text, features, uri, label (gold copies left out)
    gold_items       a Parquet file: item_id, text, features, uri (no labels: never train on them)
    classes          the class list, in the order the probability columns take
    folds            how many folds for the out-of-sample probabilities of the training items
    output_dir       a folder for this run's files (labelloop keeps it; put the model here)
    item_content     what the items carry: text, features or text+features

It reports back, with `report_asset_materialization` metadata:

    reference        where the model is (any text: a path, a registry URI)
    probabilities    a Parquet file: item_id plus one column per class, one row for every gold item
                     (from the final model) and every training item (out of sample: from a model
                     fitted without that item's fold)
    metrics          optional: anything the trainer measured

Replace the model below with your own; keep the inputs and the report as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import skops.io
from dagster_pipes import open_dagster_pipes
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def make_model(item_content: str):
    """The team's model: here TF-IDF + logistic regression for text, scaled logistic regression for
    features (items with both: their text)."""
    if "text" in item_content:
        return make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)),
                             LogisticRegression(C=4.0, max_iter=2000))
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def model_input(items: pl.DataFrame, item_content: str):
    """What the model reads: the texts, or the features as a matrix."""
    if "text" in item_content:
        return items["text"].to_numpy().astype(object)
    return np.asarray(items["features"].to_list(), dtype=np.float64)


def probabilities_for(model, inputs, classes: list[str]) -> np.ndarray:
    """The model's probabilities with one column per class of the full class list (a class the
    model never saw gets probability 0)."""
    predicted = model.predict_proba(inputs)
    full = np.zeros((predicted.shape[0], len(classes)))
    for column, label in enumerate(model.classes_):
        full[:, classes.index(str(label))] = predicted[:, column]
    return full


def out_of_sample(training: pl.DataFrame, item_content: str, classes: list[str], folds: int) -> np.ndarray:
    """K-fold probabilities: each training item is predicted by a model that did not see it."""
    labels = training["label"].to_numpy()
    inputs = model_input(training, item_content)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    splits = max(2, min(folds, smallest))  # a class with fewer items than folds lowers the folds
    result = np.zeros((training.height, len(classes)))
    splitter = StratifiedKFold(n_splits=splits, shuffle=True, random_state=0)
    for fit_rows, out_rows in splitter.split(inputs, labels):
        model = make_model(item_content).fit(inputs[fit_rows], labels[fit_rows])
        result[out_rows] = probabilities_for(model, inputs[out_rows], classes)
    return result


def main() -> None:
    with open_dagster_pipes() as pipes:
        training = pl.read_parquet(pipes.get_extra("training_items"))
        gold = pl.read_parquet(pipes.get_extra("gold_items"))
        classes = [str(c) for c in pipes.get_extra("classes")]
        folds = int(pipes.get_extra("folds"))
        item_content = pipes.get_extra("item_content")
        output_dir = Path(pipes.get_extra("output_dir"))
        pipes.log.info(f"training on {training.height} items of corpus v{pipes.get_extra('corpus_version')}")

        oos = out_of_sample(training, item_content, classes, folds)
        final = make_model(item_content).fit(model_input(training, item_content), training["label"].to_numpy())
        on_gold = (probabilities_for(final, model_input(gold, item_content), classes) if gold.height
                   else np.zeros((0, len(classes))))

        model_path = output_dir / "model.skops"
        skops.io.dump(final, model_path)
        probabilities = pl.DataFrame(
            np.vstack([oos, on_gold]), schema=classes, orient="row"
        ).insert_column(0, pl.concat([training["item_id"], gold["item_id"]]))
        probabilities_path = output_dir / "probabilities.parquet"
        probabilities.write_parquet(probabilities_path)

        oos_accuracy = float(np.mean(np.asarray(classes)[oos.argmax(axis=1)] == training["label"].to_numpy()))
        pipes.report_asset_materialization(metadata={
            "reference": str(model_path),
            "probabilities": str(probabilities_path),
            "metrics": {"raw_value": {"out_of_sample_accuracy": oos_accuracy, "folds": folds}, "type": "json"},
        })


if __name__ == "__main__":
    main()
