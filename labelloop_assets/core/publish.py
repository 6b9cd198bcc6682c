"""Read replicas for analysts: Parquet snapshots of the views they query, swapped in atomically.

DuckDB lets one process hold the database file while a run writes. Analysts instead open
`published/views.sql` in any DuckDB (or read the Parquet files directly): a reader never takes
the writer's lock, and a writer replaces each file with a rename, so a program that opens a file
once reads a whole snapshot, old or new, never a half-written one.

DuckDB opens a file again between planning a query and scanning it; had the path been renamed
over in between, it would read the new file with the old file's layout (errors, or mixed rows).
So the views in views.sql name files that never change: each publish links its files into the
sibling folder `.published/` under a generation of their own, and a generation stays there for
RETAIN_SECONDS after a newer one replaces it, so a session's views keep working that long.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import duckdb

from labelloop_assets.core.files import write_atomically

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


RETAIN_SECONDS = 600
_GENERATION = re.compile(r"(?P<name>\w+)\.(?P<generation>\d{20})\.parquet")


def publish(
    con: duckdb.DuckDBPyConnection, folder: Path, names: tuple[str, ...] = PUBLISHED
) -> dict[str, int]:
    """Export each named table or view to folder/<name>.parquet; returns row counts."""
    folder.mkdir(parents=True, exist_ok=True)
    generations = _generations_folder(folder)
    generations.mkdir(exist_ok=True)
    generation = f"{time.time_ns():020d}"
    counts, current = {}, {}
    for name in names:
        target = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        con.execute(f"COPY (SELECT * FROM {name}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
        current[name] = generations / f"{name}.{generation}.parquet"
        _link(tmp, current[name])
        os.replace(tmp, target)
        counts[name] = con.execute(f"SELECT count(*) FROM read_parquet('{_sql_path(target)}')").fetchall()[0][0]
    # Names not published by this run keep the newest generation an earlier run left.
    current = {name: current.get(name) or _current_generation(folder, name) for name in PUBLISHED}
    views = "".join(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{_sql_path(path)}');\n"
        for name, path in current.items()
        if path is not None
    )
    write_atomically(
        folder / "views.sql",
        "-- labelloop analyst views over the published snapshots. In DuckDB: .read views.sql\n" + views,
    )
    _prune(generations, time.time_ns())
    return counts


def _generations_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}")


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _generations(generations: Path, name: str) -> list[Path]:
    return sorted(generations.glob(f"{name}.*.parquet"))


def _current_generation(folder: Path, name: str) -> Path | None:
    """The newest generation of a name; a snapshot published before generations gets one."""
    found = _generations(_generations_folder(folder), name)
    if found:
        return found[-1]
    published = folder / f"{name}.parquet"
    if not published.exists():
        return None
    path = _generations_folder(folder) / f"{name}.{0:020d}.parquet"
    _link(published, path)
    return path


def _prune(generations: Path, now_ns: int) -> None:
    """Remove each generation RETAIN_SECONDS after the next one replaced it; keep the newest."""
    by_name: dict[str, list[tuple[int, Path]]] = {}
    for path in generations.iterdir():
        found = _GENERATION.fullmatch(path.name)
        if found:
            by_name.setdefault(found["name"], []).append((int(found["generation"]), path))
    for files in by_name.values():
        files.sort()
        for (_, older), (replaced_at, _) in zip(files, files[1:], strict=False):
            if now_ns - replaced_at > RETAIN_SECONDS * 1_000_000_000:
                older.unlink(missing_ok=True)


def _sql_path(path: Path) -> str:
    return str(path.resolve()).replace("'", "''")
