"""Training: a model fitted on the current corpus and evaluated on the frozen gold items."""

import json
from datetime import datetime, timezone

import dagster as dg
import numpy as np
import polars as pl
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    DUCKDB_POOL,
    OWNERS,
    config_errors_as_failures,
    run_id,
)
from labelloop_assets.checks.schema_checks import markdown_table
from labelloop_assets.core import bursts, reliability, store, train
from labelloop_assets.resources import LabelloopHome, open_store


@dg.asset(
    group_name="training",
    kinds={"scikit-learn", "duckdb"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=["production_corpus"],
)
def retrained_model(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """A scikit-learn model trained on the current corpus, stored under `models/<version>/` with its metrics."""
    home = labelloop.home()
    with open_store(database) as con:
        corpus_version, changes_total = store.corpus_head(con)
        # One training per corpus version: the same corpus and configuration give the same model.
        existing = store.frame(
            con,
            "SELECT * FROM models WHERE corpus_version = ? AND algorithm = ? AND params = ? "
            "ORDER BY trained_at DESC LIMIT 1",
            [corpus_version, train.ALGORITHM, json.dumps(train.DEFAULT_PARAMS)],
        )
        if existing.height:
            record = existing.to_dicts()[0]
            train.set_current(home.models, record["model_version"])
            context.log.info(
                f"{record['model_version']} is already trained on corpus v{corpus_version}; reused"
            )
            return dg.MaterializeResult(metadata={**_model_metadata(record), "reused": True})
        held = store.frame(con, "SELECT burst_id, reason FROM correction_bursts WHERE status = 'held'")
        if held.height:
            raise dg.Failure(
                description=f"training is held: {held.height} correction burst(s) await a reviewer "
                f"({', '.join(held['burst_id'].to_list())}); release or discard them with "
                "`labelloop review release|discard BURST_ID`",
                metadata={"held_bursts": dg.MetadataValue.md(markdown_table(held))},
            )
        training = store.frame(
            con,
            "SELECT c.item_id, c.label, i.features FROM production_corpus c "
            "JOIN items i USING (item_id) ORDER BY c.item_id",
        )
        gold = store.frame(
            con, "SELECT item_id, gold_label, features FROM items WHERE gold_label IS NOT NULL"
        )
        n_models = store.scalar(con, "SELECT count(*) FROM models")
    if training.height == 0 or training["label"].n_unique() < 2:
        raise dg.Failure(
            description="the production corpus has fewer than two labels yet: land items with "
            "initial labels or corrections first"
        )
    model = train.fit(train.features_matrix(training), training["label"].to_numpy())
    scores = train.evaluate(model, train.features_matrix(gold), gold["gold_label"].to_numpy())
    version = f"m{n_models + 1:04d}"
    record = {
        "model_version": version,
        "corpus_version": corpus_version,
        "n_train_rows": training.height,
        "n_classes": int(len(model.classes)),
        "algorithm": train.ALGORITHM,
        "params": train.DEFAULT_PARAMS,
        "train_data_hash": train.training_data_hash(training),
        "gold_accuracy": scores["accuracy"],
        "gold_macro_f1": scores["macro_f1"],
        "n_gold": gold.height,
        "label_changes_total": changes_total,
        "run_id": run_id(context),
    }
    folder = train.save(model, home.models / version, record)
    record = {**record, "params": json.dumps(record["params"]), "path": str(folder)}
    with open_store(database) as con:
        store.append(
            con,
            "models",
            pl.DataFrame([record]).with_columns(
                pl.col("gold_accuracy", "gold_macro_f1").fill_nan(None)
            ),
        )
    train.set_current(home.models, version)
    return dg.MaterializeResult(metadata={**_model_metadata(record), "reused": False})


def _model_metadata(record: dict) -> dict:
    return {
        "model_version": record["model_version"],
        "corpus_version": int(record["corpus_version"]),
        "label_changes_total": int(record["label_changes_total"]),
        "n_train_rows": int(record["n_train_rows"]),
        "gold_accuracy": round(float(np.nan_to_num(record["gold_accuracy"] or 0.0)), 4),
        "gold_macro_f1": round(float(np.nan_to_num(record["gold_macro_f1"] or 0.0)), 4),
        "n_gold": int(record["n_gold"]),
        "path": dg.MetadataValue.path(record["path"]),
    }


@dg.asset(
    group_name="training",
    kinds={"duckdb", "numpy"},
    pool=DUCKDB_POOL,
    owners=OWNERS,
    deps=["production_corpus"],
)
def contributor_reliability(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Each contributor's estimated accuracy (one-coin Dawid-Skene anchored on reviewer-confirmed labels)."""
    with config_errors_as_failures():
        ontology, policy = labelloop.ontology(), labelloop.policy()
    with open_store(database) as con:
        votes = store.frame(
            con,
            f"SELECT item_id, user_pseudonym, corrected_label FROM ({bursts.COUNTED_VOTES_SQL}) "
            "QUALIFY row_number() OVER (PARTITION BY item_id, user_pseudonym "
            "ORDER BY created_at DESC, seq DESC) = 1",
        )
        anchors = store.frame(
            con, "SELECT item_id, label FROM production_corpus WHERE reviewer_confirmed"
        )
        corpus_version, _ = store.corpus_head(con)
        estimates = reliability.estimate_reliability(
            votes, anchors, ontology.labels,
            reliability.ReliabilityPrior(policy.reliability_prior_mean, policy.reliability_prior_strength),
        )
        rows = estimates.drop("iterations").with_columns(
            estimated_at=pl.lit(datetime.now(timezone.utc)),
            corpus_version=pl.lit(corpus_version or None, pl.Int32),
        )
        store.replace(con, "contributor_reliability", rows)
    trusted = estimates.filter(
        (pl.col("accuracy") >= policy.solo_min_accuracy) & (pl.col("n_votes") >= policy.solo_min_votes)
    ).height
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": estimates.height,
            "contributors": estimates.height,
            "anchored_items": anchors.height,
            "trusted_to_flip_alone": trusted,
            "median_accuracy": dg.MetadataValue.float(
                float(estimates["accuracy"].median()) if estimates.height else 0.0
            ),
            "em_iterations": int(estimates["iterations"][0]) if estimates.height else 0,
        }
    )
