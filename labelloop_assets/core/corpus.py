"""Versioned production corpus: one current label per item, every change kept as history."""

from __future__ import annotations

import polars as pl

from labelloop_assets.core.resolve import CONFIRMED, PROMOTE, REVERT

INITIAL = "initial"
RENAME = "rename"
REVIEW = "review"
CORRECTION = "correction"
CONFIRMATION = "confirmation"
REVERTED = "revert"
RULE_APPROVER = "rule:weighted_vote"
BURST_APPROVER = "governance:correction_bursts"
ONTOLOGY_APPROVER = "ontology:renames"
# Within one corpus version an item's changes apply in this order (label_history.change_order).
CHANGE_ORDER = {INITIAL: 0, RENAME: 1, CORRECTION: 2, CONFIRMATION: 2, REVERTED: 2, REVIEW: 3}


# Every label_history row a version adds has these columns; a kind of change fills some of them.
HISTORY_COLUMNS = {
    "item_id": pl.String,
    "label": pl.String,
    "previous_label": pl.String,
    "change_kind": pl.String,
    "label_source": pl.String,
    "decision_id": pl.Int64,
    "event_ids": pl.List(pl.String),
    "rationale": pl.String,
    "support": pl.Float64,
    "share": pl.Float64,
    "n_contributors": pl.Int32,
    "approved_by": pl.String,
    "by_authority": pl.Boolean,
    "review_decision_id": pl.String,
}


def _history_rows(frame: pl.DataFrame, **columns: pl.Expr) -> pl.DataFrame:
    """History rows from `frame`: the given columns, typed nulls for the others."""
    return frame.select(
        (columns[name] if name in columns else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in HISTORY_COLUMNS.items()
    )


def plan_changes(
    new_items: pl.DataFrame,
    decisions: pl.DataFrame,
    current: pl.DataFrame,
    version: int,
    renamed: pl.DataFrame | None = None,
    reviews: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """History rows for one new corpus version.

    `new_items`: item_id, initial_label, label_source of items not yet in the corpus (gold items
    never reach here). `decisions`: label_decisions rows not applied yet; the latest one per
    item wins. `current`: item_id, label, human_confirmed of the touched items. `renamed`:
    item_id, label (the current term), previous_label of stored labels an ontology rename maps.
    `reviews`: accepted review decisions not applied yet (decision_id, item_id, decision, label,
    reviewer_pseudonym, rationale); `accept` sets the label, `reject` keeps it — both make it
    reviewer-confirmed.
    """
    source = pl.col("label_source").fill_null("unknown")
    initial = _history_rows(
        new_items.filter(pl.col("initial_label").is_not_null()),
        item_id=pl.col("item_id"),
        label=pl.col("initial_label"),
        change_kind=pl.lit(INITIAL),
        label_source=source,
        approved_by=pl.format("import:{}", source),
        by_authority=pl.lit(False),
    )
    if renamed is None:
        renamed = pl.DataFrame(schema={"item_id": pl.String, "label": pl.String, "previous_label": pl.String})
    renames = _history_rows(
        renamed,
        item_id=pl.col("item_id"),
        label=pl.col("label"),
        previous_label=pl.col("previous_label"),
        change_kind=pl.lit(RENAME),
        approved_by=pl.lit(ONTOLOGY_APPROVER),
    )
    # The label each item has before this version's votes: renamed, stored, or just arriving.
    before = (
        pl.concat([current.select("item_id"), initial.select("item_id"), renames.select("item_id")])
        .unique()
        .join(current.select("item_id", pl.col("label").alias("stored")), on="item_id", how="left")
        .join(initial.select("item_id", pl.col("label").alias("arriving")), on="item_id", how="left")
        .join(renames.select("item_id", pl.col("label").alias("renamed_to")), on="item_id", how="left")
        .select("item_id", now=pl.coalesce("renamed_to", "stored", "arriving"))
    )
    latest = (
        decisions.sort("decision_id")
        .group_by("item_id")
        .last()
        .join(current.select("item_id", "human_confirmed"), on="item_id", how="left")
        .join(before, on="item_id", how="left")
    )
    changed = pl.col("status").is_in([PROMOTE, REVERT]) & (pl.col("proposed_label") != pl.col("now")).fill_null(True)
    reverted = pl.col("status") == REVERT
    confirmed = (
        pl.col("status").is_in([PROMOTE, CONFIRMED])
        & (pl.col("proposed_label") == pl.col("now")).fill_null(False)
        & ~pl.col("human_confirmed").fill_null(False)
    )
    from_votes = _history_rows(
        latest.filter(changed | confirmed),
        item_id=pl.col("item_id"),
        label=pl.col("proposed_label"),
        previous_label=pl.col("now"),
        change_kind=pl.when(reverted).then(pl.lit(REVERTED))
        .when(changed).then(pl.lit(CORRECTION)).otherwise(pl.lit(CONFIRMATION)),
        label_source=pl.when(reverted).then(pl.lit(REVERTED)).otherwise(pl.lit(CORRECTION)),
        decision_id=pl.col("decision_id"),
        event_ids=pl.col("event_ids"),
        rationale=pl.col("rationale"),
        support=pl.col("support"),
        share=pl.col("share"),
        n_contributors=pl.col("n_contributors"),
        approved_by=pl.when(reverted).then(pl.lit(BURST_APPROVER)).otherwise(pl.lit(RULE_APPROVER)),
        by_authority=(
            pl.col("by_authority").fill_null(False) if "by_authority" in decisions.columns
            else pl.lit(False)
        ),
    )
    voted = from_votes.filter(pl.col("change_kind").is_in([CORRECTION, REVERTED])).select(
        "item_id", pl.col("label").alias("voted_to")
    )
    review_rows = _review_rows(reviews, voted, before)
    # An item that arrives and is corrected in the same batch gets both rows, in that order.
    changes = pl.concat([initial, renames, from_votes, review_rows], how="vertical")
    return changes.with_columns(
        corpus_version=pl.lit(version, pl.Int32),
        change_order=pl.col("change_kind").replace_strict(CHANGE_ORDER, return_dtype=pl.Int32),
    )


def _review_rows(reviews: pl.DataFrame | None, voted: pl.DataFrame, before: pl.DataFrame) -> pl.DataFrame:
    if reviews is None or reviews.height == 0:
        return pl.DataFrame(schema=HISTORY_COLUMNS)
    ordered = (
        reviews.sort("decision_id")
        .join(voted, on="item_id", how="left")
        .join(before, on="item_id", how="left")
        .with_columns(now=pl.coalesce("voted_to", "now"))
    )
    accept = pl.col("decision") == "accept"
    return _history_rows(
        ordered.filter(accept | pl.col("now").is_not_null()),
        item_id=pl.col("item_id"),
        label=pl.when(accept).then("label").otherwise("now"),
        previous_label=pl.col("now"),
        change_kind=pl.lit(REVIEW),
        label_source=pl.lit(CORRECTION),
        rationale=pl.col("rationale"),
        approved_by=pl.format("reviewer:{}", "reviewer_pseudonym"),
        by_authority=pl.lit(True),
        review_decision_id=pl.col("decision_id"),
    )


def corpus_rows(changes: pl.DataFrame, current: pl.DataFrame, version: int) -> pl.DataFrame:
    """The new current row of every item touched by `changes` (for a keyed merge)."""
    last = changes.group_by("item_id", maintain_order=True).agg(
        pl.all().last(),
        imported_source=pl.col("label_source").filter(pl.col("change_kind") == INITIAL).first(),
    )
    if "reviewer_confirmed" not in current.columns:
        current = current.with_columns(reviewer_confirmed=pl.lit(False))
    before = current.select(
        "item_id",
        pl.col("label").alias("old_label"),
        pl.col("label_source").alias("old_source"),
        pl.col("human_confirmed").alias("old_confirmed"),
        pl.col("reviewer_confirmed").alias("old_reviewer_confirmed"),
        "since_version",
    )
    return last.join(before, on="item_id", how="left").select(
        "item_id",
        "label",
        pl.when(pl.col("change_kind").is_in([INITIAL, REVERTED]))
        .then("label_source")
        .when(pl.col("change_kind").is_in([CONFIRMATION, RENAME]) | (
            (pl.col("change_kind") == REVIEW) & (pl.col("label") == pl.col("old_label"))
        ))
        .then(pl.coalesce("old_source", "imported_source", pl.lit(CORRECTION)))
        .otherwise(pl.lit(CORRECTION))
        .alias("label_source"),
        pl.when(pl.col("change_kind") == RENAME)
        .then(pl.col("old_confirmed").fill_null(False))
        .otherwise(~pl.col("change_kind").is_in([INITIAL, REVERTED]))
        .alias("human_confirmed"),
        # A reviewer's or domain expert's word protects a label; a rename or the crowd
        # confirming it keeps that protection; a crowd change replaces it.
        pl.when(pl.col("change_kind") == INITIAL).then(False)
        .when(pl.col("change_kind").is_in([RENAME, CONFIRMATION]))
        .then(pl.col("old_reviewer_confirmed").fill_null(False) | pl.col("by_authority").fill_null(False))
        .otherwise(pl.col("by_authority").fill_null(False))
        .alias("reviewer_confirmed"),
        pl.when(pl.col("old_label") == pl.col("label"))
        .then("since_version")
        .otherwise(pl.lit(version))
        .cast(pl.Int32)
        .alias("since_version"),
        pl.lit(version, pl.Int32).alias("updated_version"),
    )


def corpus_as_of(con, version: int) -> pl.DataFrame:
    """Exactly the (item_id, label) pairs a model trained on corpus `version` saw."""
    return con.execute(
        "SELECT item_id, label FROM corpus_as_of($version) ORDER BY item_id", {"version": version}
    ).pl()
