"""core/contracts.py, core/validation.py (check_records), core/reading.py (read_lines), core/files.py
and core/anonymize.py, on a real DuckDB."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest

from labelloop_assets.core import anonymize, contracts, files, reading, validation

KEY = b"contract-test-key"


@pytest.fixture
def con(tmp_path: Path):
    connection = duckdb.connect(str(tmp_path / "contracts.duckdb"))
    yield connection
    connection.close()


def correction(event_id: str = "e1", **overrides) -> dict:
    record = {
        "event_id": event_id,
        "item_id": "i1",
        "corrected_label": "five",
        "user_id": "bob",
        "user_role": "reviewer",
        "source": "review_prompt",
        "consent": True,
        "created_at": "2024-05-01T12:00:00+02:00",
    }
    record.update(overrides)
    return record


def lines_frame(*lines: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"line_no": list(range(1, len(lines) + 1)), "line": list(lines), "bad_encoding": [False] * len(lines)},
        schema={"line_no": pl.Int64, "line": pl.String, "bad_encoding": pl.Boolean},
    )


def check(con, *records, spec=contracts.CORRECTION_SPEC, key=KEY):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return validation.check_records(lines_frame(*lines), spec, "corrections/f.jsonl", con, key)


def reasons(quarantined: pl.DataFrame) -> list[tuple[int, str, str]]:
    return list(quarantined.select("line_no", "reason", "detail").iter_rows())


# --------------------------------------------------------------------------- reading.read_lines


def test_read_lines_numbers_physical_lines_and_counts_blanks(tmp_path, con):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a":1}\r\n\r\n   \n{"b":2}\n\t\n{"c":3}\n')
    frame, read = reading.read_lines(path)
    blank = read.blank_lines
    assert frame.select("line_no", "line", "bad_encoding").rows() == [
        (1, '{"a":1}', False), (4, '{"b":2}', False), (6, '{"c":3}', False)
    ]
    assert blank == 3


def test_read_lines_without_trailing_newline_keeps_last_line(tmp_path, con):
    path = tmp_path / "f.jsonl"
    path.write_text('{"a":1}\n{"b":2}')
    frame, read = reading.read_lines(path)
    blank = read.blank_lines
    assert frame["line"].to_list() == ['{"a":1}', '{"b":2}'] and blank == 0


def test_read_lines_of_an_empty_file_has_no_blank_lines(tmp_path, con):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    frame, read = reading.read_lines(path)
    blank = read.blank_lines
    assert frame.height == 0
    assert blank == 0


def test_read_lines_flags_only_lines_with_invalid_utf8(tmp_path, con):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a":"caf\xc3\xa9"}\n{"a":"caf\xe9"}\n{"a":"ok"}\n')
    frame, _ = reading.read_lines(path)
    assert frame.select("line_no", "bad_encoding").rows() == [(1, False), (2, True), (3, False)]
    assert frame["line"][0] == '{"a":"café"}'


def test_read_lines_reads_parquet_rows_as_json_objects(tmp_path, con):
    path = tmp_path / "f.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "features": [[1.0, 2.0], [3.0, 4.5]]}).write_parquet(path)
    frame, read = reading.read_lines(path)
    blank = read.blank_lines
    assert blank == 0
    assert frame["line_no"].to_list() == [1, 2]
    assert [json.loads(line) for line in frame["line"]] == [
        {"item_id": "a", "features": [1.0, 2.0]}, {"item_id": "b", "features": [3.0, 4.5]}
    ]
    assert frame["bad_encoding"].to_list() == [False, False]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("f.csv", b"a,b\n1,2\n", contracts.UNSUPPORTED_FORMAT),
        ("f.json", b"{}", contracts.UNSUPPORTED_FORMAT),
        ("f.parquet", b"definitely not parquet", contracts.UNREADABLE_FILE),
        ("f.parquet", b"", contracts.UNREADABLE_FILE),
    ],
)
def test_read_lines_refuses_unreadable_files(tmp_path, con, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(files.UnreadableFile) as info:
        reading.read_lines(path)
    assert info.value.reason == reason
    assert name in info.value.detail


def test_read_lines_refuses_files_over_the_size_limit(tmp_path, con, monkeypatch):
    path = tmp_path / "f.jsonl"
    path.write_text('{"a":1}\n' * 10)  # 80 bytes
    monkeypatch.setattr(contracts, "MAX_FILE_BYTES", 79)
    with pytest.raises(files.UnreadableFile) as info:
        reading.read_lines(path)
    assert info.value.reason == contracts.FILE_TOO_LARGE
    assert "80 bytes > 79" in info.value.detail
    monkeypatch.setattr(contracts, "MAX_FILE_BYTES", 80)
    assert reading.read_lines(path)[0].height == 10


def test_read_lines_refuses_a_named_pipe_at_once(tmp_path, con):
    """A pipe swapped in for a landing file must not hang the run waiting for a writer."""
    pipe = tmp_path / "p.jsonl"
    os.mkfifo(pipe)
    outcome: list = []

    def read() -> None:
        try:
            reading.read_lines(pipe)
        except files.UnreadableFile as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_lines waited on the pipe"
    assert outcome and outcome[0].reason == contracts.UNREADABLE_FILE and "not a regular file" in outcome[0].detail


def test_whole_file_quarantine_row(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"x,y\n")
    error = files.UnreadableFile(contracts.UNSUPPORTED_FORMAT, "f.csv: nope")
    row = validation.whole_file_quarantine("items", "items/f.csv", error, path).to_dicts()
    assert row == [{
        "kind": "items", "source_file": "items/f.csv", "line_no": None,
        "reason": "unsupported_format", "detail": "f.csv: nope", "record_id": None, "item_id": None,
        "line_sha256": hashlib.sha256(b"x,y\n").hexdigest(),
    }]


@pytest.mark.parametrize(
    ("name", "landed"),
    [("a.jsonl", True), ("a.parquet", True), (".a.jsonl", False), ("_a.jsonl", False),
     ("a.jsonl.tmp", False), ("a.jsonl.part", False), ("a.jsonl.partial", False)],
)
def test_is_landing_file(tmp_path, name, landed):
    path = tmp_path / name
    path.write_text("{}\n")
    assert files.is_landing_file(path) is landed
    assert files.is_landing_file(tmp_path / "missing.jsonl") is False


# --------------------------------------------------------------------------- check_records


def test_accepted_records_are_typed_trimmed_and_traceable(con):
    record = correction(
        "  e1 ", user_confidence=1, context={"screen": "review"}, rationale="clear five",
        original_label="3", model_version="m-7", prediction_id="p-9",
    )
    accepted, quarantined = check(con, record)
    assert quarantined.height == 0
    row = accepted.to_dicts()[0]
    assert row["event_id"] == "e1"
    assert row["user_id"] == anonymize.pseudonym(KEY, "bob")
    assert row["consent"] is True and row["user_confidence"] == 1.0
    assert json.loads(row["context"]) == {"screen": "review"}
    assert row["created_at"].isoformat().startswith("2024-05-01T10:00:00")  # +02:00 -> UTC
    assert row["original_label"] == "3"  # harmonization happens later, in ingest
    assert (row["source_file"], row["line_no"]) == ("corrections/f.jsonl", 1)
    # Parsed lines are identified by their ids; only rejected lines carry a hash of the line.
    assert row["line_sha256"] is None
    assert len(row["payload_hash"]) == 32


def test_optional_fields_may_be_absent_or_null(con):
    accepted, quarantined = check(
        con, correction("e1"), correction("e2", rationale=None, user_confidence=None, original_label=None)
    )
    assert quarantined.height == 0
    assert accepted.select("event_id", "rationale", "original_label", "user_confidence").rows() == [
        ("e1", None, None, None), ("e2", None, None, None)
    ]
    hashes = accepted["payload_hash"].to_list()
    assert hashes[0] != hashes[1]  # the event ids differ


def test_explicit_null_object_field_is_stored_as_null(con):
    accepted, _ = check(con, correction("e1"), correction("e1", context=None))
    assert accepted["context"].to_list() == [None, None]
    assert accepted["payload_hash"][0] == accepted["payload_hash"][1]


def test_payload_hash_ignores_formatting_but_not_content(con):
    record = correction("e1", rationale="five")
    reordered = json.dumps(dict(reversed(list(record.items()))), separators=(",", ":"))
    accepted, _ = check(con, record, reordered, correction("e1", rationale="six"))
    hashes = accepted["payload_hash"].to_list()
    assert hashes[0] == hashes[1] != hashes[2]
    # The key is part of the payload: another key gives another pseudonym and another hash.
    other, _ = validation.check_records(lines_frame(json.dumps(record)), contracts.CORRECTION_SPEC,
                                       "corrections/f.jsonl", con, b"another-key")
    assert other["payload_hash"][0] != hashes[0]


FIELD_CASES = [
    (correction(event_id=None), "missing_field", "event_id"),
    ({**correction(), "consent": None}, "missing_field", "consent"),
    (correction(item_id=17), "invalid_type", "item_id"),
    (correction(consent="true"), "invalid_type", "consent"),
    (correction(user_confidence="0.5"), "invalid_type", "user_confidence"),
    (correction(context="not an object"), "invalid_type", "context"),
    (correction(event_id="   "), "invalid_value", "event_id: empty"),
    (correction(source="email"), "invalid_value",
     "source: not one of feedback_button, review_prompt, audit_sample, annotation"),
    (correction(user_confidence=-0.01), "out_of_range", "user_confidence: outside [0.0, 1.0]"),
    (correction(created_at="yesterday"), "bad_timestamp", "created_at: not ISO-8601 with a time zone"),
    (correction(created_at="2024-02-30T10:00:00Z"), "bad_timestamp", "created_at: not ISO-8601 with a time zone"),
    (correction(created_at="2024-05-01 12:00:00"), "bad_timestamp", "created_at: not ISO-8601 with a time zone"),
    (correction(event_id="e" * 257), "oversize_field", "event_id: longer than 256"),
    (correction(context={"k": "v" * 17000}), "oversize_field", "context: longer than 16384"),
    # first failing rule wins: a missing field is reported before a later field's bad value
    (correction(item_id=None, user_role="boss"), "missing_field", "item_id"),
]


@pytest.mark.parametrize(("record", "reason", "detail"), FIELD_CASES)
def test_field_rules(con, record, reason, detail):
    record = {k: v for k, v in record.items() if not (v is None and k != "consent")}
    accepted, quarantined = check(con, correction("good"), record)
    assert accepted["event_id"].to_list() == ["good"]
    assert reasons(quarantined) == [(2, reason, detail)]


def test_timestamps_with_offsets_are_accepted(con):
    accepted, quarantined = check(
        con,
        correction("a", created_at="2024-05-01T12:00:00Z"),
        correction("b", created_at="2024-05-01T12:00:00-0530"),
        correction("c", created_at="2024-05-01 12:00:00.123+05"),
    )
    assert quarantined.height == 0
    assert [t.isoformat() for t in accepted["created_at"]] == [
        "2024-05-01T12:00:00+00:00", "2024-05-01T17:30:00+00:00", "2024-05-01T07:00:00.123000+00:00"
    ]


def test_date_only_timestamp_is_quarantined(con):
    _, quarantined = check(con, correction("a", created_at="2024-05-01"))
    assert reasons(quarantined) == [(1, "bad_timestamp", "created_at: not ISO-8601 with a time zone")]


def test_lowercase_z_timestamp_is_accepted(con):
    accepted, quarantined = check(con, correction("a", created_at="2024-05-01T12:00:00z"))
    assert quarantined.height == 0
    assert accepted["created_at"][0].isoformat() == "2024-05-01T12:00:00+00:00"


def test_structural_failures_carry_no_ids(con):
    hostile = '{"event_id": "smuggled", "item_id": "smuggled"'  # not valid JSON
    _, quarantined = check(con, hostile, '"just a string"', "[1, 2]", "42")
    assert quarantined.select("line_no", "reason", "record_id", "item_id").rows() == [
        (1, "malformed_json", None, None),
        (2, "not_an_object", None, None),
        (3, "not_an_object", None, None),
        (4, "not_an_object", None, None),
    ]
    assert quarantined.schema == pl.Schema(contracts.QUARANTINE_COLUMNS)


def test_field_failures_name_the_record(con):
    _, quarantined = check(con, correction("e9", user_role="boss", item_id="i-42"))
    assert quarantined.select("record_id", "item_id", "kind", "source_file").rows() == [
        ("e9", "i-42", "corrections", "corrections/f.jsonl")
    ]


def test_oversize_line_and_bad_encoding_come_first(con):
    big = json.dumps(correction("big", rationale="x" * (contracts.MAX_LINE_BYTES + 10)))
    lines = pl.DataFrame({
        "line_no": [1, 2], "line": [big, json.dumps(correction("enc"))], "bad_encoding": [False, True]
    })
    accepted, quarantined = validation.check_records(lines, contracts.CORRECTION_SPEC, "f", con, KEY)
    assert accepted.height == 0
    assert quarantined.select("line_no", "reason", "record_id").rows() == [
        (1, "oversize_line", None), (2, "invalid_encoding", None)
    ]


def test_line_exactly_at_the_size_limit_is_not_oversize(con):
    base = json.dumps(correction("edge", context={"pad": ""}))
    line = base.replace('"pad": ""', '"pad": "' + "p" * (contracts.MAX_LINE_BYTES - len(base)) + '"')
    assert len(line.encode()) == contracts.MAX_LINE_BYTES
    _, quarantined = check(con, line)
    # Not oversize_line; the context object itself is over its own 16 KiB limit.
    assert reasons(quarantined) == [(1, "oversize_field", "context: longer than 16384")]


@pytest.mark.parametrize(
    ("features", "ok"),
    [([1, 2.5, -3e2], True), ([], False), ([1, None], False), ([1, "a"], False), ([[1], [2]], False),
     ("1,2", False)],
)
def test_item_features_must_be_a_non_empty_number_array(con, features, ok):
    accepted, quarantined = check(con, {"item_id": "x", "features": features}, spec=contracts.ITEM_SPEC)
    if ok:
        assert accepted["features"].to_list() == [[1.0, 2.5, -300.0]]
    else:
        assert accepted.height == 0
        assert quarantined["reason"].to_list() == ["invalid_type"]
        assert quarantined["detail"][0].startswith("features")


@pytest.mark.parametrize("features", [["1", "2"], [True, False]])
def test_item_features_that_are_not_json_numbers_are_quarantined(con, features):
    _, quarantined = check(con, {"item_id": "x", "features": features}, spec=contracts.ITEM_SPEC)
    assert quarantined["reason"].to_list() == ["invalid_type"]


def test_prediction_spec(con):
    ok = {"prediction_id": "p", "item_id": "i", "model_version": "m", "predicted_label": "3",
          "confidence": 1, "served_at": "2024-01-01T00:00:00Z", "probabilities": {"three": 1.0}}
    accepted, quarantined = check(
        con, ok, {**ok, "prediction_id": "q", "confidence": 1.01},
        {k: v for k, v in ok.items() if k != "model_version"}, spec=contracts.PREDICTION_SPEC,
    )
    assert accepted.select("prediction_id", "confidence", "probabilities").rows() == [
        ("p", 1.0, '{"three":1.0}')
    ]
    assert reasons(quarantined) == [
        (2, "out_of_range", "confidence: outside [0.0, 1.0]"), (3, "missing_field", "model_version")
    ]


def test_check_records_leaves_no_registered_views(con):
    check(con, correction())
    names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert not names & {"landing_lines", "checked_lines"}


# --------------------------------------------------------------------------- anonymize


@pytest.mark.parametrize("key", [b"", b"k", b"s" * 64, b"long" * 40, "clé-secrète".encode()])
@pytest.mark.parametrize("user_id", ["alice", "José Ñúñez", "用户-42", "a" * 300])
def test_sql_pseudonym_equals_python_hmac(con, key, user_id):
    inner, outer = anonymize.hmac_pads(key)
    sql = anonymize.pseudonym_sql("$u", "$inner", "$outer")
    got = con.execute(f"SELECT {sql}", {"u": user_id, "inner": inner, "outer": outer}).fetchall()[0][0]
    expected = "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]
    assert got == expected == anonymize.pseudonym(key, user_id)


def test_pseudonym_shape_and_key_dependence():
    a, b = anonymize.pseudonym(b"one", "alice"), anonymize.pseudonym(b"two", "alice")
    assert a != b
    assert a == anonymize.pseudonym(b"one", "alice")
    assert a != anonymize.pseudonym(b"one", "alice2")
    for value in (a, b):
        assert value.startswith("u_") and len(value) == 34
        int(value[2:], 16)
    assert "alice" not in a


def test_pseudonym_sql_of_null_is_null(con):
    inner, outer = anonymize.hmac_pads(KEY)
    sql = anonymize.pseudonym_sql("CAST(NULL AS VARCHAR)", "$inner", "$outer")
    assert con.execute(f"SELECT {sql}", {"inner": inner, "outer": outer}).fetchall() == [(None,)]


def test_hmac_pads():
    inner, outer = anonymize.hmac_pads(b"\x00")
    assert inner == b"\x36" * 64 and outer == b"\x5c" * 64
    long_inner, _ = anonymize.hmac_pads(b"x" * 65)
    hashed_inner, _ = anonymize.hmac_pads(hashlib.sha256(b"x" * 65).digest())
    assert long_inner == hashed_inner and len(long_inner) == 64


def scrub(con, text: str | None, author: str | None = None) -> str | None:
    anonymize.register_scrubber(con)
    sql = anonymize.scrub_sql("$t", "$a" if author is not None else None)
    params = {"t": text, **({"a": author} if author is not None else {})}
    return con.execute(f"SELECT {sql}", params).fetchall()[0][0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail John.Doe+tag@Example.co.uk today", "mail [email] today"),
        ("call +1 (555) 123-4567 now", "call [phone] now"),
        ("call 555-123-4567", "call [phone]"),
        ("UK +44 20 7946 0958", "UK [phone]"),
        ("DE 0049 30 1234567", "DE [phone]"),
        ("mobile 07700 900123", "mobile [phone]"),
        ("host 192.168.1.20 down", "host [ip] down"),
        ("card 4111 1111 1111 1111", "card [card-or-account]"),
        ("iban DE89 3704 0044 0532 0130 00", "iban [iban]"),
        ("a@b.io and c@d.io", "[email] and [email]"),
        ("looks like a 7, digit 3 and 42 too", "looks like a 7, digit 3 and 42 too"),
        ("", ""),
    ],
)
def test_scrub_replaces_pii_with_placeholders(con, text, expected):
    assert scrub(con, text) == expected


def test_scrub_removes_the_authors_own_id_and_keeps_null(con):
    assert scrub(con, "signed bob-77, again bob-77", author="bob-77") == "signed [user], again [user]"
    assert scrub(con, "no signature", author="") == "no signature"
    assert scrub(con, None, author="bob-77") is None
    assert scrub(con, "regex chars a.b*", author="a.b*") == "regex chars [user]"


def test_scrub_french_phone_number(con):
    assert "23 45 67 89" not in scrub(con, "appelez +33 1 23 45 67 89")


def test_scrub_url_with_credentials(con):
    assert scrub(con, "see https://bob:pw@intranet.example.com/x") == "see [url-with-credentials]"


def test_parquet_rows_with_maps_structs_and_lists_read_as_json_objects(tmp_path):
    """Nested columns are read through dictionaries and measured before decoding: the JSON is the
    same as DuckDB's for the plain columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({
        "item_id": ["a", "b"],
        "probabilities": pa.array([[("x", 0.5), ("y", 0.5)], [("x", 1.0)]], pa.map_(pa.string(), pa.float64())),
        "context": pa.array([{"k": "v", "n": 1}, {"k": None, "n": 2}]),
        "features": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float64(), 2)),
        "tags": pa.array([["p", "q"], []]),
    }), path)
    frame, read = reading.read_lines(path)
    assert [json.loads(line) for line in frame["line"]] == [
        {"item_id": "a", "probabilities": {"x": 0.5, "y": 0.5}, "context": {"k": "v", "n": 1},
         "features": [1.0, 2.0], "tags": ["p", "q"]},
        {"item_id": "b", "probabilities": {"x": 1.0}, "context": {"k": None, "n": 2},
         "features": [3.0, 4.0], "tags": []},
    ]
    assert read.lines == 2 and len(read.sha256) == 64


def test_a_nul_character_is_refused_where_values_are_looked_up_and_kept_elsewhere(con):
    """Ids, labels and references are looked up by value (on the lake, DuckDB's parser ends a
    query at a NUL); an item's text, free text and pseudonymized ids are not."""
    accepted, quarantined = check(
        con, {"item_id": "a\u0000b"}, {"item_id": "x", "text": "a\u0000b"},
        {"item_id": "y", "uri": "s3://b/\u0000"}, spec=contracts.ITEM_SPEC,
    )
    assert reasons(quarantined) == [
        (1, contracts.INVALID_VALUE, "item_id: holds a NUL character"),
        (3, contracts.INVALID_VALUE, "uri: holds a NUL character"),
    ]
    assert accepted["text"].to_list() == ["a\x00b"]
    accepted, quarantined = check(con, correction("e1", user_id="al\u0000ice", rationale="a\u0000b"))
    assert quarantined.height == 0 and accepted["rationale"].to_list() == ["a\x00b"]
    assert accepted["user_id"][0].startswith("u_")
