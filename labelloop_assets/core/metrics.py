"""Label quality metrics, computed by DuckDB aggregates over the stored tables."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import polars as pl

from labelloop_assets.core import agreement, bursts, drift, store, train

# Corrections a held or discarded burst keeps out are left out of every rate below.
COUNTED = f"({bursts.COUNTED_VOTES_SQL})"

SUMMARY_SQL = f"""
WITH corpus AS (
    SELECT count(*) AS n_items, count(*) FILTER (WHERE human_confirmed) AS n_human_confirmed
    FROM production_corpus
), served AS (
    SELECT count(*) AS n_predictions FROM predictions
), corrected AS (
    SELECT count(DISTINCT v.prediction_id) AS n_corrected_predictions
    FROM {COUNTED} v
    WHERE v.prediction_found AND v.corrected_label <> v.predicted_label
), latest_model AS (
    SELECT model_version, gold_accuracy FROM models WHERE status = 'champion' LIMIT 1
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
    (SELECT count(*) FROM latest_label_decisions WHERE status = 'pending') AS n_pending_items,
    (SELECT count(*) FROM latest_label_decisions WHERE status = 'escalate') AS n_escalated_items,
    (SELECT gold_accuracy FROM latest_model) AS model_gold_accuracy,
    (SELECT count(*) FROM escalations) AS n_open_escalations,
    (SELECT count(*) FILTER (WHERE sla_breached) FROM escalations) AS n_sla_breaches
FROM corpus, served, corrected
"""

BY_LABEL_SQL = f"""
WITH labels AS (SELECT unnest($labels::VARCHAR[]) AS label),
corpus AS (
    SELECT label, count(*) AS n_items, count(*) FILTER (WHERE human_confirmed) AS n_human_confirmed
    FROM production_corpus GROUP BY label
), corrections_to AS (
    SELECT corrected_label AS label, count(*) AS n_corrections_to
    FROM {COUNTED} v GROUP BY corrected_label
), predicted AS (
    SELECT predicted_label AS label, count(*) AS n_predicted FROM predictions GROUP BY 1
), predicted_corrected AS (
    SELECT predicted_label AS label, count(DISTINCT prediction_id) AS n_predicted_corrected
    FROM {COUNTED} v
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


# Per segment: where corrections come from (source), which model's predictions (model_version)
# and when (day, by the correction's or the prediction's time). Coverage is over the segment's
# items: those its corrections touched, or that the model version / day served.
BY_SEGMENT_SQL = f"""
WITH votes AS (
    SELECT v.*, (v.label_before IS DISTINCT FROM v.corrected_label) AS changing,
           CAST(timezone('UTC', v.created_at) AS DATE) AS day
    FROM {COUNTED} v
), served AS (
    SELECT p.prediction_id, p.item_id, p.model_version, CAST(timezone('UTC', p.served_at) AS DATE) AS day,
           EXISTS (SELECT 1 FROM {COUNTED} v WHERE v.prediction_id = p.prediction_id
                   AND v.prediction_found AND v.corrected_label <> v.predicted_label) AS corrected
    FROM predictions p
), by_source AS (
    SELECT 'source' AS segment_kind, source AS segment, list(DISTINCT item_id) AS item_ids,
           count(*) AS n_corrections, count(*) FILTER (WHERE changing) AS n_changing,
           NULL::BIGINT AS n_predictions, NULL::BIGINT AS n_corrected_predictions
    FROM votes GROUP BY source
), by_model AS (
    SELECT 'model_version', s.model_version, list(DISTINCT s.item_id),
           (SELECT count(*) FROM votes v WHERE v.model_version = s.model_version),
           (SELECT count(*) FROM votes v WHERE v.model_version = s.model_version AND v.changing),
           count(*), count(*) FILTER (WHERE corrected)
    FROM served s GROUP BY s.model_version
), by_day AS (
    SELECT 'day', CAST(d.day AS VARCHAR),
           list_distinct(flatten([coalesce(s.item_ids, []), coalesce(c.item_ids, [])])),
           coalesce(c.n, 0), coalesce(c.n_changing, 0), s.n, s.n_corrected
    FROM (SELECT day FROM votes UNION SELECT day FROM served) d
    LEFT JOIN (SELECT day, list(DISTINCT item_id) AS item_ids, count(*) AS n,
                      count(*) FILTER (WHERE corrected) AS n_corrected FROM served GROUP BY day) s USING (day)
    LEFT JOIN (SELECT day, list(DISTINCT item_id) AS item_ids, count(*) AS n,
                      count(*) FILTER (WHERE changing) AS n_changing FROM votes GROUP BY day) c USING (day)
    WHERE d.day > (SELECT max(day) FROM (SELECT day FROM votes UNION ALL SELECT day FROM served)) - $days
), segments AS (
    SELECT * FROM by_source UNION ALL SELECT * FROM by_model UNION ALL SELECT * FROM by_day
), coverage AS (
    SELECT g.segment_kind, g.segment, count(c.item_id) AS n_items,
           count(c.item_id) FILTER (WHERE c.human_confirmed) AS n_human_confirmed
    FROM segments g, unnest(g.item_ids) AS u(item_id)
    JOIN production_corpus c ON c.item_id = u.item_id
    GROUP BY ALL
)
SELECT g.segment_kind, g.segment, coalesce(c.n_items, 0) AS n_items,
       coalesce(c.n_human_confirmed, 0) AS n_human_confirmed,
       c.n_human_confirmed / nullif(c.n_items, 0) AS coverage,
       g.n_corrections, g.n_changing, g.n_changing / nullif(g.n_corrections, 0) AS change_rate,
       g.n_predictions, g.n_corrected_predictions,
       g.n_corrected_predictions / nullif(g.n_predictions, 0) AS correction_rate
FROM segments g LEFT JOIN coverage c USING (segment_kind, segment)
ORDER BY g.segment_kind, g.segment
"""

# Each contributor's latest vote per item; votes a held or discarded burst keeps out do not
# count. Items with one vote are left in: agreement ignores them, and says so when none is left.
RATINGS_SQL = f"""
SELECT item_id, user_pseudonym AS rater, corrected_label AS label
FROM ({bursts.COUNTED_VOTES_SQL})
QUALIFY row_number() OVER (PARTITION BY item_id, user_pseudonym ORDER BY seq DESC) = 1
"""

# Difficult items: contributors disagree, or the latest prediction's confidence is low.
DIFFICULT_SQL = f"""
WITH latest AS (
    SELECT item_id, user_pseudonym, corrected_label FROM ({bursts.COUNTED_VOTES_SQL})
    QUALIFY row_number() OVER (PARTITION BY item_id, user_pseudonym ORDER BY seq DESC) = 1
), disputed AS (
    SELECT item_id FROM latest GROUP BY item_id HAVING count(DISTINCT corrected_label) > 1
), unsure AS (
    SELECT item_id FROM predictions
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY served_at DESC) = 1 AND confidence < $threshold
), seen AS (
    SELECT item_id FROM latest UNION SELECT item_id FROM predictions
)
SELECT (SELECT count(*) FROM seen) AS n_seen,
       (SELECT count(*) FROM (SELECT item_id FROM disputed UNION SELECT item_id FROM unsure)) AS n_difficult,
       (SELECT count(*) FROM disputed) AS n_disputed,
       (SELECT count(*) FROM unsure) AS n_low_confidence
"""


def by_segment(con: duckdb.DuckDBPyConnection, days: int = 30) -> pl.DataFrame:
    """Counts, coverage, change rate and prediction correction rate per source, model version and (recent) day."""
    return store.frame(con, BY_SEGMENT_SQL, {"days": days})


def ratings(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """(item_id, rater, label): the votes inter-annotator agreement is computed on."""
    return store.frame(con, RATINGS_SQL)


def difficult(con: duckdb.DuckDBPyConnection, confidence_below: float) -> dict:
    """Items with disagreement or a low-confidence latest prediction, among items seen."""
    row = store.frame(con, DIFFICULT_SQL, {"threshold": confidence_below}).to_dicts()[0]
    row["prevalence"] = row["n_difficult"] / row["n_seen"] if row["n_seen"] else None
    return row


def drift_windows(con: duckdb.DuckDBPyConnection, current_days: float, baseline_days: float) -> dict:
    """The current window ends at the newest served prediction (the event clock, so replays work)."""
    end = store.scalar(con, "SELECT max(served_at) FROM predictions")
    corrections_end = store.scalar(con, "SELECT max(created_at) FROM validated_labels")
    return {"predictions": _window(end, current_days, baseline_days),
            "corrections": _window(corrections_end, current_days, baseline_days)}


def _window(end, current_days: float, baseline_days: float) -> dict | None:
    if end is None:
        return None
    current_from = end - timedelta(days=current_days)
    return {"baseline_from": current_from - timedelta(days=baseline_days), "current_from": current_from,
            "current_to": end}


def window_values(con: duckdb.DuckDBPyConnection, sql: str, window: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(baseline rows, current rows) of a query with $start and $end parameters."""
    baseline = store.frame(con, sql, {"start": window["baseline_from"], "end": window["current_from"], "closed": False})
    current = store.frame(con, sql, {"start": window["current_from"], "end": window["current_to"], "closed": True})
    return baseline, current


# The baseline window is [start, end); the current one [start, end] ($closed), so that the
# newest event, which ends the current window, is in it.
_IN_WINDOW = "{t} >= $start AND ({t} < $end OR ($closed AND {t} = $end))"
PREDICTED_LABELS_SQL = "SELECT predicted_label AS label FROM predictions WHERE " + _IN_WINDOW.format(t="served_at")
# Corrections a reviewer discarded (a burst found not genuine) are no signal of the label mix;
# held ones are still undecided and count (a burst should show as drift while it waits).
CORRECTED_LABELS_SQL = (
    "SELECT corrected_label AS label FROM validated_labels v WHERE " + _IN_WINDOW.format(t="created_at")
    + f" AND NOT EXISTS (SELECT 1 FROM correction_bursts b WHERE b.status = 'discarded' AND {bursts.IN_BURST})"
)
# Features of the items served in the window (an item served twice counts twice: it is traffic);
# items that carry text only have none.
SERVED_FEATURES_SQL = (
    "SELECT i.features FROM predictions p JOIN items i USING (item_id) WHERE i.features IS NOT NULL AND "
    + _IN_WINDOW.format(t="p.served_at")
)


def agreement_signals(con: duckdb.DuckDBPyConnection, pairs: int, min_shared: int, confidence_below: float) -> dict:
    """Krippendorff's alpha, Fleiss' kappa, Cohen's kappa of the most co-active pairs, difficult items."""
    votes = ratings(con)
    summary = agreement.agreement_summary(votes)
    shared = votes.filter(pl.len().over("item_id") >= 2)
    alpha, fleiss = summary["krippendorff_alpha"], summary["fleiss_kappa"]
    hard = difficult(con, confidence_below)
    return {
        "row": {
            "krippendorff_alpha": alpha.value,
            "fleiss_kappa": fleiss.value,
            "n_items_multi": summary["n_items_multi"],
            "n_ratings": alpha.n_ratings,
            "n_raters": shared["rater"].n_unique(),
            "n_difficult": hard["n_difficult"],
            "difficult_prevalence": hard["prevalence"],
            "note": alpha.note or fleiss.note,
        },
        "pairs": agreement.cohen_kappa_pairs(votes, top=pairs, min_shared=min_shared),
        "difficult": hard,
    }


def drift_signals(
    con: duckdb.DuckDBPyConnection, labels: tuple[str, ...], current_days: float, baseline_days: float,
    feature_psi_warn: float,
) -> list[dict]:
    """Label drift of predictions and corrections, and feature drift of served items, current vs baseline window."""
    windows = drift_windows(con, current_days, baseline_days)
    rows = []
    for signal, sql, window in (
        ("predicted_labels", PREDICTED_LABELS_SQL, windows["predictions"]),
        ("corrected_labels", CORRECTED_LABELS_SQL, windows["corrections"]),
    ):
        if window is None:
            rows.append(_no_window(signal))
            continue
        baseline, current = window_values(con, sql, window)
        result = drift.label_drift(baseline["label"], current["label"], labels)
        rows.append({
            "signal": signal, **window, "n_baseline": result.n_baseline, "n_current": result.n_current,
            "js_distance": result.js_distance, "psi": result.psi, "p_value": _shift_p_value(result),
            "max_psi": None, "mean_psi": None,
            "n_drifted": None, "note": result.note,
            "detail": result.per_label.filter(
                (pl.col("baseline_share") > 0) | (pl.col("current_share") > 0)
            ).sort("psi_term", descending=True, nulls_last=True).head(5).to_dicts(),
        })
    window = windows["predictions"]
    if window is None:
        rows.append(_no_window("served_features"))
    else:
        baseline, current = window_values(con, SERVED_FEATURES_SQL, window)
        if baseline.height == 0 or current.height == 0:
            note = f"no served items with features in the {'baseline' if baseline.height == 0 else 'current'} window"
            rows.append({**_no_window("served_features"), **window, "n_baseline": baseline.height,
                         "n_current": current.height, "note": note})
        else:
            per_feature = drift.feature_drift(train.features_matrix(baseline), train.features_matrix(current))
            # PSI of two samples of one distribution is about (bins - 1)(1/n1 + 1/n2); on small
            # windows that alone passes the threshold, so a feature must also clear 3x that.
            noise = FEATURE_NOISE_FACTOR * (FEATURE_BINS - 1) * (1 / baseline.height + 1 / current.height)
            summary = drift.summarize_feature_drift(per_feature, max(feature_psi_warn, noise))
            if noise > feature_psi_warn:
                summary["note"] = "; ".join(filter(None, [summary["note"], (
                    f"small windows: a feature counts as drifted above PSI {noise:.2f} "
                    f"(3x the sampling noise of {baseline.height} vs {current.height} items), not {feature_psi_warn}"
                )]))
            rows.append({
                "signal": "served_features", **window, "n_baseline": baseline.height,
                "n_current": current.height, "js_distance": None, "psi": None, "p_value": None,
                "max_psi": summary["max_psi"], "mean_psi": summary["mean_psi"],
                "n_drifted": summary["n_drifted"], "note": summary["note"],
                "detail": per_feature.sort("psi", descending=True, nulls_last=True).head(5).to_dicts(),
            })
    return rows


FEATURE_BINS = 10
FEATURE_NOISE_FACTOR = 3.0


def _no_window(signal: str) -> dict:
    return {
        "signal": signal, "baseline_from": None, "current_from": None, "current_to": None,
        "n_baseline": 0, "n_current": 0, "js_distance": None, "psi": None, "p_value": None, "max_psi": None,
        "mean_psi": None, "n_drifted": None, "detail": [], "note": "no events yet to define a window",
    }


def _shift_p_value(result: drift.LabelDrift) -> float | None:
    """Chi-square test of the two windows' label counts: is the shift more than sampling noise?

    With a few hundred labels per window, JS distance and PSI are well above zero from noise
    alone; a drift warning also needs the shift to be significant.
    """
    if result.js_distance is None:
        return None
    counts = result.per_label.select(
        (pl.col("baseline_share") * result.n_baseline).round(), (pl.col("current_share") * result.n_current).round()
    ).filter(pl.sum_horizontal(pl.all()) > 0)
    if counts.height < 2:
        return None
    # imported where used: loading the code location must not pay for scipy
    from scipy.stats import chi2_contingency

    return float(chi2_contingency(counts.to_numpy().T)[1])
