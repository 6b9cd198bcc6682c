"""Shared fixtures: a real LABELLOOP_HOME under tmp_path and a real Dagster instance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.definitions import build_definitions
from labelloop_assets.resources import build_resources

LABELS = ("zero", "one", "two")

# The tests' own homes may use the public development key (a run elsewhere without
# LABELLOOP_SECRET fails closed; test_trust checks that with this variable removed).
os.environ.setdefault("LABELLOOP_ALLOW_DEVELOPMENT_SECRET", "1")
# Most suites test resolution with the roles their lines claim: their homes trust files landed
# directly in landing/<kind>/ to assert any role. The trust suite replaces this directory with a
# strict one (nobody granted anything) to show that claims are then capped.
TRUSTING_DIRECTORY = "contributors: []\nproducers:\n  - {folder: '.', may_claim: domain_expert}\n"


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
    """Three well-separated classes in 4 dimensions; returns landing records and the truth."""
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
def home(tmp_path: Path, monkeypatch) -> Home:
    if os.environ.get("LABELLOOP_TEST_BACKEND") == "lake":
        # `make test-lake`: the same tests with the lake as the store, a fresh catalog each.
        from labelloop_tests import pg

        monkeypatch.setenv("LABELLOOP_CATALOG", pg.fresh_database("t"))
    home = Home(tmp_path / "home").ensure()
    home.contributors_file.write_text(TRUSTING_DIRECTORY)
    # The test worlds have 15 gold items; the shipped plan wants 30 before it promotes a model.
    home.validation_file.write_text(
        home.validation_file.read_text().replace("min_eval_items: 30", "min_eval_items: 10")
    )
    return home


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


RETRAIN = RetrainPolicy(min_label_changes=2, min_interval_seconds=0)


@pytest.fixture
def defs(home: Home) -> dg.Definitions:
    return build_definitions(home, RETRAIN)


@pytest.fixture
def resources(home: Home) -> dict:
    return build_resources(home, RETRAIN)
