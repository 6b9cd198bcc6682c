"""Resources: where the loop keeps its state, and the DuckDB connection to it."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from labelloop_assets.core import lake, store, train
from labelloop_assets.core.bursts import BurstPolicy
from labelloop_assets.core.evaluation import ValidationPlan
from labelloop_assets.core.lake import Lake, LakeError
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.settings import (
    Home,
    LabelloopConfigError,
    MonitoringSettings,
    RetrainPolicy,
    load_yaml_mapping,
    pseudonymization_key,
)


# The homes and database files this process's Definitions were built for: the deployment's
# LABELLOOP_HOME (`definitions.defs`), or a test's. Resource fields are run config in Dagster
# (the launchpad, GraphQL and `-c` can set them), so a run naming any other folder or file is
# refused: a run must not be able to bring its own policies, store or models.
_BOUND_HOMES: set[Path] = set()
_BOUND_DATABASES: set[str] = set()


class RunConfigRefused(dg.Failure):
    """A run's config tried to move the home or the store away from the deployment's."""


def _bound_root(root: str) -> Path:
    resolved = Path(root).resolve()
    if resolved not in _BOUND_HOMES:
        raise RunConfigRefused(
            description=(
                f"refused: this run's config points labelloop at {resolved}, but the deployment's "
                f"LABELLOOP_HOME is {', '.join(sorted(str(p) for p in _BOUND_HOMES)) or 'not loaded'}. "
                "The home (and with it the policies, the store and the models) is fixed by the "
                "deployment's environment; a run's config cannot move it."
            )
        )
    return resolved


class LabelloopHome(dg.ConfigurableResource):
    """The `LABELLOOP_HOME` folder: landing zone, models, reports and configuration.

    `root` is set by the deployment (`build_resources`); a run whose config changes it fails.
    """

    root: str

    def home(self) -> Home:
        return Home(_bound_root(self.root)).ensure()

    def ontology(self) -> Ontology:
        return Ontology.load(self.home().ontology_file)

    def policy(self) -> ResolutionPolicy:
        return ResolutionPolicy.load(self.home().governance_file)

    def bursts(self) -> BurstPolicy:
        path = self.home().governance_file
        return BurstPolicy.from_governance(load_yaml_mapping(path, "governance"), f"governance file {path}")

    def monitoring(self) -> MonitoringSettings:
        return MonitoringSettings.load(self.home().monitoring_file)

    def validation_plan(self) -> ValidationPlan:
        return ValidationPlan.load(self.home().validation_file)

    def training(self) -> train.TrainingConfig:
        return train.TrainingConfig.load(self.home().training_file)

    def secret(self) -> bytes:
        return pseudonymization_key()


@contextmanager
def open_store(database: DuckDBResource) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the store with labelloop's schema in place, closed when the block ends.

    The store is the resource's DuckDB file, or the lake when LABELLOOP_CATALOG is set (the
    deployment's environment decides, not a run's config). While another writer holds the store
    the step waits (LABELLOOP_DB_WAIT_SECONDS, logged); past that it fails with a message naming
    the holder. The resource's own connect is not used: its retries take up to 100 s, cannot be
    configured, and end in DuckDB's raw error.
    """
    logger = dg.get_dagster_logger()
    if database.database not in _BOUND_DATABASES or database.connection_config:
        raise RunConfigRefused(
            description=(
                f"refused: this run's config sets the database resource to {database.database!r}"
                f"{' with connection_config ' + repr(database.connection_config) if database.connection_config else ''}; "
                "the store is fixed by the deployment (LABELLOOP_HOME, LABELLOOP_CATALOG), not by a run"
            )
        )
    file = Path(database.database)
    try:
        con = store.connect(
            Lake.from_env(file.parent) or file, config=database.connection_config, on_wait=logger.warning,
            groups=_table_groups(),
        )
    except (store.DatabaseBusy, store.NewerDatabaseFile, LakeError, LabelloopConfigError) as error:
        raise dg.Failure(description=f"labelloop cannot open its database: {error}") from None
    # Closed on failure too: a failed step must not leave the store held by this process.
    with con:
        yield con


# The lake's table group each asset group writes (core/lake.py); anything else takes them all.
TABLE_GROUP_OF = {"ingest": "intake", "curation": "curation", "training": "training", "monitoring": "monitoring"}


def _table_groups() -> tuple[str, ...]:
    """The table group of the asset being materialized, so that writers of other groups (another
    worker's ingest while this one curates) go on at the same time."""
    try:
        context = dg.AssetExecutionContext.get()
        group = context.assets_def.group_names_by_key[context.asset_key]
    except Exception:  # a direct invocation, or no single asset: every group
        return lake.ALL_GROUPS
    return (TABLE_GROUP_OF[group],) if group in TABLE_GROUP_OF else lake.ALL_GROUPS


class RetrainCadence(dg.ConfigurableResource):
    """How many promoted label changes, and how long a pause, before the next training."""

    min_label_changes: int
    min_interval_seconds: float

    def policy(self) -> RetrainPolicy:
        return RetrainPolicy(self.min_label_changes, self.min_interval_seconds)


def build_resources(home: Home, retrain: RetrainPolicy) -> dict:
    """The resources of the deployment bound to `home`; runs may not point them elsewhere."""
    _BOUND_HOMES.add(home.root.resolve())
    _BOUND_DATABASES.add(str(home.database_file))
    return {
        "labelloop": LabelloopHome(root=str(home.root)),
        "database": DuckDBResource(database=str(home.database_file)),
        "retrain_cadence": RetrainCadence(
            min_label_changes=retrain.min_label_changes,
            min_interval_seconds=retrain.min_interval_seconds,
        ),
    }
