"""Each day's review tasks: what annotators and reviewers should look at next, in the outbox."""

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import config_errors_as_failures, labelloop_asset, run_id
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import store, tasks, train
from labelloop_assets.resources import LabelloopHome, open_store


@labelloop_asset(
    group="monitoring",
    kinds={"duckdb", "jsonl"},
    code_version="1",
    deps=["label_issue_candidates", "production_corpus", "predictions", "model_evaluation"],
)
def review_tasks(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Today's work list for annotators and reviewers under a budget, by expected benefit, in outbox/review_tasks/."""
    with config_errors_as_failures():
        settings = labelloop.review_tasks()
        psi_warn = labelloop.monitoring().drift_label_psi_warn
        event_clock = labelloop.policy().escalation_clock == "events"
    home = labelloop.home()
    with open_store(database) as con:
        now = tasks.clock(con, event_clock)
        signals = tasks.signals(con, event_clock)
        items = store.frame(con, tasks.POOL_ITEMS_SQL)
        served = store.frame(con, tasks.SERVED_SQL)
        champion = store.frame(con, "SELECT model_version, path, file_sha256 FROM models "
                                    "WHERE status = 'champion'").to_dicts()
        drift = tasks.drift_terms(con, psi_warn)
        before = tasks.task_status(con, now)
    model = None
    if champion:
        try:
            model, _ = train.load(home.model_folder(champion[0]["path"]), champion[0]["file_sha256"])
        except train.ModelFileError as error:
            context.log.warning(f"review tasks: the champion's files cannot be read ({error}); "
                                "using the latest served predictions")
    view = tasks.model_view(champion[0]["model_version"] if champion else None, model, items, served)
    issued = tasks.plan(signals, view, drift, before, settings, now)
    outbox = None
    if issued.height:
        outbox = tasks.outbox_path(home.root, now, run_id(context))
        with open_store(database) as con:
            store.append(con, "review_tasks", issued.with_columns(
                outbox_file=pl.lit(str(outbox)), run_id=pl.lit(run_id(context))
            ))
        # The store first: an answer to a task in the file is never refused as unknown. A file
        # lost after the commit only costs its tasks' expiry and re-issue.
        tasks.write_outbox(home.root / outbox, tasks.outbox_lines(issued, items))
    counts = before.group_by("status").len() if before.height else pl.DataFrame()
    status = dict(counts.iter_rows()) if counts.height else {}
    top = issued.head(20).select("rank", "item_id", "role", "policy", pl.col("score").round(3), "why")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": issued.height,
            "tasks_issued": issued.height,
            "annotator_tasks": int((issued["role"] == tasks.ANNOTATOR).sum()) if issued.height else 0,
            "audit_tasks": int((issued["role"] == tasks.REVIEWER).sum()) if issued.height else 0,
            "reissued": int(issued["reissue_of"].is_not_null().sum()) if issued.height else 0,
            "open_before": status.get(tasks.OPEN, 0),
            "answered_so_far": status.get(tasks.ANSWERED, 0),
            "expired_so_far": status.get(tasks.EXPIRED, 0),
            "outbox_file": str(outbox) if outbox else "none (nothing to ask)",
            "top_tasks": dg.MetadataValue.md(markdown_table(top)),
            "list_with": "labelloop tasks list",
        }
    )
