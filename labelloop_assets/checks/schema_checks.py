"""Pandera validations turned into Dagster asset-check results the UI can show."""

import dagster as dg
import polars as pl

from labelloop_assets.core.schemas import ColumnRule, Validation

RAW_CORRECTIONS_SCHEMA = "raw_corrections_schema"
RAW_CORRECTIONS_RECONCILE = "raw_corrections_counts_reconcile"
VALIDATED_LABELS_SCHEMA = "validated_labels_schema"
PRODUCTION_CORPUS_SCHEMA = "production_corpus_schema"
SAMPLE_ROWS = 10
# The checks whose failure holds training: the corpus a model would learn from is in doubt.
BLOCKING_CHECKS = (
    dg.AssetCheckKey(dg.AssetKey("raw_corrections"), RAW_CORRECTIONS_RECONCILE),
    dg.AssetCheckKey(dg.AssetKey("validated_labels"), VALIDATED_LABELS_SCHEMA),
    dg.AssetCheckKey(dg.AssetKey("production_corpus"), PRODUCTION_CORPUS_SCHEMA),
)


def column_schema(columns: tuple[ColumnRule, ...]) -> dict:
    """Asset metadata declaring the columns a Pandera schema checks (types, descriptions, nullable,
    unique, rules), built from the same column rules as the schema: the UI shows them before any run."""
    return {
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(
                    column.name,
                    type=column.dtype,
                    description=column.description,
                    constraints=dg.TableColumnConstraints(
                        nullable=column.nullable,
                        unique=column.unique,
                        other=[text] if (text := column.rule_text()) else None,
                    ),
                )
                for column in columns
            ]
        )
    }


def markdown_table(frame: pl.DataFrame) -> str:
    """A small frame as a markdown table (the UI renders it with headers)."""
    if frame.height == 0:
        return "_none_"
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = [
        "| " + " | ".join("" if v is None else str(v).replace("|", "\\|")[:120] for v in row) + " |"
        for row in frame.iter_rows()
    ]
    return "\n".join([header, rule, *body])


def schema_check_result(
    check_name: str, asset_key: str, validation: Validation, *, blocking: bool
) -> dg.AssetCheckResult:
    rules = pl.DataFrame(
        {"rule": list(validation.failing_rules), "failures": list(validation.failing_rules.values())},
        schema={"rule": pl.String, "failures": pl.Int64},
    )
    sample = (
        validation.failures.select("column", "check", "failure_case", "index").head(SAMPLE_ROWS)
        if not validation.passed
        else pl.DataFrame()
    )
    return dg.AssetCheckResult(
        check_name=check_name,
        asset_key=asset_key,
        passed=validation.passed,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={
            "rows_checked": dg.MetadataValue.int(validation.rows),
            "failing_rows": dg.MetadataValue.int(validation.failures.height),
            "failing_rules": dg.MetadataValue.md(markdown_table(rules)),
            "sample_failures": dg.MetadataValue.md(markdown_table(sample)),
        },
    )


def failing_blocking_checks(instance: dg.DagsterInstance) -> list[str]:
    """The blocking checks whose latest evaluation failed, as `asset.check (run <id>)`.

    A check that never ran, or is running now, holds nothing: only an explicit failure does,
    until a later evaluation of the same check passes.
    """
    failing = []
    for key in BLOCKING_CHECKS:
        record = instance.get_latest_asset_check_evaluation_record(key)
        if record is not None and record.status.value == "FAILED":
            failing.append(f"{key.asset_key.to_user_string()}.{key.name} (run {record.run_id[:8]})")
    return failing


def blocking_checks_hold(failing: list[str]) -> str:
    """Why training waits while blocking checks fail, and what clears the hold."""
    return (
        f"blocking check {', '.join(failing)} failed on its latest evaluation; fix the cause "
        "(the check's failing rules are in the UI), then re-run ingest_job so that it passes"
    )
