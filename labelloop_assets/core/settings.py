"""Where labelloop keeps its state and the knobs read from the environment."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from labelloop_assets.core.lake import Lake

LANDING_KINDS = ("items", "predictions", "corrections", "reviews")
DEFAULTS_DIR = Path(__file__).resolve().parent.parent / "defaults"
CONFIG_FILES = (
    "ontology.yaml", "governance.yaml", "contributors.yaml", "monitoring.yaml", "validation.yaml", "training.yaml",
)
DEV_SECRET = "labelloop-development-secret-do-not-use-in-production"


class LabelloopConfigError(ValueError):
    """A configuration file or environment variable is wrong; the message says how."""


@dataclass(frozen=True)
class Home:
    """The folder that holds all labelloop state (the `LABELLOOP_HOME` contract)."""

    root: Path

    @classmethod
    def from_env(cls) -> "Home":
        return cls(Path(os.environ.get("LABELLOOP_HOME", "data/home")).resolve())

    @property
    def database(self) -> "Path | Lake":
        """Where the store is: the lake when LABELLOOP_CATALOG is set, else the embedded DuckDB file."""
        return Lake.from_env(self.root) or self.database_file

    @property
    def database_file(self) -> Path:
        return self.root / "labelloop.duckdb"

    def has_store(self) -> bool:
        """False only for an embedded home whose file was never written (the lake's catalog says for itself)."""
        return isinstance(self.database, Lake) or self.database_file.exists()

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    def landing_dir(self, kind: str) -> Path:
        return self.landing / kind

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_folder(self, stored: str) -> Path:
        """A model's folder from its `models.path`: relative to this home, so a home that is
        moved or restored elsewhere still finds its models."""
        path = Path(stored)
        if not path.is_absolute():
            return self.root / path
        # Rows written before paths were stored relative: where the home was, or, if it moved,
        # the folder of the same version in this home.
        return path if path.exists() else self.models / path.name

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def ontology_file(self) -> Path:
        return self.root / "ontology.yaml"

    @property
    def governance_file(self) -> Path:
        return self.root / "governance.yaml"

    @property
    def contributors_file(self) -> Path:
        return self.root / "contributors.yaml"

    @property
    def reviewers_file(self) -> Path:
        """Read for homes made before contributors.yaml; its grants are merged into the directory."""
        return self.root / "reviewers.yaml"

    @property
    def gold_file(self) -> Path:
        """The deployment's evaluation set (gold items); only this file declares gold labels."""
        return self.root / "gold.jsonl"

    @property
    def monitoring_file(self) -> Path:
        return self.root / "monitoring.yaml"

    @property
    def validation_file(self) -> Path:
        return self.root / "validation.yaml"

    @property
    def training_file(self) -> Path:
        return self.root / "training.yaml"

    def ensure(self) -> "Home":
        """Create the folder layout and copy default configuration files that are missing."""
        for kind in LANDING_KINDS:
            self.landing_dir(kind).mkdir(parents=True, exist_ok=True)
        self.models.mkdir(parents=True, exist_ok=True)
        self.reports.mkdir(parents=True, exist_ok=True)
        for name in CONFIG_FILES:
            target = self.root / name
            if not target.exists():
                shutil.copyfile(DEFAULTS_DIR / name, target)
        return self


# The SHA-256 of each policy file as this process last read it: the steps that decide record
# them with their decisions (`store.record_policies`), so each decision names the policy it used.
POLICY_READS: dict[str, str] = {}


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML configuration file that must hold a mapping; every problem is a config error."""
    try:
        data = path.read_bytes()
        POLICY_READS[path.name] = file_sha256(data)
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except FileNotFoundError:
        raise LabelloopConfigError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError:
        raise LabelloopConfigError(f"{what} file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise LabelloopConfigError(f"{what} file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LabelloopConfigError(f"{what} file {path} must be a mapping")
    return raw


def config_number(value, like: float | int, where: str) -> float | int:
    """A YAML number for a setting whose default is `like`: whole for an int, finite always."""
    whole = isinstance(like, int)
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or (whole and value != int(value))
    ):
        kind = "a whole number" if whole else "a finite number"
        raise LabelloopConfigError(f"{where} must be {kind}, not {value!r}")
    return int(value) if whole else float(value)


def env_number(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise LabelloopConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise LabelloopConfigError(f"{name}={raw!r} must not be negative")
    return value


@dataclass(frozen=True)
class RetrainPolicy:
    """When the retrain sensor asks for a new model."""

    min_label_changes: int
    min_interval_seconds: float

    @classmethod
    def from_env(cls) -> "RetrainPolicy":
        return cls(
            min_label_changes=env_number("LABELLOOP_RETRAIN_MIN_CHANGES", 50, int),
            min_interval_seconds=env_number("LABELLOOP_RETRAIN_MIN_INTERVAL_SECONDS", 3600.0),
        )


@dataclass(frozen=True)
class MonitoringSettings:
    """monitoring.yaml: drift windows and thresholds, agreement and the label-issue queue."""

    drift_current_days: float = 1.0
    drift_baseline_days: float = 7.0
    drift_label_js_warn: float = 0.1
    drift_label_psi_warn: float = 0.1
    drift_label_p_value: float = 0.01
    drift_feature_psi_warn: float = 0.25
    drift_features_drifted_warn: int = 1
    difficult_confidence: float = 0.6
    segment_days: int = 30
    agreement_pairs: int = 5
    agreement_min_shared: int = 10
    issues_folds: int = 5
    issues_keep: int = 500
    issue_weights: dict | None = None
    guideline_pairs: int = 10
    guideline_examples: int = 3

    @classmethod
    def load(cls, path: Path) -> "MonitoringSettings":
        raw = load_yaml_mapping(path, "monitoring")
        sections = {"drift": "drift_", "agreement": "agreement_", "label_issues": "issues_",
                    "guidelines": "guideline_"}
        unknown = set(raw) - set(sections) - {"difficult_confidence", "segment_days"}
        if unknown:
            raise LabelloopConfigError(
                f"monitoring file {path}: unknown sections {sorted(unknown)}; "
                f"known: {sorted(sections) + ['difficult_confidence', 'segment_days']}"
            )
        values: dict = {}
        for name in ("difficult_confidence", "segment_days"):
            if name in raw:
                values[name] = raw[name]
        for section, prefix in sections.items():
            entries = raw.get(section) or {}
            if not isinstance(entries, dict):
                raise LabelloopConfigError(f"monitoring file {path}: `{section}` must be a mapping")
            for key, value in entries.items():
                name = "issue_weights" if (section, key) == ("label_issues", "weights") else prefix + key
                if name not in cls.__dataclass_fields__:
                    raise LabelloopConfigError(f"monitoring file {path}: unknown setting {section}.{key}")
                values[name] = value
        for name, value in values.items():
            if name == "issue_weights":
                if value is not None and not isinstance(value, dict):
                    raise LabelloopConfigError(f"monitoring file {path}: label_issues.weights must be a mapping")
                continue
            values[name] = config_number(value, getattr(cls, name), f"monitoring file {path}: {name}")
        settings = cls(**values)
        problems = [
            text for broken, text in (
                (settings.issues_folds < 2, "label_issues.folds must be at least 2"),
                (min(settings.issues_keep, settings.agreement_pairs, settings.agreement_min_shared,
                     settings.guideline_pairs, settings.guideline_examples, settings.segment_days,
                     settings.drift_features_drifted_warn) < 1,
                 "counts (keep, pairs, min_shared, examples, segment_days, features_drifted_warn) must be at least 1"),
                (settings.drift_current_days <= 0 or settings.drift_baseline_days <= 0, "drift windows must be positive"),
                (not 0 < settings.difficult_confidence <= 1, "difficult_confidence must be in (0, 1]"),
                (not 0 < settings.drift_label_p_value < 1, "drift.label_p_value must be in (0, 1)"),
                (min(settings.drift_label_js_warn, settings.drift_label_psi_warn, settings.drift_feature_psi_warn) <= 0,
                 "drift thresholds must be positive"),
            ) if broken
        ]
        if problems:
            raise LabelloopConfigError(f"monitoring file {path}: {'; '.join(problems)}")
        return settings


DEV_SECRET_WARNING = (
    "LABELLOOP_SECRET is not set: user ids are pseudonymized with the public development key, "
    "so anyone who guesses an id can link it to its pseudonym. Set LABELLOOP_SECRET (and keep it "
    "out of LABELLOOP_HOME) before real users' data lands."
)


# Set only by `labelloop demo` (and `make demo`/`make ui` on the demo's home): the public
# development key is allowed. Anywhere else a missing LABELLOOP_SECRET stops the run at once.
ALLOW_DEV_SECRET_ENV = "LABELLOOP_ALLOW_DEVELOPMENT_SECRET"
MISSING_SECRET = (
    "LABELLOOP_SECRET is not set. labelloop pseudonymizes user ids with it and refuses to run on "
    "real data without it: set LABELLOOP_SECRET (a long random value kept outside LABELLOOP_HOME, "
    "e.g. `export LABELLOOP_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`). "
    f"Only the demo runs on the public development key ({ALLOW_DEV_SECRET_ENV}=1)."
)


def using_development_secret() -> bool:
    return not os.environ.get("LABELLOOP_SECRET")


def development_secret_allowed() -> bool:
    return os.environ.get(ALLOW_DEV_SECRET_ENV) == "1"


def pseudonymization_key() -> bytes:
    """The keyed-hash secret from LABELLOOP_SECRET; fails closed without it, except for the demo."""
    secret = os.environ.get("LABELLOOP_SECRET")
    if secret:
        return secret.encode("utf-8")
    if development_secret_allowed():
        return DEV_SECRET.encode("utf-8")
    raise LabelloopConfigError(MISSING_SECRET)
