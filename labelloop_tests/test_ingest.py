"""core/ingest.py against a real DuckDB file: quarantine reasons, reconciliation, idempotency,
privacy, Parquet landing files and label harmonization."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from labelloop_assets.core import anonymize, contracts, ingest, store
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.settings import Home

KEY = b"test-pseudonymization-key"
FEATURES = [0.5, 1.0, 1.5, 2.0]


# --------------------------------------------------------------------------- helpers


def item(item_id: str, **overrides) -> dict:
    record = {"item_id": item_id, "features": FEATURES, "initial_label": "three", "label_source": "vendor"}
    record.update(overrides)
    return record


def prediction(prediction_id: str, item_id: str = "i1", **overrides) -> dict:
    record = {
        "prediction_id": prediction_id,
        "item_id": item_id,
        "model_version": "m-001",
        "predicted_label": "three",
        "confidence": 0.75,
        "served_at": "2024-05-01T11:00:00Z",
    }
    record.update(overrides)
    return record


def correction(event_id: str, item_id: str = "i1", **overrides) -> dict:
    record = {
        "event_id": event_id,
        "item_id": item_id,
        "corrected_label": "five",
        "user_id": "alice",
        "user_role": "annotator",
        "source": "annotation",
        "consent": True,
        "created_at": "2024-05-01T12:00:00Z",
    }
    record.update(overrides)
    return record


def _encode(line) -> bytes:
    if isinstance(line, bytes):
        return line
    if isinstance(line, str):
        return line.encode("utf-8")
    return json.dumps(line).encode("utf-8")


def land(home: Home, kind: str, name: str, lines: list) -> Path:
    """Write a landing file: dicts become JSON lines, str/bytes are written verbatim."""
    path = home.landing_dir(kind) / name
    path.write_bytes(b"".join(_encode(line) + b"\n" for line in lines))
    return path


def run_ingest(con, home: Home, kind: str, key: bytes = KEY, ontology: Ontology | None = None):
    ontology = ontology or Ontology.load(home.ontology_file)
    if kind == "items":
        return ingest.ingest_items(con, home, ontology, "run-test")
    if kind == "predictions":
        return ingest.ingest_predictions(con, home, ontology, "run-test")
    return ingest.ingest_corrections(con, home, ontology, key, "run-test")


TABLES = {"items": ("items", "item_id"), "predictions": ("predictions", "prediction_id"),
          "corrections": ("raw_corrections", "event_id")}


def stored_ids(con, kind: str) -> list[str]:
    table, key = TABLES[kind]
    return [row[0] for row in con.execute(f"SELECT {key} FROM {table} ORDER BY {key}").fetchall()]


def ledger(con, path: str) -> dict:
    rows = store.frame(
        con, "SELECT * FROM ingested_files WHERE path = ?", [path]
    ).to_dicts()
    assert len(rows) == 1, f"expected one ledger row for {path}, got {rows}"
    return rows[0]


def quarantine(con, source_file: str | None = None) -> list[dict]:
    sql = "SELECT * FROM quarantine"
    params: list = []
    if source_file is not None:
        sql += " WHERE source_file = ?"
        params.append(source_file)
    return store.frame(con, sql + " ORDER BY source_file, line_no", params).to_dicts()


def counts(con) -> dict[str, int]:
    tables = ["items", "predictions", "raw_corrections", "quarantine", "ingested_files"]
    return {t: store.scalar(con, f"SELECT count(*) FROM {t}") for t in tables}


@pytest.fixture
def lhome(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home").ensure()
    # The model that served these predictions was trained outside labelloop: declared.
    with home.training_file.open("a") as config:
        config.write("external_model_versions: [m-001]\n")
    return home


@pytest.fixture
def db(lhome: Home):
    with store.connect(lhome.database) as con:
        yield con


@pytest.fixture
def seeded(lhome: Home, db):
    """Items i1..i4 (4 features, label three) are ingested and gold item g1 declared in gold.jsonl."""
    land(lhome, "items", "base.jsonl", [item(f"i{n}") for n in range(1, 5)])
    lhome.gold_file.write_text(json.dumps({"item_id": "g1", "features": FEATURES, "gold_label": "four"}) + "\n")
    report = run_ingest(db, lhome, "items")
    assert report.accepted == 4 and report.quarantined == 0
    assert db.execute("SELECT item_id FROM items WHERE gold_label = 'four'").fetchall() == [("g1",)]
    return lhome, db


# --------------------------------------------------------------------------- one test per reason


@dataclass
class LineCase:
    kind: str
    bad: object  # the line between two valid ones (line 2 of the file)
    detail: str  # substring of the quarantine detail
    record_id: str | None  # what the quarantine row names as the record (None: nothing parsed)
    first: object = None  # override of line 1 (the duplicate cases need a specific first line)
    valid_ids: list[str] = field(default_factory=list)


def _lines_for(case: LineCase) -> tuple[list, list[str]]:
    if case.kind == "corrections":
        first = case.first or correction("ok-1")
        last = correction("ok-2", item_id="i2")
        ids = [first["event_id"], "ok-2"]
    elif case.kind == "predictions":
        first, last = prediction("ok-1"), prediction("ok-2", item_id="i2")
        ids = ["ok-1", "ok-2"]
    else:
        first, last = item("ok-1"), item("ok-2")
        ids = ["ok-1", "ok-2"]
    return [first, case.bad, last], ids


def _bad_encoding_line() -> bytes:
    raw = json.dumps(correction("bad-enc")).encode()
    return raw.replace(b"bad-enc", b"bad-\xff\xfeenc")


LINE_CASES = {
    contracts.MALFORMED_JSON: LineCase("corrections", '{"event_id": "bad-1", "item_id": ', "not valid JSON", None),
    contracts.NOT_AN_OBJECT: LineCase("corrections", '["bad-1", "i1", "five"]', "not an object", None),
    contracts.INVALID_ENCODING: LineCase("corrections", _bad_encoding_line(), "not UTF-8", None),
    contracts.OVERSIZE_LINE: LineCase(
        "corrections", correction("bad-1", context={"pad": "x" * (70 * 1024)}), "65536 bytes", None
    ),
    contracts.MISSING_FIELD: LineCase(
        "corrections", {k: v for k, v in correction("bad-1").items() if k != "user_id"}, "user_id", "bad-1"
    ),
    contracts.INVALID_TYPE: LineCase("corrections", correction("bad-1", consent="yes"), "consent", "bad-1"),
    contracts.INVALID_VALUE: LineCase(
        "corrections", correction("bad-1", user_role="admin"), "user_role: not one of", "bad-1"
    ),
    contracts.OUT_OF_RANGE: LineCase(
        "corrections", correction("bad-1", user_confidence=1.5), "user_confidence: outside", "bad-1"
    ),
    contracts.BAD_TIMESTAMP: LineCase(
        "corrections", correction("bad-1", created_at="2024-05-01T12:00:00"), "created_at", "bad-1"
    ),
    contracts.OVERSIZE_FIELD: LineCase(
        "corrections", correction("bad-1", rationale="r" * 2001), "rationale: longer than 2000", "bad-1"
    ),
    contracts.UNKNOWN_LABEL: LineCase(
        "corrections", correction("bad-1", corrected_label="seventeen"), "corrected_label: not a term of the ontology",
        "bad-1",
    ),
    contracts.UNKNOWN_ITEM: LineCase(
        "corrections", correction("bad-1", item_id="no-such-item"), "not a known item", "bad-1"
    ),
    contracts.GOLD_ITEM: LineCase("corrections", correction("bad-1", item_id="g1"), "gold items", "bad-1"),
    contracts.NO_CONSENT: LineCase("corrections", correction("bad-1", consent=False), "consent is false", "bad-1"),
    contracts.DUPLICATE_EVENT: LineCase(
        "corrections", correction("dup-1"), "same content", "dup-1", first=correction("dup-1")
    ),
    contracts.CONFLICTING_DUPLICATE: LineCase(
        "corrections", correction("dup-1", corrected_label="six"), "different content", "dup-1",
        first=correction("dup-1"),
    ),
    contracts.UNKNOWN_TASK: LineCase(
        "corrections", correction("bad-1", task_id="tsk-20260301-000000000000"),
        "no review task with this id was issued", "bad-1",
    ),
    contracts.UNKNOWN_MODEL_VERSION: LineCase(
        "predictions", prediction("bad-1", model_version="m9999-not-a-model"), "not a model labelloop trained", "bad-1"
    ),
    contracts.GOLD_NOT_DECLARED: LineCase(
        "items", item("bad-1", gold_label="three"), "declared in gold.jsonl by the deployment", "bad-1"
    ),
    contracts.FEATURE_LENGTH_MISMATCH: LineCase(
        "items", item("bad-1", features=[1.0, 2.0, 3.0, 4.0, 5.0]), "5 values, this deployment uses 4", "bad-1"
    ),
    contracts.ITEM_CONTENT_MISMATCH: LineCase(
        "items", item("bad-1", text="a photo of a three"),
        "the item carries text+features; this deployment's items carry features", "bad-1",
    ),
}

WHOLE_FILE_REASONS = [
    contracts.UNREADABLE_FILE, contracts.UNSUPPORTED_FORMAT, contracts.FILE_TOO_LARGE,
    contracts.TOO_MANY_LINES, contracts.DECOMPRESSED_TOO_LARGE,
]
# A file that exhausts memory: test_hostile_files.py, in a child process under a memory limit.
RESOURCE_REASONS = {contracts.RESOURCE_LIMIT}


# Reasons that only review decisions can have; test_governance.py covers each of them.
# Tested in test_governance.py, and decision_not_applicable in test_bursts.py.
REVIEW_REASONS = {
    contracts.UNKNOWN_REVIEWER, contracts.ROLE_NOT_ALLOWED, contracts.UNKNOWN_ESCALATION,
    contracts.ESCALATION_CLOSED, contracts.DECISION_NOT_APPLICABLE,
}


# Trust reasons: signatures in test_signing.py, undeclared gold in test_gold.py, and
# role_not_granted (an audit reason: the line is accepted at its granted role) in test_trust.py.
TRUST_REASONS = {
    contracts.UNSIGNED, contracts.BAD_SIGNATURE, contracts.UNKNOWN_KEY, contracts.REVOKED_KEY,
    contracts.GOLD_NOT_DECLARED, contracts.ROLE_NOT_GRANTED,
}


def test_every_reason_code_has_a_test():
    defined = {v for k, v in vars(contracts).items() if isinstance(v, str) and k.lower() == v}
    assert len(defined) == 37
    assert defined == set(LINE_CASES) | set(WHOLE_FILE_REASONS) | REVIEW_REASONS | TRUST_REASONS | RESOURCE_REASONS


@pytest.mark.parametrize("reason", list(LINE_CASES))
def test_line_is_quarantined_with_reason_and_neighbours_are_accepted(seeded, reason):
    home, con = seeded
    case = LINE_CASES[reason]
    lines, valid_ids = _lines_for(case)
    land(home, case.kind, "batch.jsonl", lines)
    before = set(stored_ids(con, case.kind))

    report = run_ingest(con, home, case.kind)

    source = f"{case.kind}/batch.jsonl"
    rows = quarantine(con, source)
    assert [(r["reason"], r["line_no"], r["kind"]) for r in rows] == [(reason, 2, case.kind)]
    assert case.detail in rows[0]["detail"]
    assert rows[0]["record_id"] == case.record_id
    assert rows[0]["run_id"] == "run-test"
    # The valid lines around the bad one are stored.
    assert set(stored_ids(con, case.kind)) - before == set(valid_ids)
    # Counts reconcile, in the report and in the ledger.
    assert (report.records_in, report.accepted, report.quarantined) == (3, 2, 1)
    assert report.reconciles
    assert report.reasons == {reason: 1}
    entry = ledger(con, source)
    assert (entry["records_in"], entry["accepted"], entry["quarantined"]) == (3, 2, 1)
    assert entry["kind"] == case.kind


def test_prediction_rules_unknown_item_unknown_label_and_range(seeded):
    home, con = seeded
    land(home, "predictions", "p.jsonl", [
        prediction("p-ok"),
        prediction("p-item", item_id="ghost"),
        prediction("p-label", predicted_label="eleven"),
        prediction("p-conf", confidence=-0.1),
        prediction("p-renamed", predicted_label="9"),
    ])
    report = run_ingest(con, home, "predictions")
    assert report.reasons == {"unknown_item": 1, "unknown_label": 1, "out_of_range": 1}
    assert (report.records_in, report.accepted, report.quarantined) == (5, 2, 3)
    rows = con.execute("SELECT prediction_id, predicted_label FROM predictions ORDER BY 1").fetchall()
    assert rows == [("p-ok", "three"), ("p-renamed", "nine")]
    assert {(r["record_id"], r["reason"]) for r in quarantine(con, "predictions/p.jsonl")} == {
        ("p-item", "unknown_item"), ("p-label", "unknown_label"), ("p-conf", "out_of_range")
    }


def _whole_file_setup(home: Home, reason: str, monkeypatch) -> str:
    folder = home.landing_dir("corrections")
    if reason == contracts.UNREADABLE_FILE:
        (folder / "broken.parquet").write_bytes(b"PAR1 this is not really parquet \x00\x01\x02 PAR1")
        return "broken.parquet"
    if reason == contracts.UNSUPPORTED_FORMAT:
        (folder / "export.csv").write_text("event_id,item_id\nx-1,i1\n")
        return "export.csv"
    if reason == contracts.TOO_MANY_LINES:
        # Blank lines count: a file of newlines must not cost a list of empty strings to refuse.
        monkeypatch.setattr(contracts, "MAX_LINES_PER_FILE", 10)
        (folder / "newlines.jsonl").write_bytes(json.dumps(correction("nl-1")).encode() + b"\n" * 30)
        return "newlines.jsonl"
    if reason == contracts.DECOMPRESSED_TOO_LARGE:
        # A few hundred bytes of Parquet that decompress into 100 rows of 1,000 characters.
        monkeypatch.setattr(contracts, "MAX_DECOMPRESSED_BYTES", 50_000)
        pl.DataFrame([correction(f"z-{n}", rationale="z" * 1000) for n in range(100)]).write_parquet(
            folder / "bomb.parquet", compression="zstd"
        )
        assert (folder / "bomb.parquet").stat().st_size < 5_000
        return "bomb.parquet"
    monkeypatch.setattr(contracts, "MAX_FILE_BYTES", 2000)
    land(home, "corrections", "big.jsonl", [correction(f"big-{n}") for n in range(20)])
    assert (folder / "big.jsonl").stat().st_size > 2000
    return "big.jsonl"


@pytest.mark.parametrize("reason", WHOLE_FILE_REASONS)
def test_unreadable_file_is_quarantined_whole_and_other_files_still_land(seeded, reason, monkeypatch):
    home, con = seeded
    bad_name = _whole_file_setup(home, reason, monkeypatch)
    land(home, "corrections", "good.jsonl", [correction("ok-1"), correction("ok-2", item_id="i2")])
    assert (home.landing_dir("corrections") / "good.jsonl").stat().st_size < 2000

    report = run_ingest(con, home, "corrections")

    rows = quarantine(con, f"corrections/{bad_name}")
    assert len(rows) == 1
    assert rows[0]["reason"] == reason
    assert rows[0]["line_no"] is None and rows[0]["record_id"] is None
    assert bad_name in rows[0]["detail"]
    assert len(rows[0]["line_sha256"]) == 64
    assert stored_ids(con, "corrections") == ["ok-1", "ok-2"]
    assert report.reasons == {reason: 1}
    assert (report.records_in, report.accepted, report.quarantined) == (3, 2, 1)
    assert report.reconciles
    bad = ledger(con, f"corrections/{bad_name}")
    assert (bad["records_in"], bad["accepted"], bad["quarantined"]) == (1, 0, 1)
    good = ledger(con, "corrections/good.jsonl")
    assert (good["records_in"], good["accepted"], good["quarantined"]) == (2, 2, 0)
    # The ledger remembers the bad file too: it is not retried on every run.
    again = run_ingest(con, home, "corrections")
    assert again.files == [] and again.records_in == 0


# --------------------------------------------------------------------------- reconciliation


def test_blank_lines_are_counted_not_records(seeded):
    home, con = seeded
    path = home.landing_dir("corrections") / "gaps.jsonl"
    lines = [json.dumps(correction("a")), "", "   ", json.dumps(correction("b")), "\t", "not json"]
    path.write_text("\r\n".join(lines) + "\r\n")
    report = run_ingest(con, home, "corrections")
    assert (report.records_in, report.accepted, report.quarantined, report.blank_lines) == (3, 2, 1, 3)
    entry = ledger(con, "corrections/gaps.jsonl")
    assert (entry["records_in"], entry["blank_lines"], entry["size_bytes"]) == (3, 3, path.stat().st_size)
    # Line numbers are physical line numbers of the file, blank lines included.
    assert [(r["line_no"], r["reason"]) for r in quarantine(con, "corrections/gaps.jsonl")] == [
        (6, "malformed_json")
    ]
    assert con.execute("SELECT event_id, line_no FROM raw_corrections ORDER BY 1").fetchall() == [
        ("a", 1), ("b", 4)
    ]


def test_batch_report_sums_over_files_and_ledger_has_one_row_each(seeded):
    home, con = seeded
    land(home, "corrections", "a.jsonl", [correction("a1"), correction("a2", consent=False)])
    land(home, "corrections", "b.jsonl", [correction("b1"), correction("b2"), "{oops"])
    report = run_ingest(con, home, "corrections")
    assert report.files == ["corrections/a.jsonl", "corrections/b.jsonl"]
    assert (report.records_in, report.accepted, report.quarantined) == (5, 3, 2)
    assert report.reasons == {"malformed_json": 1, "no_consent": 1}
    total = con.execute(
        "SELECT sum(records_in), sum(accepted), sum(quarantined) FROM ingested_files "
        "WHERE kind = 'corrections'"
    ).fetchall()[0]
    assert total == (5, 3, 2)
    assert store.scalar(con, "SELECT count(*) FROM raw_corrections") == 3
    assert store.scalar(con, "SELECT count(*) FROM quarantine WHERE kind = 'corrections'") == 2


def test_files_still_being_written_are_not_ingested(seeded):
    home, con = seeded
    folder = home.landing_dir("corrections")
    for name in (".c.jsonl.tmp", "c.jsonl.part", "c.jsonl.partial", "_c.jsonl", "c.jsonl.tmp"):
        (folder / name).write_text(json.dumps(correction("never")) + "\n")
    land(home, "corrections", "real.jsonl", [correction("real")])
    report = run_ingest(con, home, "corrections")
    assert report.files == ["corrections/real.jsonl"]
    assert stored_ids(con, "corrections") == ["real"]


def test_nothing_pending_gives_an_empty_report_and_no_ledger_rows(lhome, db):
    report = run_ingest(db, lhome, "corrections")
    assert (report.files, report.records_in, report.accepted, report.quarantined) == ([], 0, 0, 0)
    assert counts(db)["ingested_files"] == 0


# --------------------------------------------------------------------------- idempotency


def _land_everything(home: Home) -> None:
    land(home, "items", "items-1.jsonl", [item(f"i{n}") for n in range(1, 4)] + [item("bad", initial_label="x")])
    land(home, "predictions", "pred-1.jsonl", [prediction("p1"), prediction("p2", item_id="ghost")])
    land(home, "corrections", "corr-1.jsonl", [correction("e1"), correction("e2", consent=False), "[]"])


def test_ingesting_the_same_folder_twice_adds_nothing(lhome, db):
    _land_everything(lhome)
    first = [run_ingest(db, lhome, kind) for kind in ("items", "predictions", "corrections")]
    assert [(r.accepted, r.quarantined) for r in first] == [(3, 1), (1, 1), (1, 2)]
    snapshot = counts(db)
    raw = store.frame(db, "SELECT * FROM raw_corrections")

    second = [run_ingest(db, lhome, kind) for kind in ("items", "predictions", "corrections")]

    assert [(r.files, r.records_in, r.accepted, r.quarantined) for r in second] == [([], 0, 0, 0)] * 3
    assert counts(db) == snapshot
    assert store.frame(db, "SELECT * FROM raw_corrections").equals(raw)


def test_reopening_the_database_file_keeps_the_ledger(lhome):
    _land_everything(lhome)
    with store.connect(lhome.database) as con:
        run_ingest(con, lhome, "items")
    with store.connect(lhome.database) as con:
        again = run_ingest(con, lhome, "items")
        assert again.records_in == 0
        assert store.scalar(con, "SELECT count(*) FROM items") == 3


@pytest.mark.parametrize("kind", ["items", "predictions", "corrections"])
def test_same_content_under_a_new_name_is_quarantined_as_duplicates(seeded, kind):
    home, con = seeded
    make = {"items": lambda n: item(f"new-{n}"), "predictions": lambda n: prediction(f"new-{n}"),
            "corrections": lambda n: correction(f"new-{n}")}[kind]
    first = land(home, kind, "day-1.jsonl", [make(n) for n in range(3)])
    assert run_ingest(con, home, kind).accepted == 3
    ids_before, rows_before = stored_ids(con, kind), counts(con)

    shutil.copyfile(first, home.landing_dir(kind) / "day-1-resent.jsonl")
    report = run_ingest(con, home, kind)

    assert (report.records_in, report.accepted, report.quarantined) == (3, 0, 3)
    assert report.reasons == {"duplicate_event": 3}
    assert stored_ids(con, kind) == ids_before
    assert counts(con)[TABLES[kind][0]] == rows_before[TABLES[kind][0]]
    assert [(r["record_id"], r["reason"]) for r in quarantine(con, f"{kind}/day-1-resent.jsonl")] == [
        (f"new-{n}", "duplicate_event") for n in range(3)
    ]


def test_replay_with_other_formatting_is_a_duplicate_but_changed_content_conflicts(seeded):
    home, con = seeded
    land(home, "corrections", "a.jsonl", [correction("e1", rationale="looks like a five")])
    run_ingest(con, home, "corrections")
    reordered = dict(reversed(list(correction("e1", rationale="looks like a five").items())))
    land(home, "corrections", "b.jsonl", [
        json.dumps(reordered, indent=None, separators=(" , ", " : ")),
        correction("e1", rationale="looks like a six"),
    ])
    report = run_ingest(con, home, "corrections")
    assert report.reasons == {"duplicate_event": 1, "conflicting_duplicate": 1}
    assert con.execute("SELECT rationale FROM raw_corrections WHERE event_id = 'e1'").fetchall() == [
        ("looks like a five",)
    ]


def test_valid_resend_after_a_rejected_copy_in_the_same_batch_is_accepted(seeded):
    home, con = seeded
    land(home, "corrections", "c.jsonl", [
        correction("e1", corrected_label="seventeen"),  # rejected: unknown label
        correction("e1", corrected_label="five"),  # the producer's fixed resend
    ])
    report = run_ingest(con, home, "corrections")
    assert report.reasons == {"unknown_label": 1}
    assert stored_ids(con, "corrections") == ["e1"]


# --------------------------------------------------------------------------- items specifics


def test_first_item_batch_fixes_the_feature_length(lhome, db):
    land(lhome, "items", "a.jsonl", [
        item("a1"), item("a2"), item("a3", features=[1.0, 2.0]), item("a4", features=[1, 2, 3, 4, 5, 6])
    ])
    report = run_ingest(db, lhome, "items")
    assert report.reasons == {"feature_length_mismatch": 2}
    assert store.get_state(db, "feature_length") == 4
    assert db.execute("SELECT item_id, features FROM items ORDER BY 1").fetchall() == [
        ("a1", FEATURES), ("a2", FEATURES)
    ]
    # A later batch is held to the stored length even if all its items agree on another one.
    land(lhome, "items", "b.jsonl", [item("b1", features=[1.0, 2.0]), item("b2", features=[3.0, 4.0])])
    later = run_ingest(db, lhome, "items")
    assert later.reasons == {"feature_length_mismatch": 2} and later.accepted == 0
    assert store.get_state(db, "feature_length") == 4


def test_items_may_carry_text_and_a_uri_and_the_first_batch_fixes_what_they_carry(lhome, db):
    text = {"item_id": "t1", "text": "  Refund not received after 10 days  ", "uri": "s3://tickets/t1.json",
            "initial_label": "three"}
    land(lhome, "items", "a.jsonl", [
        text, {**text, "item_id": "t2", "text": "App crashes on start"},
        {**text, "item_id": "t3"} | {"features": FEATURES},  # text and features: not what the batch carries
        {"item_id": "t4", "initial_label": "three"},  # neither
        {**text, "item_id": "t5", "uri": "not a uri"},
        {**text, "item_id": "t6", "text": "x" * (contracts.MAX_ITEM_TEXT + 1)},
        {**text, "item_id": "t7", "text": ""},
    ])
    report = run_ingest(db, lhome, "items")
    assert (report.records_in, report.accepted, report.quarantined) == (7, 2, 5)
    reasons = dict(db.execute("SELECT record_id, reason || ': ' || detail FROM quarantine").fetchall())
    assert reasons == {
        "t3": "item_content_mismatch: the item carries text+features; this deployment's items carry text "
              "(fixed by its first items)",
        "t4": "missing_field: text or features: an item carries text, features or both",
        "t5": "invalid_value: uri: must be an absolute URI with a scheme (s3://, https://, file:///...) and no spaces",
        "t6": f"oversize_field: text: longer than {contracts.MAX_ITEM_TEXT}",
        "t7": "invalid_value: text: empty",
    }
    assert db.execute("SELECT item_id, text, features, uri FROM items ORDER BY 1").fetchall() == [
        ("t1", "Refund not received after 10 days", None, "s3://tickets/t1.json"),
        ("t2", "App crashes on start", None, "s3://tickets/t1.json"),
    ]
    # Later items are held to text, even when a whole batch carries features.
    land(lhome, "items", "b.jsonl", [item("f1"), item("f2")])
    assert run_ingest(db, lhome, "items").reasons == {"item_content_mismatch": 2}


def test_items_keep_labels_source_and_gold(lhome, db):
    land(lhome, "items", "a.jsonl", [
        item("a1", initial_label="naught", label_source="vendor"),
        {"item_id": "a2", "features": [1, 2, 3, 4]},
        item("a3", initial_label="eleven"),
        # Gold is declared by the deployment, never by a landing line, whatever its label.
        item("a4", gold_label="three"),
    ])
    # Gold labels are harmonized like every label: "3" is the legacy term for "three".
    lhome.gold_file.write_text(json.dumps({"item_id": "g", "features": [1, 2, 3, 4], "gold_label": "3"}) + "\n")
    report = run_ingest(db, lhome, "items")
    assert report.reasons == {"unknown_label": 1, "gold_not_declared": 1}
    rows = db.execute(
        "SELECT item_id, features, initial_label, label_source, gold_label FROM items ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("a1", FEATURES, "zero", "vendor", None),
        ("a2", [1.0, 2.0, 3.0, 4.0], None, None, None),
        ("g", [1.0, 2.0, 3.0, 4.0], None, None, "three"),
    ]


# --------------------------------------------------------------------------- ontology at ingest


def test_renames_are_applied_to_every_label_column(seeded):
    home, con = seeded
    land(home, "predictions", "p.jsonl", [prediction("p1", predicted_label="3")])
    land(home, "corrections", "c.jsonl", [
        correction("e1", corrected_label="nought", original_label="3"),
        correction("e2", corrected_label=" 7 ", original_label="naught"),
        correction("e3", corrected_label="Zero"),  # labels are case-sensitive
    ])
    run_ingest(con, home, "predictions")
    report = run_ingest(con, home, "corrections")
    assert con.execute("SELECT predicted_label FROM predictions").fetchall() == [("three",)]
    assert con.execute(
        "SELECT event_id, corrected_label, original_label FROM raw_corrections ORDER BY 1"
    ).fetchall() == [("e1", "zero", "three"), ("e2", "seven", "zero")]
    assert report.reasons == {"unknown_label": 1}
    detail = quarantine(con, "corrections/c.jsonl")[0]["detail"]
    assert "corrected_label" in detail and "Zero" not in detail  # the value is never repeated


def test_chained_renames_from_a_custom_ontology_file(lhome, db):
    lhome.ontology_file.write_text(
        "labels: [cat, dog]\nrenames:\n  kitty: kitten\n  kitten: cat\n  puppy: dog\n"
    )
    ontology = Ontology.load(lhome.ontology_file)
    land(lhome, "items", "a.jsonl", [
        item("a1", initial_label="kitty"), item("a2", initial_label="kitten"),
        item("a3", initial_label="puppy"), item("a4", initial_label="three"),
    ])
    report = run_ingest(db, lhome, "items", ontology=ontology)
    assert db.execute("SELECT item_id, initial_label FROM items ORDER BY 1").fetchall() == [
        ("a1", "cat"), ("a2", "cat"), ("a3", "dog")
    ]
    assert report.reasons == {"unknown_label": 1}


# --------------------------------------------------------------------------- privacy

USER = "alice.w-7781"
EMAIL = "alice.w@example.com"
PHONE = "+1 (555) 123-4567"
RATIONALE = f"It's a five. -- {USER}, mail {EMAIL} or call {PHONE}"
NEEDLES = [USER, EMAIL, "alice.w@", "123-4567", "(555)"]


def _pii_lines() -> list:
    return [
        correction("e1", user_id=USER, rationale=RATIONALE),
        correction("e2", user_id=f"  {USER} ", rationale=RATIONALE, item_id="i2"),
        correction("e3", user_id=USER, rationale=RATIONALE, consent=False),  # semantic quarantine
        correction("e4", user_id=USER, rationale=RATIONALE, corrected_label="eleven"),
        {k: v for k, v in correction("e5", user_id=USER, rationale=RATIONALE).items() if k != "source"},
        json.dumps(correction("e6", user_id=USER, rationale=RATIONALE))[:-5],  # malformed
        correction("e7", user_id=USER, rationale=RATIONALE, user_role="boss"),
    ]


def _varchar_columns(con) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'main' AND data_type LIKE 'VARCHAR%' ORDER BY 1, 2"
    ).fetchall()


def test_raw_user_ids_emails_and_phones_never_reach_any_table(seeded):
    home, con = seeded
    land(home, "corrections", "c.jsonl", _pii_lines())
    report = run_ingest(con, home, "corrections")
    assert report.accepted == 2 and report.quarantined == 5
    # The data really landed, scrubbed.
    rationales = [r[0] for r in con.execute("SELECT rationale FROM raw_corrections").fetchall()]
    assert rationales == ["It's a five. -- [user], mail [email] or call [phone]"] * 2
    columns = _varchar_columns(con)
    assert ("raw_corrections", "rationale") in columns and ("quarantine", "detail") in columns
    for table, column in columns:
        for needle in NEEDLES:
            hits = store.scalar(
                con, f'SELECT count(*) FROM "{table}" WHERE strpos(CAST("{column}" AS VARCHAR), ?) > 0',
                [needle],
            )
            assert hits == 0, f"{needle!r} leaked into {table}.{column}"


def test_sql_pseudonym_equals_python_hmac_and_depends_on_the_key(tmp_path):
    pseudonyms = {}
    for key in (b"key-one", b"key-two", b"k" * 100):
        home = Home(tmp_path / key.decode()[:10]).ensure()
        with store.connect(home.database) as con:
            land(home, "items", "i.jsonl", [item("i1")])
            run_ingest(con, home, "items")
            land(home, "corrections", "c.jsonl", [
                correction("e1", user_id=USER), correction("e2", user_id="José Ñúñez"),
                correction("e3", user_id=f"  {USER} "),
            ])
            run_ingest(con, home, "corrections", key=key)
            found = dict(con.execute("SELECT event_id, user_pseudonym FROM raw_corrections").fetchall())
        assert found == {
            "e1": anonymize.pseudonym(key, USER),
            "e2": anonymize.pseudonym(key, "José Ñúñez"),
            "e3": anonymize.pseudonym(key, USER),
        }
        assert found["e1"] != found["e2"]
        pseudonyms[key] = found["e1"]
    assert len(set(pseudonyms.values())) == 3


# --------------------------------------------------------------------------- parquet


def _correction_frame(ids: list[str]) -> pl.DataFrame:
    rows = [correction(i, rationale=f"mail {EMAIL}", user_confidence=0.5) for i in ids]
    return pl.DataFrame(rows)


def test_parquet_landing_files_work_like_jsonl(seeded):
    home, con = seeded
    frame = _correction_frame(["pq-1", "pq-2"])
    bad = correction("pq-3", corrected_label="eleven", rationale=None, user_confidence=None)
    frame = pl.concat([frame, pl.DataFrame([bad], schema=frame.schema)])
    frame.write_parquet(home.landing_dir("corrections") / "c.parquet")
    pl.DataFrame([item("pq-item", features=[9.0, 8.0, 7.0, 6.0])]).write_parquet(
        home.landing_dir("items") / "i.parquet"
    )

    items_report = run_ingest(con, home, "items")
    report = run_ingest(con, home, "corrections")

    assert items_report.accepted == 1
    assert con.execute("SELECT features, initial_label FROM items WHERE item_id = 'pq-item'").fetchall() == [
        ([9.0, 8.0, 7.0, 6.0], "three")
    ]
    assert (report.records_in, report.accepted, report.quarantined, report.blank_lines) == (3, 2, 1, 0)
    assert report.reasons == {"unknown_label": 1}
    rows = con.execute(
        "SELECT event_id, corrected_label, user_pseudonym, consent, user_confidence, rationale, line_no "
        "FROM raw_corrections ORDER BY 1"
    ).fetchall()
    pseudo = anonymize.pseudonym(KEY, "alice")
    assert rows == [
        ("pq-1", "five", pseudo, True, 0.5, "mail [email]", 1),
        ("pq-2", "five", pseudo, True, 0.5, "mail [email]", 2),
    ]
    assert [(r["line_no"], r["record_id"]) for r in quarantine(con, "corrections/c.parquet")] == [(3, "pq-3")]
    entry = ledger(con, "corrections/c.parquet")
    assert (entry["records_in"], entry["accepted"], entry["quarantined"]) == (3, 2, 1)


def test_same_events_as_parquet_then_jsonl_are_duplicates(seeded):
    home, con = seeded
    _correction_frame(["x-1", "x-2"]).write_parquet(home.landing_dir("corrections") / "a.parquet")
    assert run_ingest(con, home, "corrections").accepted == 2
    land(home, "corrections", "b.jsonl", _correction_frame(["x-1", "x-2"]).to_dicts())
    report = run_ingest(con, home, "corrections")
    assert report.reasons == {"duplicate_event": 2}
    assert stored_ids(con, "corrections") == ["x-1", "x-2"]


def test_user_id_with_trailing_tab_is_normalized_like_spaces(seeded):
    home, con = seeded
    land(home, "corrections", "c.jsonl", [
        correction("e1", user_id=USER, rationale=f"signed {USER}"),
        correction("e2", user_id=f"{USER}\t", rationale=f"signed {USER}", item_id="i2"),
    ])
    assert run_ingest(con, home, "corrections").accepted == 2
    rows = con.execute("SELECT user_pseudonym, rationale FROM raw_corrections ORDER BY event_id").fetchall()
    assert rows == [(anonymize.pseudonym(KEY, USER), "signed [user]")] * 2


def test_parquet_with_null_context_then_jsonl_without_it_are_duplicates(seeded):
    home, con = seeded
    rows = [correction("y-1", context={"screen": "review"}), correction("y-2", context=None)]
    pl.DataFrame(rows).write_parquet(home.landing_dir("corrections") / "a.parquet")
    assert run_ingest(con, home, "corrections").accepted == 2
    assert con.execute("SELECT event_id, context FROM raw_corrections ORDER BY 1").fetchall() == [
        ("y-1", '{"screen":"review"}'), ("y-2", None)
    ]
    land(home, "corrections", "b.jsonl", [correction("y-2")])
    assert run_ingest(con, home, "corrections").reasons == {"duplicate_event": 1}


HASH_IN_ZONE = """
import json, sys
import duckdb, polars as pl
from labelloop_assets.core import contracts
from labelloop_assets.core.validation import check_records
line = sys.argv[1]
lines = pl.DataFrame({"line_no": [1], "line": [line], "bad_encoding": [False]})
with duckdb.connect() as con:
    zone = con.execute("SELECT current_setting('TimeZone')").fetchone()[0]
    accepted, _ = check_records(lines, contracts.CORRECTION_SPEC, "c.jsonl", con, b"k" * 32)
print(json.dumps([zone, accepted["payload_hash"].item()]))
"""


def test_a_replay_landed_on_a_machine_in_another_time_zone_is_the_same_event():
    """The payload hash writes timestamps in UTC: the session's zone (the machine's) does not move it."""
    line = json.dumps(correction("tz-1", created_at="2026-03-01T09:30:00.25+05:30"))
    hashes = {}
    for zone in ("UTC", "Asia/Kolkata", "America/Los_Angeles"):
        done = subprocess.run([sys.executable, "-c", HASH_IN_ZONE, line], env={**os.environ, "TZ": zone},
                              capture_output=True, text=True, timeout=120, check=True)
        session_zone, digest = json.loads(done.stdout)
        assert session_zone == zone  # DuckDB took the machine's zone
        hashes[zone] = digest
    assert len(set(hashes.values())) == 1, hashes
