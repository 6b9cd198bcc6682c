"""Ingest: landing files into items, predictions and raw corrections, exactly once."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from labelloop_assets.assets.common import (
    GOLD_SIGNATURE,
    config_errors_as_failures,
    ingest_metadata,
    labelloop_asset,
    landing_seen,
    run_id,
)
from labelloop_assets.assets.landing import GOLD_FILE, landing_key
from labelloop_assets.checks.schema_checks import (
    RAW_CORRECTIONS_RECONCILE,
    RAW_CORRECTIONS_SCHEMA,
    column_schema,
    markdown_table,
    schema_check_result,
)
from labelloop_assets.core import gold, ingest, landing_state, review, schemas, store
from labelloop_assets.core.settings import DEV_SECRET_WARNING, using_development_secret
from labelloop_assets.resources import LabelloopHome, open_store

GROUP = "ingest"


@labelloop_asset(
    group=GROUP, kinds={"duckdb", "polars"}, code_version="1", deps=[landing_key("items"), GOLD_FILE]
)
def items(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Items from landing/items, each file ingested once, and the gold items the deployment declares in gold.jsonl."""
    with config_errors_as_failures():
        ontology = labelloop.ontology()
    seen = {**landing_seen(labelloop.home(), "items"),
            GOLD_SIGNATURE: landing_state.gold_signature(labelloop.home()) or "none"}
    with open_store(database) as con, config_errors_as_failures():
        # gold.jsonl first: a landing line reusing a newly declared gold id is then refused.
        declared = gold.declare(con, labelloop.home(), ontology, run_id(context))
        report = ingest.ingest_items(con, labelloop.home(), ontology, run_id(context))
        total = store.scalar(con, "SELECT count(*) FROM items")
    if declared.new_version:
        context.log.info(
            f"gold.jsonl declared evaluation set {declared.evaluation_set}: "
            f"{declared.n_added} gold item(s) added, {declared.n_items} in the set"
        )
    return dg.MaterializeResult(
        metadata={
            **ingest_metadata(report, total),
            "evaluation_set": declared.evaluation_set if declared.evaluation_set is not None
            else "none (no gold.jsonl declared)",
            "n_gold": declared.n_items,
            "n_gold_added": declared.n_added,
            **seen,
        }
    )


@labelloop_asset(
    group=GROUP, kinds={"duckdb", "polars"}, code_version="1", deps=[items, landing_key("predictions")]
)
def predictions(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """The prediction log from landing/predictions: what each model version served."""
    return _ingest(context, labelloop, database, ingest.ingest_predictions, "predictions", "predictions")


def _ingest(context, labelloop: LabelloopHome, database: DuckDBResource, ingest_kind, table: str, kind: str):
    with config_errors_as_failures():
        ontology = labelloop.ontology()
    seen = landing_seen(labelloop.home(), kind)
    with open_store(database) as con:
        report = ingest_kind(con, labelloop.home(), ontology, run_id(context))
        total = store.scalar(con, f"SELECT count(*) FROM {table}")
    return dg.MaterializeResult(metadata={**ingest_metadata(report, total), **seen})


@labelloop_asset(
    group=GROUP,
    kinds={"duckdb", "polars"},
    code_version="1",
    deps=[items, landing_key("corrections")],
    metadata=column_schema(schemas.RAW_CORRECTIONS_COLUMNS),
    check_specs=[
        dg.AssetCheckSpec(
            RAW_CORRECTIONS_SCHEMA,
            asset="raw_corrections",
            description="Pandera schema of the corrections accepted in this run.",
        ),
        dg.AssetCheckSpec(
            RAW_CORRECTIONS_RECONCILE,
            asset="raw_corrections",
            blocking=True,
            description="Every line read is either accepted or quarantined: in = accepted + quarantined.",
        ),
    ],
)
def raw_corrections(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Correction events parsed once, deduplicated, pseudonymized and scrubbed; bad rows quarantined."""
    with config_errors_as_failures():
        ontology = labelloop.ontology()
        key = labelloop.secret()
    if using_development_secret():
        context.log.warning(DEV_SECRET_WARNING)
    seen = landing_seen(labelloop.home(), "corrections")
    with open_store(database) as con, config_errors_as_failures():
        report = ingest.ingest_corrections(con, labelloop.home(), ontology, key, run_id(context))
        schema = schemas.raw_corrections_schema(ontology.labels)
        # Only the columns the schema checks: free text and context would double the memory.
        batch = store.frame(
            con, f"SELECT {', '.join(schema.columns)} FROM raw_corrections WHERE run_id = ?", [run_id(context)]
        )
        total = store.scalar(con, "SELECT count(*) FROM raw_corrections")
    validation = schemas.validate(schema, batch)
    return dg.MaterializeResult(
        metadata={
            **ingest_metadata(report, total),
            "pseudonymization_key": "development default (NOT SECRET)"
            if using_development_secret()
            else "from LABELLOOP_SECRET",
            **seen,
        },
        check_results=[
            schema_check_result(
                RAW_CORRECTIONS_SCHEMA, "raw_corrections", validation, blocking=False
            ),
            dg.AssetCheckResult(
                check_name=RAW_CORRECTIONS_RECONCILE,
                passed=report.reconciles,
                metadata={
                    "records_in": report.records_in,
                    "accepted": report.accepted,
                    "quarantined": report.quarantined,
                },
            ),
        ],
    )


@labelloop_asset(group=GROUP, kinds={"duckdb", "polars"}, code_version="1", deps=[landing_key("reviews")])
def review_decisions(
    context: dg.AssetExecutionContext, labelloop: LabelloopHome, database: DuckDBResource
) -> dg.MaterializeResult:
    """Signed reviewer decisions from landing/reviews (escalations decided, bursts acknowledged), verified against contributors.yaml; refusals audited."""  # noqa: E501 -- kept on one line: the docs' asset reference shows a description's first line
    with config_errors_as_failures():
        ontology, policy = labelloop.ontology(), labelloop.policy()
        home = labelloop.home()
        directory = review.directory(home)
        key = labelloop.secret()
        burst_deciders = labelloop.bursts().may_acknowledge
    seen = landing_seen(home, "reviews")
    with open_store(database) as con, config_errors_as_failures():
        report, accepted = review.ingest_reviews(
            con, home, ontology, key, directory, policy, run_id(context), burst_deciders
        )
        total = store.scalar(con, "SELECT count(*) FROM review_decisions")
    return dg.MaterializeResult(
        metadata={
            **ingest_metadata(report, total),
            "decisions_by_kind": dg.MetadataValue.md(
                markdown_table(accepted.group_by("decision").len().sort("decision"))
                if accepted.height else "_none_"
            ),
            **seen,
        }
    )
