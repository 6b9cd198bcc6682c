"""Shared fixtures: a real LABELLOOP_HOME under tmp_path and a real Dagster instance."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import dagster as dg
import numpy as np
import pytest
import sqlalchemy
import yaml

from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.definitions import build_definitions
from labelloop_assets.resources import build_resources
from labelloop_tests.pg import in_ci

LABELS = ("zero", "one", "two")

# The tests' own homes may use the public development key (a run elsewhere without
# LABELLOOP_SECRET fails closed; test_trust checks that with this variable removed).
os.environ.setdefault("LABELLOOP_ALLOW_DEVELOPMENT_SECRET", "1")
# Most suites test resolution with the roles their lines claim: their homes trust files landed
# directly in landing/<kind>/ to assert any role. The trust suite replaces this directory with a
# strict one (nobody granted anything) to show that claims are then capped.
EXTERNAL_TEST_MODELS = ("m-001", "m0001", "m0002", "m", "m-client", "baseline-v1")
TRUSTING_DIRECTORY = "contributors: []\nproducers:\n  - {folder: '.', may_claim: domain_expert}\n"


def require_module(name: str, why: str) -> ModuleType:
    """Import a test-only dependency (the dev extras): skip the calling test without it locally,
    fail under CI, which installs the dev extras, so a comparison can never silently not run."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        reason = f"{name} is not installed ({exc}); {why}: pip install -e '.[dev]'"
        if in_ci():
            pytest.fail(f"{reason} (CI=true, so this fails instead of skipping)", pytrace=False)
        pytest.skip(reason)


@contextmanager
def umask_kept():
    """For module-wide fixtures that make homes: Home.ensure() sets the process umask, and the
    tests that follow keep the one they had."""
    before = os.umask(0o022)
    os.umask(before)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture(autouse=True)
def _restore_umask():
    """Home.ensure() sets the process umask (LABELLOOP_FILE_ACCESS); each test starts from the same."""
    with umask_kept():
        yield


def set_yaml(path: Path, changes: dict) -> None:
    """Change settings in a YAML file: `changes` mirrors the file's nesting, e.g.
    `set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})`. Every key must already be
    in the file, so an edit whose setting was renamed or moved fails here instead of silently
    leaving the shipped value (as a text replacement that no longer matches would). The file is
    rewritten from the parsed settings: its comments are not kept."""
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    _set_existing(settings, changes, path.name, ())
    path.write_text(yaml.safe_dump(settings, sort_keys=False, default_flow_style=None), encoding="utf-8")


def _set_existing(settings, changes: dict, file_name: str, above: tuple) -> None:
    for key, value in changes.items():
        where = ".".join(map(str, (*above, key)))
        if not isinstance(settings, dict) or key not in settings:
            raise AssertionError(f"{file_name} has no setting {where}; the test edits a setting that is not there")
        if isinstance(value, dict) and value:
            if not isinstance(settings[key], dict):
                raise AssertionError(f"{file_name}: {where} is {settings[key]!r}, not a mapping")
            _set_existing(settings[key], value, file_name, (*above, key))
        else:
            settings[key] = value


def write_jsonl(folder: Path, name: str, records: list) -> Path:
    """Land a file the way producers must: temp name first, then an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8",
    )
    tmp.rename(folder / name)
    return folder / name


def make_items(n: int = 60, n_gold: int = 15, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """Three well-separated classes in 4 dimensions; returns item records and the truth. The first
    `n_gold` carry a `gold_label`: land them with `land_items`, which declares those in gold.jsonl."""
    rng = np.random.default_rng(seed)
    records, truth = [], {}
    for i in range(n):
        label = LABELS[i % 3]
        centre = np.eye(4)[i % 3] * 6
        item_id = f"item-{i:03d}"
        truth[item_id] = label
        record = {"item_id": item_id, "features": (centre + rng.normal(size=4)).round(3).tolist()}
        if i < n_gold:
            record["gold_label"] = label
        else:
            record["initial_label"] = label
            record["label_source"] = "vendor"
        records.append(record)
    return records, truth


def land_items(home: Home, records: list, name: str = "items.jsonl") -> Path:
    """Land item records the way a deployment gets them: records with a `gold_label` are
    declared in the home's gold.jsonl (appended; ids already declared are skipped), the rest
    land in landing/items/<name>. Returns the landed file."""
    declared = set()
    if home.gold_file.exists():
        declared = {json.loads(line)["item_id"] for line in home.gold_file.read_text().splitlines() if line.strip()}
    gold = [r for r in records if isinstance(r, dict) and "gold_label" in r and r["item_id"] not in declared]
    if gold:
        with home.gold_file.open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(r) + "\n" for r in gold)
    return write_jsonl(
        home.landing_dir("items"), name, [r for r in records if not (isinstance(r, dict) and "gold_label" in r)]
    )


def correction(event_id: str, item_id: str, label: str, user: str = "alice",
               role: str = "reviewer", **extra) -> dict:
    record = {
        "event_id": event_id,
        "item_id": item_id,
        "corrected_label": label,
        "user_id": user,
        "user_role": role,
        "source": "annotation",
        "consent": True,
        "created_at": "2026-03-02T10:00:00+00:00",
    }
    record.update(extra)
    return record


@pytest.fixture
def home(tmp_path: Path, monkeypatch, _restored_world) -> Home:
    if _restored_world is not None:
        return _restored_world.home
    if os.environ.get("LABELLOOP_TEST_BACKEND") == "lake":
        # `make test-lake`: the same tests with the lake as the store, a fresh catalog each.
        from labelloop_tests import pg

        monkeypatch.setenv("LABELLOOP_CATALOG", pg.fresh_database("t"))
    return prepared_home(tmp_path / "home")


def prepared_home(root: Path) -> Home:
    """A home as the suites expect it: claimed roles trusted (TRUSTING_DIRECTORY), the prediction
    logs' external model versions declared, and a plan that promotes on the worlds' 15 gold items."""
    home = Home(root).ensure()
    home.contributors_file.write_text(TRUSTING_DIRECTORY)
    with home.training_file.open("a") as config:
        config.write(f"external_model_versions: {list(EXTERNAL_TEST_MODELS)}\n")
    # The shipped plan wants 30 gold items before it promotes a model.
    set_yaml(home.validation_file, {"min_eval_items": 10})
    return home


# Dagster's instances keep their run and event history in SQLite files, and open one for every
# event (connect, insert, commit, close): with SQLite's default synchronous=FULL each event waits
# for the disk, about half the time of a Dagster run in this suite. No test is about Dagster's own
# history surviving a power cut, so the suite's processes open those files with synchronous=OFF:
# every write still goes through SQLite into the file (other connections and processes, and the
# privacy scan, read it as before; a killed process loses nothing), it is only not flushed to the
# disk. Only SQLite through SQLAlchemy, which is Dagster's storage: labelloop's store is DuckDB.
@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
def _sqlite_not_flushed_to_disk(dbapi_connection, _connection_record) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=OFF")


@pytest.fixture
def instance(_restored_world):
    folder = None if _restored_world is None else str(_restored_world.instance_dir)
    with dg.instance_for_test(temp_dir=folder) as test_instance:
        yield test_instance


RETRAIN = RetrainPolicy(min_label_changes=2, min_interval_seconds=0)


@dataclass(frozen=True)
class TrainedWorld:
    """A home and its Dagster instance after make_items() landed (its 15 gold items declared in
    gold.jsonl), ingest_job, then retrain_job (m0001 promoted): the state several suites start
    from, built once per module and copied back for each test to the very paths it was built at
    (views.sql and Dagster's event log record absolute paths, so each copy is the state a build
    there gives, its Dagster history included)."""

    root: Path
    template: Path
    ingested: dg.ExecuteInProcessResult
    trained: dg.ExecuteInProcessResult

    @property
    def home(self) -> Home:
        return Home(self.root / "home")

    @property
    def instance_dir(self) -> Path:
        return self.root / "dagster"

    def restore(self) -> None:
        """The state as built, whatever the previous test made of it."""
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.template, self.root, symlinks=True)


def land_and_train(home: Home, defs: dg.Definitions, instance) -> tuple[dg.ExecuteInProcessResult, ...]:
    """make_items() landed (its gold items declared in gold.jsonl), then ingest_job and retrain_job
    (m0001 promoted): the two runs' results, each asserted successful."""
    land_items(home, make_items()[0])
    results = []
    for job in ("ingest_job", "retrain_job"):
        result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        results.append(result)
    return tuple(results)


def build_trained_world(root: Path) -> TrainedWorld | None:
    """None under `make test-lake` (the store is then a catalog no copy of the home carries)."""
    if os.environ.get("LABELLOOP_TEST_BACKEND") == "lake":
        return None
    with umask_kept(), pytest.MonkeyPatch.context() as env:
        env.setenv("LABELLOOP_KEYS_DIR", str(root.parent / f"{root.name}-keys"))
        env.delenv("LABELLOOP_SIGNING_KEY", raising=False)
        home = prepared_home(root / "home")
        (root / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
            results = land_and_train(home, build_definitions(home, RETRAIN), instance)
    template = root.parent / f"{root.name}-template"
    root.rename(template)
    return TrainedWorld(root, template, *results)


@pytest.fixture(scope="module")
def trained_world(tmp_path_factory) -> TrainedWorld | None:
    """The module's TrainedWorld. A test whose fixtures ask for it gets `home` and `instance` as a
    copy of it (restored for each test), not new ones."""
    return build_trained_world(tmp_path_factory.mktemp("trained") / "world")


@pytest.fixture
def _restored_world(request) -> TrainedWorld | None:
    if "trained_world" not in request.fixturenames:
        return None
    world = request.getfixturevalue("trained_world")
    if world is not None:
        world.restore()
    return world


@pytest.fixture
def defs(home: Home) -> dg.Definitions:
    return build_definitions(home, RETRAIN)


@pytest.fixture
def resources(home: Home) -> dict:
    return build_resources(home, RETRAIN)


# Reviewer actions are signed. Every test keeps its private keys under its own tmp_path, never in
# the home (refused) nor in the user's ~/.config.
@pytest.fixture(autouse=True)
def _keys_outside_the_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LABELLOOP_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv("LABELLOOP_SIGNING_KEY", raising=False)


# The reviewers the suites use (reviewers.yaml listed them before contributors.yaml existed).
TEST_REVIEWERS = {"reviewer-0": "reviewer", "reviewer-1": "reviewer", "expert-0": "domain_expert"}


def give_keys(home: Home, *contributor_ids: str) -> None:
    """A key pair for each contributor: the private key in LABELLOOP_KEYS_DIR, the public key
    registered in the home's contributors.yaml. Each is listed already (contributors.yaml or
    reviewers.yaml) or is one of TEST_REVIEWERS, listed here with its role."""
    from labelloop_assets.core import review, signing

    for ident in contributor_ids:
        role = review.directory(home).role_of(ident) or TEST_REVIEWERS[ident]
        key = signing.generate()
        signing.write_private_key(signing.default_key_file(ident), key)
        signing.register_public_key(home, ident, role, signing.public_key_text(key))


def signed(record: dict) -> dict:
    """A review decision signed, as `labelloop review` signs it, with its reviewer's key from give_keys."""
    from labelloop_assets.core import signing

    key = signing.load_private_key(signing.default_key_file(record["reviewer_id"].strip()))
    return signing.sign_review(key, record)


def key_of(contributor_id: str):
    """The private key give_keys made for a contributor (for review.write_decision's signer)."""
    from labelloop_assets.core import signing

    return signing.load_private_key(signing.default_key_file(contributor_id))


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every `labelloop` command that takes no further subcommand, as (words, parser)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield path, parser
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*path, name))
