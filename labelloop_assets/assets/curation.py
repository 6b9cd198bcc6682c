"""Curation: stage corrections, resolve them per item, promote changes into a versioned corpus."""

import json

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    DUCKDB_POOL,
    OWNERS,
    config_errors_as_failures,
    run_id,
)
from labelloop_assets.assets.ingest import raw_corrections
from labelloop_assets.checks.schema_checks import (
    PRODUCTION_CORPUS_SCHEMA,
    VALIDATED_LABELS_SCHEMA,
    markdown_table,
    schema_check_result,
)
from labelloop_assets.core import bursts, corpus, resolve, review, schemas, store
from labelloop_assets.resources import LabelloopHome, open_store

GROUP = "curation"
STAGED_SEQ = "validated_labels.raw_seq"
APPLIED_ITEMS = "production_corpus.items_seq"
APPLIED_DECISIONS = "production_corpus.decision_id"
APPLIED_REVIEWS = "production_corpus.review_seq"
RELIABILITY_SEEN = "validated_labels.reliability_stamp"
BURST_ACKS_SEEN = "validated_labels.burst_acks_seq"
NEAR_DUPLICATES = "near_duplicates_agree"
# Items whose features agree to this many decimals are the same item for this check.
NEAR_DUPLICATE_DECIMALS = 2
NEAR_DUPLICATES_SQL = f"""
    WITH keyed AS (
        SELECT c.item_id, c.label,
               hash(list_transform(i.features, lambda x: round(x, {NEAR_DUPLICATE_DECIMALS}))) AS shape
        FROM production_corpus c JOIN items i USING (item_id)
    )
    SELECT shape, list(item_id ORDER BY item_id) AS items, list(DISTINCT label) AS labels
    FROM keyed GROUP BY shape HAVING count(DISTINCT label) > 1
    ORDER BY items[1]
"""


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "polars"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=[raw_corrections, "predictions", "review_decisions", "correction_bursts"],
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
        ontology, policy = labelloop.ontology(), labelloop.policy()
    with open_store(database) as con:
        new = store.frame(
            con,
            "SELECT * FROM raw_corrections WHERE seq > ? ORDER BY seq",
            [store.get_state(con, STAGED_SEQ)],
        )
        # New reliability estimates can settle items left pending: decide those again too.
        reliability_stamp = store.scalar(
            con, "SELECT CAST(epoch_us(max(estimated_at)) AS BIGINT) FROM contributor_reliability"
        ) or 0
        revisit = (
            store.frame(
                con,
                "SELECT item_id FROM label_decisions "
                "QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY decision_id DESC) = 1 "
                "AND status = 'pending'",
            )
            if reliability_stamp > store.get_state(con, RELIABILITY_SEEN)
            else pl.DataFrame(schema={"item_id": pl.String})
        )
        # A burst a reviewer released since the last run lets its held votes count: decide again.
        acks_mark = store.get_state(con, BURST_ACKS_SEEN)
        released = store.frame(
            con,
            "SELECT r.seq, r.escalation_id AS burst_id FROM review_decisions r "
            "JOIN correction_bursts b ON b.burst_id = r.escalation_id "
            "WHERE r.seq > ? AND r.decision = 'release' AND b.status = 'released'",
            [acks_mark],
        )
        last_ack = store.scalar(
            con, "SELECT max(seq) FROM review_decisions WHERE decision IN ('release', 'discard')"
        ) or acks_mark
        if released.height:
            revisit = pl.concat([revisit, store.frame(
                con, "SELECT DISTINCT item_id FROM validated_labels WHERE list_has_any(burst_ids, $ids)",
                {"ids": released["burst_id"].to_list()},
            )]).unique()
        burst_table = store.frame(con, "SELECT burst_id, day, scope, key, status FROM correction_bursts")
        new = _with_bursts(new, burst_table)
        staged, decisions = _stage_and_resolve(con, new, policy, ontology, revisit, burst_table)
        validation = schemas.validate(schemas.validated_labels_schema(ontology.labels), staged)
        if validation.passed and (staged.height or decisions.height):
            with store.transaction(con):
                store.append(con, "validated_labels", staged.with_columns(run_id=pl.lit(run_id(context))))
                store.append(con, "label_decisions", decisions.with_columns(run_id=pl.lit(run_id(context))))
                if new.height:
                    store.set_state(con, STAGED_SEQ, int(new["seq"].max()))
                store.set_state(con, RELIABILITY_SEEN, int(reliability_stamp))
        if validation.passed:
            store.set_state(con, BURST_ACKS_SEEN, int(last_ack))
        total = store.scalar(con, "SELECT count(*) FROM validated_labels")
    held = (
        staged.filter(_blocked(burst_table, bursts.HELD)).height if staged.height and "burst_ids" in staged.columns else 0
    )
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
            "held_by_bursts": held,
            "decisions_by_status": dg.MetadataValue.md(markdown_table(statuses)),
        },
        check_results=[
            schema_check_result(VALIDATED_LABELS_SCHEMA, "validated_labels", validation, blocking=True)
        ],
    )


def _with_bursts(new: pl.DataFrame, burst_table: pl.DataFrame) -> pl.DataFrame:
    """Each new correction with the ids of the bursts (flagged, held or acknowledged) it belongs to."""
    if new.height == 0:
        return new.with_columns(burst_ids=pl.lit(None, pl.List(pl.String)))
    day = pl.col("created_at").dt.convert_time_zone("UTC").dt.date()
    keys = new.select(
        "event_id",
        day.alias("day"),
        pl.col("user_pseudonym").alias(bursts.CONTRIBUTOR),
        bursts.segment_key(pl.col("source"), pl.col("corrected_label")).alias(bursts.SEGMENT),
    ).unpivot(index=["event_id", "day"], on=list(bursts.SCOPES), variable_name="scope", value_name="key")
    members = (
        keys.join(burst_table.select("day", "scope", "key", "burst_id"), on=["day", "scope", "key"])
        .group_by("event_id")
        .agg(pl.col("burst_id").sort().alias("burst_ids"))
    )
    return new.join(members, on="event_id", how="left")


def _blocked(burst_table: pl.DataFrame, *statuses: str) -> pl.Expr:
    """Votes in a burst with one of `statuses` (by default held or discarded) do not count."""
    statuses = statuses or (bursts.HELD, bursts.DISCARDED)
    ids = burst_table.filter(pl.col("status").is_in(list(statuses)))["burst_id"].to_list()
    return pl.col("burst_ids").list.eval(pl.element().is_in(ids)).list.any().fill_null(False)


def _stage_and_resolve(
    con, new: pl.DataFrame, policy: resolve.ResolutionPolicy, ontology, revisit: pl.DataFrame,
    burst_table: pl.DataFrame,
):
    if new.height == 0 and revisit.height == 0:
        return new, pl.DataFrame()
    if new.height == 0:
        new = store.frame(con, "SELECT * FROM raw_corrections LIMIT 0")
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
    votes = pl.concat([earlier, staged], how="diagonal_relaxed").with_columns(
        corrected_label=ontology.harmonize("corrected_label")
    ).drop_nulls("corrected_label").filter(~_blocked(burst_table))
    return staged, resolve.resolve(votes, current, policy, reliability)


def _count(decisions: pl.DataFrame, status: str) -> int:
    return decisions.filter(pl.col("status") == status).height if decisions.height else 0


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "polars"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=[validated_labels, "items", "review_decisions"],
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
            with store.transaction(con):
                if changes.height:
                    store.append(con, "label_history", changes.with_columns(run_id=pl.lit(run_id(context))))
                    _merge_corpus(con, rows)
                    con.execute(
                        "INSERT INTO corpus_versions (corpus_version, n_new_items, n_label_changes, "
                        "n_confirmations, n_items, label_changes_total, run_id) "
                        "SELECT ?, ?, ?, ?, (SELECT count(*) FROM production_corpus), ?, ?",
                        [
                            version,
                            changes.filter(pl.col("change_kind") == corpus.INITIAL).height,
                            n_changes,
                            changes.filter(pl.col("change_kind") == corpus.CONFIRMATION).height,
                            changes_before + n_changes,
                            run_id(context),
                        ],
                    )
                    kinds = dict(changes.group_by("change_kind").len().iter_rows())
                    con.execute(
                        "INSERT INTO audit_log (actor, action, target, outcome, detail, run_id) "
                        "VALUES ('labelloop', 'corpus.publish', ?, 'published', ?, ?)",
                        [f"v{version}", json.dumps(kinds, sort_keys=True), run_id(context)],
                    )
                if new_items.height:
                    store.set_state(con, APPLIED_ITEMS, int(new_items["seq"].max()))
                if decisions.height:
                    store.set_state(con, APPLIED_DECISIONS, int(decisions["decision_id"].max()))
                if reviews.height:
                    store.set_state(con, APPLIED_REVIEWS, int(reviews["seq"].max()))
        published = validation.passed and changes.height > 0
        distribution = store.frame(
            con, "SELECT label, count(*) AS items, count(*) FILTER (WHERE human_confirmed) AS "
            "human_confirmed FROM production_corpus GROUP BY label ORDER BY label",
        )
        clashes = store.frame(con, NEAR_DUPLICATES_SQL)
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


def _merge_corpus(con, rows: pl.DataFrame) -> None:
    """Upsert the touched items only: O(changes), whatever the corpus size."""
    con.register("corpus_rows", rows)
    try:
        con.execute(
            """
            INSERT INTO production_corpus (item_id, label, label_source, human_confirmed,
                reviewer_confirmed, since_version, updated_version)
            SELECT item_id, label, label_source, human_confirmed, reviewer_confirmed,
                   since_version, updated_version
            FROM corpus_rows
            ON CONFLICT (item_id) DO UPDATE SET
                label = excluded.label, label_source = excluded.label_source,
                human_confirmed = excluded.human_confirmed,
                reviewer_confirmed = excluded.reviewer_confirmed,
                since_version = excluded.since_version,
                updated_version = excluded.updated_version, updated_at = now()
            """
        )
    finally:
        con.unregister("corpus_rows")


ESCALATIONS_WITHIN_SLA = "escalations_within_sla"


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=[production_corpus],
    check_specs=[
        dg.AssetCheckSpec(
            ESCALATIONS_WITHIN_SLA,
            asset="escalations",
            description="Warns when an open escalation is older than its SLA (governance.yaml escalation.sla_hours).",
        )
    ],
)
def escalations(context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource):
    """Open conflicts waiting for a reviewer: reason, evidence, age, SLA deadline and breach flag."""
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
        check_results=[
            dg.AssetCheckResult(
                check_name=ESCALATIONS_WITHIN_SLA,
                passed=breached.height == 0,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "breached": breached.height,
                    "breached_escalations": dg.MetadataValue.md(
                        markdown_table(
                            breached.select("escalation_id", "item_id", "reason", "age_hours").head(20)
                        ) if breached.height else "_none_"
                    ),
                },
            )
        ],
    )
