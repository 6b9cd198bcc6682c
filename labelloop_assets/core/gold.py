"""The evaluation set: gold items the deployment declares, versioned, append-only, never trained on.

Gold labels come from one place only, `$LABELLOOP_HOME/gold.jsonl` (one JSON object a line:
`item_id`, `text` and/or `features` as the home's items carry, `gold_label`), which only whoever
runs the deployment can edit. Landing files cannot declare gold: if they could, anyone who can
land a file could change the yardstick every model is judged by. Each change of the file's
content starts a new evaluation-set version (`evaluation_sets`); its new items are inserted into
`items` with their gold label.

The file may only grow. A version that changes or drops a gold item already declared fails:
scores on a changed yardstick cannot be compared with the scores before it, so a champion that
won on the old set could not be told from one that won because the set moved.

Before training, corpus items that copy a gold item (the same text once case and spacing are
ignored, or features equal or nearly so: see `find_gold_copies`) are recorded in `gold_copies`
and left out of the training rows, so a model is never scored on what it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from labelloop_assets.core import contracts as c
from labelloop_assets.core import item_content, reading, store
from labelloop_assets.core.audit import SYSTEM_ACTOR, record_audit
from labelloop_assets.core.files import UnreadableFile
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.settings import Home, LabelloopConfigError, file_sha256
from labelloop_assets.core.validation import check_records

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

GOLD_SOURCE = "gold.jsonl"  # items.source_file of declared gold items
# The evaluation set as stored: every item with a gold label (declared in gold.jsonl, or landed
# with one before gold had to be declared).
GOLD_SQL = (
    "SELECT item_id, gold_label AS label, text, features, uri FROM items WHERE gold_label IS NOT NULL "
    "ORDER BY item_id"
)
# Lines of gold.jsonl named in one error message; the rest are counted.
MAX_LINES_NAMED = 10
EXACT, NEAR = "exact", "near"

GOLD_SPEC = c.RecordSpec(
    kind="gold",
    key="item_id",
    fields=(
        c.FieldSpec("item_id", "string"),
        c.FieldSpec("text", "string", required=False, max_length=c.MAX_ITEM_TEXT, content=True),
        c.FieldSpec("features", "number_array", required=False, max_length=4096),
        c.FieldSpec("uri", "string", required=False, max_length=2048),
        c.FieldSpec("gold_label", "string"),
    ),
)

WHAT_TO_DO = (
    "gold.jsonl is append-only: restore the item as it was declared (the file's history, or "
    "`SELECT item_id, text, features, gold_label FROM items WHERE source_file = 'gold.jsonl'`). To "
    "retire a gold item that is wrong, leave it and add a corrected copy under a new item_id: "
    "models keep being compared on one growing yardstick, and the release notes name the "
    "evaluation set each score was measured on"
)


class GoldFileError(LabelloopConfigError):
    """gold.jsonl cannot be declared as it is; the message names the lines and what to do."""


@dataclass(frozen=True)
class Declaration:
    """The current evaluation set after reading gold.jsonl."""

    evaluation_set: int | None  # None: no gold.jsonl was ever declared
    n_items: int  # gold items in the set
    n_added: int  # added by this run (0 when the file was unchanged)
    new_version: bool


def current_evaluation_set(con: duckdb.DuckDBPyConnection) -> int | None:
    """The latest evaluation-set version; None before gold.jsonl was first declared."""
    value = store.scalar(con, "SELECT max(evaluation_set) FROM evaluation_sets")
    return None if value is None else int(value)


def _latest_sha(con: duckdb.DuckDBPyConnection) -> str | None:
    return store.scalar(con, "SELECT sha256 FROM evaluation_sets ORDER BY evaluation_set DESC LIMIT 1")


def _count_gold(con: duckdb.DuckDBPyConnection) -> int:
    return int(store.scalar(con, "SELECT count(*) FROM items WHERE gold_label IS NOT NULL"))


def declare(con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, run_id: str) -> Declaration:
    """Read gold.jsonl if its content changed since the latest evaluation set; add its new items
    as the next evaluation-set version. Any problem is a GoldFileError (nothing is written)."""
    path = home.gold_file
    if path.is_symlink():
        raise GoldFileError(
            f"{path} is a symbolic link; gold.jsonl must be a regular file in the home (a link could make "
            "the evaluation set whatever file it points at)"
        )
    try:
        data = path.read_bytes() if path.exists() else None
    except OSError as error:
        raise GoldFileError(f"{path}: cannot be read ({error.strerror})") from None
    latest = current_evaluation_set(con)
    if data is None:
        declared = int(store.scalar(con, "SELECT count(*) FROM items WHERE source_file = ?", [GOLD_SOURCE]))
        if declared:
            raise GoldFileError(
                f"{path} is missing, but evaluation set {latest} declared {declared} gold item(s) in it; "
                f"{WHAT_TO_DO}"
            )
        return Declaration(latest, _count_gold(con), 0, False)
    sha = file_sha256(data)
    if sha == _latest_sha(con):
        return Declaration(latest, _count_gold(con), 0, False)
    records = read_gold_file(path, ontology, con)
    if file_sha256(path.read_bytes()) != sha:
        raise GoldFileError(f"{path} changed while it was being read; run the step again")
    with store.transaction(con):
        if sha == _latest_sha(con):  # another run declared this content meanwhile
            return Declaration(current_evaluation_set(con), _count_gold(con), 0, False)
        added = _new_items(con, records, ontology, path)
        version = (current_evaluation_set(con) or 0) + 1
        if added.height:
            store.append(con, "items", added.with_columns(run_id=pl.lit(run_id)))
            item_content.fix(con, *item_content.expected(con, added))
        n_items = _count_gold(con)
        store.append(con, "evaluation_sets", pl.DataFrame([{
            "evaluation_set": version, "sha256": sha, "n_items": n_items, "n_added": added.height,
            "run_id": run_id,
        }]))
        record_audit(
            con, SYSTEM_ACTOR, "gold.declare", f"evaluation_set {version}", "declared",
            f"{added.height} gold item(s) added from {GOLD_SOURCE}",
            json.dumps({"sha256": sha, "n_items": n_items}), run_id,
        )
    return Declaration(version, n_items, added.height, True)


def read_gold_file(path: Path, ontology: Ontology, con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Every line of gold.jsonl as (item_id, text, features, gold_label, payload_hash, line_no), checked
    by the rules landing items follow; any bad line fails the whole file, naming the lines."""
    try:
        lines, _ = reading.read_lines(path)
    except UnreadableFile as error:
        raise GoldFileError(f"{path}: {error.detail} ({error.reason})") from None
    if lines.height == 0:
        return pl.DataFrame(schema={"item_id": pl.String, "text": pl.String, "features": pl.List(pl.Float64),
                                    "uri": pl.String,
                                    "gold_label": pl.String, "payload_hash": pl.String, "line_no": pl.Int64})
    accepted, rejected = check_records(lines, GOLD_SPEC, GOLD_SOURCE, con)
    problems = [(n, f"{reason} ({detail})") for n, reason, detail in
                rejected.select("line_no", "reason", "detail").iter_rows()]
    label = ontology.harmonize("gold_label")
    accepted = accepted.with_columns(_label=label)
    problems += [(n, f"gold_label {g!r} is not in the ontology") for n, g in
                 accepted.filter(pl.col("_label").is_null()).select("line_no", "gold_label").iter_rows()]
    # The rules landing items follow for what they carry and their uri, against the home's content
    # (or the file's own).
    for failing, _reason, detail in item_content.rules(*item_content.expected(con, accepted)):
        problems += accepted.filter(failing.fill_null(False)).select(
            "line_no", detail if isinstance(detail, pl.Expr) else pl.lit(detail)
        ).rows()
    repeated = accepted.filter(pl.col("item_id").is_duplicated()).sort("line_no")
    first = repeated.group_by("item_id").agg(pl.col("line_no").min().alias("first"))
    problems += [(n, f"item_id {i!r} already declared on line {f}") for n, i, f in
                 repeated.join(first, on="item_id").filter(pl.col("line_no") != pl.col("first"))
                 .select("line_no", "item_id", "first").iter_rows()]
    if problems:
        problems.sort()
        named = "; ".join(f"line {n}: {what}" for n, what in problems[:MAX_LINES_NAMED])
        more = f" (and {len(problems) - MAX_LINES_NAMED} more)" if len(problems) > MAX_LINES_NAMED else ""
        raise GoldFileError(
            f"{path} has {len(problems)} bad line(s): {named}{more}. gold.jsonl is the deployment's "
            "evaluation set, so no line of it is skipped: fix the lines and run the step again"
        )
    return accepted.with_columns(gold_label=pl.col("_label")).select(
        "item_id", "text", "features", "uri", "gold_label", "payload_hash", "line_no"
    )


def _new_items(con: duckdb.DuckDBPyConnection, records: pl.DataFrame, ontology: Ontology, path: Path) -> pl.DataFrame:
    """The records not yet stored, as `items` rows; a declared gold item changed or dropped, or a
    new gold id that is already an ordinary item, is a GoldFileError."""
    stored = store.frame(
        con, "SELECT item_id, text AS stored_text, features AS stored_features, uri AS stored_uri, "
        "gold_label AS stored_label, source_file "
        "FROM items WHERE gold_label IS NOT NULL OR list_contains($ids, item_id)",
        {"ids": records["item_id"].to_list()},
    ).with_columns(
        stored_label=ontology.harmonize("stored_label").fill_null(pl.col("stored_label")), _stored=pl.lit(True)
    )
    joined = records.join(stored, on="item_id", how="left", coalesce=True)
    problems: list[str] = []
    ordinary = joined.filter(pl.col("_stored").fill_null(False) & pl.col("stored_label").is_null())
    problems += [
        f"line {n}: {i!r} is already an ordinary item (in the corpus): a gold item must be one no model "
        "was trained on; declare it under a new item_id"
        for n, i in ordinary.select("line_no", "item_id").iter_rows()
    ]
    gold = joined.filter(pl.col("stored_label").is_not_null())
    problems += [
        f"line {n}: gold item {i!r} changed its label from {old!r} to {new!r}"
        for n, i, old, new in gold.filter(pl.col("gold_label") != pl.col("stored_label"))
        .select("line_no", "item_id", "stored_label", "gold_label").iter_rows()
    ]
    problems += [
        f"line {n}: gold item {i!r} changed its text, features or uri"
        for n, i in gold.filter(pl.col("features").ne_missing(pl.col("stored_features"))
                                | pl.col("text").ne_missing(pl.col("stored_text"))
                                | pl.col("uri").ne_missing(pl.col("stored_uri")))
        .select("line_no", "item_id").iter_rows()
    ]
    dropped = stored.filter(pl.col("source_file") == GOLD_SOURCE).join(
        records, on="item_id", how="anti"
    )["item_id"].sort().to_list()
    if dropped:
        problems.append(
            f"{len(dropped)} declared gold item(s) are no longer in the file: "
            + ", ".join(repr(i) for i in dropped[:MAX_LINES_NAMED]) + (" ..." if len(dropped) > MAX_LINES_NAMED else "")
        )
    if problems:
        shown = "; ".join(problems[:MAX_LINES_NAMED])
        more = f" (and {len(problems) - MAX_LINES_NAMED} more)" if len(problems) > MAX_LINES_NAMED else ""
        raise GoldFileError(
            f"{path} changes the declared evaluation set: {shown}{more}. Changing the yardstick "
            f"silently would make every comparison of models across it meaningless. {WHAT_TO_DO}"
        )
    return joined.filter(pl.col("_stored").is_null()).sort("line_no").select(
        "item_id", "text", "features", "uri", "gold_label", "payload_hash",
        pl.lit(GOLD_SOURCE).alias("source_file"), "line_no",
    )


def declared_gold_ids(con: duckdb.DuckDBPyConnection, ids: pl.DataFrame) -> pl.DataFrame:
    """Of the `item_id`s given, those that are gold items (a lookup, O(batch))."""
    return store.lookup(con, "items", "item_id", ids, "t.gold_label IS NOT NULL AS is_gold").filter("is_gold")


@dataclass(frozen=True)
class GoldCopies:
    """Corpus items that copy a gold item: item_id, gold_item_id, kind (exact | near), distance."""

    copies: pl.DataFrame
    spacing: float | None  # the gold set's median nearest-neighbour distance (standardized)

    @property
    def item_ids(self) -> pl.Series:
        return self.copies["item_id"].unique()

    def counts(self) -> dict[str, int]:
        return {kind: int((self.copies["kind"] == kind).sum()) for kind in (EXACT, NEAR)}


COPY_SCHEMA = {"item_id": pl.String, "gold_item_id": pl.String, "kind": pl.String, "distance": pl.Float64}


def _matrix(frame: pl.DataFrame) -> np.ndarray:
    import numpy as np
    width = int(frame["features"].list.len().max())
    # + 0.0 turns -0.0 into 0.0, so that equal numbers have equal bytes.
    return frame["features"].list.to_array(width).to_numpy().astype(np.float64) + 0.0


def find_gold_copies(corpus: pl.DataFrame, gold: pl.DataFrame, near_distance: float) -> GoldCopies:
    """Corpus items that copy a gold item: the same text once case and spacing are ignored
    (`exact`), or features equal to a gold item's (`exact`) or within `near_distance` of one
    (`near`, see `_feature_copies`). Frames hold item_id and text and/or features."""
    text_copies = _text_copies(corpus, gold)
    if "features" not in corpus.columns or "features" not in gold.columns:
        return GoldCopies(text_copies, None)
    by_features = _feature_copies(corpus.filter(pl.col("features").is_not_null()),
                                  gold.filter(pl.col("features").is_not_null()), near_distance)
    both = pl.concat([text_copies, by_features.copies]).sort("distance").unique(["item_id", "gold_item_id"],
                                                                                  keep="first")
    return GoldCopies(both.sort("item_id", "gold_item_id"), by_features.spacing)


def _normalized_text() -> pl.Expr:
    return pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _text_copies(corpus: pl.DataFrame, gold: pl.DataFrame) -> pl.DataFrame:
    if "text" not in corpus.columns or "text" not in gold.columns:
        return pl.DataFrame(schema=COPY_SCHEMA)
    keyed = gold.filter(pl.col("text").is_not_null()).select(pl.col("item_id").alias("gold_item_id"),
                                                             _normalized_text().alias("_key"))
    return corpus.filter(pl.col("text").is_not_null()).select("item_id", _normalized_text().alias("_key")).join(
        keyed, on="_key"
    ).select("item_id", "gold_item_id", kind=pl.lit(EXACT), distance=pl.lit(0.0)).cast(COPY_SCHEMA)


def _feature_copies(corpus: pl.DataFrame, gold: pl.DataFrame, near_distance: float) -> GoldCopies:
    """Corpus items whose features equal a gold item's (`exact`), or lie within `near_distance`
    of one (`near`).

    Near is scale-free: features are standardized by the gold set's standard deviation (floored
    at the median feature's, so that a feature nearly constant in gold does not turn noise into
    distance), and the Euclidean distance to the nearest gold item is divided by the gold set's
    own spacing: the median distance from a gold item to its nearest other gold item. 0.1 means
    ten times closer than two gold items usually are. `distance` is that ratio (0 for exact).
    With fewer than two distinct gold items there is no spacing, and only exact copies are found.
    """
    import numpy as np
    if corpus.height == 0 or gold.height == 0:
        return GoldCopies(pl.DataFrame(schema=COPY_SCHEMA), None)
    corpus = corpus.filter(pl.col("features").list.len() == gold["features"].list.len().max())
    if corpus.height == 0:
        return GoldCopies(pl.DataFrame(schema=COPY_SCHEMA), None)
    x, g = _matrix(corpus), _matrix(gold)
    gold_ids, corpus_ids = gold["item_id"].to_numpy(), corpus["item_id"].to_numpy()
    # Exact: equal bytes (a dictionary probe per corpus row; no distances involved).
    by_bytes = {row.tobytes(): i for i, row in enumerate(g)}
    exact = np.array([by_bytes.get(row.tobytes(), -1) for row in x])
    rows = [pl.DataFrame({"item_id": corpus_ids[exact >= 0], "gold_item_id": gold_ids[exact[exact >= 0]],
                          "kind": EXACT, "distance": 0.0}, schema=COPY_SCHEMA)]
    spacing = None
    if near_distance > 0 and len(by_bytes) >= 2:
        std = g.std(axis=0)
        positive = std[std > 0]
        scale = np.maximum(std, np.median(positive)) if positive.size else np.ones_like(std)
        gs = g / scale
        # imported where used: loading the code location must not pay for scikit-learn
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=2).fit(gs)
        between = index.kneighbors(gs)[0][:, 1]
        spacing = float(np.median(between[between > 0])) if (between > 0).any() else None
        rest = np.flatnonzero(exact < 0)
        if spacing and rest.size:
            distance, nearest = index.kneighbors(x[rest] / scale, n_neighbors=1)
            ratio = distance[:, 0] / spacing
            close = ratio < near_distance
            rows.append(pl.DataFrame({
                "item_id": corpus_ids[rest[close]], "gold_item_id": gold_ids[nearest[close, 0]],
                "kind": NEAR, "distance": ratio[close],
            }, schema=COPY_SCHEMA))
    return GoldCopies(pl.concat(rows).sort("item_id"), spacing)


def record_copies(con: duckdb.DuckDBPyConnection, found: GoldCopies, run_id: str) -> int:
    """Add the copies not recorded before to `gold_copies`; returns how many were new."""
    if found.copies.height == 0:
        return 0
    known = store.lookup(con, "gold_copies", "item_id", found.copies, "t.gold_item_id, t.kind")
    new = found.copies.join(known, on=["item_id", "gold_item_id", "kind"], how="anti")
    return store.append(con, "gold_copies", new.with_columns(run_id=pl.lit(run_id)))
