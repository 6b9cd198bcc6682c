"""Monitoring: label quality figures over time."""

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    DUCKDB_POOL,
    OWNERS,
    config_errors_as_failures,
    run_id,
)
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import metrics, publish, store
from labelloop_assets.jobs import INGEST_JOB
from labelloop_assets.resources import LabelloopHome, open_store

FIGURES = (
    "coverage",
    "correction_rate",
    "model_gold_accuracy",
    "n_items",
    "n_human_confirmed",
    "n_predictions",
    "n_corrections",
    "n_quarantined",
    "n_pending_items",
    "n_escalated_items",
    "n_open_escalations",
    "n_sla_breaches",
)


@dg.asset(
    group_name="monitoring",
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=["production_corpus", "retrained_model", "escalations"],
)
def label_quality_metrics(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Coverage, correction rate, per-label counts and the current model's accuracy on gold items."""
    with config_errors_as_failures():
        labels = labelloop.ontology().labels
    with open_store(database) as con:
        summary = metrics.summary(con)
        per_label = metrics.by_label(con, labels)
        with store.transaction(con):
            store.append(con, "label_quality_metrics", pl.DataFrame([{**summary, "run_id": run_id(context)}]))
            store.append(
                con,
                "label_quality_by_label",
                per_label.with_columns(
                    corpus_version=pl.lit(summary["corpus_version"]), run_id=pl.lit(run_id(context))
                ),
            )
    numbers = {
        name: (dg.MetadataValue.float(round(float(summary[name]), 4)) if isinstance(summary[name], float)
               else dg.MetadataValue.int(int(summary[name])))
        for name in FIGURES
        if summary[name] is not None
    }
    return dg.MaterializeResult(
        metadata={
            **numbers,
            "corpus_version": summary["corpus_version"] or 0,
            "model_version": summary["model_version"] or "none yet",
            "by_label": dg.MetadataValue.md(markdown_table(per_label.with_columns(pl.selectors.float().round(3)))),
        }
    )


@dg.asset(
    group_name="monitoring",
    kinds={"duckdb", "parquet"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=["label_quality_metrics"],
)
def published_views(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Parquet snapshots of the analyst views in published/, readable while the loop writes."""
    folder = labelloop.home().published
    # The ingest job refreshes what follows the batch; whole-history views follow training.
    names = publish.EVERY_RUN if _job_name(context) == INGEST_JOB else publish.PUBLISHED
    with open_store(database) as con:
        counts = publish.publish(con, folder, names)
    return dg.MaterializeResult(
        metadata={
            "folder": dg.MetadataValue.path(str(folder)),
            "open_with": f".read {folder / 'views.sql'}",
            "rows": dg.MetadataValue.md(
                markdown_table(pl.DataFrame({"view": list(counts), "rows": list(counts.values())}))
            ),
        }
    )


def _job_name(context: dg.AssetExecutionContext) -> str | None:
    try:
        return context.job_name
    except dg.DagsterError:
        return None
