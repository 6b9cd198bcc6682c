"""What a home's items carry: text, features (a fixed-length list of numbers) or both.

A home's first accepted items fix it, as they fix the feature length: one model reads every
item, so an item that carries less than the others cannot be predicted, and one that carries
more would be read differently from the rest. Later items that differ are quarantined with the
reason (`item_content_mismatch`, `feature_length_mismatch`); an item that carries neither is
missing a field. `uri` (a reference to the payload, which the team's own code may read) is
optional on every item and never read by labelloop.
"""

from __future__ import annotations

import duckdb
import polars as pl

from labelloop_assets.core import contracts as c
from labelloop_assets.core import store
from labelloop_assets.core.pipelines import BOTH, FEATURES, TEXT

# pipeline_state holds numbers: the content is kept as bits.
_BITS = {FEATURES: 1, TEXT: 2, BOTH: 3}
_NAMES = {bits: name for name, bits in _BITS.items()}
STATE_KEY = "item_content"
LENGTH_KEY = "feature_length"


def carried() -> pl.Expr:
    """Per record: text, features, text+features, or null for neither."""
    text, features = pl.col("text").is_not_null(), pl.col("features").is_not_null()
    return (
        pl.when(text & features).then(pl.lit(BOTH))
        .when(text).then(pl.lit(TEXT))
        .when(features).then(pl.lit(FEATURES))
    )


def home_content(con: duckdb.DuckDBPyConnection) -> str | None:
    """What this home's items carry, or None before its first item (stores from before text
    items had features only)."""
    bits = store.get_state(con, STATE_KEY, 0)
    if bits:
        return _NAMES[bits]
    return FEATURES if store.get_state(con, LENGTH_KEY, 0) else None


def expected(con: duckdb.DuckDBPyConnection, records: pl.DataFrame) -> tuple[str | None, int]:
    """(content, feature length) the records are checked against: the home's, or for its first
    items the most common among them."""
    content = home_content(con)
    if content is None and records.height:
        found = records.select(carried().alias("content")).drop_nulls()["content"]
        content = found.mode().sort().first() if found.len() else None
    length = store.get_state(con, LENGTH_KEY, 0)
    if not length and content in (FEATURES, BOTH):
        lengths = records["features"].drop_nulls().list.len()
        length = int(lengths.mode().sort().first()) if lengths.len() else 0
    return content, length


def rules(content: str | None, feature_length: int) -> list[tuple[pl.Expr, str, str | pl.Expr]]:
    """(failing condition, reason, detail) for what items carry and where their payload is, in the
    order they are tried: landing items and gold.jsonl both follow them."""
    found = [(carried().is_null(), c.MISSING_FIELD, "text or features: an item carries text, features or both")]
    if content is not None:
        found.append((
            carried() != content, c.ITEM_CONTENT_MISMATCH,
            pl.format(f"the item carries {{}}; this deployment's items carry {content} (fixed by its first items)",
                      carried()),
        ))
    if content in (FEATURES, BOTH) and feature_length:
        found.append((
            pl.col("features").list.len() != feature_length,
            c.FEATURE_LENGTH_MISMATCH,
            pl.format(f"features: {{}} values, this deployment uses {feature_length}", pl.col("features").list.len()),
        ))
    found.append((pl.col("uri").is_not_null() & ~pl.col("uri").str.contains(c.URI_PATTERN), c.INVALID_VALUE,
                  "uri: must be an absolute URI with a scheme (s3://, https://, file:///...) and no spaces"))
    return found


def fix(con: duckdb.DuckDBPyConnection, content: str | None, feature_length: int) -> None:
    """Record what the home's first accepted items carry (no-op once recorded)."""
    if content is None:
        return
    if not store.get_state(con, STATE_KEY, 0):
        store.set_state(con, STATE_KEY, _BITS[content])
    if content in (FEATURES, BOTH) and feature_length and not store.get_state(con, LENGTH_KEY, 0):
        store.set_state(con, LENGTH_KEY, feature_length)
