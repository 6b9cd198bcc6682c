"""Items that look the same but carry different labels in the corpus.

Two items have the same shape when their features, rounded to DECIMALS places, and their text,
trimmed, with runs of white space made one space and lowered, are equal. An item's content never
changes once ingested, so its shape is worked out once, when it is first seen here, and kept in
`item_shapes`: each run then looks at the items new since the last one and groups the stored
shapes, instead of rounding every item's features and normalizing every text again (at 100,000
items: 0.27 s a run, growing with the item count, against about 0.07 s).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from labelloop_assets.core import store

DECIMALS = 2

# md5 of an unambiguous text (features, then the unit separator, then the text), not DuckDB's
# hash(): shapes are stored, so they must not change with the engine's version. Features print
# the same for the same rounded doubles (adding 0.0 turns a -0.0 into 0.0).
SHAPE_SQL = f"""md5(
    coalesce(CAST(list_transform(i.features, lambda x: round(x, {DECIMALS}) + 0.0) AS VARCHAR), '')
    || chr(31) || coalesce(lower(regexp_replace(trim(i.text), '\\s+', ' ', 'g')), '')
)"""

# Clashing shapes are found first (min <> max is cheaper than count(DISTINCT)), and item lists
# are built for those only: listing the items of every shape was most of this query's time.
CLASHES_SQL = """
    WITH joined AS (
        SELECT s.shape, c.item_id, c.label FROM production_corpus c JOIN item_shapes s USING (item_id)
    ), clashing AS (
        SELECT shape FROM joined GROUP BY shape HAVING min(label) <> max(label)
    )
    SELECT shape, list(item_id ORDER BY item_id) AS items, list(DISTINCT label ORDER BY label) AS labels
    FROM joined SEMI JOIN clashing USING (shape)
    GROUP BY shape ORDER BY items[1]
"""


def record_shapes(con: Any) -> int:
    """Work out the shape of every item not yet in item_shapes; returns how many were added.

    Items are numbered in the order they are appended, by one writer at a time, and committed in
    that order: the items after the largest number kept here are exactly the ones not seen yet."""
    return int(store.scalar(
        con,
        f"INSERT INTO item_shapes (seq, item_id, shape) SELECT i.seq, i.item_id, {SHAPE_SQL} FROM items i "
        "WHERE i.seq > (SELECT coalesce(max(seq), 0) FROM item_shapes)",
    ) or 0)


def clashes(con: Any) -> pl.DataFrame:
    """Groups of corpus items with the same shape and more than one label (shape, items, labels)."""
    record_shapes(con)
    return store.frame(con, CLASHES_SQL)
