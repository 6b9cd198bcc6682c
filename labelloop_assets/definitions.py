"""The labelloop code location: one Definitions object."""

import dagster as dg

from labelloop_assets.assets import curation, ingest, maintenance, monitoring, quality, tasks, training
from labelloop_assets.assets.landing import landing_files
from labelloop_assets.checks.scheduled_checks import scheduled_checks
from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.jobs import (
    ingest_job,
    maintenance_job,
    maintenance_schedule,
    retrain_job,
    review_tasks_job,
    review_tasks_schedule,
    scheduled_checks_job,
    scheduled_checks_schedule,
)
from labelloop_assets.resources import build_resources
from labelloop_assets.sensors import landing_sensor, retrain_sensor


def build_definitions(
    home: Home | None = None, retrain: RetrainPolicy | None = None, trainer_client: dg.PipesClient | None = None,
) -> dg.Definitions:
    """The loop bound to one LABELLOOP_HOME: `home` when given (tests, the demo), else the
    environment's, read through `dg.EnvVar` when a run or a sensor starts, so that loading the code
    location reads no environment and touches no file. `trainer_client`: the Pipes client that runs
    training.yaml's external trainer (default: a subprocess on this machine)."""
    return dg.Definitions(
        assets=[
            *landing_files,
            *dg.load_assets_from_modules([ingest, curation, quality, monitoring, tasks, training, maintenance]),
        ],
        asset_checks=scheduled_checks,
        jobs=[ingest_job, retrain_job, review_tasks_job, maintenance_job, scheduled_checks_job],
        schedules=[review_tasks_schedule, maintenance_schedule, scheduled_checks_schedule],
        sensors=[landing_sensor, retrain_sensor],
        resources=build_resources(home, retrain, trainer_client),
        executor=dg.in_process_executor,
    )


defs = build_definitions()
