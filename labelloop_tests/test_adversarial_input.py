"""Hostile landing input, table-driven: every kind of bad line, field or file ends in quarantine
with its specific reason code (or is stored verbatim as data, where the contract says so), the
valid records beside it are stored, the counts reconcile per file and in total, and no table is
harmed. Each case is one named kind; test_there_are_at_least_30_kinds counts them."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from labelloop_assets.checks.schema_checks import RAW_CORRECTIONS_RECONCILE
from labelloop_assets.core import anonymize, contracts, ingest, review, signing, store
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.settings import Home
from labelloop_assets.jobs import INGEST_JOB
from labelloop_tests.conftest import correction as vote
from labelloop_tests.conftest import give_keys, land_items, make_items, set_yaml, signed, write_jsonl

KEY = b"adversarial-test-key"
FEATURES = [0.5, 1.0, 1.5, 2.0]
SQL = "'; DROP TABLE raw_corrections; --"
PATH = "../../etc/passwd"
TABLES = {"items": ("items", "item_id"), "predictions": ("predictions", "prediction_id"),
          "corrections": ("raw_corrections", "event_id"), "reviews": ("review_decisions", "decision_id")}


def correction(event_id: str, item_id: str = "i1", **overrides) -> dict:
    record = {
        "event_id": event_id, "item_id": item_id, "corrected_label": "five", "user_id": "alice",
        "user_role": "annotator", "source": "annotation", "consent": True,
        "created_at": "2024-05-01T12:00:00Z",
    }
    record.update(overrides)
    return record


def prediction(prediction_id: str, item_id: str = "i1", **overrides) -> dict:
    record = {
        "prediction_id": prediction_id, "item_id": item_id, "model_version": "m-001",
        "predicted_label": "three", "confidence": 0.75, "served_at": "2024-05-01T11:00:00Z",
    }
    record.update(overrides)
    return record


def item(item_id: str, **overrides) -> dict:
    record = {"item_id": item_id, "features": FEATURES, "initial_label": "three"}
    record.update(overrides)
    return record


# Signing keys: the template home registers reviewer-0's and expert-0's; the stranger's is
# registered nowhere.
SIGNERS = {name: signing.generate() for name in ("reviewer-0", "expert-0", "stranger")}


def decision(decision_id: str, signed_by: str | None = "reviewer-0", **overrides) -> dict:
    """A review decision, signed (after the overrides) with `signed_by`'s key; None leaves it unsigned."""
    record = {
        "decision_id": decision_id, "escalation_id": "esc-i1-1", "decision": "reject",
        "reviewer_id": "reviewer-0", "rationale": "looks right", "decided_at": "2024-05-02T09:00:00Z",
    }
    record.update(overrides)
    return signing.sign_review(SIGNERS[signed_by], record) if signed_by else record


def raw(record: dict, field_name: str, json_text: str) -> str:
    """A record whose field holds JSON text json.dumps would never write (NaN, 1e999, ...)."""
    return json.dumps({**record, field_name: "@@"}).replace('"@@"', json_text)


def nested(depth: int, leaf: str = "1", key: str = "a") -> str:
    """`depth` levels of JSON objects, built as text: the json module would recurse."""
    return f'{{"{key}":' * depth + leaf + "}" * depth


def encode(line) -> bytes:
    if isinstance(line, bytes):
        return line
    return (line if isinstance(line, str) else json.dumps(line)).encode("utf-8")


def jsonl(lines: list, end: bytes = b"\n") -> bytes:
    return b"".join(encode(line) + end for line in lines)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """A landing folder's new files and what ingesting them must do.

    `files` maps a file name to lines (a list), raw bytes, a Parquet frame, or a writer
    `f(path)`; `quarantined` maps (file, line number or None for the whole file) to the reason;
    `accepted` are the record ids stored from these files; `earlier` files are ingested first
    (for replays)."""

    files: dict[str, object]
    quarantined: dict[tuple[str, int | None], str]
    accepted: tuple[str, ...]
    kind: str = "corrections"
    blank: int = 0
    earlier: dict[str, list] = field(default_factory=dict)
    check: Callable | None = None  # check(con): what the stored rows must look like
    not_read: tuple[str, ...] = ()  # names that must not be ingested (temp names, folders)
    detail: str | None = None  # a substring every quarantine detail of the case holds


NEIGHBOURS = {
    "corrections": (correction("ok-1"), correction("ok-2", item_id="i2")),
    "predictions": (prediction("ok-1"), prediction("ok-2", item_id="i2")),
    "items": (item("ok-1"), item("ok-2")),
}


def between(bad, reason: str | None, kind: str = "corrections", *, detail: str | None = None,
            record_id: str = "bad", check: Callable | None = None) -> Case:
    """The bad line is line 2 of three; reason None means the contract accepts it as data."""
    first, last = NEIGHBOURS[kind]
    accepted = ("ok-1", "ok-2") if reason else ("ok-1", record_id, "ok-2")
    return Case(
        files={"batch.jsonl": [first, bad, last]},
        quarantined={("batch.jsonl", 2): reason} if reason else {},
        accepted=accepted, kind=kind, detail=detail, check=check,
    )


def stored(con, sql: str, params=None) -> list[tuple]:
    return con.execute(sql, params or []).fetchall()


def _stored_verbatim(con) -> None:
    rows = {r["event_id"]: r for r in store.frame(con, "SELECT * FROM raw_corrections").to_dicts()}
    for text in (SQL, PATH):
        record = rows[f"text-{FREE_TEXTS.index(text)}"]
        assert (record["prediction_id"], record["rationale"]) == (text, text)
        assert json.loads(record["context"]) == {text: text}
        assert record["user_pseudonym"] == anonymize.pseudonym(KEY, f"{text} (user)")


def _sql_and_path_lines() -> tuple[list, dict[int, str]]:
    """Every checked text field of a correction, once holding SQL and once a path."""
    checked = {"item_id": contracts.UNKNOWN_ITEM, "corrected_label": contracts.UNKNOWN_LABEL,
               "original_label": contracts.UNKNOWN_LABEL, "user_role": contracts.INVALID_VALUE,
               "source": contracts.INVALID_VALUE, "created_at": contracts.BAD_TIMESTAMP,
               "model_version": contracts.UNKNOWN_MODEL_VERSION}
    lines, reasons = [correction("ok-1")], {}
    for n, text in enumerate((SQL, PATH)):
        for name, reason in checked.items():
            lines.append(correction(f"{name}-{n}", **{name: text}))
            reasons[len(lines)] = reason
        # An event id is scoped by its producer's folder: '/' may not be part of it.
        lines.append(correction(text))
        reasons[len(lines)] = contracts.INVALID_VALUE if "/" in text else None
    reasons = {line: reason for line, reason in reasons.items() if reason}
    lines.append(correction("ok-2", item_id="i2"))
    return lines, reasons


SQL_PATH_LINES, SQL_PATH_REASONS = _sql_and_path_lines()
FREE_TEXTS = (SQL, PATH)


def _label_is(label: str) -> Callable:
    def check(con) -> None:
        assert stored(con, "SELECT corrected_label FROM raw_corrections WHERE event_id = 'bad'") == [(label,)]
    return check


def _oversized_file(path: Path) -> None:
    # Sparse: the size is real, the disk blocks are not.
    with path.open("wb") as handle:
        handle.truncate(contracts.MAX_FILE_BYTES + 1)


def _truncated_parquet(path: Path) -> None:
    pl.DataFrame([correction("pq-1")]).write_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _link_to_a_file_outside(path: Path) -> None:
    secret = path.parent.parent.parent / "outside-secret.jsonl"
    secret.write_bytes(jsonl([correction("secret-1")]) + b"password=hunter2\n")
    path.symlink_to(secret)


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "gone.jsonl")


def _in_the_future(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


BAD_UTF8 = json.dumps(correction("bad")).encode().replace(b'"bad"', b'"b\xff\xfead"')
REPLACEMENT_CHAR_LINE = json.dumps(correction("ok-3", item_id="i3", rationale="a \ufffd in text"),
                                   ensure_ascii=False).encode()
TEN_MB = 10 * 1024 * 1024

CASES: dict[str, Case] = {
    # ---- lines that are not one JSON object
    "truncated_json": between(json.dumps(correction("bad"))[:60], contracts.MALFORMED_JSON),
    "two_objects_on_one_line": between(json.dumps(correction("bad")) * 2, contracts.MALFORMED_JSON),
    "single_quoted_pseudo_json": between(json.dumps(correction("bad")).replace('"', "'"),
                                         contracts.MALFORMED_JSON),
    # Which of two equal keys wins differs between parsers: refused, never guessed.
    "duplicate_key_with_another_value": between(
        json.dumps(correction("bad"))[:-1] + ', "corrected_label": "six"}', contracts.MALFORMED_JSON,
        detail="more than once",
    ),
    "duplicate_key_spelled_with_an_escape": between(
        json.dumps(correction("bad"))[:-1] + ', "corrected\\u005flabel": "six"}', contracts.MALFORMED_JSON,
        detail="more than once",
    ),
    "lone_surrogate_escape": between(raw(correction("bad"), "rationale", '"a\\ud800b"'),
                                     contracts.MALFORMED_JSON),
    "raw_control_character_in_string": between(raw(correction("bad"), "rationale", '"a\x01b"'),
                                               contracts.MALFORMED_JSON),
    "json_array_line": between('["bad", "i1", "five"]', contracts.NOT_AN_OBJECT),
    "json_string_line": between('"bad"', contracts.NOT_AN_OBJECT),
    "json_number_line": between("42", contracts.NOT_AN_OBJECT),
    "json_null_line": between("null", contracts.NOT_AN_OBJECT),
    # ---- bytes that are not UTF-8
    "invalid_utf8_bytes": between(BAD_UTF8, contracts.INVALID_ENCODING),
    "utf8_encoded_surrogate": between(
        json.dumps(correction("bad")).encode().replace(b'"bad"', b'"\xed\xa0\x80"'), contracts.INVALID_ENCODING
    ),
    "overlong_utf8_slash_in_a_path": between(
        json.dumps(correction("bad", rationale="@")).encode().replace(b"@", b"..\xc0\xaf..\xc0\xafetc"),
        contracts.INVALID_ENCODING,
    ),
    "utf16_file": Case(
        files={"utf16.jsonl": jsonl(list(NEIGHBOURS["corrections"])).decode().encode("utf-16")},
        quarantined={("utf16.jsonl", None): contracts.INVALID_ENCODING}, accepted=(), detail="UTF-16",
    ),
    # Bad bytes elsewhere in the file do not make a literal U+FFFD in a valid line suspect.
    "replacement_character_beside_bad_bytes": Case(
        files={"batch.jsonl": [REPLACEMENT_CHAR_LINE, BAD_UTF8, correction("ok-2", item_id="i2")]},
        quarantined={("batch.jsonl", 2): contracts.INVALID_ENCODING}, accepted=("ok-3", "ok-2"),
    ),
    # ---- missing fields and nulls
    "empty_object": between("{}", contracts.MISSING_FIELD, detail="event_id"),
    "null_in_required_string": between(correction("bad", user_id=None), contracts.MISSING_FIELD,
                                       detail="user_id"),
    "null_consent": between(correction("bad", consent=None), contracts.MISSING_FIELD, detail="consent"),
    # ---- wrong types
    "number_where_a_string_belongs": between(correction(12345), contracts.INVALID_TYPE, detail="event_id"),
    "string_where_a_bool_belongs": between(correction("bad", consent="true"), contracts.INVALID_TYPE,
                                           detail="consent"),
    "string_where_a_number_belongs": between(correction("bad", user_confidence="0.9"),
                                             contracts.INVALID_TYPE, detail="user_confidence"),
    "bool_where_a_number_belongs": between(correction("bad", user_confidence=True),
                                           contracts.INVALID_TYPE, detail="user_confidence"),
    "epoch_number_where_a_timestamp_belongs": between(correction("bad", created_at=1714564800),
                                                      contracts.INVALID_TYPE, detail="created_at"),
    "array_where_context_object_belongs": between(correction("bad", context=[1, 2]),
                                                  contracts.INVALID_TYPE, detail="context"),
    "20000_nested_arrays_where_a_string_belongs": between(
        raw(correction("bad"), "rationale", "[" * 20_000 + "]" * 20_000), contracts.INVALID_TYPE,
        detail="rationale",
    ),
    # ---- values outside the contract
    "empty_required_string": between(correction("bad", item_id=""), contracts.INVALID_VALUE,
                                     detail="item_id: empty"),
    "whitespace_only_id": between(correction(" \t "), contracts.INVALID_VALUE, detail="event_id: empty"),
    # Ids are looked up by value, and on the lake a NUL in one ended DuckLake's pruning query early:
    # the line failed the whole run. Free text keeps it as data.
    "nul_character_in_an_item_id": between(correction("bad", item_id="item-\u0000-1"), contracts.INVALID_VALUE,
                                           detail="item_id: holds a NUL character"),
    # ...but not as a way past the scrubber: a NUL between digits hid a card or an id from it.
    "nul_characters_inside_personal_data_in_free_text": between(
        correction("bad", rationale="card 4111 1111 1111\u00001111", context={"note": "ssn 123-45\u0000-6789"}),
        None,
        check=lambda con: stored(con, "SELECT rationale, context FROM raw_corrections WHERE event_id = 'bad'")
        == [("card [card-or-account]", '{"note":"ssn [national-id]"}')],
    ),
    "nul_character_in_a_rationale_is_data": between(
        correction("bad", rationale="see\u0000here"), None,
        check=lambda con: stored(con, "SELECT rationale FROM raw_corrections WHERE event_id = 'bad'")
        == [("see\x00here",)],
    ),
    "role_outside_the_list": between(correction("bad", user_role="admin"), contracts.INVALID_VALUE,
                                     detail="user_role"),
    "source_in_other_case": between(correction("bad", source="Annotation"), contracts.INVALID_VALUE,
                                    detail="source"),
    # ---- sizes (a line over 64 KiB is refused before it is parsed)
    "rationale_of_10_mb": between(correction("bad", rationale="x" * TEN_MB), contracts.OVERSIZE_LINE),
    "rationale_of_2001_chars": between(correction("bad", rationale="é" * 2001), contracts.OVERSIZE_FIELD,
                                       detail="rationale"),
    "rationale_of_2000_multibyte_chars_is_at_the_limit": between(
        correction("bad", rationale="é" * 2000), None,
        check=lambda con: stored(con, "SELECT length(rationale) FROM raw_corrections WHERE event_id = 'bad'")
        == [(2000,)],
    ),
    "id_of_257_chars": between(correction("e" * 257), contracts.OVERSIZE_FIELD, detail="event_id"),
    "context_over_16_kib": between(correction("bad", context={"pad": "x" * 17_000}),
                                   contracts.OVERSIZE_FIELD, detail="context"),
    "context_nested_10000_levels": between(raw(correction("bad"), "context", nested(10_000)),
                                           contracts.OVERSIZE_FIELD, detail="context"),
    # Deep nesting within the size limit is parsed without recursion and stored as it came.
    "context_nested_8000_levels_under_the_limit": between(
        raw(correction("bad"), "context", '{"a":' + "[" * 8000 + "]" * 8000 + "}"), None,
        check=lambda con: stored(con, "SELECT length(context) FROM raw_corrections WHERE event_id = 'bad'")
        == [(len('{"a":}') + 16_000,)],
    ),
    # Fields outside the contract are ignored, however deep.
    "unknown_field_nested_25000_levels": between(
        raw(correction("bad"), "extra", "[" * 25_000 + "]" * 25_000), None
    ),
    # ---- timestamps
    "timestamp_without_zone": between(correction("bad", created_at="2024-05-01T12:00:00"),
                                      contracts.BAD_TIMESTAMP, detail="created_at"),
    "date_without_time": between(correction("bad", created_at="2024-05-01"), contracts.BAD_TIMESTAMP),
    "impossible_date": between(correction("bad", created_at="2024-02-30T10:00:00Z"), contracts.BAD_TIMESTAMP),
    "zone_offset_of_24_hours": between(correction("bad", created_at="2024-05-01T12:00:00+24:00"),
                                       contracts.BAD_TIMESTAMP),
    "timestamp_in_year_9999": between(correction("bad", created_at="9999-12-31T23:59:59Z"),
                                      contracts.OUT_OF_RANGE, detail="created_at: more than 1 day in the future"),
    "timestamp_two_days_ahead": between(correction("bad", created_at=_in_the_future(2)),
                                        contracts.OUT_OF_RANGE, detail="in the future"),
    "timestamp_an_hour_ahead_is_clock_skew": between(correction("bad", created_at=_in_the_future(1 / 24)), None),
    "timestamp_in_year_1": between(correction("bad", created_at="0001-01-01T00:00:00Z"),
                                   contracts.OUT_OF_RANGE, detail="created_at: before 2000-01-01"),
    "timestamp_in_year_0": between(correction("bad", created_at="0000-01-01T00:00:00Z"),
                                   contracts.OUT_OF_RANGE, detail="before 2000-01-01"),
    "unset_clock_1970": between(correction("bad", created_at="1970-01-01T00:00:00Z"),
                                contracts.OUT_OF_RANGE, detail="before 2000-01-01"),
    # ---- numbers that are not finite
    "nan_user_confidence": between(raw(correction("bad"), "user_confidence", "NaN"),
                                   contracts.OUT_OF_RANGE, detail="user_confidence"),
    "infinity_user_confidence": between(raw(correction("bad"), "user_confidence", "Infinity"),
                                        contracts.OUT_OF_RANGE, detail="user_confidence"),
    "minus_infinity_user_confidence": between(raw(correction("bad"), "user_confidence", "-Infinity"),
                                              contracts.OUT_OF_RANGE, detail="user_confidence"),
    "1e999_user_confidence": between(raw(correction("bad"), "user_confidence", "1e999"),
                                     contracts.OUT_OF_RANGE, detail="user_confidence"),
    "nan_prediction_confidence": between(raw(prediction("bad"), "confidence", "NaN"),
                                         contracts.OUT_OF_RANGE, "predictions", detail="confidence"),
    "1e999_prediction_confidence": between(raw(prediction("bad"), "confidence", "1e999"),
                                           contracts.OUT_OF_RANGE, "predictions", detail="confidence"),
    "nan_probability": between(raw(prediction("bad"), "probabilities", '{"three": NaN}'),
                               contracts.OUT_OF_RANGE, "predictions", detail="probabilities"),
    "infinite_probability": between(raw(prediction("bad"), "probabilities", '{"three": 1e999}'),
                                    contracts.OUT_OF_RANGE, "predictions", detail="probabilities"),
    "negative_probability": between(prediction("bad", probabilities={"three": -3}),
                                    contracts.OUT_OF_RANGE, "predictions", detail="probabilities"),
    "served_in_year_9999": between(prediction("bad", served_at="9999-01-01T00:00:00Z"),
                                   contracts.OUT_OF_RANGE, "predictions", detail="served_at"),
    "nan_feature": between(raw(item("bad"), "features", "[NaN, 1, 2, 3]"), contracts.INVALID_VALUE,
                           "items", detail="finite"),
    "infinite_feature": between(raw(item("bad"), "features", "[1, Infinity, 2, 3]"),
                                contracts.INVALID_VALUE, "items", detail="finite"),
    "1e999_feature": between(raw(item("bad"), "features", "[1, 2, 1e999, 3]"), contracts.INVALID_VALUE,
                             "items", detail="finite"),
    "string_feature": between(item("bad", features=["1", 2, 3, 4]), contracts.INVALID_TYPE, "items",
                              detail="features"),
    "features_nested_20000_levels": between(raw(item("bad"), "features", "[" * 20_000 + "]" * 20_000),
                                            contracts.INVALID_TYPE, "items", detail="features"),
    "4097_features": between(item("bad", features=[1.0] * 4097), contracts.OVERSIZE_FIELD, "items",
                             detail="features"),
    # ---- labels: exact terms after trimming whitespace; look-alikes are never guessed
    "label_with_cyrillic_o": between(correction("bad", corrected_label="\u043ene"), contracts.UNKNOWN_LABEL,
                                     detail="not repeated here"),
    "label_in_full_width_letters": between(correction("bad", corrected_label="ｏｎｅ"),
                                           contracts.UNKNOWN_LABEL, detail="not repeated here"),
    "label_with_zero_width_space": between(correction("bad", corrected_label="one\u200b"),
                                           contracts.UNKNOWN_LABEL),
    "label_in_other_case": between(correction("bad", corrected_label="ONE"), contracts.UNKNOWN_LABEL,
                                   detail="not a term of the ontology"),
    "original_label_with_cyrillic_o": between(correction("bad", original_label="\u043ene"),
                                              contracts.UNKNOWN_LABEL, detail="original_label"),
    "label_with_surrounding_spaces_and_tab": between(correction("bad", corrected_label="  one\t"), None,
                                                     check=_label_is("one")),
    "label_with_surrounding_no_break_spaces": between(correction("bad", corrected_label="\u00a0one\u00a0"),
                                                      None, check=_label_is("one")),
    # ---- references
    "unknown_item": between(correction("bad", item_id="no-such-item"), contracts.UNKNOWN_ITEM),
    # Ids are compared exactly (only ASCII spaces, tabs and line breaks are trimmed).
    "item_id_with_trailing_no_break_space": between(correction("bad", item_id="i1\u00a0"),
                                                    contracts.UNKNOWN_ITEM),
    "gold_item": between(correction("bad", item_id="g1"), contracts.GOLD_ITEM),
    "no_consent": between(correction("bad", consent=False), contracts.NO_CONSENT),
    "unknown_reviewer": Case(
        files={"r.jsonl": [decision("r-1", reviewer_id="mallory"), decision("r-2", reviewer_id=SQL)]},
        quarantined={("r.jsonl", 1): contracts.UNKNOWN_REVIEWER, ("r.jsonl", 2): contracts.UNKNOWN_REVIEWER},
        accepted=(), kind="reviews",
    ),
    # ---- reviewer actions that are not what their reviewer signed
    "review_unsigned_for_a_listed_reviewer": Case(
        files={"r.jsonl": [decision("r-1", signed_by=None),
                           {**decision("r-2", signed_by=None), "key_id": "", "signature": ""}]},
        quarantined={("r.jsonl", 1): contracts.UNSIGNED, ("r.jsonl", 2): contracts.INVALID_VALUE},
        accepted=(), kind="reviews",
    ),
    "review_changed_after_signing": Case(
        files={"r.jsonl": [{**decision("r-1"), "rationale": "changed"}, {**decision("r-2"), "decision": "defer"},
                           {**decision("r-3"), "decided_at": "2024-05-02T09:00:01Z"}]},
        quarantined={("r.jsonl", n): contracts.BAD_SIGNATURE for n in (1, 2, 3)},
        accepted=(), kind="reviews", detail="does not verify",
    ),
    "review_signature_replayed_under_a_new_decision_id": Case(
        files={"r.jsonl": [{**decision("r-1"), "decision_id": "r-2"}]},
        quarantined={("r.jsonl", 1): contracts.BAD_SIGNATURE}, accepted=(), kind="reviews",
    ),
    "review_signed_by_another_reviewer_or_a_stranger": Case(
        files={"r.jsonl": [decision("r-1", signed_by="expert-0"), decision("r-2", signed_by="stranger")]},
        quarantined={("r.jsonl", 1): contracts.BAD_SIGNATURE, ("r.jsonl", 2): contracts.UNKNOWN_KEY},
        accepted=(), kind="reviews",
    ),
    "review_with_hostile_key_id_and_signature": Case(
        files={"r.jsonl": [{**decision("r-1"), "key_id": SQL}, {**decision("r-2"), "signature": PATH},
                           {**decision("r-3"), "signature": 7}]},
        quarantined={("r.jsonl", 1): contracts.UNKNOWN_KEY, ("r.jsonl", 2): contracts.BAD_SIGNATURE,
                     ("r.jsonl", 3): contracts.INVALID_TYPE},
        accepted=(), kind="reviews",
    ),
    # Text a JSON parser reads but that cannot be encoded again: refused as malformed, never a crash.
    "review_with_lone_surrogate_in_signed_text": Case(
        files={"r.jsonl": [raw(decision("r-1"), "rationale", '"a\\ud800b"'),
                           raw(decision("r-2"), "extra", "[" * 3000 + "]" * 3000)]},
        quarantined={("r.jsonl", 1): contracts.MALFORMED_JSON, ("r.jsonl", 2): contracts.BAD_SIGNATURE},
        accepted=(), kind="reviews",
    ),
    "review_of_a_path_like_escalation": Case(
        files={"r.jsonl": [decision("r-1", escalation_id=PATH), decision("r-2", decision="DROP")]},
        quarantined={("r.jsonl", 1): contracts.UNKNOWN_ESCALATION, ("r.jsonl", 2): contracts.INVALID_VALUE},
        accepted=(), kind="reviews",
    ),
    # ---- duplicates and replays
    "same_event_twice_in_a_file": Case(
        files={"batch.jsonl": [correction("ok-1"), correction("ok-1"), correction("ok-2", item_id="i2")]},
        quarantined={("batch.jsonl", 2): contracts.DUPLICATE_EVENT}, accepted=("ok-1", "ok-2"),
    ),
    "same_event_id_other_payload_in_a_file": Case(
        files={"batch.jsonl": [correction("ok-1"), correction("ok-1", corrected_label="six"),
                               correction("ok-2", item_id="i2")]},
        quarantined={("batch.jsonl", 2): contracts.CONFLICTING_DUPLICATE}, accepted=("ok-1", "ok-2"),
    ),
    "event_replayed_in_a_later_file": Case(
        earlier={"day-1.jsonl": [correction("ok-1")]},
        files={"day-2.jsonl": [json.dumps(correction("ok-1"), indent=None, separators=(" , ", " : ")),
                               correction("ok-2", item_id="i2")]},
        quarantined={("day-2.jsonl", 1): contracts.DUPLICATE_EVENT}, accepted=("ok-2",),
    ),
    "event_resent_later_with_other_payload": Case(
        earlier={"day-1.jsonl": [correction("ok-1")]},
        files={"day-2.jsonl": [correction("ok-1", rationale="changed"), correction("ok-2", item_id="i2")]},
        quarantined={("day-2.jsonl", 1): contracts.CONFLICTING_DUPLICATE}, accepted=("ok-2",),
    ),
    # ---- SQL- and path-looking strings: data, never code
    "sql_and_paths_in_free_text_fields": Case(
        files={"batch.jsonl": [correction(f"text-{n}", user_id=f"{text} (user)",
                                          prediction_id=text, rationale=text, context={text: text})
                               for n, text in enumerate(FREE_TEXTS)]},
        quarantined={}, accepted=("text-0", "text-1"), check=_stored_verbatim,
    ),
    "sql_and_paths_in_checked_fields": Case(
        files={"batch.jsonl": SQL_PATH_LINES},
        quarantined={("batch.jsonl", n): reason for n, reason in SQL_PATH_REASONS.items()},
        accepted=("ok-1", "ok-2", SQL),
    ),
    "sql_and_paths_in_item_fields": Case(
        files={"batch.jsonl": [item(SQL, label_source=PATH), item(PATH, label_source=SQL),
                               item("bad", initial_label=SQL), item("bad-2", gold_label=PATH)]},
        # A landing line never declares gold, whatever its gold_label holds.
        quarantined={("batch.jsonl", 3): contracts.UNKNOWN_LABEL, ("batch.jsonl", 4): contracts.GOLD_NOT_DECLARED},
        accepted=(SQL, PATH), kind="items",
        check=lambda con: stored(con, "SELECT item_id, label_source FROM items WHERE item_id IN (?, ?) "
                                      "ORDER BY 1", [SQL, PATH]) == [(SQL, PATH), (PATH, SQL)],
    ),
    "sql_and_paths_in_prediction_fields": Case(
        files={"batch.jsonl": [prediction(SQL), prediction(PATH),
                               prediction("bad", predicted_label=SQL), prediction("bad-2", item_id=PATH),
                               prediction("bad-3", model_version=SQL), prediction("bad-4", model_version=PATH)]},
        # A model version must name a trained or declared model: hostile text names none.
        quarantined={("batch.jsonl", 3): contracts.UNKNOWN_LABEL, ("batch.jsonl", 4): contracts.UNKNOWN_ITEM,
                     ("batch.jsonl", 5): contracts.UNKNOWN_MODEL_VERSION,
                     ("batch.jsonl", 6): contracts.UNKNOWN_MODEL_VERSION},
        accepted=(SQL, PATH), kind="predictions",
        check=lambda con: stored(con, "SELECT prediction_id, model_version FROM predictions "
                                      "WHERE prediction_id IN (?, ?) ORDER BY 1", [SQL, PATH])
        == [(SQL, "m-001"), (PATH, "m-001")],
    ),
    "sql_in_a_file_name": Case(
        files={f"{SQL}.jsonl": list(NEIGHBOURS["corrections"])}, quarantined={}, accepted=("ok-1", "ok-2"),
    ),
    # ---- files and line endings
    "utf8_byte_order_mark_before_line_1": Case(
        files={"bom.jsonl": b"\xef\xbb\xbf" + jsonl(list(NEIGHBOURS["corrections"]))},
        quarantined={}, accepted=("ok-1", "ok-2"),
        check=lambda con: stored(con, "SELECT event_id, line_no FROM raw_corrections ORDER BY 2")
        == [("ok-1", 1), ("ok-2", 2)],
    ),
    "byte_order_marks_of_concatenated_files": Case(
        files={"cat.jsonl": b"\xef\xbb\xbf" + jsonl([correction("ok-1")])
               + b"\xef\xbb\xbf" + jsonl([correction("ok-2", item_id="i2")])},
        quarantined={}, accepted=("ok-1", "ok-2"),
    ),
    "crlf_line_endings": Case(
        files={"crlf.jsonl": jsonl(list(NEIGHBOURS["corrections"]), end=b"\r\n")},
        quarantined={}, accepted=("ok-1", "ok-2"),
    ),
    # Old Mac line breaks are not JSON Lines: the whole text is one line, and not valid JSON.
    "carriage_return_only_line_endings": Case(
        files={"cr.jsonl": jsonl(list(NEIGHBOURS["corrections"]), end=b"\r")},
        quarantined={("cr.jsonl", 1): contracts.MALFORMED_JSON}, accepted=(),
    ),
    "final_line_without_newline": Case(
        files={"last.jsonl": jsonl([correction("ok-1")]) + encode(correction("ok-2", item_id="i2"))},
        quarantined={}, accepted=("ok-1", "ok-2"),
    ),
    # A writer that did not write atomically and was read mid-write: the cut line is quarantined
    # (the ledger then holds the file: producers must write to a temp name and rename).
    "final_line_cut_off_mid_write": Case(
        files={"cut.jsonl": jsonl(list(NEIGHBOURS["corrections"])) + encode(correction("ok-3"))[:50]},
        quarantined={("cut.jsonl", 3): contracts.MALFORMED_JSON}, accepted=("ok-1", "ok-2"),
    ),
    "empty_file": Case(files={"empty.jsonl": b""}, quarantined={}, accepted=()),
    "only_blank_lines": Case(files={"blank.jsonl": b"\n  \n\t\r\n\n"}, quarantined={}, accepted=(), blank=4),
    "blank_lines_between_records": Case(
        files={"gaps.jsonl": b"\n" + jsonl([correction("ok-1"), "   ", ""])
               + jsonl([correction("ok-2", item_id="i2")])},
        quarantined={}, accepted=("ok-1", "ok-2"), blank=3,
        check=lambda con: stored(con, "SELECT line_no FROM raw_corrections ORDER BY 1") == [(2,), (5,)],
    ),
    "unsupported_suffixes": Case(
        files={"export.csv": b"event_id,item_id\nx,i1\n", "export.json": jsonl([correction("x")]),
               "export": jsonl([correction("y")]), "export.ndjson": jsonl([correction("z")])},
        quarantined={(name, None): contracts.UNSUPPORTED_FORMAT
                     for name in ("export.csv", "export.json", "export", "export.ndjson")},
        accepted=(),
    ),
    "suffix_in_upper_case": Case(files={"UPPER.JSONL": list(NEIGHBOURS["corrections"])}, quarantined={},
                                 accepted=("ok-1", "ok-2")),
    # Whoever can write to the landing zone must not make labelloop read other files through it.
    "symlink_to_a_file_outside_the_landing_zone": Case(
        files={"link.jsonl": _link_to_a_file_outside, "small.jsonl": list(NEIGHBOURS["corrections"])},
        quarantined={("link.jsonl", None): contracts.UNREADABLE_FILE}, accepted=("ok-1", "ok-2"),
        detail="symbolic link",
        # Not even a digest of the target is kept.
        check=lambda con: stored(con, "SELECT line_sha256 FROM quarantine WHERE source_file LIKE '%link.jsonl'")
        == [(None,)],
    ),
    "dangling_symlink": Case(
        files={"dangling.jsonl": _dangling_link}, quarantined={("dangling.jsonl", None): contracts.UNREADABLE_FILE},
        accepted=(), detail="symbolic link",
    ),
    "file_over_512_mib": Case(
        files={"huge.jsonl": _oversized_file, "small.jsonl": list(NEIGHBOURS["corrections"])},
        quarantined={("huge.jsonl", None): contracts.FILE_TOO_LARGE}, accepted=("ok-1", "ok-2"),
    ),
    "files_still_being_written": Case(
        files={".c.jsonl.tmp": [correction("never")], "c.jsonl.tmp": [correction("never")],
               "c.jsonl.part": [correction("never")], "c.jsonl.partial": [correction("never")],
               "_c.jsonl": [correction("never")], "done.jsonl": list(NEIGHBOURS["corrections"])},
        quarantined={}, accepted=("ok-1", "ok-2"),
        not_read=(".c.jsonl.tmp", "c.jsonl.tmp", "c.jsonl.part", "c.jsonl.partial", "_c.jsonl"),
    ),
    # A folder in a landing folder is a producer's, whatever its name: its files are read, and
    # their event ids are scoped by it.
    "folder_named_like_a_landing_file": Case(
        files={"folder.jsonl/inner.jsonl": [correction("inner")], "done.jsonl": list(NEIGHBOURS["corrections"])},
        quarantined={}, accepted=("ok-1", "ok-2", "folder.jsonl/inner"),
    ),
    # The JSON reader tolerates a trailing comma: the record is unambiguous, so it is kept.
    "trailing_comma_is_tolerated": between(json.dumps(correction("bad"))[:-1] + ",}", None),
    # ---- Parquet
    "parquet_with_a_foreign_schema": Case(
        files={"foreign.parquet": pl.DataFrame({"foo": [1, 2], "bar": ["x", "y"]})},
        quarantined={("foreign.parquet", 1): contracts.MISSING_FIELD,
                     ("foreign.parquet", 2): contracts.MISSING_FIELD},
        accepted=(), detail="event_id",
    ),
    "parquet_with_a_wrongly_typed_column": Case(
        files={"typed.parquet": pl.DataFrame([correction("pq-1", consent="yes"),
                                              correction("pq-2", consent="no")])},
        quarantined={("typed.parquet", 1): contracts.INVALID_TYPE, ("typed.parquet", 2): contracts.INVALID_TYPE},
        accepted=(), detail="consent",
    ),
    "parquet_with_nan_confidence": Case(
        files={"nan.parquet": pl.DataFrame([correction("pq-1", user_confidence=float("nan")),
                                            correction("pq-2", item_id="i2", user_confidence=0.5)])},
        quarantined={("nan.parquet", 1): contracts.OUT_OF_RANGE}, accepted=("pq-2",),
    ),
    "parquet_with_a_zoneless_timestamp_column": Case(
        files={"naive.parquet": pl.DataFrame([{**correction("pq-1"), "created_at": datetime(2024, 5, 1, 12)}])},
        quarantined={("naive.parquet", 1): contracts.BAD_TIMESTAMP}, accepted=(),
    ),
    "parquet_that_is_not_parquet": Case(
        files={"fake.parquet": jsonl(list(NEIGHBOURS["corrections"])), "ok.jsonl": [correction("ok-1")]},
        quarantined={("fake.parquet", None): contracts.UNREADABLE_FILE}, accepted=("ok-1",),
    ),
    "parquet_cut_in_half": Case(
        files={"half.parquet": _truncated_parquet},
        quarantined={("half.parquet", None): contracts.UNREADABLE_FILE}, accepted=(),
    ),
    "parquet_without_rows": Case(
        files={"none.parquet": pl.DataFrame([correction("pq-1")]).head(0)}, quarantined={}, accepted=(),
    ),
}


def test_there_are_at_least_30_kinds():
    assert len(CASES) >= 30
    quarantined = {reason for case in CASES.values() for reason in case.quarantined.values()}
    # Every line- and file-level reason a landing file can earn is exercised here.
    assert quarantined >= {
        contracts.MALFORMED_JSON, contracts.NOT_AN_OBJECT, contracts.INVALID_ENCODING,
        contracts.OVERSIZE_LINE, contracts.MISSING_FIELD, contracts.INVALID_TYPE, contracts.INVALID_VALUE,
        contracts.OUT_OF_RANGE, contracts.BAD_TIMESTAMP, contracts.OVERSIZE_FIELD, contracts.UNKNOWN_LABEL,
        contracts.UNKNOWN_ITEM, contracts.GOLD_ITEM, contracts.NO_CONSENT, contracts.DUPLICATE_EVENT,
        contracts.CONFLICTING_DUPLICATE, contracts.UNKNOWN_REVIEWER, contracts.UNKNOWN_ESCALATION,
        contracts.UNREADABLE_FILE, contracts.UNSUPPORTED_FORMAT, contracts.FILE_TOO_LARGE,
        contracts.GOLD_NOT_DECLARED,
    }


# --------------------------------------------------------------------------- the driver


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A home whose DuckDB file holds items i1..i4 (4 features) and gold item g1 (declared in
    gold.jsonl); each test works on its own copy."""
    home = Home(tmp_path_factory.mktemp("template") / "home").ensure()
    with home.training_file.open("a") as config:  # the model that served the predictions below
        config.write("external_model_versions: [m-001]\n")
    with store.connect(home.database) as con:
        (home.landing_dir("items") / "base.jsonl").write_bytes(jsonl([item(f"i{n}") for n in range(1, 5)]))
        home.gold_file.write_bytes(jsonl([{"item_id": "g1", "features": FEATURES, "gold_label": "four"}]))
        assert run_ingest(con, home, "items").accepted == 4
    home.contributors_file.write_text("contributors:\n" + "".join(
        f"  - {{id: {name}, role: {role}, keys: [{{public_key: '{signing.public_key_text(SIGNERS[name])}'}}]}}\n"
        for name, role in (("reviewer-0", "reviewer"), ("expert-0", "domain_expert"))
    ))
    return home.root


@pytest.fixture
def seeded(template: Path, tmp_path: Path):
    home = Home(Path(shutil.copytree(template, tmp_path / "home")))
    with store.connect(home.database) as con:
        yield home, con


def run_ingest(con, home: Home, kind: str) -> ingest.IngestReport:
    ontology = Ontology.load(home.ontology_file)
    if kind == "items":
        return ingest.ingest_items(con, home, ontology, "run-adv")
    if kind == "predictions":
        return ingest.ingest_predictions(con, home, ontology, "run-adv")
    if kind == "reviews":
        policy = ResolutionPolicy.load(home.governance_file)
        return review.ingest_reviews(con, home, ontology, KEY, review.directory(home), policy, "run-adv")[0]
    return ingest.ingest_corrections(con, home, ontology, KEY, "run-adv")


def write(folder: Path, name: str, content) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)  # a producer's subfolder
    if callable(content):
        content(path)
    elif isinstance(content, pl.DataFrame):
        content.write_parquet(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(jsonl(content))


def records_in_file(path: Path) -> int:
    """Non-blank lines of a JSON Lines file, counted without the parser under test."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = data.split(b"\n")
    lines = lines[:-1] if lines[-1] == b"" else lines
    return sum(1 for line in lines if line.strip(b" \t\r\n"))


def table_names(con) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
    ).fetchall()]


def _ids_from(con, kind: str, sources: list[str]) -> list[str]:
    table, key = TABLES[kind]
    return [r[0] for r in con.execute(
        f"SELECT {key} FROM {table} WHERE list_contains(?, source_file) ORDER BY {key}", [sources]
    ).fetchall()]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_lands_in_quarantine_with_its_reason_and_valid_records_flow(seeded, name):
    home, con = seeded
    case = CASES[name]
    folder = home.landing_dir(case.kind)
    tables = table_names(con)
    if case.earlier:
        for file_name, lines in case.earlier.items():
            write(folder, file_name, lines)
        assert run_ingest(con, home, case.kind).quarantined == 0
    for file_name, content in case.files.items():
        write(folder, file_name, content)
    read = [f for f in case.files if f not in case.not_read]
    sources = [f"{case.kind}/{f}" for f in read]

    tracemalloc.start()
    try:
        report = run_ingest(con, home, case.kind)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Only the files that are landed are read; each of them once.
    assert report.files == sorted(sources)
    rows = store.frame(
        con, "SELECT * FROM quarantine WHERE list_contains(?, source_file)", [sources]
    ).to_dicts()
    assert {(r["source_file"].split("/", 1)[1], r["line_no"]): r["reason"] for r in rows} == case.quarantined
    assert len(rows) == len(case.quarantined)
    if case.detail:
        assert all(case.detail in r["detail"] for r in rows), [r["detail"] for r in rows]
    # The raw line is never kept, only its hash.
    assert all(r["line_sha256"] is None or len(r["line_sha256"]) == 64 for r in rows)
    assert _ids_from(con, case.kind, sources) == sorted(case.accepted)

    # Records in = accepted + quarantined: in the report, per file in the ledger, and against
    # the file's own lines.
    assert report.reconciles and report.blank_lines == case.blank
    assert (report.accepted, report.quarantined) == (len(case.accepted), len(case.quarantined))
    assert report.reasons == dict(Counter(case.quarantined.values()))
    ledger = {r["path"]: r for r in store.frame(
        con, "SELECT * FROM ingested_files WHERE list_contains(?, path)", [sources]
    ).to_dicts()}
    assert sorted(ledger) == sorted(sources)
    for file_name in read:
        entry = ledger[f"{case.kind}/{file_name}"]
        quarantined_here = sum(1 for (f, _) in case.quarantined if f == file_name)
        assert entry["records_in"] == entry["accepted"] + entry["quarantined"]
        assert entry["quarantined"] == quarantined_here
        assert entry["accepted"] == len(_ids_from(con, case.kind, [f"{case.kind}/{file_name}"]))
        whole_file = (file_name, None) in case.quarantined
        if file_name.lower().endswith(".jsonl") and not whole_file:
            assert entry["records_in"] == records_in_file(folder / file_name)
    assert sum(e["records_in"] for e in ledger.values()) == report.records_in

    # Hostile text never became SQL: every table is still there.
    assert table_names(con) == tables
    if case.check:
        assert case.check(con) in (None, True)
    # Memory stays bounded by the line limit, not by what a file claims to hold.
    assert peak < (128 if name == "rationale_of_10_mb" else 64) * 1024 * 1024

    # Idempotent: nothing is read twice.
    counts = {t: store.scalar(con, f"SELECT count(*) FROM {t}") for t in ("quarantine", "ingested_files")}
    again = run_ingest(con, home, case.kind)
    assert (again.files, again.records_in) == ([], 0)
    assert counts == {t: store.scalar(con, f"SELECT count(*) FROM {t}") for t in counts}


def test_a_file_is_ingested_once_it_is_renamed_from_its_temp_name(seeded):
    home, con = seeded
    folder = home.landing_dir("corrections")
    temp = folder / ".day-1.jsonl.part"
    temp.write_bytes(jsonl([correction("late-1")]))
    assert run_ingest(con, home, "corrections").files == []
    os.replace(temp, folder / "day-1.jsonl")
    report = run_ingest(con, home, "corrections")
    assert (report.files, report.accepted) == (["corrections/day-1.jsonl"], 1)
    assert stored(con, "SELECT event_id FROM raw_corrections") == [("late-1",)]


# --------------------------------------------------------------------------- through Dagster


def _check_passed(result: dg.ExecuteInProcessResult, name: str) -> bool:
    return [e.passed for e in result.get_asset_check_evaluations() if e.check_name == name] == [True]


@pytest.mark.slow
def test_hostile_landing_zone_through_real_ingest_runs(home, defs, instance):
    """Two ingest runs on a real instance: hostile lines are quarantined, the valid votes behind
    them open an escalation, a reviewer decides it beside hostile review lines, and every table
    survives."""
    records, _ = make_items()
    land_items(home, records)
    # Fresh end-user ids count fully here (newcomers' weight is test_trust's subject): 2 v 2 is a tie.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    tie = [vote(f"tie-{k}", "item-030", label, user=f"user{k}", role="end_user")
           for k, label in enumerate(["one", "one", "two", "two"])]
    hostile = [
        json.dumps(vote("cut", "item-031", "one"))[:50],
        vote(SQL, "item-031", "one", user="mallory", role="end_user", rationale=SQL, context={PATH: SQL}),
        vote("future", "item-031", "two", created_at="9999-01-01T00:00:00Z"),
        raw(vote("nan", "item-031", "two"), "user_confidence", "NaN"),
        vote("gold", "item-000", "two"),
        vote("lookalike", "item-031", "\u043ene"),
        json.dumps(vote("dup-key", "item-031", "two"))[:-1] + ', "corrected_label": "one"}',
    ]
    folder = home.landing_dir("corrections")
    (folder / "day-1.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(tie + hostile))
    job = defs.resolve_job_def(INGEST_JOB)

    first = job.execute_in_process(instance=instance)

    assert first.success and _check_passed(first, RAW_CORRECTIONS_RECONCILE)
    with store.connect(home.database, read_only=True) as con:
        tables = table_names(con)
        assert {"raw_corrections", "quarantine", "items", "escalations", "review_decisions"} <= set(tables)
        assert stored(con, "SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 1") == [
            ("gold_item", 1), ("malformed_json", 2), ("out_of_range", 2), ("unknown_label", 1)
        ]
        assert stored(con, "SELECT records_in, accepted, quarantined FROM ingested_files "
                           "WHERE path = 'corrections/day-1.jsonl'") == [(11, 5, 6)]
        assert stored(con, "SELECT rationale, context FROM raw_corrections WHERE event_id = ?", [SQL]) == [
            (SQL, json.dumps({PATH: SQL}, separators=(",", ":")))
        ]
        assert stored(con, "SELECT escalation_id, reason FROM escalations") == [("esc-item-030-1", "tie")]

    give_keys(home, "reviewer-0")
    decisions = [
        signed({"decision_id": "d-ok", "escalation_id": "esc-item-030-1", "decision": "accept", "label": "two",
                "reviewer_id": "reviewer-0", "rationale": SQL, "decided_at": "2026-03-03T09:00:00Z"}),
        {"decision_id": "d-sql", "escalation_id": "esc-item-030-1", "decision": "accept", "label": "one",
         "reviewer_id": SQL, "rationale": "x", "decided_at": "2026-03-03T09:00:00Z"},
        signed({"decision_id": "d-path", "escalation_id": PATH, "decision": "reject",
                "reviewer_id": "reviewer-0", "rationale": PATH, "decided_at": "2026-03-03T09:00:00Z"}),
    ]
    write_jsonl(home.landing_dir("reviews"), "decisions.jsonl", decisions)

    second = job.execute_in_process(instance=instance)

    assert second.success
    with store.connect(home.database, read_only=True) as con:
        assert table_names(con) == tables
        assert stored(
            con, "SELECT label, reviewer_confirmed FROM production_corpus WHERE item_id = 'item-030'"
        ) == [("two", True)]
        assert stored(con, "SELECT decision_id, rationale FROM review_decisions") == [("d-ok", SQL)]
        assert stored(con, "SELECT record_id, reason FROM quarantine WHERE kind = 'reviews' ORDER BY 1") == [
            ("d-path", "unknown_escalation"), ("d-sql", "unknown_reviewer")
        ]
        assert stored(con, "SELECT count(*) FROM escalations") == [(0,)]
