"""Train, evaluate and store the model: a scikit-learn pipeline, kept in an audited format.

A model is stored as `model.skops` (scikit-learn's objects written by skops, which loads only
types it is told to trust: never pickle) and `metadata.json` beside it, with the file's SHA-256,
so loading one never executes code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from labelloop_assets.core import external, pipelines
from labelloop_assets.core.files import path_sha256, sync_to_disk, write_atomically
from labelloop_assets.core.pipelines import FEATURES, TEXT, PipelineChoice, PipelineSpec
from labelloop_assets.core.settings import (
    LabelloopConfigError,
    config_number,
    load_yaml_mapping,
)

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

MODEL_FILE = "model.skops"
CURRENT_POINTER = "CURRENT"
# The training data: every corpus item with its current label and what it carries.
TRAINING_SQL = (
    "SELECT c.item_id, c.label, i.text, i.features, i.uri FROM production_corpus c JOIN items i USING (item_id) "
    "ORDER BY c.item_id"
)
# Types a model file may hold beyond those skops trusts by default (scikit-learn's estimators,
# NumPy arrays, builtins): the fitted parts of the estimators training.yaml may name, measured by
# dumping each of them. A name, not a prefix: `sklearn.` modules also import functions such as
# subprocess.check_output, which a crafted file could otherwise call when it predicts.
TRUSTED_TYPES = frozenset({
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    # The score functions of SelectKBest and its kin: pure statistics.
    "sklearn.feature_selection._univariate_selection.f_classif",
    "sklearn.feature_selection._univariate_selection.chi2",
    "sklearn.feature_selection._mutual_info.mutual_info_classif",
})


class ModelFileError(ValueError):
    """A model folder that cannot be loaded safely: missing, altered, or of another format."""


def features_matrix(frame: pl.DataFrame, column: str = "features", width: int | None = None) -> np.ndarray:
    """A (rows, width) float matrix from a list column of one fixed width."""
    import numpy as np
    if frame.height == 0:
        return np.empty((0, width or 0))
    width = width or int(frame[column].list.len().max())
    return frame[column].list.to_array(width).to_numpy().astype(np.float64, copy=False)


def model_input(items: pl.DataFrame, item_input: str, feature_length: int | None = None) -> Any:
    """What a pipeline of this input reads from items (columns text and/or features)."""
    if item_input == TEXT:
        return items["text"].to_numpy().astype(object)
    if item_input == FEATURES:
        return features_matrix(items, width=feature_length)
    matrix = features_matrix(items, width=feature_length)
    return pl.DataFrame({"text": items["text"]}).hstack(
        pl.DataFrame(matrix, schema=pipelines.feature_columns(matrix.shape[1]), orient="row")
    )


@dataclass
class TrainedModel:
    """A fitted pipeline with what it reads and the labels it gives."""

    pipeline: Any
    spec: PipelineSpec
    feature_length: int | None

    @property
    def classes(self) -> np.ndarray:
        import numpy as np
        return np.asarray(self.pipeline.classes_).astype(str)

    def predict_proba(self, items: pl.DataFrame | np.ndarray) -> np.ndarray:
        """Probabilities per class (columns in `classes` order); a matrix stands for features."""
        import numpy as np
        if isinstance(items, np.ndarray):
            if self.spec.input != FEATURES:
                raise ValueError(f"this model reads {self.spec.input}; pass items with those columns")
            return self.pipeline.predict_proba(items)
        if items.height == 0:
            return np.empty((0, len(self.classes)))
        return self.pipeline.predict_proba(model_input(items, self.spec.input, self.feature_length))

    def predict(self, items: pl.DataFrame | np.ndarray) -> np.ndarray:
        return self.classes[self.predict_proba(items).argmax(axis=1)]


@dataclass
class ExternalModel:
    """A model an external trainer made: labelloop holds only the class probabilities its trainer
    reported (gold items, and training items out of sample), and answers from them by item_id."""

    version: str
    probabilities: pl.DataFrame  # item_id, then one Float64 column per class in `classes` order
    reference: str
    # What a TrainedModel has and an external model has not: no pipeline here to read items.
    spec = None
    feature_length = None

    @property
    def classes(self) -> np.ndarray:
        import numpy as np
        return np.asarray([c for c in self.probabilities.columns if c != "item_id"]).astype(str)

    def stored(self, item_ids: pl.Series) -> np.ndarray:
        """Probabilities per item in the given order; NaN rows for items the trainer was not given."""
        columns = self.classes.tolist()
        joined = pl.DataFrame({"item_id": item_ids.cast(pl.String)}).with_row_index("_row").join(
            self.probabilities, on="item_id", how="left"
        ).sort("_row")
        return joined.select(pl.col(columns).fill_null(float("nan"))).to_numpy().reshape(-1, len(columns))

    def predict_proba(self, items: pl.DataFrame | np.ndarray) -> np.ndarray:
        """The stored probabilities of these items (a frame with item_id); ValueError for any the
        trainer was not given."""
        import numpy as np
        if not isinstance(items, pl.DataFrame) or "item_id" not in items.columns:
            raise ValueError(f"{self.version} was trained by an external trainer and answers only by item_id: "
                             "pass items with an item_id column")
        probabilities = self.stored(items["item_id"])
        unknown = items["item_id"].filter(pl.Series(np.isnan(probabilities).any(axis=1) if len(probabilities)
                                                    else np.zeros(0, dtype=bool)))
        if unknown.len():
            shown = ", ".join(repr(i) for i in unknown.head(3).to_list()) + (", ..." if unknown.len() > 3 else "")
            raise ValueError(
                f"{self.version} (external trainer, {self.reference}) has no probabilities for {unknown.len()} "
                f"item(s) ({shown}): it answers only for the items it was trained and scored on; train it again"
            )
        return probabilities

    def predict(self, items: pl.DataFrame) -> np.ndarray:
        return self.classes[self.predict_proba(items).argmax(axis=1)]


@dataclass(frozen=True)
class TrainingConfig:
    """training.yaml: the pipeline, its parameters, the smallest corpus worth training on, and
    the team's own training command when it has one (`trainer`)."""

    choice: PipelineChoice
    min_train_rows: int = 5
    trainer: external.TrainerConfig | None = None

    @property
    def params(self) -> dict:
        """The preset's parameter overrides (empty for a steps list)."""
        return self.choice.params

    def spec(self, item_content: str, where: str = "training.yaml") -> PipelineSpec:
        return self.choice.resolve(item_content, where)

    @classmethod
    def load(cls, path: Path) -> TrainingConfig:
        raw = load_yaml_mapping(path, "training")
        where = f"training file {path}"
        # external_model_versions is read by ingest; trainer by the external trainer.
        known = {"pipeline", "params", "input", "min_train_rows", "external_model_versions", "trainer"}
        if set(raw) - known:
            raise LabelloopConfigError(f"{where}: unknown keys {sorted(set(raw) - known)}; known: {sorted(known)}")
        given = raw.get("params") or {}
        if isinstance(given, dict) and raw.get("pipeline", "auto") in ("auto", "logistic_regression"):
            # The linear model's two numbers keep their friendlier messages (and C: 1 is a float).
            given = {**given, **{key: config_number(given[key], example, f"{where}: params.{key}")
                                 for key, example in (("C", 1.0), ("max_iter", 1)) if key in given}}
            if given.get("C", 1) <= 0 or given.get("max_iter", 1) < 1:
                raise LabelloopConfigError(f"{where}: params.C must be above 0 and params.max_iter at least 1")
            raw = {**raw, "params": given}
        choice = pipelines.parse_choice(raw, where)
        min_rows = config_number(raw.get("min_train_rows", cls.min_train_rows), cls.min_train_rows,
                                 f"{where}: min_train_rows")
        if min_rows < 2:
            raise LabelloopConfigError(f"{where}: min_train_rows must be at least 2")
        trainer = external.TrainerConfig.parse(raw["trainer"], where) if raw.get("trainer") is not None else None
        return cls(choice=choice, min_train_rows=min_rows, trainer=trainer)


def fit(
    items: pl.DataFrame | np.ndarray, labels: np.ndarray, spec: PipelineSpec | None = None,
    feature_length: int | None = None,
) -> TrainedModel:
    """Fit the spec's pipeline (None: the default for features) on items and their labels.

    Items are a frame with text and/or features as the spec reads them, or a features matrix."""
    import numpy as np
    spec = spec or pipelines.preset_spec("logistic_regression", FEATURES)
    if len(np.unique(labels)) < 2:
        raise ValueError("training needs at least two distinct labels in the corpus")
    if isinstance(items, np.ndarray):
        if spec.input != FEATURES:
            raise ValueError(f"this pipeline reads {spec.input}; pass a frame with those columns")
        feature_length, inputs = items.shape[1], items
    else:
        if spec.input == TEXT:
            feature_length = None
        elif feature_length is None:
            feature_length = int(items["features"].list.len().max()) if items.height else None
        inputs = model_input(items, spec.input, feature_length)
    pipeline = spec.build(feature_length)
    pipeline.fit(inputs, np.asarray(labels).astype(str))
    return TrainedModel(pipeline=pipeline, spec=spec, feature_length=feature_length)


def evaluate(model: TrainedModel, items: pl.DataFrame, labels: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    # imported where used: loading the code location must not pay for scikit-learn
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict(items)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def training_data_hash(training: pl.DataFrame) -> str:
    """A fingerprint of exactly which (item, label) pairs a model saw, whatever their order."""
    lines = training.sort("item_id").select(pl.format("{}\t{}", "item_id", "label")).to_series()
    return hashlib.sha256(lines.str.join("\n").item().encode()).hexdigest()


def save(model: TrainedModel, folder: Path, metadata: dict) -> Path:
    """Write the model file and metadata into a temp folder, then rename it into place.

    Callers save a version before registering it and number versions past every registered one,
    so a folder already there is what a run killed between the two left behind: it is replaced.
    """
    import skops.io

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    skops.io.dump(model.pipeline, staging / MODEL_FILE)
    described = {
        **metadata,
        "pipeline": model.spec.as_dict(),
        "classes": model.classes.tolist(),
        "feature_length": model.feature_length,
        "model_file": MODEL_FILE,
        "model_file_sha256": path_sha256(staging / MODEL_FILE),
    }
    return _publish(staging, folder, described, MODEL_FILE)


def save_external(probabilities: pl.DataFrame, folder: Path, metadata: dict) -> Path:
    """Store an external model as save stores a built-in one: its checked probabilities
    (`probabilities.parquet`) and metadata.json with the file's SHA-256, renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    probabilities.write_parquet(staging / external.PROBABILITIES_FILE)
    described = {
        **metadata,
        "trainer": external.EXTERNAL,
        "classes": [c for c in probabilities.columns if c != "item_id"],
        "probabilities_file": external.PROBABILITIES_FILE,
        "probabilities_sha256": path_sha256(staging / external.PROBABILITIES_FILE),
    }
    return _publish(staging, folder, described, external.PROBABILITIES_FILE)


def _publish(staging: Path, folder: Path, described: dict, model_file: str) -> Path:
    (staging / "metadata.json").write_text(json.dumps(described, indent=2, sort_keys=True, default=str))
    # The registry will refer to this folder: it must be on disk before the database says so.
    for written in (staging / model_file, staging / "metadata.json", staging):
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


def load(folder: Path, registered_sha256: str | None = None) -> tuple[TrainedModel | ExternalModel, dict]:
    """The model in `folder`, refused (ModelFileError) unless its file is the one its metadata names
    (same SHA-256) and holds only trusted types; nothing in the file runs while loading. An
    external trainer's model is its stored probabilities (an ExternalModel)."""
    import skops.io

    name = folder.name
    try:
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{name}: metadata.json is missing from {folder}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelFileError(f"{name}: metadata.json in {folder} is not readable JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{name}: metadata.json in {folder} is not a JSON object")
    if registered_sha256 is not None and registered_sha256 != recorded_sha256(folder, metadata):
        raise ModelFileError(f"{name}: the model in {folder} is not the file the registry recorded (SHA-256 "
                             "differs from models.file_sha256): refused")
    if metadata.get("trainer") == external.EXTERNAL:
        return _load_external(folder, metadata), metadata
    path = folder / MODEL_FILE
    if not path.is_file():
        older = " (model.npz: saved by an earlier labelloop; train again)" if (folder / "model.npz").exists() else ""
        raise ModelFileError(f"{name}: {MODEL_FILE} is missing from {folder}{older}")
    if path_sha256(path) != metadata.get("model_file_sha256"):
        raise ModelFileError(f"{name}: {MODEL_FILE} in {folder} is not the file its metadata.json describes "
                             "(SHA-256 differs): refused")
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
        foreign = sorted(set(untrusted) - TRUSTED_TYPES)
        if foreign:
            raise ModelFileError(f"{name}: {MODEL_FILE} in {folder} holds types labelloop does not load: {foreign}")
        pipeline = skops.io.load(path, trusted=untrusted)
        spec = PipelineSpec.from_recorded(metadata["pipeline"])
    except ModelFileError:
        raise
    except Exception as error:  # skops raises many kinds on a damaged file; each is a refusal
        raise ModelFileError(f"{name}: {MODEL_FILE} in {folder} is not a readable model ({error})") from None
    model = TrainedModel(pipeline=pipeline, spec=spec, feature_length=metadata.get("feature_length"))
    # The steps must be the classes the recorded pipeline names, nothing slipped in before them.
    if _step_classes(pipeline) != [step for step, _ in spec.steps]:
        raise ModelFileError(f"{name}: {MODEL_FILE} in {folder} is not the pipeline its metadata.json records "
                             f"({' -> '.join(_step_classes(pipeline))}): refused")
    if not hasattr(pipeline, "predict_proba") or model.classes.tolist() != metadata.get("classes"):
        raise ModelFileError(f"{name}: {MODEL_FILE} in {folder} does not match its metadata (classes)")
    return model, metadata


def recorded_sha256(folder: Path, metadata: dict | None = None) -> str | None:
    """The SHA-256 a model folder's metadata.json records for its model file (the registry keeps
    it too: `models.file_sha256`)."""
    if metadata is None:
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    return metadata.get("probabilities_sha256") or metadata.get("model_file_sha256")


def _step_classes(pipeline: Any) -> list[str]:
    """The class names of a pipeline's steps, a ColumnTransformer's blocks in their place."""
    from sklearn.compose import ColumnTransformer

    names = []
    for _, step in getattr(pipeline, "steps", [("", pipeline)]):
        if isinstance(step, ColumnTransformer):
            names += [type(block).__name__ for _, block, _ in step.transformers_ if block != "drop"]
        else:
            names.append(type(step).__name__)
    return names


def _load_external(folder: Path, metadata: dict) -> ExternalModel:
    name = folder.name
    path = folder / external.PROBABILITIES_FILE
    if not path.is_file():
        raise ModelFileError(f"{name}: {external.PROBABILITIES_FILE} is missing from {folder}")
    if path_sha256(path) != metadata.get("probabilities_sha256"):
        raise ModelFileError(f"{name}: {external.PROBABILITIES_FILE} in {folder} is not the file its metadata.json "
                             "describes (SHA-256 differs): refused")
    try:
        probabilities = pl.read_parquet(path)
    except Exception as error:  # a damaged file: refused, whatever polars raises
        raise ModelFileError(f"{name}: {external.PROBABILITIES_FILE} in {folder} is not readable ({error})") from None
    model = ExternalModel(version=str(metadata.get("model_version", name)), probabilities=probabilities,
                          reference=str(metadata.get("reference", "")))
    if probabilities.columns[:1] != ["item_id"] or model.classes.tolist() != metadata.get("classes"):
        raise ModelFileError(f"{name}: {external.PROBABILITIES_FILE} in {folder} does not match its metadata (classes)")
    return model



def set_current(models_dir: Path, version: str) -> None:
    """Point serving code at a model version, atomically."""
    write_atomically(models_dir / CURRENT_POINTER, version + "\n", durable=True)


def current_version(models_dir: Path) -> str | None:
    pointer = models_dir / CURRENT_POINTER
    return pointer.read_text().strip() if pointer.exists() else None
