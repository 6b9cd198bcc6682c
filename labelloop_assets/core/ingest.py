"""Ingest landing files exactly once: structural checks, semantic checks, one transaction a group.

The files of a kind to read are those the `ingested_files` ledger has not seen, and those whose
content changed since they were read (ingested again as a new version). They are read in bounded
memory (core/reading.py) and ingested in groups of about GROUP_BYTES: a group's records,
quarantine rows and ledger entries commit together, so a crash or a retried run can neither lose
a file nor ingest it twice.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl

from labelloop_assets.core import contracts as c
from labelloop_assets.core import gold, item_content, reading, store
from labelloop_assets.core.audit import record_audit_rows
from labelloop_assets.core.directory import END_USER, ROOT_PRODUCER, Directory, effective_role, producer_expr
from labelloop_assets.core.files import UnreadableFile, landing_file_sha256, landing_names
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.secret import check_pseudonymization_key
from labelloop_assets.core.settings import Home, LabelloopConfigError, load_yaml_mapping
from labelloop_assets.core.validation import check_records, quarantine_rows, whole_file_quarantine


@dataclass
class IngestReport:
    """What one ingest batch did; the figures become Dagster metadata."""

    kind: str
    files: list[str] = field(default_factory=list)
    records_in: int = 0
    accepted: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def reconciles(self) -> bool:
        return self.records_in == self.accepted + self.quarantined


@dataclass
class _Batch:
    accepted: list[pl.DataFrame] = field(default_factory=list)
    quarantined: list[pl.DataFrame] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)

    def drop(self, source: str) -> None:
        """Forget what was kept of one file (it is quarantined whole instead)."""
        keep = pl.col("source_file") != source
        self.accepted = [f.filter(keep) for f in self.accepted]
        self.quarantined = [f.filter(keep) for f in self.quarantined]


@dataclass(frozen=True)
class PendingFile:
    """A landing file to read: new, or a ledgered one whose content changed since (a new version)."""

    path: Path
    name: str  # kind/[producer/]file, the ledger's path
    version: int = 1
    resume: reading.Resume | None = None  # an appended file: where the ingested part ended

    @property
    def source(self) -> str:
        """What its records and quarantine rows name as their source_file."""
        return source_name(self.name, self.version)


def source_name(path: str, version: int) -> str:
    """A landing path, and `@v<N>` for the N-th version of a file that changed after it was read."""
    return path if version == 1 else f"{path}@v{version}"


def pending_files(home: Home, con: duckdb.DuckDBPyConnection, kind: str) -> list[PendingFile]:
    """Landing files of a kind (its folder and producers' subfolders) to read: every file the
    ledger has not seen, and every ledgered file whose size or change time moved and whose
    content is no longer what was read (a rewritten file, or one with lines appended)."""
    candidates = [f"{kind}/{name}" for name in landing_names(home.landing_dir(kind))]
    if not candidates:
        return []
    names = pl.DataFrame({"path": candidates})
    ledgered = store.lookup(
        con, "ingested_files", "path", names,
        "coalesce(t.version, 1) AS version, t.size_bytes, t.ctime_ns, t.sha256, t.line_count",
    )
    latest = ledgered.sort("version").group_by("path", maintain_order=True).last()
    seen = {row["path"]: row for row in latest.iter_rows(named=True)}
    pending = []
    for name in candidates:
        path = home.landing / name
        row = seen.get(name)
        if row is None:
            pending.append(PendingFile(path, name))
            continue
        changed = _changed_version(con, path, row)
        if changed is not None:
            pending.append(changed)
    return pending


def _changed_version(con: duckdb.DuckDBPyConnection, path: Path, row: dict) -> PendingFile | None:
    """The next version of a ledgered file if its content changed, else None.

    Change is seen by the inode's change time (ctime), which every write moves and which, unlike
    the modification time, no one can set back; a new time with the same size and SHA-256 is a
    file touched or re-permissioned, not changed."""
    try:
        now = os.lstat(path)
    except OSError:
        return None  # gone: nothing new to read (its rows stay)
    if row["ctime_ns"] is None:
        # Ledgered before versions were kept (or never opened by this labelloop): only a new size tells.
        if now.st_size == row["size_bytes"]:
            return None
    elif now.st_ctime_ns == row["ctime_ns"]:
        return None
    elif now.st_size == row["size_bytes"] and row["sha256"] is not None and stat.S_ISREG(now.st_mode):
        if landing_file_sha256(path) == row["sha256"]:
            con.execute(
                "UPDATE ingested_files SET ctime_ns = ? WHERE path = ? AND version = ?",
                [now.st_ctime_ns, row["path"], row["version"]],
            )
            return None
    resume = None
    if now.st_size > (row["size_bytes"] or 0) and row["sha256"] and row["line_count"] is not None:
        resume = reading.Resume(row["size_bytes"], row["line_count"] + 1, row["sha256"])
    return PendingFile(path, row["path"], row["version"] + 1, resume)


# landing/<kind>/<producer>/<name> at the deepest: a producer is one folder.
NESTED_TOO_DEEP = (
    "{name}: inside a folder within a producer's folder; landing files go in landing/<kind>/ or "
    "landing/<kind>/<producer>/ (move it there to have it read)"
)
OUT_OF_MEMORY_DETAIL = (
    "{name}: ran out of memory while reading it ({error}); the other files went through. "
    "Split it into smaller files and land them under new names"
)


OUT_OF_MEMORY = (MemoryError, duckdb.OutOfMemoryException)


def _read_batch(
    files: list[PendingFile], spec: c.RecordSpec, con: duckdb.DuckDBPyConnection, key: bytes,
    raw_lines: list[pl.DataFrame] | None = None,
) -> tuple[_Batch, int]:
    """Read every file in bounded memory and check its lines, several small files or one part of
    a big file at a time (the lines as read go to `raw_lines` when given: review ingest verifies
    signatures over exactly those). A file that cannot be read, passes a cap or exhausts memory is
    quarantined whole and the others go through."""
    reader = _BatchReader(spec, con, key, raw_lines)
    for pending in files:
        reader.read(pending)
    reader.flush()
    return reader.batch, sum(entry["blank_lines"] for entry in reader.batch.files)


class _BatchReader:
    """Lines read wait here until there are enough to check at once."""

    def __init__(self, spec: c.RecordSpec, con: duckdb.DuckDBPyConnection, key: bytes,
                 raw_lines: list[pl.DataFrame] | None):
        self.spec, self.con, self.key, self.raw_lines = spec, con, key, raw_lines
        self.batch = _Batch()
        self.waiting: list[pl.DataFrame] = []
        self.waiting_bytes = self.waiting_lines = 0
        self.read_so_far: dict[str, tuple[PendingFile, reading.FileRead]] = {}
        self.isolated: set[str] = set()

    def read(self, pending: PendingFile) -> None:
        landing = reading.LandingFile(pending.path, pending.resume)
        self.read_so_far[pending.source] = (pending, landing.read)
        try:
            if pending.name.count("/") > 2:
                raise UnreadableFile(c.UNREADABLE_FILE, NESTED_TOO_DEEP.format(name=pending.name))
            for chunk in landing.chunks():
                self.waiting.append(chunk.with_columns(source_file=pl.lit(pending.source)))
                self.waiting_bytes += _bytes([chunk])
                self.waiting_lines += chunk.height
                if self.waiting_bytes >= reading.CHUNK_BYTES or self.waiting_lines >= reading.CHUNK_LINES:
                    self.flush()
                    if pending.source in self.isolated:
                        return
        except UnreadableFile as error:
            self.isolate(pending.source, error)
            return
        except OUT_OF_MEMORY as error:  # while reading it (a check that runs out is handled in flush)
            self.isolate(pending.source, _out_of_memory(pending.name, error))
            return
        read = landing.read
        self.batch.files.append(_ledger_entry(pending, read, read.size_bytes, read.blank_lines))

    def flush(self) -> None:
        """Check what is waiting. If that runs out of memory, each file is checked alone and only
        the files that still run out are quarantined."""
        frames = [f for f in self.waiting if f.height]
        self.waiting, self.waiting_bytes, self.waiting_lines = [], 0, 0
        if not frames:
            return
        try:
            self._check(frames)
        except OUT_OF_MEMORY as error:
            sources = pl.concat([f.select("source_file") for f in frames]).unique(maintain_order=True)
            if sources.height == 1:
                source = sources["source_file"][0]
                self.isolate(source, _out_of_memory(self.read_so_far[source][0].name, error))
                return
            for source in sources["source_file"]:
                alone = [f.filter(pl.col("source_file") == source) for f in frames]
                try:
                    self._check(alone)
                except OUT_OF_MEMORY:
                    pending, _ = self.read_so_far[source]
                    self.isolate(source, _out_of_memory(pending.name, error))

    def _check(self, frames: list[pl.DataFrame]) -> None:
        lines = pl.concat(frames)
        checked = [
            check_records(lines.slice(start, reading.CHUNK_LINES), self.spec, None, self.con, self.key)
            for start in range(0, lines.height, reading.CHUNK_LINES)
        ]
        if self.raw_lines is not None:
            self.raw_lines.append(lines)
        self.batch.accepted.extend(accepted for accepted, _ in checked)
        self.batch.quarantined.extend(quarantined for _, quarantined in checked)

    def isolate(self, source: str, error: UnreadableFile) -> None:
        """Quarantine one file whole and forget whatever was kept of it."""
        pending, read = self.read_so_far[source]
        self.isolated.add(source)
        others = pl.col("source_file") != source
        self.waiting = [f.filter(others) for f in self.waiting]
        self.waiting_bytes, self.waiting_lines = _bytes(self.waiting), sum(f.height for f in self.waiting)
        self.batch.drop(source)
        if self.raw_lines is not None:
            self.raw_lines[:] = [f.filter(others) for f in self.raw_lines]
        self.batch.files = [entry for entry in self.batch.files if entry["source"] != source]
        self.batch.quarantined.append(whole_file_quarantine(self.spec.kind, source, error, pending.path))
        self.batch.files.append(_ledger_entry(pending, read, _size(pending.path), 0))


def _out_of_memory(name: str, error: BaseException) -> UnreadableFile:
    return UnreadableFile(c.RESOURCE_LIMIT, OUT_OF_MEMORY_DETAIL.format(name=name, error=type(error).__name__))


def _bytes(frames: list[pl.DataFrame]) -> int:
    return sum(int(f["line"].str.len_bytes().sum() or 0) for f in frames)


def _ledger_entry(pending: PendingFile, read: reading.FileRead, size: int | None, blank: int) -> dict:
    changed = read.ctime_ns
    if changed is None:  # refused before it was opened (a link, a folder): its own entry's time
        try:
            changed = os.lstat(pending.path).st_ctime_ns
        except OSError:
            changed = None
    return {
        "path": pending.name, "source": pending.source, "version": pending.version,
        "size_bytes": size, "blank_lines": blank, "sha256": read.sha256, "ctime_ns": changed,
        "line_count": read.lines if read.sha256 else None, "first_line": read.resumed_at_line,
    }


def _size(path: Path) -> int | None:
    try:
        return os.lstat(path).st_size  # a refused link's own size, not its target's
    except OSError:
        return None


def split_by_rules(
    frame: pl.DataFrame, kind: str, key: str, rules: list[tuple[pl.Expr, str, pl.Expr | str]]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """First failing rule wins; returns (passing rows, quarantine rows)."""
    if frame.height == 0 or not rules:
        return frame, pl.DataFrame(schema=c.QUARANTINE_COLUMNS)
    reason = pl.when(rules[0][0]).then(pl.lit(rules[0][1]))
    detail = pl.when(rules[0][0]).then(_lit(rules[0][2]))
    for condition, code, text in rules[1:]:
        reason = reason.when(condition).then(pl.lit(code))
        detail = detail.when(condition).then(_lit(text))
    tagged = frame.with_columns(
        reason.otherwise(None).alias("_reason"), detail.otherwise(None).alias("_detail")
    )
    failed = tagged.filter(pl.col("_reason").is_not_null())
    quarantined = quarantine_rows(failed, kind, "", pl.col("_detail"), key).with_columns(
        reason=failed["_reason"]
    )
    return tagged.filter(pl.col("_reason").is_null()).drop("_reason", "_detail"), quarantined


def _lit(value: pl.Expr | str) -> pl.Expr:
    return pl.lit(value) if isinstance(value, str) else value


def _split_duplicates(
    frame: pl.DataFrame, con: duckdb.DuckDBPyConnection, table: str, kind: str, key: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Quarantine replays (same key, same payload) and conflicts (same key, other payload).

    Run on rows that passed every other rule: the first such occurrence in file order is
    compared with what is stored, later ones in the batch with the first.
    """
    none = pl.DataFrame(schema=c.QUARANTINE_COLUMNS)
    if frame.height == 0:
        return frame, none
    stored = store.lookup(con, table, key, frame, "t.payload_hash AS stored_hash")
    frame = frame.sort("source_file", "line_no")
    # The usual batch repeats nothing: it skips the per-key windows (most of this step's cost).
    if stored.height == 0 and not frame[key].is_duplicated().any():
        return frame, none
    frame = (
        frame.join(stored, on=key, how="left", maintain_order="left")
        .with_columns(
            _rank=pl.int_range(pl.len()).over(key),
            _first_hash=pl.col("payload_hash").first().over(key),
        )
    )
    reference = pl.coalesce("stored_hash", pl.when(pl.col("_rank") > 0).then("_first_hash"))
    rules: list[tuple[pl.Expr, str, pl.Expr | str]] = [
        (
            reference.is_not_null() & (reference == pl.col("payload_hash")),
            c.DUPLICATE_EVENT,
            f"{key} already ingested with the same content",
        ),
        (
            reference.is_not_null() & (reference != pl.col("payload_hash")),
            c.CONFLICTING_DUPLICATE,
            f"{key} already ingested with different content",
        ),
    ]
    kept, rejected = split_by_rules(frame, kind, key, rules)
    return kept.drop("stored_hash", "_rank", "_first_hash"), rejected


def _label_rule(ontology: Ontology, column: str, required: bool) -> tuple[pl.Expr, pl.Expr]:
    """(harmonized label expr, failing condition) for one label column."""
    harmonized = ontology.harmonize(column)
    failing = pl.col(column).is_not_null() & harmonized.is_null()
    if required:
        failing = failing | pl.col(column).is_null()
    return harmonized, failing


def _label_detail(column: str) -> str:
    # Never the value itself: a free-text label may be a name or an address (the line is at
    # source_file:line_no, and `labelloop quarantine --reason unknown_label` counts them).
    return f"{column}: not a term of the ontology (nor a rename of one); the value is not repeated here"


LEDGER_COLUMNS = {
    "path": pl.String, "source": pl.String, "version": pl.Int32, "size_bytes": pl.Int64,
    "blank_lines": pl.Int64, "sha256": pl.String, "ctime_ns": pl.Int64, "line_count": pl.Int64,
    "first_line": pl.Int64,
}


def _finish(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    table: str,
    batch: _Batch,
    accepted: pl.DataFrame,
    quarantined: list[pl.DataFrame],
    blank_total: int,
    run_id: str,
    extra: list[tuple[str, pl.DataFrame]] | None = None,
    audit_rows: pl.DataFrame | None = None,
) -> IngestReport:
    """Commit records, quarantine rows, ledger entries (and `extra` and `audit_rows` rows) in one transaction."""
    quarantine = pl.concat(
        [pl.DataFrame(schema=c.QUARANTINE_COLUMNS), *quarantined], how="vertical"
    )
    if not batch.files:
        return IngestReport(kind=kind)
    sources = [quarantine.select(source="source_file", accepted=pl.lit(0), quarantined=pl.lit(1))]
    if accepted.height:
        sources.append(
            accepted.select(source="source_file", accepted=pl.lit(1), quarantined=pl.lit(0))
        )
    counts = (
        pl.concat(sources)
        .group_by("source")
        .agg(pl.col("accepted").sum(), pl.col("quarantined").sum())
    )
    ledger = (
        pl.DataFrame(batch.files, schema=LEDGER_COLUMNS)
        .join(counts, on="source", how="left")
        .drop("source")
        .with_columns(
            pl.col("accepted").fill_null(0).cast(pl.Int64),
            pl.col("quarantined").fill_null(0).cast(pl.Int64),
            kind=pl.lit(kind),
            run_id=pl.lit(run_id),
        )
        .with_columns(records_in=pl.col("accepted") + pl.col("quarantined"))
    )
    with store.transaction(con):
        if accepted.height:
            store.append(con, table, accepted.with_columns(run_id=pl.lit(run_id)))
        store.append(con, "quarantine", quarantine.with_columns(run_id=pl.lit(run_id)))
        store.append(con, "ingested_files", ledger)
        for table, rows in extra or []:
            store.append(con, table, rows)
        if audit_rows is not None:
            record_audit_rows(con, audit_rows)
    return IngestReport(
        kind=kind,
        files=[source_name(p, v) for p, v in ledger.select("path", "version").iter_rows()],
        records_in=int(ledger["records_in"].sum()),
        accepted=accepted.height,
        quarantined=quarantine.height,
        blank_lines=blank_total,
        reasons=dict(quarantine.group_by("reason").len().sort("reason").iter_rows()),
    )


# Files are ingested in groups of about this many bytes, each group in its own transaction (its
# records, quarantine rows and ledger entries together): what a run holds in memory follows the
# group, not everything that landed since the last run.
GROUP_BYTES = 64 * 1024 * 1024
GROUP_FILES = 1000  # and at most this many files: each costs its own frames and ledger row


def file_groups(files: list[PendingFile]) -> list[list[PendingFile]]:
    """Consecutive files up to GROUP_BYTES on disk and GROUP_FILES files (a bigger file makes a
    group of its own)."""
    groups: list[list[PendingFile]] = []
    size = 0
    for pending in files:
        grown = _size(pending.path) or 0
        if not groups or (size + grown > GROUP_BYTES and groups[-1]) or len(groups[-1]) >= GROUP_FILES:
            groups.append([])
            size = 0
        groups[-1].append(pending)
        size += grown
    return groups


def in_groups(
    con: duckdb.DuckDBPyConnection, home: Home, kind: str,
    ingest_group: Callable[[list[PendingFile]], IngestReport],
) -> IngestReport:
    """Ingest a kind's pending files group by group; one report for them all."""
    reports = [ingest_group(group) for group in file_groups(pending_files(home, con, kind))]
    return merge_reports(kind, reports)


def merge_reports(kind: str, reports: list[IngestReport]) -> IngestReport:
    merged = IngestReport(kind=kind)
    for report in reports:
        merged.files += report.files
        merged.records_in += report.records_in
        merged.accepted += report.accepted
        merged.quarantined += report.quarantined
        merged.blank_lines += report.blank_lines
        for reason, n in report.reasons.items():
            merged.reasons[reason] = merged.reasons.get(reason, 0) + n
    merged.reasons = dict(sorted(merged.reasons.items()))
    return merged


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="vertical") if frames else pl.DataFrame()


def ingest_items(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, run_id: str
) -> IngestReport:
    """New item files into `items`; the first batch fixes what items carry (text, features or both)
    and the feature length.

    Gold items are declared by the deployment in gold.jsonl (read first, `gold.declare`): a
    landing line that carries a gold label, or reuses a gold item's id, is quarantined.
    """
    gold.declare(con, home, ontology, run_id)
    return in_groups(con, home, c.ITEM_SPEC.kind, lambda files: _ingest_items(con, home, ontology, run_id, files))


def _ingest_items(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, run_id: str, files: list[PendingFile]
) -> IngestReport:
    spec = c.ITEM_SPEC
    batch, blank = _read_batch(files, spec, con, b"")
    records = _concat(batch.accepted)
    quarantined = list(batch.quarantined)
    if records.height:
        content, feature_length = item_content.expected(con, records)
        initial, initial_bad = _label_rule(ontology, "initial_label", required=False)
        declared = gold.declared_gold_ids(con, records.select("item_id"))
        records = records.join(declared, on="item_id", how="left")
        rules = [
            # Whoever can land a file must not be able to move the yardstick models are judged by.
            (pl.col("gold_label").is_not_null(), c.GOLD_NOT_DECLARED,
             "gold_label: gold items are declared in gold.jsonl by the deployment, not by landing files"),
            (pl.col("is_gold").fill_null(False), c.GOLD_ITEM,
             "item_id is a gold item declared in gold.jsonl; gold items are frozen for evaluation"),
            (initial_bad, c.UNKNOWN_LABEL, _label_detail("initial_label")),
            *item_content.rules(content, feature_length),
        ]
        records, rejected = split_by_rules(records, spec.kind, spec.key, rules)
        records, replayed = _split_duplicates(records, con, "items", spec.kind, spec.key)
        quarantined.extend([rejected, replayed])
        records = records.with_columns(initial_label=initial).select(
            "item_id", "text", "features", "uri", "initial_label", "label_source",
            "payload_hash", "source_file", "line_no",
        )
        if records.height:
            item_content.fix(con, content, feature_length)
    return _finish(con, spec.kind, "items", batch, records, quarantined, blank, run_id)


def declared_model_versions(home: Home) -> set[str]:
    """Model versions served outside labelloop (a baseline, a team's own trainer) that the
    deployment declares in training.yaml `external_model_versions`."""
    raw = load_yaml_mapping(home.training_file, "training").get("external_model_versions") or []
    if not isinstance(raw, list) or not all(isinstance(v, str) and v.strip() for v in raw):
        raise LabelloopConfigError(
            f"training file {home.training_file}: external_model_versions must be a list of version names"
        )
    return {v.strip() for v in raw}


def _model_version_rule(con: duckdb.DuckDBPyConnection, home: Home) -> tuple[pl.Expr, str, str]:
    """A model_version must name a model labelloop registered or one the deployment declared:
    a producer cannot put a made-up model into lineage."""
    known = declared_model_versions(home) | set(
        store.frame(con, "SELECT model_version FROM models")["model_version"].to_list()
    )
    return (
        pl.col("model_version").is_not_null() & ~pl.col("model_version").is_in(sorted(known)),
        c.UNKNOWN_MODEL_VERSION,
        "model_version: not a model labelloop trained nor one declared in training.yaml external_model_versions",
    )


def ingest_predictions(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, run_id: str
) -> IngestReport:
    """New prediction-log files into `predictions`."""
    return in_groups(
        con, home, c.PREDICTION_SPEC.kind, lambda files: _ingest_predictions(con, home, ontology, run_id, files)
    )


def _ingest_predictions(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, run_id: str, files: list[PendingFile]
) -> IngestReport:
    spec = c.PREDICTION_SPEC
    batch, blank = _read_batch(files, spec, con, b"")
    records = _concat(batch.accepted)
    quarantined = list(batch.quarantined)
    if records.height:
        predicted, predicted_bad = _label_rule(ontology, "predicted_label", required=True)
        known = store.lookup(con, "items", "item_id", records, "true AS known_item")
        records = records.join(known, on="item_id", how="left")
        rules = [
            (predicted_bad, c.UNKNOWN_LABEL, _label_detail("predicted_label")),
            (pl.col("known_item").is_null(), c.UNKNOWN_ITEM, "item_id is not a known item"),
            _model_version_rule(con, home),
        ]
        records, rejected = split_by_rules(records, spec.kind, spec.key, rules)
        records, replayed = _split_duplicates(records, con, "predictions", spec.kind, spec.key)
        quarantined.extend([rejected, replayed])
        records = records.with_columns(predicted_label=predicted).select(
            "prediction_id", "item_id", "model_version", "predicted_label", "confidence",
            "probabilities", "served_at", "payload_hash", "source_file", "line_no",
        )
    return _finish(con, spec.kind, "predictions", batch, records, quarantined, blank, run_id)


# Policy files that decide what a correction counts as at ingest.
CORRECTION_POLICIES = ("contributors.yaml", "reviewers.yaml", "ontology.yaml", "training.yaml")


def ingest_corrections(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, key: bytes, run_id: str
) -> IngestReport:
    """New correction files into `raw_corrections`: pseudonymized, scrubbed, deduplicated.

    A line's role is a claim: it counts up to what the contributor directory grants its user
    (or its producer may assert), and every downgrade is audited. Event ids are scoped by
    producer folder, so one producer cannot take another's ids.
    """
    check_pseudonymization_key(con, key)
    directory = Directory.load(home.contributors_file, home.reviewers_file)
    return in_groups(
        con, home, c.CORRECTION_SPEC.kind,
        lambda files: _ingest_corrections(con, home, ontology, key, run_id, directory, files),
    )


def _ingest_corrections(
    con: duckdb.DuckDBPyConnection, home: Home, ontology: Ontology, key: bytes, run_id: str,
    directory: Directory, files: list[PendingFile],
) -> IngestReport:
    spec = c.CORRECTION_SPEC
    batch, blank = _read_batch(files, spec, con, key)
    records = _concat(batch.accepted)
    quarantined = list(batch.quarantined)
    audit = None
    if records.height:
        corrected, corrected_bad = _label_rule(ontology, "corrected_label", required=True)
        original, original_bad = _label_rule(ontology, "original_label", required=False)
        known = store.lookup(
            con, "items", "item_id", records, "t.gold_label IS NOT NULL AS is_gold"
        )
        records = records.join(known, on="item_id", how="left").with_columns(
            producer=producer_expr(pl.col("source_file"))
        )
        records = _with_task_items(con, records)
        rules = [
            (pl.col("event_id").str.contains("/", literal=True), c.INVALID_VALUE,
             "event_id: '/' is reserved (stored ids are scoped as producer/event_id)"),
            (corrected_bad, c.UNKNOWN_LABEL, _label_detail("corrected_label")),
            (original_bad, c.UNKNOWN_LABEL, _label_detail("original_label")),
            (pl.col("is_gold").is_null(), c.UNKNOWN_ITEM, "item_id is not a known item"),
            (pl.col("is_gold"), c.GOLD_ITEM, "gold items are frozen for evaluation"),
            (~pl.col("consent"), c.NO_CONSENT, "consent is false: never used for training"),
            _model_version_rule(con, home),
            # An answer names a task the loop issued for this very item, so task -> answer ->
            # label change holds in lineage and in the efficacy figures.
            (pl.col("task_id").is_not_null() & pl.col("task_item").is_null(), c.UNKNOWN_TASK,
             "task_id: no review task with this id was issued"),
            (pl.col("task_id").is_not_null() & (pl.col("task_item") != pl.col("item_id")), c.UNKNOWN_TASK,
             "task_id: the review task was issued for another item"),
        ]
        records, rejected = split_by_rules(records, spec.kind, spec.key, rules)
        records = records.with_columns(event_id=_scoped_event_id())
        records, replayed = _split_duplicates(records, con, "raw_corrections", spec.kind, spec.key)
        quarantined.extend([rejected, replayed])
        records = _counted_roles(records, directory, key)
        audit = _role_downgrades(records, run_id)
        records = records.with_columns(
            corrected_label=corrected, original_label=original,
            arrived_at=pl.lit(datetime.now(UTC), pl.Datetime("us", "UTC")),
        ).select(
            "event_id", "item_id", "corrected_label", "original_label",
            pl.col("user_id").alias("user_pseudonym"), "user_role", "source", "consent",
            "created_at", "model_version", "prediction_id", "rationale", "user_confidence",
            "context", "payload_hash", "source_file", "line_no", "producer", "claimed_role", "arrived_at",
            "task_id",
        )
    extra = [("policy_uses", store.policy_rows(run_id, "raw_corrections", CORRECTION_POLICIES))]
    return _finish(con, spec.kind, "raw_corrections", batch, records, quarantined, blank, run_id, extra=extra,
                   audit_rows=audit)


def _with_task_items(con: duckdb.DuckDBPyConnection, records: pl.DataFrame) -> pl.DataFrame:
    """`task_item`: the item of the review task each line answers (null: no task, or none issued)."""
    if "task_id" not in records.columns:
        records = records.with_columns(task_id=pl.lit(None, pl.String))
    asked = records.filter(pl.col("task_id").is_not_null())
    issued = (
        store.lookup(con, "review_tasks", "task_id", asked, "t.item_id AS task_item") if asked.height
        else pl.DataFrame(schema={"task_id": pl.String, "task_item": pl.String})
    )
    return records.join(issued, on="task_id", how="left")


def _scoped_event_id() -> pl.Expr:
    """A producer's own ids: `producer/event_id` for files in a producer's folder; files landed
    directly in landing/corrections/ keep their ids (they may not contain '/')."""
    return (
        pl.when(pl.col("producer") == ROOT_PRODUCER)
        .then(pl.col("event_id"))
        .otherwise(pl.format("{}/{}", "producer", "event_id"))
    )


def _counted_roles(records: pl.DataFrame, directory: Directory, key: bytes) -> pl.DataFrame:
    """claimed_role as landed; user_role capped by the directory's grant and the producer's trust."""
    grants = directory.grants(key).rename({"user_pseudonym": "user_id"})
    joined = (
        records.join(grants, on="user_id", how="left")
        .join(directory.producer_claims(), on="producer", how="left")
        .with_columns(
            # A listed user's authority is their grant, which counts only in lines from the
            # producers its `via` allows (elsewhere they are an end user); what a producer may
            # assert is for users the directory does not list.
            granted_role=pl.when(
                pl.col("granted_via").is_null() | pl.col("granted_via").list.contains(pl.col("producer"))
            ).then("granted_role").otherwise(pl.lit(END_USER)),
            may_claim=pl.when(pl.col("granted_role").is_null()).then("may_claim"),
        )
    )
    return joined.with_columns(
        claimed_role=pl.col("user_role"),
        user_role=effective_role(pl.col("user_role"), pl.col("granted_role"), pl.col("may_claim")),
    ).drop("granted_role", "granted_via", "may_claim")


def _role_downgrades(records: pl.DataFrame, run_id: str) -> pl.DataFrame:
    """One audit row per file, user and claim that counted at less than it claimed."""
    return (
        records.filter(pl.col("user_role") != pl.col("claimed_role"))
        .group_by("source_file", "user_id", "claimed_role", "user_role")
        .agg(n=pl.len(), first_event=pl.col("event_id").min())
        .sort("source_file", "user_id", "claimed_role")
        .select(
            pl.col("user_id").alias("actor"),
            pl.col("user_role").alias("actor_role"),
            pl.lit("correction.role_claim").alias("action"),
            pl.col("source_file").alias("target"),
            pl.lit("downgraded").alias("outcome"),
            pl.lit(c.ROLE_NOT_GRANTED).alias("reason"),
            pl.format(
                "{} correction(s) (first {}) claimed {}; counted as {}: the directory grants no more",
                "n", "first_event", "claimed_role", "user_role",
            ).alias("detail"),
            pl.lit(run_id).alias("run_id"),
        )
    )
