"""Label quality metrics, computed by DuckDB aggregates over the stored tables."""

from __future__ import annotations

import duckdb
import polars as pl

from labelloop_assets.core import store

SUMMARY_SQL = """
WITH corpus AS (
    SELECT count(*) AS n_items, count(*) FILTER (WHERE human_confirmed) AS n_human_confirmed
    FROM production_corpus
), served AS (
    SELECT count(*) AS n_predictions FROM predictions
), corrected AS (
    SELECT count(DISTINCT v.prediction_id) AS n_corrected_predictions
    FROM validated_labels v
    WHERE v.prediction_found AND v.corrected_label <> v.predicted_label
), latest_decision AS (
    SELECT status FROM label_decisions
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY decision_id DESC) = 1
), latest_model AS (
    SELECT model_version, gold_accuracy FROM models ORDER BY trained_at DESC LIMIT 1
)
SELECT
    (SELECT max(corpus_version) FROM corpus_versions) AS corpus_version,
    (SELECT model_version FROM latest_model) AS model_version,
    corpus.n_items,
    (SELECT count(*) FROM items WHERE gold_label IS NOT NULL) AS n_gold_items,
    corpus.n_human_confirmed,
    corpus.n_human_confirmed / nullif(corpus.n_items, 0) AS coverage,
    served.n_predictions,
    corrected.n_corrected_predictions,
    corrected.n_corrected_predictions / nullif(served.n_predictions, 0) AS correction_rate,
    (SELECT count(*) FROM validated_labels) AS n_corrections,
    (SELECT count(*) FROM quarantine) AS n_quarantined,
    (SELECT count(*) FROM latest_decision WHERE status = 'pending') AS n_pending_items,
    (SELECT count(*) FROM latest_decision WHERE status = 'escalate') AS n_escalated_items,
    (SELECT gold_accuracy FROM latest_model) AS model_gold_accuracy,
    (SELECT count(*) FROM escalations) AS n_open_escalations,
    (SELECT count(*) FILTER (WHERE sla_breached) FROM escalations) AS n_sla_breaches
FROM corpus, served, corrected
"""

BY_LABEL_SQL = """
WITH labels AS (SELECT unnest($labels::VARCHAR[]) AS label),
corpus AS (
    SELECT label, count(*) AS n_items, count(*) FILTER (WHERE human_confirmed) AS n_human_confirmed
    FROM production_corpus GROUP BY label
), corrections_to AS (
    SELECT corrected_label AS label, count(*) AS n_corrections_to
    FROM validated_labels GROUP BY corrected_label
), predicted AS (
    SELECT predicted_label AS label, count(*) AS n_predicted FROM predictions GROUP BY 1
), predicted_corrected AS (
    SELECT predicted_label AS label, count(DISTINCT prediction_id) AS n_predicted_corrected
    FROM validated_labels
    WHERE prediction_found AND corrected_label <> predicted_label GROUP BY 1
)
SELECT labels.label,
       coalesce(n_items, 0) AS n_items,
       coalesce(n_human_confirmed, 0) AS n_human_confirmed,
       n_human_confirmed / nullif(n_items, 0) AS coverage,
       coalesce(n_corrections_to, 0) AS n_corrections_to,
       coalesce(n_predicted, 0) AS n_predicted,
       coalesce(n_predicted_corrected, 0) AS n_predicted_corrected,
       n_predicted_corrected / nullif(n_predicted, 0) AS correction_rate
FROM labels
LEFT JOIN corpus USING (label)
LEFT JOIN corrections_to USING (label)
LEFT JOIN predicted USING (label)
LEFT JOIN predicted_corrected USING (label)
ORDER BY labels.label
"""


def summary(con: duckdb.DuckDBPyConnection) -> dict:
    """Corpus-wide figures: coverage, correction rate, pending work, model accuracy on gold."""
    return store.frame(con, SUMMARY_SQL).to_dicts()[0]


def by_label(con: duckdb.DuckDBPyConnection, labels: tuple[str, ...]) -> pl.DataFrame:
    """Per label: items, human-confirmed coverage, corrections towards it, prediction corrections."""
    return store.frame(con, BY_LABEL_SQL, {"labels": list(labels)})
