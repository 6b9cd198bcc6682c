"""The code location as a deployment loads it: workspace.yaml names labelloop_assets.definitions,
whose module-level `defs` is built from the environment (LABELLOOP_HOME, LABELLOOP_SECRET) when
the module is imported. Every other suite builds its own Definitions for a test home, so only
this one would notice that module failing to load, or a job, sensor or schedule going missing.

Each case runs in a fresh interpreter with a deployment's environment: a new home, a real secret,
no development key and Dagster's instance configured by the shipped dagster.yaml.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCATION = "labelloop"
# What the README documents; the code location may grow, but none of these may go missing.
ASSETS = {
    "items", "predictions", "raw_corrections", "review_decisions", "validated_labels",
    "production_corpus", "escalations", "correction_bursts", "contributor_reliability",
    "label_quality_metrics", "label_quality_signals", "label_issue_candidates", "guideline_report",
    "retrained_model", "model_evaluation", "release_notes", "published_views", "store_maintenance",
    "review_tasks",
}
CHECKS = {
    "raw_corrections_schema", "raw_corrections_counts_reconcile", "validated_labels_schema",
    "production_corpus_schema", "label_drift_within_threshold", "feature_drift_within_threshold",
    "agreement_above_floor", "escalations_within_sla", "near_duplicates_agree", "no_held_bursts",
    "store_keys_unique",
}
JOBS = {"ingest_job", "retrain_job", "review_tasks_job", "maintenance_job", "scheduled_checks_job"}
SENSORS = {"landing_sensor", "retrain_sensor"}
SCHEDULES = {"review_tasks_job_schedule", "maintenance_job_schedule", "scheduled_checks_job_schedule"}

LIST_DEFINITIONS = """
import importlib, json, sys
import dagster as dg

module = importlib.import_module(sys.argv[1])
defs = module.defs
dg.Definitions.validate_loadable(defs)
graph = defs.resolve_asset_graph()
print(json.dumps({
    "module_file": module.__file__,
    "is_definitions": isinstance(defs, dg.Definitions),
    "assets": sorted(key.to_user_string() for key in graph.get_all_asset_keys()),
    "checks": sorted(key.name for key in graph.asset_check_keys),
    "jobs": sorted(job.name for job in defs.resolve_all_job_defs()),
    "sensors": sorted(sensor.name for sensor in defs.sensors),
    "schedules": sorted(schedule.name for schedule in defs.schedules),
}))
"""


@pytest.fixture
def deployment_env(tmp_path: Path) -> dict[str, str]:
    """A deployment's environment: a fresh home, its own secret, the shipped instance config."""
    dagster_home = tmp_path / "dagster-home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("LABELLOOP_ALLOW_DEVELOPMENT_SECRET", "LABELLOOP_CATALOG", "DAGSTER_IS_DEFS_VALIDATION_CLI")
    }
    env.update(
        LABELLOOP_HOME=str(tmp_path / "home"),
        LABELLOOP_SECRET=secrets.token_urlsafe(32),
        DAGSTER_HOME=str(dagster_home),
        LABELLOOP_DAGSTER_STORAGE=str(dagster_home / "storage"),
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def _workspace_module() -> tuple[str, str]:
    [entry] = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    return entry["python_module"]["module_name"], entry["python_module"]["location_name"]


@pytest.mark.slow
def test_the_workspace_loads_as_dagster_loads_it(deployment_env):
    module, location = _workspace_module()
    assert (module, location) == ("labelloop_assets.definitions", LOCATION)
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, env=deployment_env, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"Validation successful for code location {LOCATION}" in output, output
    assert "Validation failed" not in output, output


def test_the_module_level_definitions_list_every_asset_job_sensor_and_schedule(deployment_env, tmp_path):
    module, _ = _workspace_module()
    done = subprocess.run(
        [sys.executable, "-c", LIST_DEFINITIONS, module],
        cwd=tmp_path, env=deployment_env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(listed["module_file"]).is_relative_to(ROOT), listed["module_file"]  # this checkout
    assert listed["is_definitions"]
    assert ASSETS <= set(listed["assets"]), sorted(ASSETS - set(listed["assets"]))
    assert CHECKS <= set(listed["checks"]), sorted(CHECKS - set(listed["checks"]))
    assert JOBS <= set(listed["jobs"]), listed["jobs"]
    assert set(listed["sensors"]) == SENSORS
    assert set(listed["schedules"]) == SCHEDULES
