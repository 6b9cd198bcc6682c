"""Read replicas for analysts: Parquet snapshots of the views they query, swapped in atomically.

DuckDB lets one process hold the database file while a run writes. Analysts instead open
`published/views.sql` in any DuckDB (or read the Parquet files directly): a reader never takes
the writer's lock, and a writer replaces each file with a rename, so a reader sees a whole
snapshot, old or new, never a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from labelloop_assets.core.contracts import write_atomically

# Refreshed by every run: their size follows the corpus or stays small.
EVERY_RUN = (
    "production_corpus",
    "escalations",
    "review_decisions",
    "audit_log",
    "corpus_versions",
    "models",
    "model_evaluations",
    "release_notes",
    "contributor_reliability",
    "label_quality_metrics",
    "label_quality_by_label",
    "label_quality_by_segment",
    "label_agreement",
    "label_agreement_pairs",
    "label_drift",
    "correction_bursts",
    "label_issue_candidates",
    "guideline_pairs",
)
# Whole-history views: refreshed with each training, so an ingest run's cost follows its batch.
WITH_TRAINING = ("label_versions", "label_lineage", "label_decisions", "quarantine", "ingested_files")
PUBLISHED = EVERY_RUN + WITH_TRAINING


def publish(
    con: duckdb.DuckDBPyConnection, folder: Path, names: tuple[str, ...] = PUBLISHED
) -> dict[str, int]:
    """Export each named table or view to folder/<name>.parquet; returns row counts."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in names:
        target = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        con.execute(f"COPY (SELECT * FROM {name}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
        os.replace(tmp, target)
        counts[name] = con.execute(f"SELECT count(*) FROM read_parquet('{_sql_path(target)}')").fetchall()[0][0]
    views = "".join(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{_sql_path(folder / (name + '.parquet'))}');\n"
        for name in PUBLISHED
        if (folder / f"{name}.parquet").exists()
    )
    write_atomically(
        folder / "views.sql",
        "-- labelloop analyst views over the published snapshots. In DuckDB: .read views.sql\n" + views,
    )
    return counts


def _sql_path(path: Path) -> str:
    return str(path.resolve()).replace("'", "''")
