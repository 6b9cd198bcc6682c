"""Items that look the same but carry different labels in the corpus.

Two items have the same shape when their features, rounded to DECIMALS places, and their text,
trimmed, with runs of white space made one space and lowered, are equal. An item's content never
changes once ingested, so its shape is worked out once, when it is first seen here, and kept in
`item_shapes`: each run works out the shapes of the items new since the last one, instead of
rounding every item's features and normalizing every text again. The clashes are still found
by grouping every corpus item's kept shape (at 100,000 items about 0.07 s a run, against 0.27 s
before; both grow with the corpus).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from labelloop_assets.core import store

DECIMALS = 2
SCALE = 10 ** DECIMALS  # features are compared as whole multiples of 1 / SCALE

# Shapes are kept, so how they are worked out must not drift under them: features are written
# as whole numbers of hundredths (integers print the same in every DuckDB release; -0.0 becomes
# 0), the text as normalized, and an MD5 of both is kept. A change to SHAPE_SQL must raise
# SHAPE_FORMAT: the next run then works out every item's shape again.
SHAPE_FORMAT = 1
FORMAT_STATE = "item_shapes.format"
SHAPE_SQL = f"""md5(
    coalesce(CAST(list_transform(i.features, lambda x: CAST(round(x * {SCALE}) AS BIGINT)) AS VARCHAR), '')
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
    """Work out the shape of every item not yet in item_shapes (of every item, when the kept ones
    were worked out another way); returns how many were added.

    Items are numbered in the order they are appended, by one writer at a time, and committed in
    that order: the items after the largest number kept here are exactly the ones not seen yet.
    One transaction, so on the lake it commits only while this writer still holds its lock."""
    with store.transaction(con):
        if store.get_state(con, FORMAT_STATE) != SHAPE_FORMAT:
            con.execute("DELETE FROM item_shapes")
            store.set_state(con, FORMAT_STATE, SHAPE_FORMAT)
        return int(store.scalar(
            con,
            f"INSERT INTO item_shapes (seq, item_id, shape) SELECT i.seq, i.item_id, {SHAPE_SQL} FROM items i "
            "WHERE i.seq > (SELECT coalesce(max(seq), 0) FROM item_shapes)",
        ) or 0)


def clashes(con: Any) -> pl.DataFrame:
    """Groups of corpus items with the same shape and more than one label (shape, items, labels)."""
    record_shapes(con)
    return store.frame(con, CLASHES_SQL)
