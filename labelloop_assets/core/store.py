"""The schema labelloop writes, the two stores that hold it, and small helpers to read and write it.

One SQL schema serves both backends: the embedded DuckDB file (the default) and the lake
(DuckLake on PostgreSQL, `core/lake.py`). It uses nothing DuckLake lacks: no PRIMARY KEY or
UNIQUE, no sequences, no ON CONFLICT. Keys stay unique because every write checks them (anti-joins
against stored keys, MERGE by key) under one writer at a time, and `duplicate_keys` verifies it.

Large, growing tables (raw corrections, label history, quarantine) are append-only; derived
tables that hold one row per item (`production_corpus`) are merged in place by key.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from labelloop_assets.core import lake
from labelloop_assets.core.lake import Lake
from labelloop_assets.core.settings import POLICY_READS, env_number

SCHEMA_VERSION = 8

DDL = """
CREATE TABLE IF NOT EXISTS schema_info (key VARCHAR NOT NULL, value VARCHAR);
CREATE TABLE IF NOT EXISTS pipeline_state (name VARCHAR NOT NULL, value BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS ingested_files (
    path VARCHAR NOT NULL, kind VARCHAR NOT NULL, size_bytes BIGINT,
    records_in BIGINT NOT NULL, accepted BIGINT NOT NULL, quarantined BIGINT NOT NULL,
    blank_lines BIGINT NOT NULL, ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR,
    version INTEGER DEFAULT 1, sha256 VARCHAR, ctime_ns BIGINT, line_count BIGINT, first_line BIGINT
);

CREATE TABLE IF NOT EXISTS quarantine (
    kind VARCHAR NOT NULL, source_file VARCHAR NOT NULL, line_no BIGINT,
    reason VARCHAR NOT NULL, detail VARCHAR, record_id VARCHAR, item_id VARCHAR,
    line_sha256 VARCHAR, quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);
CREATE OR REPLACE VIEW quarantined_corrections AS
    SELECT * EXCLUDE (kind) FROM quarantine WHERE kind = 'corrections';

CREATE TABLE IF NOT EXISTS items (
    seq BIGINT NOT NULL, item_id VARCHAR NOT NULL, features DOUBLE[],
    -- v6: items may carry text instead of (or beside) features, and the address of their payload.
    text VARCHAR, uri VARCHAR, initial_label VARCHAR, label_source VARCHAR, gold_label VARCHAR,
    payload_hash VARCHAR NOT NULL, source_file VARCHAR, line_no BIGINT,
    ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS predictions (
    prediction_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, model_version VARCHAR NOT NULL,
    predicted_label VARCHAR NOT NULL, confidence DOUBLE NOT NULL, probabilities VARCHAR,
    served_at TIMESTAMPTZ NOT NULL, payload_hash VARCHAR NOT NULL, source_file VARCHAR,
    line_no BIGINT, ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS raw_corrections (
    seq BIGINT NOT NULL, event_id VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL, corrected_label VARCHAR NOT NULL, original_label VARCHAR, user_pseudonym VARCHAR NOT NULL,
    user_role VARCHAR NOT NULL, source VARCHAR NOT NULL, consent BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL, model_version VARCHAR, prediction_id VARCHAR,
    rationale VARCHAR, user_confidence DOUBLE, context VARCHAR, payload_hash VARCHAR NOT NULL,
    source_file VARCHAR, line_no BIGINT, ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR,
    -- v4: the landing folder the line came from, the role the line claimed (user_role is what
    -- the directory lets it count as), and when it arrived on the store's clock.
    producer VARCHAR, claimed_role VARCHAR, arrived_at TIMESTAMPTZ,
    -- v7: the review task this correction answers (core/tasks.py).
    task_id VARCHAR
);

CREATE TABLE IF NOT EXISTS validated_labels (
    seq BIGINT NOT NULL, event_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL,
    corrected_label VARCHAR NOT NULL, original_label VARCHAR, label_before VARCHAR,
    predicted_label VARCHAR, prediction_confidence DOUBLE, model_version VARCHAR,
    prediction_id VARCHAR, prediction_found BOOLEAN NOT NULL, user_pseudonym VARCHAR NOT NULL,
    user_role VARCHAR NOT NULL, source VARCHAR NOT NULL, vote_weight DOUBLE NOT NULL,
    created_at TIMESTAMPTZ NOT NULL, rationale VARCHAR, staged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR,
    -- v4: arrival on the store's clock, and the day a vote counts on for burst scoring.
    arrived_at TIMESTAMPTZ, burst_day DATE
);

CREATE TABLE IF NOT EXISTS label_decisions (
    decision_id BIGINT NOT NULL, item_id VARCHAR NOT NULL, current_label VARCHAR,
    proposed_label VARCHAR NOT NULL, support DOUBLE NOT NULL, total_weight DOUBLE NOT NULL,
    share DOUBLE NOT NULL, n_contributors INTEGER NOT NULL, n_supporters INTEGER,
    by_authority BOOLEAN, status VARCHAR NOT NULL, escalation_reason VARCHAR,
    event_time TIMESTAMPTZ,
    event_ids VARCHAR[] NOT NULL, rationale VARCHAR, decided_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR
);

-- Each item's latest resolution (what pending, escalated and open mean everywhere).
CREATE OR REPLACE VIEW latest_label_decisions AS
    SELECT * FROM label_decisions
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY decision_id DESC) = 1;

CREATE TABLE IF NOT EXISTS review_decisions (
    seq BIGINT NOT NULL, decision_id VARCHAR NOT NULL,
    escalation_id VARCHAR NOT NULL, item_id VARCHAR, decision VARCHAR NOT NULL,
    label VARCHAR, reviewer_pseudonym VARCHAR NOT NULL, reviewer_role VARCHAR NOT NULL,
    rationale VARCHAR NOT NULL, decided_at TIMESTAMPTZ NOT NULL, payload_hash VARCHAR NOT NULL,
    source_file VARCHAR, line_no BIGINT, ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR,
    -- v4: the Ed25519 key that signed the decision and the signature ingest verified.
    key_id VARCHAR, signature VARCHAR
);

-- The shape each item's content has (core/near_duplicates.py), worked out once per item.
CREATE TABLE IF NOT EXISTS item_shapes (seq BIGINT NOT NULL, item_id VARCHAR NOT NULL, shape VARCHAR NOT NULL);

CREATE TABLE IF NOT EXISTS escalations (
    escalation_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, reason VARCHAR NOT NULL,
    current_label VARCHAR, proposed_label VARCHAR, support DOUBLE, share DOUBLE,
    n_contributors INTEGER, event_ids VARCHAR[], rationale VARCHAR, model_confidence DOUBLE,
    opened_at TIMESTAMPTZ NOT NULL, sla_deadline TIMESTAMPTZ NOT NULL, age_hours DOUBLE,
    sla_breached BOOLEAN NOT NULL, deferrals INTEGER NOT NULL, refreshed_at TIMESTAMPTZ NOT NULL
);

-- Corrections per day and scope (contributor pseudonym, or segment `source/label`): the
-- baseline that correction bursts are scored against, grown by each batch's counts.
CREATE TABLE IF NOT EXISTS correction_volume (
    day DATE NOT NULL, scope VARCHAR NOT NULL, key VARCHAR NOT NULL, n BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS correction_bursts (
    burst_id VARCHAR NOT NULL, day DATE NOT NULL, scope VARCHAR NOT NULL, key VARCHAR NOT NULL,
    n_events BIGINT NOT NULL, day_total BIGINT NOT NULL, baseline_days BIGINT NOT NULL,
    baseline_median_share DOUBLE, baseline_mad_share DOUBLE, expected DOUBLE, score DOUBLE,
    severity VARCHAR NOT NULL, status VARCHAR NOT NULL, reason VARCHAR NOT NULL, evidence VARCHAR,
    detected_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status_changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    acknowledged_by VARCHAR, acknowledged_role VARCHAR, acknowledged_at TIMESTAMPTZ,
    acknowledgement VARCHAR, n_events_acknowledged BIGINT, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS audit_log (
    logged_at TIMESTAMPTZ NOT NULL DEFAULT now(), actor VARCHAR NOT NULL, actor_role VARCHAR,
    action VARCHAR NOT NULL, target VARCHAR, outcome VARCHAR NOT NULL, reason VARCHAR,
    detail VARCHAR, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS contributor_reliability (
    user_pseudonym VARCHAR NOT NULL, n_votes BIGINT NOT NULL, n_anchored BIGINT NOT NULL,
    n_anchor_agreements BIGINT NOT NULL, accuracy DOUBLE NOT NULL, estimated_at TIMESTAMPTZ NOT NULL,
    corpus_version INTEGER
);

CREATE TABLE IF NOT EXISTS corpus_versions (
    corpus_version INTEGER NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    n_new_items BIGINT NOT NULL, n_label_changes BIGINT NOT NULL, n_confirmations BIGINT NOT NULL,
    n_items BIGINT NOT NULL, label_changes_total BIGINT NOT NULL, run_id VARCHAR,
    -- On the lake: the DuckLake snapshot that committed this version (time travel reads it).
    lake_snapshot BIGINT
);

CREATE TABLE IF NOT EXISTS label_history (
    item_id VARCHAR NOT NULL, corpus_version INTEGER NOT NULL, change_order INTEGER NOT NULL,
    label VARCHAR NOT NULL, previous_label VARCHAR, change_kind VARCHAR NOT NULL, label_source VARCHAR,
    decision_id BIGINT, event_ids VARCHAR[], rationale VARCHAR, support DOUBLE, share DOUBLE,
    n_contributors INTEGER, by_authority BOOLEAN, review_decision_id VARCHAR,
    approved_by VARCHAR NOT NULL, changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS production_corpus (
    item_id VARCHAR NOT NULL, label VARCHAR NOT NULL, label_source VARCHAR NOT NULL,
    human_confirmed BOOLEAN NOT NULL, reviewer_confirmed BOOLEAN NOT NULL DEFAULT false,
    since_version INTEGER NOT NULL,
    updated_version INTEGER NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS models (
    model_version VARCHAR NOT NULL, corpus_version INTEGER NOT NULL,
    trained_at TIMESTAMPTZ NOT NULL DEFAULT now(), n_train_rows BIGINT NOT NULL, n_classes INTEGER NOT NULL,
    algorithm VARCHAR NOT NULL, params VARCHAR NOT NULL, train_data_hash VARCHAR NOT NULL,
    gold_accuracy DOUBLE, gold_macro_f1 DOUBLE, n_gold BIGINT NOT NULL,
    label_changes_total BIGINT NOT NULL, path VARCHAR NOT NULL, run_id VARCHAR,
    -- challenger (trained, not evaluated yet), champion (serving), rejected, retired
    status VARCHAR NOT NULL DEFAULT 'challenger', confirm_below DOUBLE,
    -- v6: the SHA-256 of the model's file (model.skops, or an external model's probabilities),
    -- so that a folder rewritten together with its metadata.json is still refused.
    file_sha256 VARCHAR
);

CREATE TABLE IF NOT EXISTS release_notes (
    evaluation_id BIGINT NOT NULL, challenger VARCHAR NOT NULL, champion VARCHAR,
    decision VARCHAR NOT NULL, n_label_changes BIGINT NOT NULL, attribution VARCHAR,
    markdown VARCHAR NOT NULL, path VARCHAR NOT NULL, written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS model_evaluations (
    evaluation_id BIGINT NOT NULL,
    evaluated_at TIMESTAMPTZ NOT NULL DEFAULT now(), challenger VARCHAR NOT NULL, champion VARCHAR,
    decision VARCHAR NOT NULL, reasons VARCHAR[] NOT NULL, plan VARCHAR NOT NULL,
    challenger_scores VARCHAR NOT NULL, champion_scores VARCHAR, slice_scores VARCHAR,
    confirm_below DOUBLE, n_eval BIGINT NOT NULL, run_id VARCHAR,
    -- v4: the evaluation-set version both models were scored on.
    evaluation_set INTEGER
);

-- v4: the deployment's gold file, versioned: a new version whenever its content changes.
CREATE TABLE IF NOT EXISTS evaluation_sets (
    evaluation_set INTEGER NOT NULL, sha256 VARCHAR NOT NULL, n_items BIGINT NOT NULL,
    n_added BIGINT NOT NULL, declared_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);

-- v4: corpus items whose features copy a gold item's (exactly or nearly): kept out of training.
CREATE TABLE IF NOT EXISTS gold_copies (
    item_id VARCHAR NOT NULL, gold_item_id VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    distance DOUBLE NOT NULL, detected_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);

-- v4: the SHA-256 of each policy file a deciding step read (resolution, evaluation, promotion,
-- review ingest), by run: every decision names the exact policy that drove it.
CREATE TABLE IF NOT EXISTS policy_uses (
    run_id VARCHAR NOT NULL, step VARCHAR NOT NULL, file VARCHAR NOT NULL, sha256 VARCHAR NOT NULL,
    used_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS label_quality_metrics (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER, model_version VARCHAR,
    n_items BIGINT NOT NULL, n_gold_items BIGINT NOT NULL, n_human_confirmed BIGINT NOT NULL,
    coverage DOUBLE, n_predictions BIGINT NOT NULL, n_corrected_predictions BIGINT NOT NULL,
    correction_rate DOUBLE, n_corrections BIGINT NOT NULL, n_quarantined BIGINT NOT NULL,
    n_pending_items BIGINT NOT NULL, n_escalated_items BIGINT NOT NULL,
    model_gold_accuracy DOUBLE, n_open_escalations BIGINT, n_sla_breaches BIGINT, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_quality_by_label (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER, label VARCHAR NOT NULL,
    n_items BIGINT NOT NULL, n_human_confirmed BIGINT NOT NULL, coverage DOUBLE,
    n_corrections_to BIGINT NOT NULL, n_predicted BIGINT NOT NULL,
    n_predicted_corrected BIGINT NOT NULL, correction_rate DOUBLE, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_quality_by_segment (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER,
    segment_kind VARCHAR NOT NULL, segment VARCHAR NOT NULL, n_items BIGINT NOT NULL,
    n_human_confirmed BIGINT NOT NULL, coverage DOUBLE, n_corrections BIGINT NOT NULL,
    n_changing BIGINT NOT NULL, change_rate DOUBLE, n_predictions BIGINT,
    n_corrected_predictions BIGINT, correction_rate DOUBLE, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_agreement (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER,
    krippendorff_alpha DOUBLE, fleiss_kappa DOUBLE, n_items_multi BIGINT NOT NULL,
    n_ratings BIGINT NOT NULL, n_raters BIGINT NOT NULL, n_difficult BIGINT NOT NULL,
    difficult_prevalence DOUBLE, note VARCHAR, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_agreement_pairs (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER, rater_a VARCHAR NOT NULL,
    rater_b VARCHAR NOT NULL, n_shared BIGINT NOT NULL, kappa DOUBLE, note VARCHAR, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_drift (
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), corpus_version INTEGER, signal VARCHAR NOT NULL,
    baseline_from TIMESTAMPTZ, current_from TIMESTAMPTZ, current_to TIMESTAMPTZ,
    n_baseline BIGINT NOT NULL, n_current BIGINT NOT NULL, js_distance DOUBLE, psi DOUBLE,
    p_value DOUBLE, max_psi DOUBLE, mean_psi DOUBLE, n_drifted BIGINT, detail VARCHAR, note VARCHAR, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS label_issue_candidates (
    rank BIGINT NOT NULL, item_id VARCHAR NOT NULL, label VARCHAR NOT NULL,
    suggested_label VARCHAR, score DOUBLE NOT NULL, self_confidence DOUBLE, margin DOUBLE,
    cl_issue BOOLEAN, votes_against DOUBLE, votes_for DOUBLE, reviewer_confirmed BOOLEAN,
    reasons VARCHAR[], corpus_version INTEGER, computed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id VARCHAR
);

-- Review tasks the loop issued (core/tasks.py), append-only: a task's answers are the accepted
-- corrections that carry its task_id, and whether it is open, answered or expired follows from them.
CREATE TABLE IF NOT EXISTS review_tasks (
    task_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, role VARCHAR NOT NULL, policy VARCHAR NOT NULL,
    rank BIGINT NOT NULL, score DOUBLE NOT NULL, reasons VARCHAR[], why VARCHAR,
    current_label VARCHAR, suggested_label VARCHAR, model_version VARCHAR, predicted_label VARCHAR,
    predicted_probability DOUBLE, label_issue DOUBLE, uncertainty DOUBLE, disagreement DOUBLE,
    shortfall DOUBLE, drift DOUBLE, overdue DOUBLE, answers_wanted INTEGER NOT NULL,
    attempt INTEGER NOT NULL, reissue_of VARCHAR, issued_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL, outbox_file VARCHAR, run_id VARCHAR
);

CREATE TABLE IF NOT EXISTS guideline_pairs (
    corpus_version INTEGER NOT NULL, label_from VARCHAR NOT NULL, label_to VARCHAR NOT NULL,
    n_corrections BIGINT NOT NULL, n_disputed BIGINT NOT NULL, n_items BIGINT NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(), run_id VARCHAR
);

-- What a model trained on corpus version v saw: SELECT * FROM corpus_as_of(v).
CREATE OR REPLACE MACRO corpus_as_of(v) AS TABLE
    SELECT item_id, label, corpus_version AS labelled_in_version
    FROM label_history WHERE corpus_version <= v
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY corpus_version DESC, change_order DESC) = 1;

-- Every label an item had, the corpus versions it was valid in ([from, to), to NULL = current)
-- and the models trained on a version that contained it.
CREATE OR REPLACE VIEW label_versions AS
    WITH ordered AS (
        SELECT h.*, h.corpus_version AS valid_from_version,
               lead(h.corpus_version) OVER (
                   PARTITION BY h.item_id ORDER BY h.corpus_version, h.change_order
               ) AS next_version
        FROM label_history h
    )
    SELECT o.* EXCLUDE (next_version),
           CASE WHEN o.next_version = o.corpus_version THEN o.corpus_version
                ELSE o.next_version END AS valid_to_version,
           (SELECT list(m.model_version ORDER BY m.model_version) FROM models m
             WHERE m.corpus_version >= o.corpus_version
               AND (o.next_version IS NULL OR m.corpus_version < o.next_version)) AS models_trained
    FROM ordered o;

-- Analysts' lineage: every current label back to the corrections, people (pseudonymized),
-- model versions and corpus versions behind it, and the models trained on that corpus.
CREATE OR REPLACE VIEW label_lineage AS
    WITH current_change AS (
        SELECT h.* FROM label_history h
        JOIN production_corpus c
          ON c.item_id = h.item_id AND c.updated_version = h.corpus_version
        QUALIFY row_number() OVER (PARTITION BY h.item_id ORDER BY h.change_order DESC) = 1
    )
    SELECT c.item_id, c.label, c.label_source, c.human_confirmed,
           c.since_version AS label_since_version, h.change_kind, h.previous_label,
           h.approved_by, h.support, h.share, h.rationale AS decision_rationale,
           e.event_id, v.user_pseudonym, v.user_role, v.source, v.corrected_label,
           v.model_version AS corrected_model_version, v.predicted_label, v.rationale,
           v.created_at AS corrected_at,
           (SELECT list(m.model_version ORDER BY m.model_version) FROM models m
             WHERE m.corpus_version >= c.since_version) AS models_trained_with_label
    FROM production_corpus c
    JOIN current_change h USING (item_id)
    LEFT JOIN LATERAL (SELECT unnest(h.event_ids) AS event_id) e ON TRUE
    LEFT JOIN validated_labels v ON v.event_id = e.event_id;
"""


def schema_version(con: Any) -> int | None:
    """The stored schema version; None for a store without labelloop's schema."""
    try:
        found = con.execute("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:
        return None
    return int(found[0][0]) if found else None


def ensure_schema(con: Any) -> None:
    """Create every table and view that is missing; a newer store is refused, not downgraded.

    A store already at SCHEMA_VERSION is left as it is: on the lake every DDL statement is a
    catalog commit, and concurrent ones conflict.
    """
    found = schema_version(con)
    if found == SCHEMA_VERSION:
        return
    if found is not None and found > SCHEMA_VERSION:
        raise RuntimeError(
            f"the store has schema version {found}, newer than this labelloop "
            f"({SCHEMA_VERSION}); upgrade labelloop before running it on this store"
        )
    with transaction(con):
        if found is not None:
            _migrate(con, found)
        con.execute(DDL)
        if found is None:
            con.execute("INSERT INTO schema_info VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        else:
            con.execute(
                "UPDATE schema_info SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)]
            )


def _migrate(con: Any, found: int) -> None:
    """Bring an older store up to SCHEMA_VERSION in place (inside ensure_schema's transaction)."""
    if found < 2:
        # Version 2: burst acknowledgements are review decisions without an item; models have
        # a status, and the newest model of a version-1 file is its champion.
        con.execute("ALTER TABLE review_decisions ALTER COLUMN item_id DROP NOT NULL")
        con.execute("ALTER TABLE models ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'retired'")
        con.execute("ALTER TABLE models ADD COLUMN IF NOT EXISTS confirm_below DOUBLE")
        con.execute("UPDATE models SET status = 'retired'")
        con.execute(
            "UPDATE models SET status = 'champion' WHERE model_version = "
            "(SELECT model_version FROM models ORDER BY trained_at DESC LIMIT 1)"
        )
    if found < 3:
        # Version 3: corpus versions name the lake snapshot that committed them. Older files keep
        # their PRIMARY KEYs and sequences; nothing relies on them any more.
        con.execute("ALTER TABLE corpus_versions ADD COLUMN IF NOT EXISTS lake_snapshot BIGINT")
    if found < 4:
        # Version 4 (trust): producer, claimed role and arrival of each correction; signatures
        # of review decisions; the evaluation set a model comparison used.
        for table, column, kind in (
            ("raw_corrections", "producer", "VARCHAR"), ("raw_corrections", "claimed_role", "VARCHAR"),
            ("raw_corrections", "arrived_at", "TIMESTAMPTZ"), ("validated_labels", "arrived_at", "TIMESTAMPTZ"),
            ("validated_labels", "burst_day", "DATE"), ("review_decisions", "key_id", "VARCHAR"),
            ("review_decisions", "signature", "VARCHAR"), ("model_evaluations", "evaluation_set", "INTEGER"),
        ):
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
    if found < 5:
        # Version 5: each version of a landing file is ledgered (a rewritten or appended file is
        # read again), with what identifies the content read and where its new lines started.
        for column, kind in (
            ("version", "INTEGER DEFAULT 1"), ("sha256", "VARCHAR"), ("ctime_ns", "BIGINT"),
            ("line_count", "BIGINT"), ("first_line", "BIGINT"),
        ):
            con.execute(f"ALTER TABLE ingested_files ADD COLUMN IF NOT EXISTS {column} {kind}")
    if found < 6:
        # Version 6: items carry text, features or both, and an optional uri.
        con.execute("ALTER TABLE items ALTER COLUMN features DROP NOT NULL")
        con.execute("ALTER TABLE models ADD COLUMN IF NOT EXISTS file_sha256 VARCHAR")
        for column in ("text", "uri"):
            con.execute(f"ALTER TABLE items ADD COLUMN IF NOT EXISTS {column} VARCHAR")
    if found < 7:
        # Version 7: corrections may answer a review task (the review_tasks table is new).
        con.execute("ALTER TABLE raw_corrections ADD COLUMN IF NOT EXISTS task_id VARCHAR")
    # Version 8: item_shapes is new (created by the DDL; filled by the next production_corpus run).


# DuckDB lets one process at a time hold the file for writing, and a process holding it open
# read-only keeps writers out too. Another holder is waited for, with growing pauses, this long.
WAIT_ENV = "LABELLOOP_DB_WAIT_SECONDS"
DEFAULT_WAIT_SECONDS = 60.0
_MAX_PAUSE_SECONDS = 0.5
_LOCKED = "Could not set lock on file"
# Absent when the holder let go between DuckDB's attempt and its question who held the file.
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)")


_NEWER_FILE = "created with an newer version of DuckDB"


class DatabaseBusy(duckdb.IOException):
    """Another process held the DuckDB file for longer than labelloop waits for it."""


class NewerDatabaseFile(duckdb.IOException):
    """The DuckDB file was written by a later DuckDB release than the one installed."""


def wait_seconds() -> float:
    return float(env_number(WAIT_ENV, DEFAULT_WAIT_SECONDS))


def open_database(
    database: Path,
    read_only: bool = False,
    config: dict | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> duckdb.DuckDBPyConnection:
    """Connect to the file, waiting while another process holds it (LABELLOOP_DB_WAIT_SECONDS).

    `on_wait` (default: standard error) hears once that the file is busy; when the wait runs out,
    DatabaseBusy says who holds the file. Other errors (a damaged file, a missing folder) are
    raised at once.
    """
    limit = wait_seconds()
    deadline = time.monotonic() + limit
    pause, told, who = 0.05, False, "another process"
    while True:
        try:
            return duckdb.connect(str(database), read_only=read_only, config=config or {})
        except duckdb.IOException as error:
            if _NEWER_FILE in str(error):
                raise NewerDatabaseFile(
                    f"{database} was written by a newer DuckDB than this labelloop's "
                    f"({duckdb.__version__}): DuckDB cannot read files of later releases. Export it "
                    "with the DuckDB that wrote it (EXPORT DATABASE, then IMPORT DATABASE here), or "
                    "start a fresh home (the demo's: `make clean demo`)"
                ) from None
            if _LOCKED not in str(error):
                raise
            holder = _LOCK_HOLDER.search(str(error))
            if holder:
                who = f"another process (PID {holder['pid']}, {holder['program']})"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseBusy(
                    f"{database} is held by {who}; retried for {limit:g} s. Try again when it "
                    f"has finished (or wait longer: {WAIT_ENV}, now {limit:g})"
                ) from None
            if not told:
                (on_wait or _tell)(f"{database} is held by {who}; waiting up to {limit:g} s for it")
                told = True
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_PAUSE_SECONDS)


def _tell(message: str) -> None:
    print(f"labelloop: {message}", file=sys.stderr, flush=True)


def connect(
    database: Path | Lake,
    read_only: bool = False,
    config: dict | None = None,
    on_wait: Callable[[str], None] | None = None,
    groups: tuple[str, ...] = lake.ALL_GROUPS,
) -> Any:
    """An open connection with labelloop's schema in place; `with connect(...) as con:` closes it.

    `database` is the embedded DuckDB file or a `Lake` (see `Home.database`). The store is opened
    here, not on entering the block, so a caller's `try` around this call sees a busy or
    unreadable store. A writer on the lake holds the writer locks of `groups` (the table groups
    it writes; default all) until it closes; the embedded file has one writer at a time anyway.
    """
    if isinstance(database, Lake):
        con = lake.connect(database, read_only, wait_seconds(), on_wait or _tell, groups)
        if not read_only and groups != lake.ALL_GROUPS and schema_version(con) != SCHEMA_VERSION:
            con.close()  # creating or upgrading the schema touches every table: all groups
            con = lake.connect(database, read_only, wait_seconds(), on_wait or _tell)
    else:
        con = open_database(database, read_only, config, on_wait)
    if not read_only:
        try:
            ensure_schema(con)
        except BaseException:
            con.close()
            raise
    return con


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All or nothing: a crash or error inside leaves the file as it was before."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        if isinstance(con, lake.LakeConnection):
            con.check_writer()
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def frame(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> pl.DataFrame:
    # execute(), not sql(): with parameters, DuckDB 1.5's sql() relation takes ~15x longer to
    # reach Polars (9 s against 0.6 s for a million rows).
    return con.execute(sql, params or []).pl()


def rows_since(con: duckdb.DuckDBPyConnection, table: str, columns: str, mark: int) -> pl.DataFrame:
    """`columns` of a numbered table's rows after number `mark`, in number order.

    Sorted by Polars, and only when the rows are not in order already (read back in insertion
    order, they are): ORDER BY in DuckDB holds a second copy of a big batch while it sorts,
    ~300 MB more at a million corrections.
    """
    serial = SERIALS[table]
    rows = frame(con, f"SELECT {columns} FROM {table} WHERE {serial} > ?", [mark])
    return rows if rows[serial].is_sorted() else rows.sort(serial)


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> Any:
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


# Tables whose rows are numbered in insertion order (what sequences did before): the number
# continues from the table's largest, which is safe because each table has one writer at a time
# (the embedded file's lock; on the lake, the lock of the table's group).
SERIALS = {
    "items": "seq",
    "raw_corrections": "seq",
    "review_decisions": "seq",
    "label_decisions": "decision_id",
    "model_evaluations": "evaluation_id",
}


def append(con: Any, table: str, rows: pl.DataFrame) -> int:
    """Insert a frame into a table by column name (columns the frame lacks get defaults).

    A numbered table's rows get the next numbers, in the frame's order.
    """
    if rows.height == 0:
        return 0
    columns = ", ".join(rows.columns)
    values = columns
    serial = SERIALS.get(table)
    if serial and serial not in rows.columns:
        # The frame's own row index, not row_number() OVER (...): a window sorts every row.
        rows = rows.with_row_index("_append_order", offset=1)
        values = f"{_largest(table)} + _append_order, {columns}"
        columns = f"{serial}, {columns}"
    con.register("rows_to_append", _in_scan_chunks(rows))
    try:
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {values} FROM rows_to_append")
    finally:
        con.unregister("rows_to_append")
    return rows.height


# DuckDB scans a registered frame one chunk per thread: a frame in one piece is converted and
# written by one thread (942,807 corrections: 2.1 s), in pieces of a row group by all (1.2 s).
# Insertion order is kept either way.
SCAN_CHUNK_ROWS = 122_880


def _in_scan_chunks(rows: pl.DataFrame) -> pl.DataFrame:
    """The same rows, in chunks of at most SCAN_CHUNK_ROWS (no copy: slices share the data)."""
    if rows.height <= SCAN_CHUNK_ROWS:
        return rows
    return pl.concat(
        [rows.slice(start, SCAN_CHUNK_ROWS) for start in range(0, rows.height, SCAN_CHUNK_ROWS)],
        rechunk=False,
    )


def next_number(con: Any, table: str) -> int:
    """The number the next row of a numbered table gets."""
    return int(scalar(con, f"SELECT {_largest(table)} + 1"))


def _largest(table: str) -> str:
    """SQL for a numbered table's largest number so far (0 when empty)."""
    return f"(SELECT coalesce(max({SERIALS[table]}), 0) FROM {table})"


# Each table's keys: unique by the writes (anti-joins, MERGE, numbered appends under the writer
# lock), verified by `duplicate_keys`. The `seq` numbers are the watermarks later steps read from.
KEYS = (
    ("items", "item_id"), ("items", "seq"),
    ("predictions", "prediction_id"),
    ("raw_corrections", "event_id"), ("raw_corrections", "seq"),
    ("validated_labels", "event_id"),
    ("review_decisions", "decision_id"), ("review_decisions", "seq"),
    ("label_decisions", "decision_id"),
    ("production_corpus", "item_id"),
    ("item_shapes", "item_id"),
    ("review_tasks", "task_id"),
    ("corpus_versions", "corpus_version"),
    ("models", "model_version"),
    ("model_evaluations", "evaluation_id"),
    ("release_notes", "evaluation_id"),
    ("contributor_reliability", "user_pseudonym"),
    ("evaluation_sets", "evaluation_set"),
    ("label_issue_candidates", "item_id"),
    ("ingested_files", "path, version"),
    ("escalations", "escalation_id"),
    ("correction_bursts", "burst_id"),
    ("correction_volume", "day, scope, key"),
    ("pipeline_state", "name"),
    ("schema_info", "key"),
)


def duplicate_keys(con: Any, limit: int = 5) -> dict[str, list]:
    """Keys that occur more than once, by table (empty when every key is unique)."""
    found = {}
    for table, key in KEYS:
        rows = con.execute(
            f"SELECT {key} FROM {table} GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL LIMIT ?", [limit]
        ).fetchall()
        if rows:
            found[f"{table}.{key}"] = [r[0] if len(r) == 1 else list(r) for r in rows]
    return found


def policy_rows(run_id: str, step: str, files: tuple[str, ...]) -> pl.DataFrame:
    """policy_uses rows: the SHA-256 of each of `files` as this process last read it."""
    used = {name: POLICY_READS[name] for name in files if name in POLICY_READS}
    return pl.DataFrame(
        {"run_id": [run_id] * len(used), "step": [step] * len(used), "file": list(used), "sha256": list(used.values())},
        schema={"run_id": pl.String, "step": pl.String, "file": pl.String, "sha256": pl.String},
    )


def record_policies(con: Any, run_id: str, step: str, files: tuple[str, ...]) -> dict[str, str]:
    """Record the SHA-256 of the policy files `step` read (as this process read them) with its run."""
    rows = policy_rows(run_id, step, files)
    if rows.height:
        append(con, "policy_uses", rows)
    return dict(zip(rows["file"], rows["sha256"], strict=True))


def corpus_head(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(latest corpus version, label changes up to it); (0, 0) before the first version."""
    rows = con.execute(
        "SELECT corpus_version, label_changes_total FROM corpus_versions "
        "ORDER BY corpus_version DESC LIMIT 1"
    ).fetchall()
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def replace(con: duckdb.DuckDBPyConnection, table: str, rows: pl.DataFrame) -> None:
    """Swap a small derived table's contents for `rows`, in one transaction."""
    with transaction(con):
        con.execute(f"DELETE FROM {table}")
        append(con, table, rows)


def get_state(con: duckdb.DuckDBPyConnection, name: str, default: int = 0) -> int:
    value = scalar(con, "SELECT value FROM pipeline_state WHERE name = ?", [name])
    return default if value is None else int(value)


def set_state(con: duckdb.DuckDBPyConnection, name: str, value: int) -> None:
    con.execute(
        "MERGE INTO pipeline_state t USING (SELECT ?::VARCHAR AS name, ?::BIGINT AS value) s "
        "ON t.name = s.name WHEN MATCHED THEN UPDATE SET value = s.value "
        "WHEN NOT MATCHED THEN INSERT (name, value) VALUES (s.name, s.value)",
        [name, value],
    )


def lookup(con: duckdb.DuckDBPyConnection, table: str, key: str, keys: pl.DataFrame, columns: str) -> pl.DataFrame:
    """Rows of `table` whose `key` is among `keys[key]`: an indexed probe, O(batch)."""
    con.register("lookup_keys", keys.select(key).unique())
    try:
        return frame(
            con, f"SELECT t.{key}, {columns} FROM {table} t JOIN lookup_keys k USING ({key})"
        )
    finally:
        con.unregister("lookup_keys")


def copy_into_lake(source: Path, target: Lake, on_wait: Callable[[str], None] | None = None) -> dict[str, int]:
    """Copy an embedded home's DuckDB file into an empty lake, every table by column name.

    By name rather than `COPY FROM DATABASE`: a file from an older labelloop has fewer columns
    (they get their defaults), and the file's PRIMARY KEYs and sequences must not follow it into
    DuckLake, which has neither. One lake commit: a failed copy leaves the lake empty.
    """
    con = connect(target, on_wait=on_wait)
    try:
        filled = [t for t in ("items", "raw_corrections", "corpus_versions", "models", "audit_log")
                  if scalar(con, f"SELECT count(*) FROM {t}")]
        if filled:
            raise lake.LakeError(
                f"the {target} already holds labelloop data ({', '.join(filled)}); "
                "copy only into an empty catalog"
            )
        try:
            con.execute(f"ATTACH '{str(source).replace(chr(39), chr(39) * 2)}' AS embedded (READ_ONLY)")
        except duckdb.Error as error:
            newer = (
                " (written by a newer DuckDB: export it with that DuckDB first)" if _NEWER_FILE in str(error) else ""
            )
            raise lake.LakeError(f"cannot open {source} for reading{newer}: {error}") from None
        version = scalar(con, "SELECT value FROM embedded.main.schema_info WHERE key = 'schema_version'")
        if version is None or not 2 <= int(version) <= SCHEMA_VERSION:
            raise lake.LakeError(
                f"{source} has schema version {version}; this labelloop copies versions 2 to "
                f"{SCHEMA_VERSION} (run any labelloop job on it first to upgrade it)"
            )
        columns = frame(
            con,
            "SELECT c.table_name, c.column_name, c.database_name FROM duckdb_columns() c "
            "JOIN duckdb_tables() t USING (database_name, schema_name, table_name) "
            "WHERE c.database_name IN ('embedded', $lake) AND c.schema_name = 'main' "
            "ORDER BY c.table_name, c.column_index",
            {"lake": lake.ALIAS},
        )
        copied = {}
        with transaction(con):
            lake.name_commit(con, f"copied from the embedded file {source.name}")
            for table in sorted(set(columns.filter(pl.col("database_name") == lake.ALIAS)["table_name"])):
                if table == "schema_info":
                    continue
                here = columns.filter((pl.col("table_name") == table) & (pl.col("database_name") == lake.ALIAS))
                there = set(columns.filter((pl.col("table_name") == table)
                                           & (pl.col("database_name") == "embedded"))["column_name"])
                shared = [c for c in here["column_name"] if c in there]
                if not shared:
                    continue
                names = ", ".join(f'"{c}"' for c in shared)
                con.execute(
                    f"INSERT INTO {lake.ALIAS}.main.{table} ({names}) SELECT {names} FROM embedded.main.{table}"
                )
                copied[table] = int(scalar(con, f"SELECT count(*) FROM {lake.ALIAS}.main.{table}"))
            con.execute(
                "INSERT INTO schema_info SELECT key, value FROM embedded.main.schema_info "
                "WHERE key NOT IN (SELECT key FROM schema_info)"
            )
        lake.stamp_corpus_snapshots(con)
        return copied
    finally:
        try:  # the attachment belongs to the process's lake instance, not to this connection
            con.execute("DETACH DATABASE IF EXISTS embedded")
        finally:
            con.close()
