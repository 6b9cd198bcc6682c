"""Serving the loop's champion: load it safely, predict, and hand the prediction log back.

Serving code imports this module, not the code location: it needs NumPy, scikit-learn, skops,
the store's driver and the project's core modules, never Dagster. A model is read from the two
files the loop writes (`model.skops`, which skops loads only after every type in it is checked
against the trusted list, and `metadata.json` with the file's SHA-256), so loading one never
executes code from a file. The champion is the one the registry (the `models` table) and
`models/CURRENT` both name; when they disagree nothing is loaded.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from labelloop_assets.core import evaluation, store, train
from labelloop_assets.core.contracts import MAX_ITEM_TEXT, TRIMMED
from labelloop_assets.core.files import sync_to_disk
from labelloop_assets.core.lake import LakeError
from labelloop_assets.core.pipelines import FEATURES, TEXT
from labelloop_assets.core.settings import Home

PREDICTIONS_KIND = "predictions"
# Statuses of models that have served: a pinned version may be a past champion, never a model
# the validation plan refused or has not judged yet.
SERVABLE_STATUSES = ("champion", "retired")


class ServingError(ValueError):
    """A model cannot be loaded or used as asked; the message says why and what to do."""


class NoChampion(ServingError):
    """The registry has no champion yet; the message carries the latest evaluation's reasons."""


def as_home(home_or_path: Home | str | os.PathLike | None = None) -> Home:
    """A Home from a Home, a path to its folder, or LABELLOOP_HOME when None."""
    if home_or_path is None:
        return Home.from_env()
    if isinstance(home_or_path, Home):
        return home_or_path
    return Home(Path(home_or_path).expanduser().resolve())


def _registry(home: Home, sql: str, params: list | None = None) -> list[dict]:
    if not home.has_store():
        raise ServingError(f"no store at {home.database}: the loop has not run in this home (LABELLOOP_HOME)")
    try:
        with store.connect(home.database, read_only=True) as con:
            return store.frame(con, sql, params).to_dicts()
    except (duckdb.Error, LakeError, OSError) as error:  # a busy file, an unreachable catalog
        raise ServingError(f"cannot read the model registry in {home.database}: {error}") from None


def no_champion_reason(home: Home) -> str:
    """Why no model is the champion: the latest evaluation's verdict, or that none was evaluated."""
    latest = _registry(
        home,
        "SELECT challenger, decision, array_to_string(reasons, '; ') AS reasons FROM model_evaluations "
        "ORDER BY evaluation_id DESC LIMIT 1",
    )
    if not latest:
        trained = _registry(home, "SELECT count(*) AS n FROM models")[0]["n"]
        return "no model trained yet" if not trained else "no model evaluated yet"
    verdict = latest[0]
    return evaluation.verdict_text(verdict["challenger"], verdict["decision"], verdict["reasons"])


def champion_row(home: Home) -> dict:
    """The registry's champion row, checked against models/CURRENT; ServingError when they disagree,
    NoChampion when there is none."""
    rows = _registry(home, "SELECT * FROM models WHERE status = 'champion'")
    pointer = train.current_version(home.models)
    if not rows:
        if pointer:
            raise ServingError(
                f"models/CURRENT names {pointer!r} but the registry has no champion; a promotion or rollback "
                "may be under way: try again in a moment, and check `labelloop model list`"
            )
        raise NoChampion(f"no champion yet: {no_champion_reason(home)}")
    row = rows[0]
    if pointer != row["model_version"]:
        named = f"names {pointer!r}" if pointer else "is missing"
        raise ServingError(
            f"models/CURRENT {named} but the registry's champion is {row['model_version']}; a promotion or "
            "rollback may be under way: try again in a moment, and check `labelloop model list`"
        )
    return row


def model_row(home: Home, version: str) -> dict:
    """A pinned version's registry row: it must be a model that has served (champion or retired)."""
    rows = _registry(home, "SELECT * FROM models WHERE model_version = ?", [version])
    if not rows:
        raise ServingError(f"no model {version!r} in the registry (labelloop model list)")
    if rows[0]["status"] not in SERVABLE_STATUSES:
        raise ServingError(
            f"{version} is {rows[0]['status']}: only a champion or a retired champion can be served"
        )
    return rows[0]


def read_model(folder: Path, row: dict) -> tuple[train.TrainedModel | train.ExternalModel, dict]:
    """The model and metadata in `folder`, refused unless the model file is the one its metadata
    names, holds only trusted types (skops, never pickle), and the metadata names the registry
    row's model."""
    version = row["model_version"]
    try:
        model, metadata = train.load(folder, row.get("file_sha256"))
    except train.ModelFileError as error:
        raise ServingError(f"{version}: {str(error).removeprefix(folder.name + ': ')}") from None
    # The registry row is the record of what was trained; the files must describe the same model.
    expected = {
        "model_version": version, "corpus_version": row["corpus_version"],
        "train_data_hash": row["train_data_hash"], "n_classes": len(model.classes),
    }
    if row.get("n_classes") is not None and int(row["n_classes"]) != len(model.classes):
        raise ServingError(f"{version}: the model in {folder} has {len(model.classes)} classes, the registry "
                           f"{row['n_classes']}")
    differing = sorted(key for key, value in expected.items() if metadata.get(key) != value)
    if differing:
        shown = ", ".join(f"{key} {metadata.get(key)!r} (registry: {expected[key]!r})" for key in differing)
        raise ServingError(f"{version}: metadata.json in {folder} does not match the registry: {shown}")
    return model, metadata


@dataclass(frozen=True)
class Champion:
    """A served model: the champion (or a pinned past champion) with what serving needs to know.

    `confirm_below`: predictions whose confidence is below it should go to a person for review
    (None when the registry has no threshold for this model)."""

    home: Home
    version: str
    folder: Path
    corpus_version: int
    trained_at: datetime | None
    confirm_below: float | None
    gold_metrics: dict
    metadata: dict
    model: train.TrainedModel | train.ExternalModel = field(repr=False)

    @classmethod
    def load(cls, home_or_path: Home | str | os.PathLike | None = None, version: str | None = None) -> Champion:
        """The champion of a home (LABELLOOP_HOME when None); `version` pins a past or present
        champion instead. Raises NoChampion or ServingError with the reason."""
        home = as_home(home_or_path)
        row = champion_row(home) if version is None else model_row(home, version)
        folder = home.model_folder(row["path"])
        model, metadata = read_model(folder, row)
        return cls(
            home=home, version=row["model_version"], folder=folder, corpus_version=int(row["corpus_version"]),
            trained_at=row["trained_at"],
            confirm_below=None if row["confirm_below"] is None else float(row["confirm_below"]),
            gold_metrics={"accuracy": _number(row["gold_accuracy"]), "macro_f1": _number(row["gold_macro_f1"]),
                          "n_gold": int(row["n_gold"])},
            metadata=metadata, model=model,
        )

    @property
    def classes(self) -> list[str]:
        return [str(label) for label in self.model.classes]

    @property
    def external(self) -> bool:
        """Whether the team's own trainer made this model (training.yaml `trainer`)."""
        return isinstance(self.model, train.ExternalModel)

    @property
    def reference(self) -> str | None:
        """An external model's reference as its trainer reported it (a path, a registry URI)."""
        return self.model.reference if self.external else None

    @property
    def reads(self) -> str | None:
        """What the model reads from an item: text, features or text+features (None: external,
        its trainer's code decides)."""
        return None if self.external else self.model.spec.input

    @property
    def feature_length(self) -> int | None:
        """Numbers per item, for a model that reads features (None for text only, and external)."""
        return self.model.feature_length

    def is_current(self) -> bool:
        """Whether models/CURRENT still names this model: a cheap check (one small file) for a
        long-running server to call between requests and reload when it turns False."""
        return train.current_version(self.home.models) == self.version

    def _frame(self, items) -> pl.DataFrame:
        """Items as the model reads them: strings (text), lists of numbers (features), or mappings
        with `text` and/or `features`; refused with the reason when they do not fit the model."""
        if isinstance(items, np.ndarray):
            items = items.tolist()
        if isinstance(items, (str, dict)):
            items = [items]
        rows = list(items)
        if rows and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rows):
            rows = [rows]  # one item's features
        texts, features = [], []
        for position, row in enumerate(rows):
            text, numbers = None, None
            if isinstance(row, str):
                text = row
            elif isinstance(row, dict):
                text, numbers = row.get("text"), row.get("features")
            elif isinstance(row, (list, tuple)):
                numbers = row
            else:
                raise ServingError(f"item {position}: give text, a list of numbers, or a mapping with text/features")
            texts.append(self._checked_text(position, text))
            features.append(self._checked_features(position, numbers))
        return pl.DataFrame({"text": texts, "features": features},
                            schema={"text": pl.String, "features": pl.List(pl.Float64)})

    def _checked_text(self, position: int, text) -> str | None:
        if TEXT not in self.reads:
            return None
        if not isinstance(text, str) or not text.strip():
            raise ServingError(f"item {position}: {self.version} reads text; give a non-empty string")
        if len(text) > MAX_ITEM_TEXT:
            raise ServingError(f"item {position}: text longer than {MAX_ITEM_TEXT} characters (the items contract)")
        return text.strip(TRIMMED)

    def _checked_features(self, position: int, numbers) -> list[float] | None:
        if FEATURES not in self.reads:
            return None
        try:
            row = np.asarray(numbers, dtype=np.float64)
        except (TypeError, ValueError):
            raise ServingError(f"item {position}: features must be numbers: one list of numbers per item") from None
        if row.ndim != 1 or row.shape[0] != self.feature_length:
            raise ServingError(
                f"item {position}: features must be {self.feature_length} numbers ({self.version} was trained on "
                f"{self.feature_length}); got an array of shape {row.shape}"
            )
        if not np.isfinite(row).all():
            raise ServingError(f"item {position}: features must be finite numbers (no NaN or infinity)")
        return row.tolist()

    def predict_proba(self, items) -> np.ndarray:
        """One row of class probabilities per item, columns in the order of `classes`. Items are
        strings (a text model), lists of numbers (a features model), or mappings with `text`
        and/or `features`."""
        if self.external:
            raise ServingError(
                f"{self.version} was trained by an external trainer: labelloop holds only its probabilities on the "
                f"items it was trained and scored on. Serve it from its reference ({self.reference}) with your "
                "own code, and send its predictions back through the prediction log (write_prediction_log, "
                "landing/predictions)"
            )
        frame = self._frame(items)
        if frame.height == 0:
            return np.empty((0, len(self.classes)))  # no items: nothing to predict, not an error
        return self.model.predict_proba(frame)

    def predict(self, items) -> tuple[list[str], np.ndarray]:
        """The predicted label and its probability (the confidence) per item."""
        probabilities = self.predict_proba(items)
        best = probabilities.argmax(axis=1) if len(probabilities) else np.empty(0, dtype=int)
        return [self.classes[i] for i in best], probabilities.max(axis=1, initial=0.0)

    def needs_review(self, confidence: float) -> bool:
        """Below `confirm_below`: the prediction should be confirmed by a person before it is trusted."""
        return self.confirm_below is not None and confidence < self.confirm_below

    def prediction_records(self, item_ids, items, served_at: datetime | None = None) -> list[dict]:
        """Prediction-log records as the predictions contract requires, one per item, ready for
        `write_prediction_log`."""
        ids = list(item_ids)
        bad = [item for item in ids if not isinstance(item, str) or not item.strip() or len(item) > 256]
        if bad:
            raise ServingError(f"item ids must be non-empty strings of at most 256 characters; got {bad[0]!r}")
        probabilities = self.predict_proba(items)
        if len(ids) != len(probabilities):
            raise ServingError(f"{len(ids)} item ids for {len(probabilities)} items")
        moment = served_at or datetime.now(UTC)
        if moment.tzinfo is None:
            raise ServingError("served_at must carry a time zone (the contract wants ISO-8601 with zone)")
        labels = self.classes
        records = []
        for item_id, row in zip(ids, probabilities, strict=True):
            best = int(row.argmax())
            records.append({
                "prediction_id": f"{self.version}-{uuid.uuid4()}",
                "item_id": item_id,
                "model_version": self.version,
                "predicted_label": labels[best],
                "confidence": float(row[best]),
                "served_at": moment.isoformat(),
                "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
            })
        return records


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def write_prediction_log(home_or_path: Home | str | os.PathLike | None, records: list[dict],
                         name: str | None = None) -> Path:
    """Land prediction records in landing/predictions/ as one JSON Lines file: written under a
    temp name the ingest never reads, made durable, then renamed into place. An existing file is
    never replaced (a rewritten log would be read again as a new version). Returns the file."""
    home = as_home(home_or_path)
    name = name or f"predictions-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"
    if (not isinstance(name, str) or "/" in name or "\\" in name or name.startswith((".", "_"))
            or not name.lower().endswith(".jsonl")):
        raise ServingError(f"a prediction log's name must be a plain file name ending in .jsonl, not {name!r}")
    folder = home.landing_dir(PREDICTIONS_KIND)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        raise ServingError(f"{target} exists already: give each prediction log a new name")
    try:
        text = "".join(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n" for record in records)
    except (TypeError, ValueError) as error:
        raise ServingError(f"prediction records must be plain JSON objects with finite numbers ({error})") from None
    staging = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        staging.write_text(text, encoding="utf-8")
        sync_to_disk(staging)
        # A hard link fails if the name was taken meanwhile, where a rename would replace the file.
        os.link(staging, target)
    except FileExistsError:
        raise ServingError(f"{target} exists already: give each prediction log a new name") from None
    finally:
        staging.unlink(missing_ok=True)
    sync_to_disk(folder)
    return target


def describe(champion: Champion) -> dict:
    """What `labelloop model current --json` prints: these keys, always all of them."""
    return {
        "model_version": champion.version,
        "path": str(champion.folder),
        "corpus_version": champion.corpus_version,
        "trained_at": champion.trained_at.isoformat() if isinstance(champion.trained_at, datetime)
        else champion.trained_at,
        "classes": champion.classes,
        "reads": champion.reads,
        "pipeline": None if champion.external else champion.model.spec.describe(),
        "trainer": "external" if champion.external else "built-in",
        "reference": champion.reference,
        "command": champion.metadata.get("command") if champion.external else None,
        "feature_length": champion.feature_length,
        "confirm_below": champion.confirm_below,
        "gold_metrics": champion.gold_metrics,
    }
