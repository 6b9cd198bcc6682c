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
# A rule that stands for the ontology's labels, which are known only when a run reads ontology.yaml.
LABELS = "labels"


@dataclass(frozen=True)
class ColumnRule:
    """One column of a gated table in plain data. The Pandera schema a run validates with and the
    column schema the Dagster UI shows before any run are both built from these, so they cannot
    disagree. `rule` is (name, *arguments): str_length, isin, labels, matches, eq, in_range, ge."""

    name: str
    dtype: str  # string, bool, float, int32
    description: str
    rule: tuple = ()
    nullable: bool = False
    unique: bool = False

    def rule_text(self) -> str | None:
        """The rule as a reader would state it."""
        if not self.rule:
            return None
        kind, *args = self.rule
        return {
            "str_length": lambda: f"length {args[0]} to {args[1]} characters",
            "isin": lambda: "one of " + ", ".join(map(str, args[0])),
            LABELS: lambda: "a label of the ontology (ontology.yaml)",
            "matches": lambda: f"matches {args[0]}",
            "eq": lambda: f"always {args[0]}",
            "in_range": lambda: f"between {args[0]} and {args[1]}",
            "ge": lambda: f"at least {args[0]}",
        }[kind]()


RAW_CORRECTIONS_COLUMNS = (
    ColumnRule("event_id", "string", "The correction's id, scoped to its producer.", ("str_length", 1, 256),
               unique=True),
    ColumnRule("item_id", "string", "The item corrected.", ("str_length", 1, 256)),
    ColumnRule("corrected_label", "string", "The label the user says is right.", (LABELS,)),
    ColumnRule("original_label", "string", "The label the user saw, when the producer sent it.", (LABELS,),
               nullable=True),
    ColumnRule("user_pseudonym", "string", "Who corrected, pseudonymized with the deployment's key.",
               ("matches", PSEUDONYM)),
    ColumnRule("user_role", "string", "The role the correction counts as (claims capped by contributors.yaml).",
               ("isin", USER_ROLES)),
    ColumnRule("source", "string", "Where in the product the correction was made.", ("isin", CORRECTION_SOURCES)),
    ColumnRule("consent", "bool", "The user consented to the correction being used for training.", ("eq", True)),
    ColumnRule("user_confidence", "float", "How sure the user said they were.", ("in_range", 0.0, 1.0),
               nullable=True),
)

VALIDATED_LABELS_COLUMNS = (
    ColumnRule("event_id", "string", "The staged correction's id.", unique=True),
    ColumnRule("item_id", "string", "The item the vote is about."),
    ColumnRule("corrected_label", "string", "The label voted for.", (LABELS,)),
    # What the label was, and what a model predicted, are history: a term since dropped from the
    # ontology may appear there.
    ColumnRule("label_before", "string", "The item's label when the vote was staged (history: any term).",
               nullable=True),
    ColumnRule("predicted_label", "string", "What the model served for the corrected prediction (history).",
               nullable=True),
    ColumnRule("prediction_confidence", "float", "The served prediction's confidence.", ("in_range", 0.0, 1.0),
               nullable=True),
    ColumnRule("user_pseudonym", "string", "Who voted, pseudonymized.", ("matches", PSEUDONYM)),
    ColumnRule("user_role", "string", "The role the vote counts as.", ("isin", USER_ROLES)),
    ColumnRule("vote_weight", "float", "The weight of the vote in resolution (role, history, reliability).",
               ("ge", 0.0)),
)

PRODUCTION_CORPUS_COLUMNS = (
    ColumnRule("item_id", "string", "The item; one current label each.", unique=True),
    ColumnRule("label", "string", "The item's current label.", (LABELS,)),
    ColumnRule("label_source", "string", "Where the current label came from (initial, correction, review)."),
    ColumnRule("human_confirmed", "bool", "A person set or confirmed the label."),
    ColumnRule("reviewer_confirmed", "bool", "A reviewer or domain expert set or confirmed the label."),
    ColumnRule("since_version", "int32", "The corpus version that first held this label.", ("ge", 1)),
    ColumnRule("updated_version", "int32", "The corpus version of the item's latest change.", ("ge", 1)),
)

def pandera_schema(name: str, columns: tuple[ColumnRule, ...], labels: tuple[str, ...] = ()) -> pa.DataFrameSchema:
    """The Pandera (polars) schema of `columns`, with the ontology's `labels` for label rules."""
    import pandera.polars as pa

    dtypes = {"string": str, "bool": bool, "float": float, "int32": pl.Int32}

    def check(rule: tuple) -> pa.Check:
        kind, *args = rule
        return {
            "str_length": lambda: pa.Check.str_length(*args),
            "isin": lambda: pa.Check.isin(list(args[0])),
            LABELS: lambda: pa.Check.isin(list(labels)),
            "matches": lambda: pa.Check.str_matches(args[0]),
            "eq": lambda: pa.Check.eq(args[0]),
            "in_range": lambda: pa.Check.in_range(*args),
            "ge": lambda: pa.Check.ge(args[0]),
        }[kind]()

    return pa.DataFrameSchema(
        {
            c.name: pa.Column(dtypes[c.dtype], check(c.rule) if c.rule else None, nullable=c.nullable, unique=c.unique)
            for c in columns
        },
        name=name,
    )


def raw_corrections_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    return pandera_schema("raw_corrections", RAW_CORRECTIONS_COLUMNS, labels)


def validated_labels_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    return pandera_schema("validated_labels", VALIDATED_LABELS_COLUMNS, labels)


def production_corpus_schema(labels: tuple[str, ...]) -> pa.DataFrameSchema:
    return pandera_schema("production_corpus", PRODUCTION_CORPUS_COLUMNS, labels)


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
