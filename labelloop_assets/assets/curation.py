"""Curation: stage corrections, resolve them per item, promote changes into a versioned corpus."""

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    CORPUS_FRESHNESS,
    config_errors_as_failures,
    labelloop_asset,
    run_id,
)
from labelloop_assets.assets.ingest import raw_corrections
from labelloop_assets.checks.schema_checks import (
    PRODUCTION_CORPUS_SCHEMA,
    VALIDATED_LABELS_SCHEMA,
    column_schema,
    markdown_table,
    schema_check_result,
)
from labelloop_assets.core import bursts, corpus, lake, near_duplicates, registry, resolve, review, schemas, store
from labelloop_assets.resources import LabelloopHome, open_store

GROUP = "curation"
STAGED_SEQ = bursts.STAGED_SEQ
APPLIED_ITEMS = "production_corpus.items_seq"
APPLIED_DECISIONS = "production_corpus.decision_id"
APPLIED_REVIEWS = "production_corpus.review_seq"
RELIABILITY_SEEN = "validated_labels.reliability_stamp"
BURSTS_SEEN = "validated_labels.bursts_stamp"
NEAR_DUPLICATES = "near_duplicates_agree"


@labelloop_asset(
    group=GROUP,
    kinds={"duckdb", "polars"},
    code_version="1",
    deps=[raw_corrections, "predictions", "review_decisions", "correction_bursts"],
    metadata=column_schema(schemas.VALIDATED_LABELS_COLUMNS),
    check_specs=[
        dg.AssetCheckSpec(
            VALIDATED_LABELS_SCHEMA,
            asset="validated_labels",
            blocking=True,
            description="Pandera schema of the staged corrections; a failure keeps the batch out of the corpus.",
        )
    ],
)
def validated_labels(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Staging zone: new corrections joined to the prediction they correct, weighed and resolved per item."""
    with config_errors_as_failures():
        ontology, policy, burst_policy = labelloop.ontology(), labelloop.policy(), labelloop.bursts()
    with open_store(database) as con:
        # Each correction's arrival on the store's clock and the day it counts on for bursts,
        # derived as correction_bursts derived them when it scored the batch.
        new, clock_after = bursts.arrivals(
            con,
            store.rows_since(
                con, "raw_corrections",
                # Not the context, payload hash or file position: nothing here reads them.
                "* EXCLUDE (context, payload_hash, source_file, line_no)",
                store.get_state(con, STAGED_SEQ),
            ),
            burst_policy,
            bursts.STAGED_CLOCK,
        )
        # New reliability estimates can settle items left pending: decide those again too.
        reliability_stamp = store.scalar(
            con, "SELECT CAST(epoch_us(max(estimated_at)) AS BIGINT) FROM contributor_reliability"
        ) or 0
        revisit = (
            store.frame(
                con,
                "SELECT item_id FROM latest_label_decisions WHERE status = 'pending'",
            )
            if reliability_stamp > store.get_state(con, RELIABILITY_SEEN)
            else pl.DataFrame(schema={"item_id": pl.String})
        )
        # A burst held, discarded or released since the last run changes which votes count:
        # decide its items again (and take back labels that only its votes had set).
        bursts_mark = store.get_state(con, BURSTS_SEEN)
        bursts_stamp = store.scalar(
            con, "SELECT CAST(epoch_us(max(status_changed_at)) AS BIGINT) FROM correction_bursts"
        ) or 0
        if bursts_stamp > bursts_mark:
            revisit = pl.concat([
                revisit,
                store.frame(con, bursts.ITEMS_IN_CHANGED_BURSTS_SQL, {"since": bursts_mark}),
            ]).unique()
        burst_table = store.frame(con, "SELECT burst_id, day, scope, key, status FROM correction_bursts")
        staged, decisions, newcomers = _stage_and_resolve(con, new, policy, ontology, revisit, burst_table)
        validation = schemas.validate(schemas.validated_labels_schema(ontology.labels), staged)
        if validation.passed and (staged.height or decisions.height):
            with store.transaction(con):
                store.append(con, "validated_labels", staged.with_columns(run_id=pl.lit(run_id(context))))
                store.append(con, "label_decisions", decisions.with_columns(run_id=pl.lit(run_id(context))))
                if new.height:
                    store.set_state(con, STAGED_SEQ, int(new["seq"].max()))
                    store.set_state(con, bursts.STAGED_CLOCK, clock_after)
                store.set_state(con, RELIABILITY_SEEN, int(reliability_stamp))
                # The policies these decisions followed (roles were capped by the directory at
                # ingest, which records contributors.yaml with raw_corrections).
                store.record_policies(con, run_id(context), "validated_labels", ("governance.yaml", "ontology.yaml"))
        if validation.passed:
            store.set_state(con, BURSTS_SEEN, int(bursts_stamp))
        total = store.scalar(con, "SELECT count(*) FROM validated_labels")
    held = bursts.blocked_events(staged, burst_table, (bursts.HELD,)).len() if staged.height else 0
    late = staged.filter(
        pl.col("burst_day") != pl.col("created_at").dt.convert_time_zone("UTC").dt.date()
    ).height if staged.height else 0
    statuses = (
        decisions.group_by("status").len("items").sort("status") if decisions.height else pl.DataFrame()
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "staged": staged.height if validation.passed else 0,
            "committed": validation.passed,
            "items_decided": decisions.height,
            "promote": _count(decisions, resolve.PROMOTE),
            "confirmed": _count(decisions, resolve.CONFIRMED),
            "pending": _count(decisions, resolve.PENDING),
            "escalate": _count(decisions, resolve.ESCALATE),
            "revert": _count(decisions, resolve.REVERT),
            "held_by_bursts": held,
            "newcomer_votes": newcomers,
            "late_corrections": late,
            "decisions_by_status": dg.MetadataValue.md(markdown_table(statuses)),
        },
        check_results=[
            schema_check_result(VALIDATED_LABELS_SCHEMA, "validated_labels", validation, blocking=True)
        ],
    )


def _stage_and_resolve(
    con, new: pl.DataFrame, policy: resolve.ResolutionPolicy, ontology, revisit: pl.DataFrame,
    burst_table: pl.DataFrame,
):
    if new.height == 0 and revisit.height == 0:
        return new, pl.DataFrame(), 0
    predictions = store.lookup(
        con,
        "predictions",
        "prediction_id",
        new.filter(pl.col("prediction_id").is_not_null()),
        "t.item_id, t.predicted_label, t.confidence, t.model_version",
    )
    touched = pl.concat([new.select("item_id"), revisit.select("item_id")]).unique()
    current = store.lookup(con, "production_corpus", "item_id", touched, "t.label, t.reviewer_confirmed")
    # An item landed in the same batch is not in the corpus yet: its label is the initial one
    # production_corpus is about to apply, so a correction is judged against that.
    arriving = store.lookup(
        con, "items", "item_id", touched.join(current.select("item_id"), on="item_id", how="anti"),
        "t.initial_label AS label, false AS reviewer_confirmed",
    ).filter(pl.col("label").is_not_null())
    current = pl.concat([current, arriving], how="vertical_relaxed")
    staged = resolve.stage(new, predictions, current, policy)
    earlier = store.lookup(
        con, "validated_labels", "item_id", touched, "t.* EXCLUDE (item_id, run_id)"
    )
    # A reviewer's decision settles the votes that came before it: only later ones count.
    reviewed = (
        store.lookup(con, "review_decisions", "item_id", touched, "t.decision, t.ingested_at")
        .filter(pl.col("decision").is_in(list(review.CLOSING)))
        .group_by("item_id")
        .agg(reviewed_at=pl.col("ingested_at").max())
    )
    earlier = earlier.join(reviewed, on="item_id", how="left").filter(
        pl.col("reviewed_at").is_null() | (pl.col("staged_at") > pl.col("reviewed_at"))
    ).drop("reviewed_at", "staged_at")
    reliability = store.lookup(
        con, "contributor_reliability", "user_pseudonym",
        pl.concat([earlier.select("user_pseudonym"), staged.select("user_pseudonym")]),
        "t.accuracy, t.n_votes",
    )
    # Older votes are read in today's terms; a vote for a term since dropped counts no more.
    # One time zone name for every timestamp: the store's frames say "Etc/UTC", times computed
    # in Polars may say "UTC", and concat does not unify the two.
    utc = pl.col(pl.Datetime("us", "*")).dt.convert_time_zone("UTC")
    votes = pl.concat([earlier.with_columns(utc), staged.with_columns(utc)], how="diagonal_relaxed").with_columns(
        corrected_label=ontology.harmonize("corrected_label")
    ).drop_nulls("corrected_label")
    blocked = bursts.blocked_events(votes, burst_table)
    if blocked.len():  # a filter copies every row, even when it keeps them all
        votes = votes.filter(~pl.col("event_id").is_in(blocked.implode()))
    votes = resolve.with_history(con, votes)
    newcomers = votes.filter(resolve.is_newcomer(policy)).height
    # A label that only blocked votes set is judged from the label it replaced.
    undo = _labels_set_by(con, touched, blocked)
    judged = current.join(undo, on="item_id", how="left").with_columns(
        label=pl.coalesce("restore", "label")
    ).drop("restore")
    decisions = resolve.resolve(votes, judged, policy, reliability)
    return staged, _with_reverts(decisions, undo, current), newcomers


def _labels_set_by(con, touched: pl.DataFrame, blocked: pl.Series) -> pl.DataFrame:
    """(item_id, restore) for touched items whose current label came from a vote change whose
    events are all blocked: restore is the label before that change."""
    if blocked.len() == 0:
        return pl.DataFrame(schema={"item_id": pl.String, "restore": pl.String})
    latest = store.lookup(
        con, "label_history", "item_id", touched,
        "t.corpus_version, t.change_order, t.change_kind, t.previous_label, t.event_ids",
    ).sort("corpus_version", "change_order").group_by("item_id").last()
    return latest.filter(
        (pl.col("change_kind") == corpus.CORRECTION)
        & pl.col("previous_label").is_not_null()
        & pl.col("event_ids").list.eval(pl.element().is_in(blocked.implode())).list.all()
    ).select("item_id", pl.col("previous_label").alias("restore"))


def _with_reverts(decisions: pl.DataFrame, undo: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """Items to restore get a `revert` decision unless the votes that count change them anyway."""
    if undo.height == 0:
        return decisions
    changing = decisions.filter(pl.col("status") == resolve.PROMOTE).select("item_id") if decisions.height \
        else pl.DataFrame(schema={"item_id": pl.String})
    reverts = undo.join(changing, on="item_id", how="anti").join(
        current.select("item_id", pl.col("label").alias("current_label")), on="item_id"
    ).select(
        "item_id", "current_label",
        pl.col("restore").alias("proposed_label"),
        support=pl.lit(0.0), total_weight=pl.lit(0.0), share=pl.lit(0.0),
        n_contributors=pl.lit(0, pl.Int32), n_supporters=pl.lit(0, pl.Int32), by_authority=pl.lit(False),
        status=pl.lit(resolve.REVERT), escalation_reason=pl.lit(None, pl.String),
        event_ids=pl.lit([], pl.List(pl.String)),
        rationale=pl.lit("the votes that set this label are in a held or discarded correction burst"),
    )
    kept = decisions.join(reverts.select("item_id"), on="item_id", how="anti") if decisions.height else decisions
    return pl.concat([kept, reverts], how="diagonal_relaxed")


def _count(decisions: pl.DataFrame, status: str) -> int:
    return decisions.filter(pl.col("status") == status).height if decisions.height else 0


@labelloop_asset(
    group=GROUP,
    kinds={"duckdb", "polars"},
    code_version="1",
    deps=[validated_labels, "items", "review_decisions"],
    freshness_policy=CORPUS_FRESHNESS,
    metadata=column_schema(schemas.PRODUCTION_CORPUS_COLUMNS),
    check_specs=[
        dg.AssetCheckSpec(
            PRODUCTION_CORPUS_SCHEMA,
            asset="production_corpus",
            blocking=True,
            description="Pandera schema of the new corpus rows: one current label per item, in the ontology.",
        ),
        dg.AssetCheckSpec(
            NEAR_DUPLICATES,
            asset="production_corpus",
            description="Warns when items with identical or near-identical features carry different labels.",
        ),
    ],
)
def production_corpus(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """One current label per item; every change kept in label_history under a new corpus version."""
    with config_errors_as_failures():
        ontology = labelloop.ontology()
    with open_store(database) as con:
        item_mark, decision_mark = store.get_state(con, APPLIED_ITEMS), store.get_state(con, APPLIED_DECISIONS)
        new_items = store.frame(
            con,
            "SELECT seq, item_id, initial_label, label_source FROM items "
            "WHERE seq > ? AND gold_label IS NULL ORDER BY seq",
            [item_mark],
        )
        decisions = store.frame(
            con, "SELECT * FROM label_decisions WHERE decision_id > ? ORDER BY decision_id", [decision_mark]
        )
        reviews = store.frame(
            con,
            "SELECT seq, decision_id, item_id, decision, label, reviewer_pseudonym, rationale "
            "FROM review_decisions WHERE seq > ? AND decision IN ('accept', 'reject') ORDER BY seq",
            [store.get_state(con, APPLIED_REVIEWS)],
        )
        # Stored labels outside the ontology: a rename maps them to the current term in this
        # version; any left over fail the schema check below and hold the corpus.
        stale = store.frame(
            con,
            "SELECT item_id, label, label_source, human_confirmed, reviewer_confirmed, since_version, updated_version "
            "FROM production_corpus WHERE NOT list_contains($labels, label)",
            {"labels": list(ontology.labels)},
        )
        mapped = stale.with_columns(
            current_term=pl.col("label").replace_strict(ontology.rename_map, default=None)
        )
        renamed = mapped.filter(pl.col("current_term").is_not_null()).select(
            "item_id", pl.col("current_term").alias("label"), pl.col("label").alias("previous_label")
        )
        orphans = mapped.filter(pl.col("current_term").is_null()).drop("current_term")
        touched = pl.concat(
            [new_items.select("item_id"), decisions.select("item_id"), renamed.select("item_id"),
             reviews.select("item_id")]
        )
        current = store.lookup(
            con, "production_corpus", "item_id", touched,
            "t.label, t.human_confirmed, t.reviewer_confirmed, t.label_source, t.since_version",
        )
        previous_version, changes_before = store.corpus_head(con)
        version = previous_version + 1
        changes = corpus.plan_changes(new_items, decisions, current, version, renamed, reviews)
        rows = corpus.corpus_rows(changes, current, version)
        validation = schemas.validate(
            schemas.production_corpus_schema(ontology.labels),
            pl.concat([rows, orphans.select(rows.columns)], how="vertical_relaxed"),
        )
        n_changes = changes.filter(
            pl.col("change_kind").is_in([corpus.CORRECTION, corpus.REVIEW])
            & (pl.col("label") != pl.col("previous_label")).fill_null(True)
        ).height
        if validation.passed:
            # What this run applied, even when it changed no label: the watermarks move with the version.
            applied = {}
            if new_items.height:
                applied[APPLIED_ITEMS] = int(new_items["seq"].max())
            if decisions.height:
                applied[APPLIED_DECISIONS] = int(decisions["decision_id"].max())
            if reviews.height:
                applied[APPLIED_REVIEWS] = int(reviews["seq"].max())
            registry.publish_corpus_version(
                con, registry.CorpusVersion(version, changes, rows, n_changes, changes_before, run_id(context)), applied
            )
        published = validation.passed and changes.height > 0
        if published:
            lake.stamp_corpus_snapshots(con)
        distribution = store.frame(
            con, "SELECT label, count(*) AS items, count(*) FILTER (WHERE human_confirmed) AS "
            "human_confirmed FROM production_corpus GROUP BY label ORDER BY label",
        )
        clashes = near_duplicates.clashes(con)
    latest_version, changes_total = (
        (version, changes_before + n_changes) if published else (previous_version, changes_before)
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": int(distribution["items"].sum()) if distribution.height else 0,
            "corpus_version": latest_version,
            "new_version_published": published,
            "label_changes_this_run": n_changes if published else 0,
            "label_changes_total": changes_total,
            "history_rows_this_run": changes.height if published else 0,
            "label_distribution": dg.MetadataValue.md(markdown_table(distribution)),
        },
        check_results=[
            schema_check_result(PRODUCTION_CORPUS_SCHEMA, "production_corpus", validation, blocking=True),
            dg.AssetCheckResult(
                check_name=NEAR_DUPLICATES,
                passed=clashes.height == 0,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "conflicting_groups": clashes.height,
                    "groups": dg.MetadataValue.md(
                        markdown_table(clashes.select("items", "labels").head(20))
                    ),
                    "review_with": "labelloop lineage ITEM_ID",
                },
            ),
        ],
    )


@labelloop_asset(
    group=GROUP,
    kinds={"duckdb"},
    code_version="1",
    deps=[production_corpus],
)
def escalations(context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource):
    """Open conflicts waiting for a reviewer: reason, evidence, age, SLA deadline and breach flag."""
    # Its SLA check is checks/scheduled_checks.py: it runs after this asset and hourly on its own.
    with config_errors_as_failures():
        policy = labelloop.policy()
    with open_store(database) as con:
        rows = review.open_escalations(con, policy)
        store.replace(con, "escalations", rows)
    breached = rows.filter(pl.col("sla_breached")) if rows.height else rows
    oldest = float(rows["age_hours"].max()) if rows.height else 0.0
    by_reason = rows.group_by("reason").len("escalations").sort("reason") if rows.height else pl.DataFrame()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows.height,
            "open_escalations": rows.height,
            "sla_breaches": breached.height,
            "oldest_age_hours": dg.MetadataValue.float(round(oldest, 2)),
            "sla_hours": dg.MetadataValue.float(policy.escalation_sla_hours),
            "by_reason": dg.MetadataValue.md(markdown_table(by_reason)),
            "review_with": "labelloop review list",
        },
    )
