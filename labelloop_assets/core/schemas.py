"""Pandera (polars) schemas of the tables that gate the loop, and a plain-data validation result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from labelloop_assets.core.contracts import CORRECTION_SOURCES, USER_ROLES

# pandera is imported where used (in the functions below): loading the code location must not
# pay for pandera.
if TYPE_CHECKING:
    import pandera.polars as pa

PSEUDONYM = r"^u_[0-9a-f]{32}$"


def raw_corrections_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    import pandera.polars as pa

    return pa.DataFrameSchema(
        {
            "event_id": pa.Column(str, pa.Check.str_length(1, 256), unique=True),
            "item_id": pa.Column(str, pa.Check.str_length(1, 256)),
            "corrected_label": pa.Column(str, pa.Check.isin(list(labels))),
            "original_label": pa.Column(str, pa.Check.isin(list(labels)), nullable=True),
            "user_pseudonym": pa.Column(str, pa.Check.str_matches(PSEUDONYM)),
            "user_role": pa.Column(str, pa.Check.isin(list(USER_ROLES))),
            "source": pa.Column(str, pa.Check.isin(list(CORRECTION_SOURCES))),
            "consent": pa.Column(bool, pa.Check.eq(True)),
            "user_confidence": pa.Column(float, pa.Check.in_range(0.0, 1.0), nullable=True),
        },
        name="raw_corrections",
    )


def validated_labels_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    import pandera.polars as pa

    return pa.DataFrameSchema(
        {
            "event_id": pa.Column(str, unique=True),
            "item_id": pa.Column(str),
            "corrected_label": pa.Column(str, pa.Check.isin(list(labels))),
            # What the label was, and what a model predicted, are history: a term since dropped
            # from the ontology may appear there.
            "label_before": pa.Column(str, nullable=True),
            "predicted_label": pa.Column(str, nullable=True),
            "prediction_confidence": pa.Column(float, pa.Check.in_range(0.0, 1.0), nullable=True),
            "user_pseudonym": pa.Column(str, pa.Check.str_matches(PSEUDONYM)),
            "user_role": pa.Column(str, pa.Check.isin(list(USER_ROLES))),
            "vote_weight": pa.Column(float, pa.Check.ge(0.0)),
        },
        name="validated_labels",
    )


def production_corpus_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    import pandera.polars as pa

    return pa.DataFrameSchema(
        {
            "item_id": pa.Column(str, unique=True),
            "label": pa.Column(str, pa.Check.isin(list(labels))),
            "label_source": pa.Column(str),
            "human_confirmed": pa.Column(bool),
            "reviewer_confirmed": pa.Column(bool),
            "since_version": pa.Column(pl.Int32, pa.Check.ge(1)),
            "updated_version": pa.Column(pl.Int32, pa.Check.ge(1)),
        },
        name="production_corpus",
    )


@dataclass
class Validation:
    """The outcome of one schema validation, in plain data for check metadata."""

    schema: str
    rows: int
    failures: pl.DataFrame = field(default_factory=pl.DataFrame)

    @property
    def passed(self) -> bool:
        return self.failures.height == 0

    @property
    def failing_rules(self) -> dict[str, int]:
        if self.passed:
            return {}
        counted = self.failures.group_by("column", "check").len().sort("len", descending=True)
        return {f"{column}: {check}": n for column, check, n in counted.iter_rows()}


def validate(schema: pa.DataFrameSchema, frame: pl.DataFrame) -> Validation:
    """Run every rule (lazy) and keep the failure cases instead of raising."""
    from pandera.errors import SchemaError, SchemaErrors

    if frame.height == 0:
        return Validation(schema.name or "schema", 0)  # an empty batch breaks no rule
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as errors:
        failures = errors.failure_cases.with_columns(
            pl.col("failure_case").cast(pl.String), pl.col("column").cast(pl.String),
            pl.col("check").cast(pl.String),
        )
        return Validation(schema.name or "schema", frame.height, failures)
    except SchemaError as error:
        failures = pl.DataFrame(
            {"failure_case": [str(error)], "column": [None], "check": [str(error.check)], "index": [None]},
            schema={"failure_case": pl.String, "column": pl.String, "check": pl.String, "index": pl.Int32},
        )
        return Validation(schema.name or "schema", frame.height, failures)
    return Validation(schema.name or "schema", frame.height)
