"""The whole trail of one item's label, from the views analysts query."""

from __future__ import annotations

from datetime import datetime

import duckdb
import polars as pl

from labelloop_assets.core import store
from labelloop_assets.core.tasks import STATUS_SQL

TRAIL_QUERIES: dict[str, str] = {
    # What the item carries (its text cut to 80 characters; `labelloop sql` shows it whole).
    "item": "SELECT item_id, initial_label, label_source, gold_label IS NOT NULL AS is_gold, "
            "concat_ws('+', CASE WHEN text IS NOT NULL THEN 'text' END, "
            "CASE WHEN features IS NOT NULL THEN 'features' END) AS carries, "
            "CASE WHEN length(text) > 80 THEN left(text, 77) || '...' ELSE text END AS text, uri, "
            "ingested_at FROM items WHERE item_id = $item",
    "predictions": "SELECT prediction_id, model_version, predicted_label, confidence, served_at "
                   "FROM predictions WHERE item_id = $item ORDER BY served_at",
    # The review tasks issued for the item (status on the store's clock, $now), each with its
    # answers and the label changes they made.
    "tasks": "SELECT t.task_id, t.role, t.policy, t.attempt, t.issued_at, t.expires_at, "
             "(SELECT list(r.event_id || ' -> ' || r.corrected_label ORDER BY r.seq) FROM raw_corrections r "
             " WHERE r.task_id = t.task_id) AS answers, "
             "(SELECT list(DISTINCT 'v' || h.corpus_version || ': ' || h.previous_label || ' -> ' || h.label) "
             " FROM label_history h JOIN raw_corrections r ON list_contains(h.event_ids, r.event_id) "
             " WHERE r.task_id = t.task_id AND h.previous_label <> h.label) AS label_changes, t.status "
             f"FROM ({STATUS_SQL}) t WHERE t.item_id = $item ORDER BY t.issued_at, t.task_id",
    "corrections": "SELECT v.event_id, v.corrected_label, v.user_pseudonym, v.user_role, v.source, "
                   "true AS consent, v.model_version, v.predicted_label, v.vote_weight, r.task_id, v.rationale, "
                   "v.created_at FROM validated_labels v LEFT JOIN raw_corrections r USING (event_id) "
                   "WHERE v.item_id = $item ORDER BY v.created_at",
    "set_aside": "SELECT record_id AS event_id, reason, detail, source_file, line_no "
                 "FROM quarantine WHERE kind = 'corrections' AND item_id = $item ORDER BY reason",
    "decisions": "SELECT decision_id, status, escalation_reason, current_label, proposed_label, "
                 "round(support, 3) AS support, round(share, 3) AS share, n_contributors, decided_at "
                 "FROM label_decisions WHERE item_id = $item ORDER BY decision_id",
    "reviews": "SELECT decision_id, escalation_id, decision, label, reviewer_pseudonym, "
               "reviewer_role, rationale, decided_at FROM review_decisions "
               "WHERE item_id = $item ORDER BY seq",
    "versions": "SELECT label, change_kind, approved_by, valid_from_version, valid_to_version, "
                "event_ids, rationale, models_trained FROM label_versions "
                "WHERE item_id = $item ORDER BY valid_from_version, change_order",
}


def item_trail(con: duckdb.DuckDBPyConnection, item_id: str, now: datetime) -> dict[str, pl.DataFrame]:
    """Every section of the trail; empty frames where the item has none. `now`: the store's clock,
    which says whether a task is still open (core/tasks.py `clock`)."""
    return {
        name: store.frame(con, sql, {"item": item_id, **({"now": now} if name == "tasks" else {})})
        for name, sql in TRAIL_QUERIES.items()
    }


def quarantined_lines(con: duckdb.DuckDBPyConnection, item_id: str) -> pl.DataFrame:
    """Lines of any kind that named the item and were quarantined, counted by kind and reason: why an
    item may be missing from the store, or have no label history."""
    return store.frame(
        con,
        "SELECT kind, reason, count(*) AS lines FROM quarantine WHERE item_id = $item GROUP BY ALL ORDER BY ALL",
        {"item": item_id},
    )
