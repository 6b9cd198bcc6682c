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


class LabelloopHome(dg.ConfigurableResource):
    """The `LABELLOOP_HOME` folder: landing zone, models, reports and configuration."""

    root: str

    def home(self) -> Home:
        return Home(Path(self.root).resolve()).ensure()

    def ontology(self) -> Ontology:
        return Ontology.load(self.home().ontology_file)

    def policy(self) -> ResolutionPolicy:
        return ResolutionPolicy.load(self.home().governance_file)

    def bursts(self) -> BurstPolicy:
        path = self.home().governance_file
        return BurstPolicy.from_mapping(load_yaml_mapping(path, "governance").get("bursts"), f"governance file {path}")

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
    return {
        "labelloop": LabelloopHome(root=str(home.root)),
        "database": DuckDBResource(database=str(home.database_file)),
        "retrain_cadence": RetrainCadence(
            min_label_changes=retrain.min_label_changes,
            min_interval_seconds=retrain.min_interval_seconds,
        ),
    }
