"""Small pieces shared by the asset modules."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import dagster as dg
import polars as pl

from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import landing_state
from labelloop_assets.core.ingest import IngestReport
from labelloop_assets.core.settings import Home, LabelloopConfigError

DUCKDB_POOL = "duckdb"
OWNERS = ["team:labelloop"]

# How stale the UI lets the loop's outputs get before it warns, then fails their freshness.
# production_corpus and label_quality_metrics are materialized by every ingest run (each batch of
# landed files), which a deployment with traffic sees many times a day: a corpus not refreshed for
# a day means the landing sensor, the daemon or the producers stopped. label_quality_signals
# follows training, which waits for LABELLOOP_RETRAIN_MIN_CHANGES label changes (default 50) and
# an interval of at least LABELLOOP_RETRAIN_MIN_INTERVAL_SECONDS (default an hour): a week
# without one means the loop has stopped learning or its signals stopped updating.
CORPUS_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=1), warn_window=timedelta(hours=12))
METRICS_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=1), warn_window=timedelta(hours=12))
SIGNALS_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=7), warn_window=timedelta(days=2))


def labelloop_asset(*, group: str, kinds: set[str], code_version: str, **attributes):
    """`dg.asset` with what every labelloop asset shares: its owners, and the DuckDB pool (one
    writer of the store at a time). Each asset names its own group, kinds and code version.

    Bump an asset's `code_version` when a change to its code changes what it writes from the same
    inputs (another column, another rule, a corrected figure): Dagster then marks the asset and
    what follows it as changed since their last materialization. A refactor that writes the same
    rows, or a change to its configuration files (recorded per run in policy_uses), keeps it.
    """
    return dg.asset(
        group_name=group, kinds=kinds, code_version=code_version, pool=DUCKDB_POOL, owners=OWNERS, **attributes
    )


@contextmanager
def config_errors_as_failures() -> Iterator[None]:
    """A wrong config file fails the step with its own message, not a traceback."""
    try:
        yield
    except LabelloopConfigError as error:
        raise dg.Failure(description=f"labelloop configuration error: {error}") from None


def run_id(context: dg.AssetExecutionContext) -> str:
    """The run's id; a direct invocation (tests, benchmarks) has no run, so it gets its own id."""
    try:
        return context.run.run_id
    except dg.DagsterError:
        return f"direct-{uuid.uuid4()}"


# The landing listing an ingest step read, recorded with its materialization: the landing sensor
# takes a listing that matches the latest record of its kind as seen (sensors.py).
LANDING_DIGEST = "landing_digest"
GOLD_SIGNATURE = "gold_file_signature"
INGEST_ASSET_OF_KIND = {
    "items": "items", "predictions": "predictions", "corrections": "raw_corrections", "reviews": "review_decisions",
}


def landing_seen(home: Home, kind: str) -> dict:
    """The digest of `kind`'s landing folder, taken before the step reads it: every file it covers
    is then read (or quarantined) by the step, which lists the folder again after this."""
    return {LANDING_DIGEST: landing_state.kind_digest(home, kind)}


def ingest_metadata(report: IngestReport, table_rows: int) -> dict:
    reasons = pl.DataFrame(
        {"reason": list(report.reasons), "rows": list(report.reasons.values())},
        schema={"reason": pl.String, "rows": pl.Int64},
    )
    return {
        "dagster/row_count": dg.MetadataValue.int(table_rows),
        "files_ingested": dg.MetadataValue.int(len(report.files)),
        "records_in": dg.MetadataValue.int(report.records_in),
        "accepted": dg.MetadataValue.int(report.accepted),
        "quarantined": dg.MetadataValue.int(report.quarantined),
        "blank_lines_skipped": dg.MetadataValue.int(report.blank_lines),
        "counts_reconcile": dg.MetadataValue.bool(report.reconciles),
        "quarantine_reasons": dg.MetadataValue.md(markdown_table(reasons)),
        "files": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in report.files) or "_none_"),
    }
