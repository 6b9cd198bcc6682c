"""Train, evaluate and store the model: scikit-learn to fit, plain arrays and JSON to keep.

A model is stored as `model.npz` (numbers only, loaded with allow_pickle=False) and
`metadata.json` beside it, so loading one never executes code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from labelloop_assets.core.files import sync_to_disk, write_atomically
from labelloop_assets.core.settings import (
    LabelloopConfigError,
    config_number,
    load_yaml_mapping,
)

ALGORITHM = "standard_scaler+logistic_regression"
DEFAULT_PARAMS = {"C": 0.1, "max_iter": 2000}
CURRENT_POINTER = "CURRENT"
# The training data: every corpus item with its current label and features.
TRAINING_SQL = (
    "SELECT c.item_id, c.label, i.features FROM production_corpus c JOIN items i USING (item_id) ORDER BY c.item_id"
)


@dataclass
class LinearModel:
    """A fitted multinomial logistic regression reduced to its arrays."""

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def decision(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = self.decision(features)
        if logits.shape[1] == 1:  # binary: one logit for the second class, as in scikit-learn
            logits = np.hstack([np.zeros_like(logits), logits])
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes[self.predict_proba(features).argmax(axis=1)]


def features_matrix(frame: pl.DataFrame, column: str = "features") -> np.ndarray:
    """A (rows, width) float matrix from a list column of one fixed width."""
    if frame.height == 0:
        return np.empty((0, 0))
    width = int(frame[column].list.len().max())
    return frame[column].list.to_array(width).to_numpy().astype(np.float64, copy=False)


@dataclass(frozen=True)
class TrainingConfig:
    """training.yaml: the estimator's parameters and the smallest corpus worth training on."""

    params: dict
    min_train_rows: int = 5

    @classmethod
    def load(cls, path: Path) -> TrainingConfig:
        raw = load_yaml_mapping(path, "training")
        where = f"training file {path}"
        known = {"params", "min_train_rows", "external_model_versions"}  # the last: read by ingest
        if set(raw) - known:
            raise LabelloopConfigError(f"{where}: unknown keys {sorted(set(raw) - known)}; known: {sorted(known)}")
        given = raw.get("params") or {}
        if not isinstance(given, dict):
            raise LabelloopConfigError(f"{where}: params must be a mapping")
        unknown = set(given) - set(DEFAULT_PARAMS)
        if unknown:
            raise LabelloopConfigError(f"{where}: unknown params {sorted(unknown)}; known: {sorted(DEFAULT_PARAMS)}")
        params = {
            **DEFAULT_PARAMS,
            **{
                key: config_number(value, DEFAULT_PARAMS[key], f"{where}: params.{key}")
                for key, value in given.items()
            },
        }
        min_rows = config_number(raw.get("min_train_rows", cls.min_train_rows), cls.min_train_rows,
                                 f"{where}: min_train_rows")
        if params["C"] <= 0 or params["max_iter"] < 1 or min_rows < 2:
            raise LabelloopConfigError(
                f"{where}: params.C must be above 0, params.max_iter at least 1 and min_train_rows at least 2"
            )
        return cls(params=params, min_train_rows=min_rows)


def fit(features: np.ndarray, labels: np.ndarray, params: dict | None = None) -> LinearModel:
    # imported where used: loading the code location must not pay for scikit-learn
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    params = {**DEFAULT_PARAMS, **(params or {})}
    if len(np.unique(labels)) < 2:
        raise ValueError("training needs at least two distinct labels in the corpus")
    scaler = StandardScaler().fit(features)
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    classifier = LogisticRegression(C=params["C"], max_iter=params["max_iter"])
    classifier.fit((features - scaler.mean_) / scale, labels)
    return LinearModel(
        classes=np.asarray(classifier.classes_).astype(str),
        mean=scaler.mean_,
        scale=scale,
        coef=classifier.coef_,
        intercept=classifier.intercept_,
    )


def evaluate(model: LinearModel, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    # imported where used: loading the code location must not pay for scikit-learn
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict(features)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def training_data_hash(training: pl.DataFrame) -> str:
    """A fingerprint of exactly which (item, label) pairs a model saw, whatever their order."""
    lines = training.sort("item_id").select(pl.format("{}\t{}", "item_id", "label")).to_series()
    return hashlib.sha256(lines.str.join("\n").item().encode()).hexdigest()


def save(model: LinearModel, folder: Path, metadata: dict) -> Path:
    """Write the arrays and metadata into a temp folder, then rename it into place.

    Callers save a version before registering it and number versions past every registered one,
    so a folder already there is what a run killed between the two left behind: it is replaced.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.savez(
        staging / "model.npz",
        classes=model.classes.astype("U"),
        mean=model.mean,
        scale=model.scale,
        coef=model.coef,
        intercept=model.intercept,
    )
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    # The registry will refer to this folder: it must be on disk before the database says so.
    for written in (staging / "model.npz", staging / "metadata.json", staging):
        sync_to_disk(written)
    if folder.exists():
        # A directory cannot be renamed over a non-empty one: move the leftover aside first.
        stale = folder.with_name(f".{folder.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)
        os.replace(staging, folder)
        shutil.rmtree(stale)
    else:
        os.replace(staging, folder)
    sync_to_disk(folder.parent)
    return folder


def load(folder: Path) -> tuple[LinearModel, dict]:
    with np.load(folder / "model.npz", allow_pickle=False) as arrays:
        model = LinearModel(**{name: arrays[name] for name in ("classes", "mean", "scale", "coef", "intercept")})
    metadata = json.loads((folder / "metadata.json").read_text())
    return model, metadata


def set_current(models_dir: Path, version: str) -> None:
    """Point serving code at a model version, atomically."""
    write_atomically(models_dir / CURRENT_POINTER, version + "\n", durable=True)


def current_version(models_dir: Path) -> str | None:
    pointer = models_dir / CURRENT_POINTER
    return pointer.read_text().strip() if pointer.exists() else None
