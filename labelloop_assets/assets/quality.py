"""Quality signals that gate or steer the loop: correction bursts, label-issue candidates, guideline insights."""

from typing import TYPE_CHECKING

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    config_errors_as_failures,
    labelloop_asset,
    run_id,
)
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import bursts, external, guidelines, item_content, label_issues, store, train
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.pipelines import PipelineSpec
from labelloop_assets.core.settings import Home
from labelloop_assets.resources import LabelloopHome, open_store

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

OPEN_BURSTS_SQL = """
    SELECT burst_id, day, scope, key, n_events, day_total, round(expected, 1) AS expected,
           round(score, 1) AS score, severity, status, reason, evidence
    FROM correction_bursts WHERE status IN ('held', 'flagged') ORDER BY day DESC, score DESC
"""


@labelloop_asset(
    group="curation",
    kinds={"duckdb", "polars"},
    code_version="1",
    deps=["raw_corrections", "review_decisions"],
)
def correction_bursts(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Correction volume per contributor and per segment scored against a robust baseline; severe bursts are held."""
    # Its no_held_bursts check is checks/scheduled_checks.py: it runs after this asset and hourly on its own.
    with config_errors_as_failures():
        policy = labelloop.bursts()
    with open_store(database) as con:
        outcome = bursts.detect(con, policy, run_id(context))
        unresolved = store.frame(con, OPEN_BURSTS_SQL)
        totals = dict(
            store.frame(con, "SELECT status, count(*) AS n FROM correction_bursts GROUP BY status").iter_rows()
        )
    held = unresolved.filter(pl.col("status") == bursts.HELD)
    if outcome["newly_held"]:
        context.log.warning(
            f"correction bursts held: {', '.join(outcome['newly_held'])}; "
            "see `labelloop review list --queue bursts`"
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(totals.values()),
            "events_scored": outcome["events"],
            # counted on their arrival day, not their created_at day (late, or dated ahead of arrival)
            "late_corrections": outcome["late"],
            "days_scored": ", ".join(outcome["days_scored"]) or "none",
            "keys_not_scored": dg.MetadataValue.int(outcome["not_scored"]),
            "held_bursts": held.height,
            "flagged_bursts": totals.get(bursts.FLAGGED, 0),
            "released_bursts": totals.get(bursts.RELEASED, 0),
            "discarded_bursts": totals.get(bursts.DISCARDED, 0),
            "acknowledged_this_run": outcome["acknowledged"],
            "open_bursts": dg.MetadataValue.md(markdown_table(unresolved.drop("evidence").head(20))),
            "review_with": "labelloop review list --queue bursts",
        },
    )


@labelloop_asset(
    group="monitoring",
    kinds={"scikit-learn", "duckdb"},
    code_version="1",
    deps=["production_corpus", "contributor_reliability"],
)
def label_issue_candidates(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Review queue of corpus labels most likely wrong: K-fold confident learning fused with votes, disputes and reliability."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    import numpy as np
    with config_errors_as_failures():
        settings = labelloop.monitoring()
        policy = labelloop.policy()
        weights = label_issues.IssueWeights.from_mapping(
            {"reference_accuracy": policy.reliability_prior_mean, **(settings.issue_weights or {})}
        )
    with open_store(database) as con:
        corpus = store.frame(con, train.TRAINING_SQL)
        active = label_issues.active_signals(con, policy.reliability_prior_mean, policy.reliability_prior_strength)
        corpus_version, _ = store.corpus_head(con)
        # Judged with the serving champion's pipeline: a rejected experiment does not steer the queue.
        champion = store.frame(con, "SELECT model_version, algorithm, params, path FROM models "
                                    "WHERE status = 'champion'").to_dicts()
        content = item_content.home_content(con)
    labels = corpus["label"].to_numpy()
    external_champion = bool(champion) and external.is_external(champion[0]["algorithm"])
    if external_champion:
        # An external champion cannot be refitted here: its trainer's out-of-sample probabilities,
        # stored with it, are the passive signal.
        probabilities, classes, note = _stored_probabilities(labelloop.home(), champion[0], corpus, labels)
    else:
        if champion:
            spec = PipelineSpec.from_recorded(champion[0]["params"])
        elif content is not None:
            with config_errors_as_failures():
                spec = labelloop.training().spec(content)
        probabilities, classes, note = (
            label_issues.out_of_sample_probabilities(corpus, labels, folds=settings.issues_folds, spec=spec)
            if corpus.height else (None, np.array([]), "the corpus is empty")
        )
    passive = (
        label_issues.confident_learning(probabilities, labels, classes) if probabilities is not None else None
    )
    ranked = label_issues.rank_candidates(corpus.select("item_id", "label"), passive, active, weights)
    kept = ranked.head(settings.issues_keep).with_columns(
        corpus_version=pl.lit(corpus_version), run_id=pl.lit(run_id(context))
    )
    with open_store(database) as con:
        store.replace(con, "label_issue_candidates", kept)
    if note:
        context.log.warning(f"label-issue candidates: {note}")
    top = kept.head(20).select(
        "rank", "item_id", "label", "suggested_label", pl.col("score").round(3),
        pl.col("reasons").list.join("; ").alias("reasons"),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": kept.height,
            "corpus_version": corpus_version,
            "items_scored": ranked.height,
            "confident_learning_issues": int(ranked["cl_issue"].sum()) if ranked.height else 0,
            "items_with_votes_against": int((ranked["votes_against"] > 0).sum()) if ranked.height else 0,
            "expected_wrong_labels": dg.MetadataValue.float(round(float(ranked["score"].sum()), 1))
            if ranked.height else 0.0,
            "passive_signal": note or (
                "the external champion's out-of-sample probabilities" if external_champion
                else f"{settings.issues_folds}-fold out-of-sample probabilities"
            ),
            "top_candidates": dg.MetadataValue.md(markdown_table(top)),
            "review_with": "labelloop review list --queue issues",
        }
    )


def _stored_probabilities(
    home: Home, champion: dict, corpus: pl.DataFrame, labels: "np.ndarray"
) -> "tuple[np.ndarray | None, np.ndarray, str | None]":
    """(probabilities, classes, note) of the corpus items from an external champion's stored
    out-of-sample probabilities; items it has none for get NaN rows (no passive signal)."""
    import numpy as np
    version = champion["model_version"]
    if corpus.height == 0:
        return None, np.array([]), "the corpus is empty"
    try:
        model, _ = train.load(home.model_folder(champion["path"]))
    except train.ModelFileError as error:
        return None, np.array([]), f"no passive signal: the champion's files cannot be read ({error})"
    probabilities, classes = model.stored(corpus["item_id"]), model.classes
    # Labels the champion was not asked for (an ontology changed since) get a column of zeros, so
    # every given label is a class; their items carry no probabilities of their own.
    unseen = np.setdiff1d(np.unique(labels.astype(str)), classes)
    if unseen.size:
        probabilities = np.hstack([probabilities, np.zeros((len(probabilities), unseen.size))])
        probabilities[np.isin(labels.astype(str), unseen)] = np.nan
        order = np.argsort(np.concatenate([classes, unseen]))
        classes, probabilities = np.concatenate([classes, unseen])[order], probabilities[:, order]
    lacking = int(np.isnan(probabilities).any(axis=1).sum())
    notes = [f"{lacking} of {corpus.height} corpus item(s) have no stored probabilities from the external champion "
             f"{version} (added to the corpus after its training, or labelled with a class it was not trained "
             "for): no passive signal for them"] if lacking else []
    if lacking == corpus.height:
        return None, classes, "; ".join(notes)
    return probabilities, classes, "; ".join(notes) or None


@labelloop_asset(
    group="monitoring",
    kinds={"duckdb", "markdown"},
    code_version="1",
    deps=["production_corpus"],
)
def guideline_report(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Markdown report for guideline owners: most corrected and disputed label pairs, examples, rationales, change."""
    with config_errors_as_failures():
        settings = labelloop.monitoring()
    home = labelloop.home()
    with open_store(database) as con:
        corpus_version, _ = store.corpus_head(con)
        pairs, examples, previous_version = guidelines.report_data(
            con, corpus_version, settings.guideline_pairs, settings.guideline_examples
        )
        with store.transaction(con):
            # One report per corpus version: a rerun on the same version replaces it.
            con.execute("DELETE FROM guideline_pairs WHERE corpus_version = ?", [corpus_version])
            store.append(
                con, "guideline_pairs",
                pairs.select("label_from", "label_to", "n_corrections", "n_disputed", "n_items").with_columns(
                    corpus_version=pl.lit(corpus_version), run_id=pl.lit(run_id(context))
                ),
            )
    text = guidelines.render(pairs, examples, corpus_version, previous_version)
    path = write_atomically(home.reports / "guidelines.md", text)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "corpus_version": corpus_version,
            "pairs": pairs.height,
            "report": dg.MetadataValue.md(text),
        }
    )
