"""Guideline insights: which label pairs people correct or dispute most, with examples and why."""

from __future__ import annotations

import duckdb
import polars as pl

from labelloop_assets.core import bursts, store

# A pair is (label before the correction -> label asked for). Disputed: the item's latest
# decision is still pending or escalated, or its contributors disagree.
PAIRS_SQL = f"""
WITH counted AS ({bursts.COUNTED_VOTES_SQL}),
split AS (
    SELECT item_id FROM counted GROUP BY item_id HAVING count(DISTINCT corrected_label) > 1
), pairs AS (
    SELECT v.label_before AS label_from, v.corrected_label AS label_to, v.item_id,
           (d.status IN ('pending', 'escalate') OR s.item_id IS NOT NULL) AS disputed
    FROM counted v
    LEFT JOIN latest_label_decisions d USING (item_id)
    LEFT JOIN split s USING (item_id)
    WHERE v.label_before IS NOT NULL AND v.label_before <> v.corrected_label
)
SELECT label_from, label_to, count(*) AS n_corrections,
       count(*) FILTER (WHERE disputed) AS n_disputed, count(DISTINCT item_id) AS n_items
FROM pairs GROUP BY ALL
ORDER BY n_corrections DESC, n_disputed DESC, label_from, label_to
LIMIT $top
"""

EXAMPLES_SQL = f"""
SELECT label_before AS label_from, corrected_label AS label_to, item_id, user_role, rationale
FROM ({bursts.COUNTED_VOTES_SQL})
WHERE rationale IS NOT NULL AND label_before IS NOT NULL
  AND list_contains($pairs, label_before || ' -> ' || corrected_label)
QUALIFY row_number() OVER (PARTITION BY label_before, corrected_label ORDER BY created_at DESC, event_id) <= $examples
"""


def report_data(
    con: duckdb.DuckDBPyConnection, current_version: int, top: int, examples: int
) -> tuple[pl.DataFrame, pl.DataFrame, int | None]:
    """(top pairs with change since the last report, example corrections, previous report's version)."""
    pairs = store.frame(con, PAIRS_SQL, {"top": top})
    previous_version = store.scalar(
        con, "SELECT max(corpus_version) FROM guideline_pairs WHERE corpus_version < ?", [current_version]
    )
    previous = store.frame(
        con,
        "SELECT label_from, label_to, n_corrections AS previous_corrections FROM guideline_pairs "
        "WHERE corpus_version = ?",
        [previous_version],
    )
    pairs = pairs.join(previous, on=["label_from", "label_to"], how="left").with_columns(
        change=pl.when(pl.lit(previous_version).is_null()).then(pl.lit("first report"))
        .when(pl.col("previous_corrections").is_null()).then(pl.lit("new in the top pairs"))
        .otherwise(pl.format("+{}", pl.col("n_corrections") - pl.col("previous_corrections")))
    )
    keys = (
        pairs.select(pl.format("{} -> {}", "label_from", "label_to").alias("pair"))["pair"].to_list()
        if pairs.height else []
    )
    shown = store.frame(con, EXAMPLES_SQL, {"pairs": keys, "examples": examples}) if keys else pl.DataFrame()
    return pairs, shown, previous_version


def render(pairs: pl.DataFrame, examples: pl.DataFrame, corpus_version: int, previous_version: int | None) -> str:
    """The report as markdown, for guideline owners."""
    lines = [
        f"# Labeling guideline insights (corpus v{corpus_version})",
        "",
        "The label pairs contributors most often correct (label before -> label asked for), how many",
        "of those items are still disputed, and what contributors wrote. Pairs at the top are where the",
        "guidelines most likely need a clearer rule or an example.",
        "",
        f"Change is against the previous report (corpus v{previous_version})." if previous_version
        else "This is the first report: no change to show yet.",
        "",
    ]
    if pairs.height == 0:
        return "\n".join([*lines, "_No corrections that change a label yet._", ""])
    lines += [
        "| label before | corrected to | corrections | disputed | items | change |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['label_from']} | {r['label_to']} | {r['n_corrections']} | {r['n_disputed']} | {r['n_items']} | "
        f"{r['change']} |"
        for r in pairs.iter_rows(named=True)
    ]
    for r in pairs.iter_rows(named=True):
        said = examples.filter((pl.col("label_from") == r["label_from"]) & (pl.col("label_to") == r["label_to"])) \
            if examples.height else examples
        lines += ["", f"## {r['label_from']} -> {r['label_to']}", ""]
        if said.height == 0:
            lines.append("_No rationale given with these corrections._")
        lines += [
            f"- `{e['item_id']}` ({e['user_role']}): {_quote(e['rationale'])}" for e in said.iter_rows(named=True)
        ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """Contributors' words as an inline code span: no markdown (links, images) of theirs renders."""
    return "`" + " ".join(text.split())[:300].replace("`", "'").replace("|", "/") + "`"
