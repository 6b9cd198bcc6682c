"""Checks that need no new data to change their verdict: an escalation ages past its SLA, a held
burst keeps waiting, while nothing lands. Each runs with its asset (in ingest_job) and also on its
own, hourly (`scheduled_checks_job`), reading the store as it is now.
"""

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import DUCKDB_POOL, config_errors_as_failures
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import bursts, review, store
from labelloop_assets.resources import TABLE_GROUP_OF, LabelloopHome, open_store

ESCALATIONS_WITHIN_SLA = "escalations_within_sla"
NO_HELD_BURSTS = "no_held_bursts"
# Both checks read tables of the curation group (escalations and correction_bursts are curation
# assets). A check step is no single asset's materialization, so without this it would take every
# group's writer lock on the lake and wait for another worker's training.
CURATION_TABLES = (TABLE_GROUP_OF["curation"],)
HELD_BURSTS_SQL = (
    "SELECT burst_id, reason, evidence FROM correction_bursts WHERE status = ? ORDER BY day DESC, score DESC"
)


@dg.asset_check(
    asset="escalations",
    name=ESCALATIONS_WITHIN_SLA,
    description="Warns when an open escalation is older than its SLA (governance.yaml escalation.sla_hours); "
    "evaluated after each ingest and hourly, so a breach shows while no files land.",
    pool=DUCKDB_POOL,
)
def escalations_within_sla(labelloop: LabelloopHome, database: DuckDBResource) -> dg.AssetCheckResult:
    """Open escalations aged on the governance clock now, not as of the last ingest."""
    with config_errors_as_failures():
        policy = labelloop.policy()
    with open_store(database, groups=CURATION_TABLES) as con:
        rows = review.open_escalations(con, policy)
    breached = rows.filter(pl.col("sla_breached")) if rows.height else rows
    return dg.AssetCheckResult(
        passed=breached.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "open": rows.height,
            "breached": breached.height,
            "sla_hours": dg.MetadataValue.float(policy.escalation_sla_hours),
            "breached_escalations": dg.MetadataValue.md(
                markdown_table(
                    breached.select("escalation_id", "item_id", "reason", pl.col("age_hours").round(1)).head(20)
                )
                if breached.height else "_none_"
            ),
            "act_with": "labelloop review list",
        },
    )


@dg.asset_check(
    asset="correction_bursts",
    name=NO_HELD_BURSTS,
    description="Warns while a severe correction burst holds its corrections (and retraining) until a reviewer "
    "releases or discards it; evaluated after each ingest and hourly.",
    pool=DUCKDB_POOL,
)
def no_held_bursts(database: DuckDBResource) -> dg.AssetCheckResult:
    """The bursts still held now: a release or discard lands as a review file, so this clears on the next ingest."""
    with open_store(database, groups=CURATION_TABLES) as con:
        held = store.frame(con, HELD_BURSTS_SQL, [bursts.HELD])
    return dg.AssetCheckResult(
        passed=held.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "held": held.height,
            "held_bursts": dg.MetadataValue.md(markdown_table(held)),
            "act_with": "labelloop review release|discard BURST_ID --rationale ... --as REVIEWER_ID",
        },
    )


scheduled_checks = [escalations_within_sla, no_held_bursts]
