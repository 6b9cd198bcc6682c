"""External trainers: the team's own training command, what labelloop hands it, what it accepts back.

training.yaml may name a command (`trainer: {command: [...], timeout_seconds: ...}`). The training
step then runs it through Dagster Pipes with the training rows and the gold items (without their
labels) in two Parquet files, and the trainer reports its model's reference and a Parquet file
of class probabilities for every gold item and every training item (out of sample). Those
probabilities are checked strictly here, and they are all labelloop keeps of an external model:
the gate scores the gold items from them, and label-issue ranking reads the training items'.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from labelloop_assets.core.files import path_sha256
from labelloop_assets.core.settings import LabelloopConfigError, config_number

# The registry's `algorithm` and metadata.json's `trainer` for a model an external trainer made.
EXTERNAL = "external"
PROBABILITIES_FILE = "probabilities.parquet"
TRAINING_ITEMS_FILE = "training_items.parquet"
GOLD_ITEMS_FILE = "gold_items.parquet"
# A row of probabilities may miss 1 by this much (float32 output, rounding in the trainer).
SUM_TOLERANCE = 1e-6
# A command starting with one of these runs under the Python that runs labelloop, so the trainer
# sees the same packages (dagster-pipes, scikit-learn); name another interpreter by its path.
PYTHON_NAMES = ("python", "python3")
# What the trainer may report (pipes metadata, or the JSON file `results_file` names).
REPORT_KEYS = ("reference", "probabilities", "metrics", "results_file")
IDS_SHOWN = 3


class TrainerOutputError(ValueError):
    """What an external trainer reported cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class TrainerConfig:
    """training.yaml's `trainer`: the command (an argv list, run with the home as working
    directory) and how long it may run."""

    command: tuple[str, ...]
    timeout_seconds: float | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> TrainerConfig:
        where = f"{where}: trainer"
        if not isinstance(raw, dict):
            raise LabelloopConfigError(
                f"{where} must be a mapping with command (and optionally timeout_seconds), not {raw!r}"
            )
        known = {"command", "timeout_seconds"}
        if set(raw) - known:
            raise LabelloopConfigError(f"{where}: unknown keys {sorted(map(str, set(raw) - known))}; "
                                       f"known: {sorted(known)}")
        command = raw.get("command")
        if not isinstance(command, list) or not command:
            raise LabelloopConfigError(
                f"{where}.command must be a non-empty list of arguments, e.g. [python, trainer/train.py], "
                f"not {command!r}"
            )
        for position, argument in enumerate(command, start=1):
            if not isinstance(argument, str) or not argument.strip() or "\x00" in argument:
                raise LabelloopConfigError(
                    f"{where}.command argument {position} must be non-empty text, not {argument!r} "
                    "(quote numbers: '5')"
                )
        timeout = raw.get("timeout_seconds")
        if timeout is not None:
            timeout = config_number(timeout, 1.0, f"{where}.timeout_seconds")
            if timeout <= 0:
                raise LabelloopConfigError(f"{where}.timeout_seconds must be above 0")
        return cls(command=tuple(command), timeout_seconds=timeout)

    def argv(self) -> list[str]:
        """The command as it runs: `python` is the interpreter running labelloop."""
        first, *rest = self.command
        return [sys.executable if first in PYTHON_NAMES else first, *rest]

    def recorded(self, working_dir: Path) -> str:
        """The registry's `params`: the command and the SHA-256 of every argument that names a file
        under the working directory, so an edited training script trains a new model."""
        files = {}
        for argument in self.command[1:]:
            path = working_dir / argument
            if path.is_file():
                files[argument] = path_sha256(path)
        return json.dumps({"trainer": EXTERNAL, "command": list(self.command), "files": files}, sort_keys=True)


def is_external(algorithm: str | None) -> bool:
    return algorithm == EXTERNAL


def write_inputs(folder: Path, training: pl.DataFrame, gold: pl.DataFrame) -> tuple[Path, Path]:
    """The training rows (item_id, text, features, uri, label) and the gold items without their
    labels (item_id, text, features, uri) as two Parquet files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"item_id": pl.String, "text": pl.String, "features": pl.List(pl.Float64), "uri": pl.String}
    training_path, gold_path = folder / TRAINING_ITEMS_FILE, folder / GOLD_ITEMS_FILE
    _columns(training, {**columns, "label": pl.String}).write_parquet(training_path)
    _columns(gold, columns).write_parquet(gold_path)
    return training_path, gold_path


def _columns(frame: pl.DataFrame, schema: dict) -> pl.DataFrame:
    return frame.select([
        (pl.col(name) if name in frame.columns else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in schema.items()
    ])


@dataclass(frozen=True)
class TrainerReport:
    """What the trainer said: its model's reference, its own metrics, its probabilities file."""

    reference: str
    probabilities: Path
    metrics: dict


def read_report(metadata: Mapping[str, Any], output_dir: Path) -> TrainerReport:
    """The trainer's report from its materialization metadata (plain values), completed by the
    JSON file `results_file` names when it names one; relative paths are read from `output_dir`."""
    reported = dict(metadata)
    if reported.get("results_file") is not None:
        path = _path(reported["results_file"], output_dir, "results_file")
        try:
            from_file = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise TrainerOutputError(f"results_file {path} is not readable JSON ({error})") from None
        if not isinstance(from_file, dict):
            raise TrainerOutputError(f"results_file {path} must hold a JSON object")
        reported = {**from_file, **{k: v for k, v in reported.items() if k != "results_file"}}
    missing = [key for key in ("reference", "probabilities") if reported.get(key) in (None, "")]
    if missing:
        raise TrainerOutputError(
            f"the trainer did not report {' and '.join(missing)}: report them with "
            "context.report_asset_materialization(metadata={'reference': ..., 'probabilities': ...}) "
            "or in a JSON file named by metadata 'results_file'"
        )
    reference = reported["reference"]
    if not isinstance(reference, str):
        raise TrainerOutputError(f"reference must be text (a path, a registry URI), not {reference!r}")
    metrics = reported.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise TrainerOutputError(f"metrics must be a mapping of names to values, not {metrics!r}")
    return TrainerReport(reference=reference, probabilities=_path(reported["probabilities"], output_dir,
                                                                 "probabilities"), metrics=metrics)


def _path(value: Any, base: Path, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise TrainerOutputError(f"{key} must be a file path, not {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def check_probabilities(path: Path, classes: list[str], training_ids: pl.Series, gold_ids: pl.Series) -> pl.DataFrame:
    """The trainer's probabilities, checked: item_id plus one column per class, a row for every
    training and gold item and for nothing else, finite values in [0, 1], rows summing to 1.
    Returns them sorted by item_id, columns in `classes` order, as Float64."""
    # NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
    import numpy as np
    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise TrainerOutputError(f"the probabilities file {path} does not exist") from None
    except Exception as error:  # polars raises several kinds on a file that is not Parquet
        raise TrainerOutputError(f"the probabilities file {path} is not readable Parquet ({error})") from None
    where = f"probabilities file {path.name}"
    if "item_id" not in frame.columns:
        raise TrainerOutputError(f"{where} has no item_id column (columns: {frame.columns})")
    if frame.schema["item_id"] != pl.String:
        raise TrainerOutputError(
            f"{where}: item_id must be text (as handed to the trainer), not {frame.schema['item_id']}"
        )
    given = [c for c in frame.columns if c != "item_id"]
    unknown, absent = sorted(set(given) - set(classes)), sorted(set(classes) - set(given))
    if unknown or absent:
        raise TrainerOutputError(
            f"{where} must have one column per class ({', '.join(classes)})"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(absent)}" if absent else "")
        )
    not_numbers = [c for c in classes if not frame.schema[c].is_numeric()]
    if not_numbers:
        raise TrainerOutputError(f"{where}: class columns must hold numbers; not: {', '.join(not_numbers)}")
    ids = frame["item_id"]
    if ids.null_count():
        raise TrainerOutputError(f"{where}: {ids.null_count()} row(s) without an item_id")
    duplicated = ids.filter(ids.is_duplicated()).unique().sort()
    if duplicated.len():
        raise TrainerOutputError(
            f"{where}: {duplicated.len()} item_id(s) appear more than once, e.g. {_ids(duplicated)}"
        )
    for role, wanted in (("gold", gold_ids), ("training", training_ids)):
        lacking = wanted.filter(~wanted.is_in(ids.implode())).sort()
        if lacking.len():
            kind = "final model" if role == "gold" else "out-of-sample (K-fold)"
            raise TrainerOutputError(
                f"{where} lacks {lacking.len()} {role} item(s), e.g. {_ids(lacking)}: it needs a row for every "
                f"{role} item ({kind} probabilities)"
            )
    extra = ids.filter(~ids.is_in(pl.concat([training_ids, gold_ids]).implode())).sort()
    if extra.len():
        raise TrainerOutputError(
            f"{where} has {extra.len()} item_id(s) labelloop did not hand the trainer, e.g. {_ids(extra)}"
        )
    values = frame.select(pl.col(classes).cast(pl.Float64)).to_numpy()
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise TrainerOutputError(
            f"{where}: {int(bad.any(axis=1).sum())} row(s) hold values that are not finite numbers in [0, 1], "
            f"e.g. item {ids[row]!r}"
        )
    sums = values.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise TrainerOutputError(
            f"{where}: {int(off.sum())} row(s) do not sum to 1 (within {SUM_TOLERANCE:g}), e.g. item {ids[row]!r} "
            f"sums to {sums[row]:.6g}"
        )
    return frame.select("item_id", *[pl.col(c).cast(pl.Float64) for c in classes]).sort("item_id")


def _ids(ids: pl.Series) -> str:
    shown = ", ".join(repr(i) for i in ids.head(IDS_SHOWN).to_list())
    return shown + (", ..." if ids.len() > IDS_SHOWN else "")


def plain_metrics(metrics: dict) -> dict:
    """The trainer's metrics as JSON can hold them (non-finite numbers become null)."""
    def plain(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)

    return plain(metrics)


def trainer_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The environment a trainer runs with: the worker's, without labelloop's own settings
    (LABELLOOP_SECRET is the pseudonymization key; the others name the home, the catalog and its
    credentials). The trainer gets what it needs through the Pipes extras."""
    return {name: value for name, value in environment.items() if not name.startswith("LABELLOOP_")}
