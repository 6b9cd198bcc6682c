"""Store upkeep on a schedule: the lake's small files compacted, unneeded snapshots expired, keys verified."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import labelloop_asset
from labelloop_assets.core import lake, store
from labelloop_assets.core.settings import env_number
from labelloop_assets.resources import open_store

KEYS_UNIQUE = "store_keys_unique"
RETAIN_DAYS_ENV = "LABELLOOP_LAKE_RETAIN_DAYS"


@labelloop_asset(
    group="maintenance",
    kinds={"duckdb"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            KEYS_UNIQUE,
            asset="store_maintenance",
            description="Every table's key is unique "
            "(DuckLake has no PRIMARY KEY: the writes keep keys unique, this verifies it).",
        )
    ],
)
def store_maintenance(context: dg.AssetExecutionContext, database: DuckDBResource) -> dg.MaterializeResult:
    """Lake upkeep: small files compacted, snapshots no corpus version needs expired; every key checked unique."""
    retain_days = float(env_number(RETAIN_DAYS_ENV, 7.0))
    with open_store(database) as con:
        if lake.is_lake(con):
            done = {"backend": "lake", "retain_days": retain_days, **lake.maintain(con, retain_days)}
        else:
            con.execute("CHECKPOINT")
            done = {"backend": "embedded", "checkpointed": True}
        duplicates = store.duplicate_keys(con)
    if duplicates:
        context.log.error(f"duplicate keys: {duplicates}")
    return dg.MaterializeResult(
        metadata=done,
        check_results=[
            dg.AssetCheckResult(
                check_name=KEYS_UNIQUE,
                passed=not duplicates,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"duplicates": dg.MetadataValue.json({t: [str(k) for k in v] for t, v in duplicates.items()})},
            )
        ],
    )
