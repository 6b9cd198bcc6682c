"""Monitoring: label quality figures over time."""

import json

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    METRICS_FRESHNESS,
    SIGNALS_FRESHNESS,
    config_errors_as_failures,
    labelloop_asset,
    run_id,
)
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import charts, metrics, publish, store, tasks
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


LABEL_DRIFT = "label_drift_within_threshold"
FEATURE_DRIFT = "feature_drift_within_threshold"
AGREEMENT_FLOOR = "agreement_above_floor"
# Krippendorff's own reading: alpha >= 0.8 reliable, 0.667 the lowest for tentative conclusions.
ALPHA_FLOOR = 0.667


@labelloop_asset(
    group="monitoring",
    kinds={"duckdb"},
    code_version="1",
    deps=["production_corpus", "predictions", "model_evaluation", "escalations", "correction_bursts"],
    freshness_policy=METRICS_FRESHNESS,
)
def label_quality_metrics(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Coverage, correction rate, per-label counts, the model's accuracy on gold items and label changes per 100 answers by routing policy."""  # noqa: E501 -- one line: the docs' asset reference shows a description's first line
    with config_errors_as_failures():
        labels = labelloop.ontology().labels
    with open_store(database) as con:
        summary = metrics.summary(con)
        per_label = metrics.by_label(con, labels)
        efficacy = tasks.efficacy(con)
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
            # Review tasks' efficacy, one series per annotator arm (plotted over runs in the UI).
            **{f"label_changes_per_100_answers_{row['policy']}": dg.MetadataValue.float(
                row["label_changes_per_100_answers"])
               for row in efficacy.filter(pl.col("role") == "annotator").iter_rows(named=True)
               if row["label_changes_per_100_answers"] is not None},
            "routing_efficacy": dg.MetadataValue.md(markdown_table(efficacy)) if efficacy.height
            else "no review tasks issued yet",
        }
    )


@labelloop_asset(
    group="monitoring",
    kinds={"duckdb", "scipy"},
    code_version="1",
    deps=["production_corpus", "predictions", "model_evaluation", "correction_bursts"],
    freshness_policy=SIGNALS_FRESHNESS,
    check_specs=[
        dg.AssetCheckSpec(LABEL_DRIFT, asset="label_quality_signals",
                          description="Warns when the label mix of predictions or corrections in the current window "
                          "drifts from the baseline window (Jensen-Shannon distance or PSI above monitoring.yaml's "
                          "thresholds, and a significant chi-square test)."),
        dg.AssetCheckSpec(FEATURE_DRIFT, asset="label_quality_signals",
                          description="Warns when features of the items served in the current window drift from the "
                          "baseline window (per-feature PSI above drift.feature_psi_warn and above sampling noise)."),
        dg.AssetCheckSpec(AGREEMENT_FLOOR, asset="label_quality_signals",
                          description=f"Warns when contributors agree less than Krippendorff's alpha {ALPHA_FLOOR} "
                          "on items two or more of them labelled."),
    ],
)
def label_quality_signals(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Contributor agreement, difficult items, drift and per-segment correction rates, with a trend chart (training cadence)."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    with config_errors_as_failures():
        labels = labelloop.ontology().labels
        settings = labelloop.monitoring()
    with open_store(database) as con:
        corpus_version, _ = store.corpus_head(con)
        per_segment = metrics.by_segment(con, settings.segment_days)
        agreement = metrics.agreement_signals(
            con, settings.agreement_pairs, settings.agreement_min_shared, settings.difficult_confidence
        )
        drift_rows = metrics.drift_signals(
            con, labels, settings.drift_current_days, settings.drift_baseline_days, settings.drift_feature_psi_warn
        )
        stamp = {"corpus_version": corpus_version, "run_id": run_id(context)}
        with store.transaction(con):
            store.append(con, "label_quality_by_segment", per_segment.with_columns(**_literals(stamp)))
            store.append(con, "label_agreement", pl.DataFrame([{**agreement["row"], **stamp}]))
            store.append(con, "label_agreement_pairs", agreement["pairs"].with_columns(**_literals(stamp)))
            store.append(con, "label_drift", pl.DataFrame(
                [{**row, "detail": json.dumps(row["detail"], default=str), **stamp} for row in drift_rows]
            ))
        agreement_history = store.frame(
            con, "SELECT krippendorff_alpha, fleiss_kappa, difficult_prevalence FROM label_agreement "
            "ORDER BY computed_at DESC LIMIT $n", {"n": TREND_POINTS},
        ).reverse()
        drift_history = store.frame(
            con, "SELECT signal, js_distance, max_psi FROM label_drift WHERE computed_at >= "
            "(SELECT min(computed_at) FROM "
            "(SELECT computed_at FROM label_agreement ORDER BY computed_at DESC LIMIT $n)) "
            "ORDER BY computed_at", {"n": TREND_POINTS},
        )
    signals = {
        **agreement["row"],
        **{f"{r['signal']}_{k}": r[k] for r in drift_rows for k in ("js_distance", "psi", "max_psi")},
    }
    plotted = {
        name: dg.MetadataValue.float(round(float(value), 4))
        for name, value in signals.items()
        if name in SIGNAL_FIGURES and value is not None
    }
    chart = charts.quality_trends_png(
        agreement_history, drift_history, settings.drift_label_js_warn, settings.drift_feature_psi_warn
    )
    return dg.MaterializeResult(
        metadata={
            **plotted,
            "corpus_version": corpus_version,
            "agreement_note": agreement["row"]["note"] or "computed",
            "by_segment": dg.MetadataValue.md(markdown_table(per_segment.with_columns(pl.selectors.float().round(3)))),
            "cohen_kappa_pairs": dg.MetadataValue.md(
                markdown_table(agreement["pairs"].with_columns(pl.col("kappa").round(3)))
            ),
            "drift": dg.MetadataValue.md(markdown_table(_drift_table(drift_rows))),
            "trends": dg.MetadataValue.md(charts.markdown_image(chart, "agreement and drift trends")),
        },
        check_results=[
            _label_drift_check(drift_rows, settings),
            _feature_drift_check(drift_rows, settings),
            _agreement_check(agreement),
        ],
    )


# The trend chart shows this many measurements.
TREND_POINTS = 60
SIGNAL_FIGURES = (
    "krippendorff_alpha", "fleiss_kappa", "difficult_prevalence", "n_items_multi",
    "predicted_labels_js_distance", "predicted_labels_psi", "corrected_labels_js_distance",
    "corrected_labels_psi", "served_features_max_psi",
)


def _literals(values: dict) -> dict:
    return {name: pl.lit(value) for name, value in values.items()}


def _drift_table(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        [{"signal": r["signal"], "n_baseline": r["n_baseline"], "n_current": r["n_current"],
          "js_distance": _round(r["js_distance"]), "psi": _round(r["psi"]),
          "p_value": None if r["p_value"] is None else float(f"{r['p_value']:.2g}"),
          "max_feature_psi": _round(r["max_psi"]),
          "features_drifted": r["n_drifted"], "note": r["note"]} for r in rows]
    )


def _round(value):
    return None if value is None else round(float(value), 4)


def _label_drift_check(rows: list[dict], settings) -> dg.AssetCheckResult:
    labels = [r for r in rows if r["signal"] != "served_features"]
    drifted = [
        r for r in labels
        if ((r["js_distance"] or 0) > settings.drift_label_js_warn or (r["psi"] or 0) > settings.drift_label_psi_warn)
        and r["p_value"] is not None and r["p_value"] < settings.drift_label_p_value
    ]
    return dg.AssetCheckResult(
        check_name=LABEL_DRIFT,
        passed=not drifted,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "thresholds": f"(JS distance > {settings.drift_label_js_warn} or PSI > {settings.drift_label_psi_warn}) "
            f"and chi-square p < {settings.drift_label_p_value}",
            "drifted_signals": ", ".join(r["signal"] for r in drifted) or "none",
            "windows": dg.MetadataValue.md(markdown_table(_drift_table(labels))),
            "largest_shifts": dg.MetadataValue.md("\n\n".join(
                f"**{r['signal']}**\n\n"
                + markdown_table(pl.DataFrame(r["detail"]).with_columns(pl.selectors.float().round(4)))
                for r in labels if r["detail"]
            ) or "_no windows yet_"),
        },
    )


def _feature_drift_check(rows: list[dict], settings) -> dg.AssetCheckResult:
    served = next(r for r in rows if r["signal"] == "served_features")
    drifted = served["n_drifted"] or 0
    return dg.AssetCheckResult(
        check_name=FEATURE_DRIFT,
        passed=drifted < settings.drift_features_drifted_warn,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "threshold": f"{settings.drift_features_drifted_warn}+ features with PSI > "
            f"{settings.drift_feature_psi_warn}",
            "features_drifted": drifted,
            "max_psi": (
                dg.MetadataValue.float(_round(served["max_psi"]) or 0.0)
                if served["max_psi"] is not None else "not computed"
            ),
            "note": served["note"] or "computed",
            "worst_features": dg.MetadataValue.md(
                markdown_table(pl.DataFrame(served["detail"]).with_columns(pl.selectors.float().round(4)))
                if served["detail"] else "_none_"
            ),
        },
    )


def _agreement_check(agreement: dict) -> dg.AssetCheckResult:
    alpha = agreement["row"]["krippendorff_alpha"]
    return dg.AssetCheckResult(
        check_name=AGREEMENT_FLOOR,
        passed=alpha is None or alpha >= ALPHA_FLOOR,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "krippendorff_alpha": dg.MetadataValue.float(round(alpha, 4)) if alpha is not None else "undefined",
            "floor": ALPHA_FLOOR,
            "note": agreement["row"]["note"] or "computed",
            "items_with_two_or_more_contributors": agreement["row"]["n_items_multi"],
            "least_agreeing_pairs": dg.MetadataValue.md(
                markdown_table(agreement["pairs"].sort("kappa", nulls_last=True).head(5))
            ),
        },
    )


@labelloop_asset(
    group="monitoring",
    kinds={"duckdb", "parquet"},
    code_version="1",
    deps=["label_quality_metrics", "label_quality_signals"],
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
