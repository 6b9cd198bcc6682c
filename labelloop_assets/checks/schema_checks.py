"""Pandera validations turned into Dagster asset-check results the UI can show."""

import dagster as dg
import polars as pl

from labelloop_assets.core.schemas import Validation

RAW_CORRECTIONS_SCHEMA = "raw_corrections_schema"
RAW_CORRECTIONS_RECONCILE = "raw_corrections_counts_reconcile"
VALIDATED_LABELS_SCHEMA = "validated_labels_schema"
PRODUCTION_CORPUS_SCHEMA = "production_corpus_schema"
SAMPLE_ROWS = 10


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
