"""Where labelloop keeps its state and the knobs read from the environment."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import stat
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from labelloop_assets.core.lake import Lake

LANDING_KINDS = ("items", "predictions", "corrections", "reviews")
DEFAULTS_DIR = Path(__file__).resolve().parent.parent / "defaults"
CONFIG_FILES = (
    "ontology.yaml", "governance.yaml", "contributors.yaml", "monitoring.yaml", "validation.yaml", "training.yaml",
    "review_tasks.yaml",
)
DEV_SECRET = "labelloop-development-secret-do-not-use-in-production"


class LabelloopConfigError(ValueError):
    """A configuration file or environment variable is wrong; the message says how."""


@dataclass(frozen=True)
class Home:
    """The folder that holds all labelloop state (the `LABELLOOP_HOME` contract)."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get("LABELLOOP_HOME", "data/home")).resolve())

    @property
    def database(self) -> Path | Lake:
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

    @property
    def review_tasks_file(self) -> Path:
        return self.root / "review_tasks.yaml"

    def ensure(self) -> Home:
        """Create the folder layout and copy default configuration files that are missing.

        Every path that writes under a home comes through here: it also sets this process's file
        access (LABELLOOP_FILE_ACCESS, `apply_file_access`) and takes away what that setting does
        not allow from the home's own folders and files (`tighten_home`).
        """
        mask = apply_file_access()
        for kind in LANDING_KINDS:
            self.landing_dir(kind).mkdir(parents=True, exist_ok=True)
        self.models.mkdir(parents=True, exist_ok=True)
        self.reports.mkdir(parents=True, exist_ok=True)
        for name in CONFIG_FILES:
            target = self.root / name
            if not target.exists():
                shutil.copyfile(DEFAULTS_DIR / name, target)
        tighten_home(self, mask)
        return self


# Who may read what labelloop writes. `owner` (the default): files 0600, folders 0700. `group`:
# files 0640, folders 0750, so that the home's group (analysts reading published views, a reviewer
# account, producers) may read. The value is the process umask, the bits taken away.
FILE_ACCESS_ENV = "LABELLOOP_FILE_ACCESS"
FILE_ACCESS = {"owner": 0o077, "group": 0o027}
# Folders of the home whose whole content labelloop writes (.published holds the generations of the
# published Parquet files): tightened all the way down, once per process. Anything else in the
# home is tightened at its own level only (a folder that others may not enter hides what it
# holds), and the landing zone not at all (see `tighten_home`).
OWN_TREES = ("models", "reports", "published", ".published", "outbox")
_TIGHTENED: set[tuple[Path, int]] = set()


def file_access_mask() -> int:
    """The bits LABELLOOP_FILE_ACCESS takes away (a umask); a config error for an unknown value."""
    raw = os.environ.get(FILE_ACCESS_ENV) or "owner"
    if raw not in FILE_ACCESS:
        raise LabelloopConfigError(
            f"{FILE_ACCESS_ENV}={raw!r} is not a file access setting: use `owner` (the default: files "
            "0600, folders 0700, only the account that runs labelloop reads them) or `group` (files 0640, "
            "folders 0750: the home's group may read, nobody else)"
        )
    return FILE_ACCESS[raw]


def apply_file_access() -> int:
    """Set this process's umask from LABELLOOP_FILE_ACCESS, so that every file and folder it
    creates from now on (the store, its write-ahead log, models, published Parquet, reports,
    landed review files) is created with that access. Returns the mask."""
    mask = file_access_mask()
    os.umask(mask)
    return mask


def tighten_home(home: Home, mask: int) -> None:
    """Take the bits `mask` forbids away from the home's own files and folders, never adding any.

    The home folder and the store file(s) each time (a store created by a process that did not
    come through `Home.ensure`); once per process, the home's other top-level entries and
    everything under models/, reports/ and published/. The landing zone keeps the modes it has:
    producers may be other accounts, which its operator lets write there (for example the home's
    group with LABELLOOP_FILE_ACCESS=group and `chmod g+ws` on the landing folders); tightening it
    would stop their files from landing. Folders labelloop creates there follow the setting.
    """
    _tighten(home.root, mask)
    store_file = home.database_file
    for path in (store_file, store_file.with_name(store_file.name + ".wal")):
        _tighten(path, mask)
    if (home.root, mask) in _TIGHTENED:
        return
    _TIGHTENED.add((home.root, mask))
    try:
        entries = list(os.scandir(home.root))
    except OSError:
        return
    for entry in entries:
        if entry.name == home.landing.name:
            continue
        _tighten(Path(entry.path), mask)
        if entry.name in OWN_TREES and entry.is_dir(follow_symlinks=False):
            for folder, folders, files in os.walk(entry.path):
                for name in (*folders, *files):
                    _tighten(Path(folder) / name, mask)


def _tighten(path: Path, mask: int) -> None:
    """chmod away the bits of `mask` that `path` has; symbolic links (whose target may lie outside
    the home), missing paths and paths of other accounts (not ours to change) are left alone."""
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & mask:
            os.chmod(path, stat.S_IMODE(mode) & ~mask)
    except OSError:
        pass


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
    def from_env(cls) -> RetrainPolicy:
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
    def load(cls, path: Path) -> MonitoringSettings:
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
                (settings.drift_current_days <= 0 or settings.drift_baseline_days <= 0,
                 "drift windows must be positive"),
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
    """The keyed-hash secret from LABELLOOP_SECRET; fails closed without it, except for the demo,
    and refuses a weak one (`secret_problems`)."""
    secret = os.environ.get("LABELLOOP_SECRET")
    if secret:
        if secret == DEV_SECRET and development_secret_allowed():
            return secret.encode("utf-8")
        problems = secret_problems(secret)
        if problems:
            raise LabelloopConfigError(weak_secret_message(problems))
        return secret.encode("utf-8")
    if development_secret_allowed():
        return DEV_SECRET.encode("utf-8")
    raise LabelloopConfigError(MISSING_SECRET)


# The strength rule for LABELLOOP_SECRET. Pseudonyms are HMAC-SHA256(key, user_id): whoever holds
# the database and knows one person's id can test guesses of the key offline at millions per
# second, so the key itself must be out of reach of guessing.
SECRET_MIN_LENGTH = 32
# 10, not 12: a random 32-hex-digit key (128 bits) has fewer than 12 different digits 1.7% of the
# time (measured on 200,000), fewer than 10 about once in 10,000.
SECRET_MIN_DISTINCT = 10
SECRET_MIN_BITS = 128
SECRET_REPEAT = 8  # a stretch this long found twice is a repeated pattern
SECRET_RUN = 4  # ... and so is a run this long stepping by -1, 0 or +1 (aaaa, abcd, 4321)
SECRET_LONG_RUN = 10
# zxcvbn's guesses (log10) as a share of the length: random values score about 1 (of 4,000 random
# 32-hex-digit keys the lowest scored 0.83); words, keyboard walks and counters score 0.45-0.6.
SECRET_GUESS_SHARE = 0.75
SECRET_STRIDE = 8
# Character kinds and how many characters each offers (the estimate is length x log2 of the
# sum over the kinds used).
_KINDS = (
    (frozenset(string.ascii_lowercase), 26),
    (frozenset(string.ascii_uppercase), 26),
    (frozenset(string.digits), 10),
    (frozenset(string.punctuation + " "), 33),
)
_BEYOND_ASCII = 100
# Words people put in a key they chose themselves (matched ignoring case).
_COMMON_WORDS = (
    "password", "passwd", "secret", "changeme", "example", "labelloop", "default", "letmein",
    "admin", "test", "dummy", "sample", "qwert", "asdfg", "zxcvb",
)
SECRET_RULE = (
    f"at least {SECRET_MIN_LENGTH} characters, {SECRET_MIN_DISTINCT} of them different, an estimated "
    f"{SECRET_MIN_BITS} bits or more (length x log2 of the character kinds used), no repeated, "
    "sequential or strided pattern, no common word, and no pattern a password cracker tries first "
    "(zxcvbn's estimate at least 10^(0.75 x length) guesses)"
)
NEW_SECRET_HINT = (
    "`labelloop secret new` prints one (or `python -c 'import secrets; print(secrets.token_urlsafe(32))'`); "
    "keep it outside LABELLOOP_HOME"
)


def estimated_bits(value: str) -> float:
    """Length x log2 of the characters the value's kinds offer: what a guesser who knows the
    kinds used must search at most. A generous estimate for a value a person chose."""
    pool = sum(size for kind, size in _KINDS if any(ch in kind for ch in value))
    if any(ord(ch) > 127 for ch in value):
        pool += _BEYOND_ASCII
    return len(value) * math.log2(pool) if pool > 1 else 0.0


def secret_problems(value: str) -> list[str]:
    """Why `value` is too weak to be LABELLOOP_SECRET (empty: it meets the rule). The reasons
    never quote the value."""
    problems = []
    if len(value) < SECRET_MIN_LENGTH:
        problems.append(f"it is shorter than {SECRET_MIN_LENGTH} characters")
    if len(set(value)) < SECRET_MIN_DISTINCT:
        problems.append(f"it has fewer than {SECRET_MIN_DISTINCT} different characters")
    if estimated_bits(value) < SECRET_MIN_BITS:
        problems.append(
            f"its estimated strength is under {SECRET_MIN_BITS} bits (length x log2 of the character kinds used)"
        )
    if _repeats(value):
        problems.append(f"a stretch of {SECRET_REPEAT} characters comes twice (a repeated pattern)")
    if _sequential(value):
        problems.append("it is largely made of runs like aaaa, abcd or 4321 (a sequential pattern)")
    if _strided(value):
        problems.append("every few characters it repeats or counts on (aZ1!aZ2!..., Aa1!Bb2@...: a strided pattern)")
    guesses = _guesses_log10(value)
    if guesses < SECRET_GUESS_SHARE * len(value):
        problems.append(
            f"it follows patterns that password crackers try first (words, names, keyboard walks, "
            f"dates, repeats): zxcvbn estimates about 10^{guesses:.0f} guesses"
        )
    if value == DEV_SECRET:
        problems.append("it is the public development key")
    elif any(word in value.lower() for word in _COMMON_WORDS):
        problems.append("it contains a common word (such as secret, password, test or labelloop)")
    return problems


def weak_secret_message(problems: list[str]) -> str:
    return (
        f"LABELLOOP_SECRET is too weak to be the pseudonymization key: {'; '.join(problems)}. "
        "Whoever holds the database and one person's user id could test guesses of a weak key against "
        f"that person's pseudonym. The rule: {SECRET_RULE}. Use a random value: {NEW_SECRET_HINT}. "
        "A store keeps needing the key its pseudonyms were made with."
    )


def _strided(value: str) -> bool:
    """For some stride p up to SECRET_STRIDE, most characters step from the one p before as that
    one stepped from the one p before it (a repeat is a step of 0): a period with a counter."""
    codes = [ord(ch) for ch in value]
    for p in range(1, SECRET_STRIDE + 1):
        steps = [codes[i] - codes[i - p] for i in range(p, len(codes))]
        same = [steps[i] == steps[i - p] for i in range(p, len(steps))]
        if same and sum(same) >= 0.5 * len(same):
            return True
    return False


@functools.lru_cache(maxsize=8)  # every step and command asks; zxcvbn takes a few milliseconds
def _guesses_log10(value: str) -> float:
    """zxcvbn's estimate of the guesses a cracker needs (it knows words, names, keyboard walks,
    dates, l33t and repeats); a random value scores about its length (10 guesses a character)."""
    from zxcvbn import zxcvbn

    return float(zxcvbn(value[:100])["guesses_log10"])


def _repeats(value: str) -> bool:
    seen = set()
    for start in range(len(value) - SECRET_REPEAT + 1):
        stretch = value[start:start + SECRET_REPEAT]
        if stretch in seen:
            return True
        seen.add(stretch)
    return False


def _sequential(value: str) -> bool:
    """Runs of SECRET_RUN or more characters, each one step (-1, 0 or +1, the same step along the
    run) from the one before, cover half the value, or one run is SECRET_LONG_RUN long."""
    covered = longest = start = 0
    for end in range(1, len(value) + 1):
        if end < len(value):
            step = ord(value[end]) - ord(value[end - 1])
            if step in (-1, 0, 1) and (end - start == 1 or step == ord(value[start + 1]) - ord(value[start])):
                continue
        length = end - start
        covered += length if length >= SECRET_RUN else 0
        longest = max(longest, length)
        start = end
    return covered * 2 >= len(value) > 0 or longest >= SECRET_LONG_RUN


def quoted(text: str, limit: int = 80) -> str:
    """A value someone typed, quoted for a message: escaped, and cut when it is very long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
