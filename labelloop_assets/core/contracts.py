"""Landing-file contracts: the field specs, and every record checked against its spec in SQL.

Each line of a landing file ends up either as a typed record or as a quarantine row with a
machine-readable reason. All checks are vectorized DuckDB expressions over the whole file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import duckdb
import polars as pl

from labelloop_assets.core.anonymize import hmac_pads, pseudonym_sql, register_scrubber, scrub_json_sql, scrub_sql

MAX_LINE_BYTES = 64 * 1024
MAX_FILE_BYTES = 512 * 1024 * 1024
# Caps on what one file may cost once read (core/reading.py): physical lines, blank ones included
# (a file of newlines must not cost a list of empty strings), and the text a Parquet file's rows
# make once decompressed (a few kilobytes of zstd can hold gigabytes of repeated text).
MAX_LINES_PER_FILE = 1_000_000
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024
# Timestamps outside this window are device clocks gone wrong (unset clocks say 1970, typos say
# 9999); a vote dated in the future would stay a contributor's latest vote forever.
EARLIEST_TIMESTAMP = "2000-01-01T00:00:00Z"
MAX_CLOCK_SKEW = "1 day"
SUPPORTED_SUFFIXES = (".jsonl", ".parquet")
UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")

USER_ROLES = ("end_user", "annotator", "reviewer", "domain_expert")
CORRECTION_SOURCES = ("feedback_button", "review_prompt", "audit_sample", "annotation")

# Quarantine reason codes (a documented contract: analysts filter on them).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
INVALID_ENCODING = "invalid_encoding"
OVERSIZE_LINE = "oversize_line"
MISSING_FIELD = "missing_field"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
OUT_OF_RANGE = "out_of_range"
BAD_TIMESTAMP = "bad_timestamp"
OVERSIZE_FIELD = "oversize_field"
UNKNOWN_LABEL = "unknown_label"
UNKNOWN_ITEM = "unknown_item"
GOLD_ITEM = "gold_item"
NO_CONSENT = "no_consent"
DUPLICATE_EVENT = "duplicate_event"
CONFLICTING_DUPLICATE = "conflicting_duplicate"
UNKNOWN_REVIEWER = "unknown_reviewer"
ROLE_NOT_ALLOWED = "role_not_allowed"
UNKNOWN_ESCALATION = "unknown_escalation"
ESCALATION_CLOSED = "escalation_closed"
DECISION_NOT_APPLICABLE = "decision_not_applicable"
FEATURE_LENGTH_MISMATCH = "feature_length_mismatch"
UNREADABLE_FILE = "unreadable_file"
UNSUPPORTED_FORMAT = "unsupported_format"
FILE_TOO_LARGE = "file_too_large"
TOO_MANY_LINES = "too_many_lines"
DECOMPRESSED_TOO_LARGE = "decompressed_too_large"
RESOURCE_LIMIT = "resource_limit"  # ran out of memory reading it: isolated, the rest goes through
# Trust (issue: authority granted by the deployment, signed reviewer actions).
ROLE_NOT_GRANTED = "role_not_granted"  # an audit reason: the claim counts at the granted role
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
REVOKED_KEY = "revoked_key"
UNKNOWN_MODEL_VERSION = "unknown_model_version"
GOLD_NOT_DECLARED = "gold_not_declared"
# Every code a quarantine row may carry (ROLE_NOT_GRANTED is an audit reason, never quarantined):
# `labelloop quarantine --reason` accepts these and names them when given another.
QUARANTINE_REASONS = (
    MALFORMED_JSON, NOT_AN_OBJECT, INVALID_ENCODING, OVERSIZE_LINE, MISSING_FIELD, INVALID_TYPE, INVALID_VALUE,
    OUT_OF_RANGE, BAD_TIMESTAMP, OVERSIZE_FIELD, UNKNOWN_LABEL, UNKNOWN_ITEM, GOLD_ITEM, NO_CONSENT,
    DUPLICATE_EVENT, CONFLICTING_DUPLICATE, UNKNOWN_REVIEWER, ROLE_NOT_ALLOWED, UNKNOWN_ESCALATION,
    ESCALATION_CLOSED, DECISION_NOT_APPLICABLE, FEATURE_LENGTH_MISMATCH, UNREADABLE_FILE, UNSUPPORTED_FORMAT,
    FILE_TOO_LARGE, TOO_MANY_LINES, DECOMPRESSED_TOO_LARGE, RESOURCE_LIMIT, UNSIGNED, BAD_SIGNATURE,
    UNKNOWN_KEY, REVOKED_KEY, UNKNOWN_MODEL_VERSION, GOLD_NOT_DECLARED,
)

JSON_NUMBER_TYPES = ("UBIGINT", "BIGINT", "DOUBLE", "HUGEINT")
# ISO-8601 date and time with a zone; a bare date or a zone-less time is refused.
ISO_TIMESTAMP = (
    r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]([01]\d|2[0-3])(:?[0-5]\d)?)$"
)


# What the contract trims from both ends of a string field; the CLI and the signature check
# trim ids the same way in Python (str.strip(TRIMMED)), so they look up what ingest stores.
TRIMMED = " \t\r\n"


def _trim(expr: str) -> str:
    """Strip TRIMMED's characters from both ends (DuckDB's one-argument trim strips spaces only).

    Trimming with a set of characters costs ~7x a test of the two ends, and almost no value
    needs it: only a value that starts or ends with one of them is trimmed."""
    codes = [ord(char) for char in TRIMMED]
    ends = " OR ".join(f"ends_with({expr}, chr({code}))" for code in codes)
    characters = " || ".join(f"chr({code})" for code in codes)
    return (
        f"CASE WHEN ascii({expr}) IN ({', '.join(map(str, codes))}) OR {ends} "
        f"THEN trim({expr}, {characters}) ELSE {expr} END"
    )



@dataclass(frozen=True)
class FieldSpec:
    """One field of a landing record: its JSON type and the limits on its value."""

    name: str
    kind: str  # string | number | bool | timestamp | object | number_map | number_array
    required: bool = True
    max_length: int | None = 256
    allowed: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    private: bool = False  # stored only as a keyed pseudonym
    free_text: bool = False  # stored only after PII scrubbing (an object: every string in it)


@dataclass(frozen=True)
class RecordSpec:
    kind: str
    key: str  # the idempotency key
    fields: tuple[FieldSpec, ...]


CORRECTION_SPEC = RecordSpec(
    kind="corrections",
    key="event_id",
    fields=(
        FieldSpec("event_id", "string"),
        FieldSpec("item_id", "string"),
        FieldSpec("corrected_label", "string"),
        FieldSpec("user_id", "string", private=True),
        FieldSpec("user_role", "string", allowed=USER_ROLES),
        FieldSpec("source", "string", allowed=CORRECTION_SOURCES),
        FieldSpec("consent", "bool"),
        FieldSpec("created_at", "timestamp"),
        FieldSpec("original_label", "string", required=False),
        FieldSpec("model_version", "string", required=False),
        FieldSpec("prediction_id", "string", required=False),
        FieldSpec("rationale", "string", required=False, max_length=2000, free_text=True),
        FieldSpec("user_confidence", "number", required=False, minimum=0.0, maximum=1.0),
        # Every string inside the object is scrubbed as free text; keys and numbers are kept.
        FieldSpec("context", "object", required=False, max_length=16 * 1024, free_text=True),
    ),
)

PREDICTION_SPEC = RecordSpec(
    kind="predictions",
    key="prediction_id",
    fields=(
        FieldSpec("prediction_id", "string"),
        FieldSpec("item_id", "string"),
        FieldSpec("model_version", "string"),
        FieldSpec("predicted_label", "string"),
        FieldSpec("confidence", "number", minimum=0.0, maximum=1.0),
        FieldSpec("served_at", "timestamp"),
        FieldSpec(
            "probabilities", "number_map", required=False, max_length=16 * 1024,
            minimum=0.0, maximum=1.0,
        ),
    ),
)

ITEM_SPEC = RecordSpec(
    kind="items",
    key="item_id",
    fields=(
        FieldSpec("item_id", "string"),
        FieldSpec("features", "number_array", max_length=4096),
        FieldSpec("initial_label", "string", required=False),
        FieldSpec("label_source", "string", required=False, max_length=64),
        FieldSpec("gold_label", "string", required=False),
    ),
)

# accept / reject / defer decide an escalation; release / discard acknowledge a correction burst.
ESCALATION_DECISIONS = ("accept", "reject", "defer")
BURST_DECISIONS = ("release", "discard")
REVIEW_DECISIONS = ESCALATION_DECISIONS + BURST_DECISIONS

REVIEW_SPEC = RecordSpec(
    kind="reviews",
    key="decision_id",
    fields=(
        FieldSpec("decision_id", "string"),
        FieldSpec("escalation_id", "string"),
        FieldSpec("decision", "string", allowed=REVIEW_DECISIONS),
        FieldSpec("label", "string", required=False),
        FieldSpec("reviewer_id", "string", private=True),
        FieldSpec("rationale", "string", max_length=2000, free_text=True),
        FieldSpec("decided_at", "timestamp"),
        # Required in effect: a decision without them is refused as `unsigned` (a clearer
        # reason than a missing field).
        FieldSpec("key_id", "string", required=False, max_length=64),
        FieldSpec("signature", "string", required=False, max_length=128),
    ),
)

SPECS = {spec.kind: spec for spec in (CORRECTION_SPEC, PREDICTION_SPEC, ITEM_SPEC, REVIEW_SPEC)}

QUARANTINE_COLUMNS = {
    "kind": pl.String,
    "source_file": pl.String,
    "line_no": pl.Int64,
    "reason": pl.String,
    "detail": pl.String,
    "record_id": pl.String,
    "item_id": pl.String,
    "line_sha256": pl.String,
}


class UnreadableFile(Exception):
    """A landing file that cannot be read at all; it is quarantined whole."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_landing_name(name: str) -> bool:
    """Temp names of atomic writers (dot-prefixed, `.tmp`, `.part`) are not landed yet."""
    return not name.startswith((".", "_")) and not name.endswith((".tmp", ".part", ".partial"))


def is_landing_file(path: Path | os.DirEntry) -> bool:
    """A path or a directory entry (the sensor's scandir reads the type without a stat)."""
    # A symbolic link is listed (even a dangling one) so that it is quarantined, not skipped.
    return (path.is_file() or path.is_symlink()) and is_landing_name(path.name)


def landing_names(folder: Path) -> list[str]:
    """Complete landing files of one kind, as sorted paths relative to `folder`: directly in it, or
    in a producer's subfolder (`<producer>/<name>`). Hidden or temp names are someone's work in
    progress and are not read. Every other file below a producer's folder is listed too, however
    deep (ingest quarantines it by its own path, so none is skipped silently), and so is a folder
    that cannot be listed (quarantined until it can: its files then have paths of their own).
    Plain strings: the sensor lists tens of thousands each tick, and a Path per file costs more
    than reading the directory."""
    found: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        # scandir reads the type from the directory entry: no stat per file.
        if entry.is_dir(follow_symlinks=False):
            if is_landing_name(entry.name):
                _names_below(entry.path, entry.name + "/", found)
        elif is_landing_file(entry):
            found.append(entry.name)
    found.sort()
    return found


def _names_below(folder: str, prefix: str, found: list[str]) -> None:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:  # removed while it was being listed
        return
    except OSError:
        found.append(prefix.rstrip("/"))
        return
    for entry in entries:
        if not is_landing_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            _names_below(entry.path, prefix + entry.name + "/", found)
        elif is_landing_file(entry):
            found.append(prefix + entry.name)


def open_landing_file(path: Path) -> BinaryIO:
    """Open a landing file for reading, refusing (OSError) a symbolic link put in its place.

    Non-blocking, so that a named pipe swapped in is opened at once (and then refused as not a
    regular file) instead of hanging the run; reads of a regular file are not affected.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.fdopen(os.open(path, flags), "rb")


def write_atomically(path: Path, text: str, durable: bool = False) -> Path:
    """Write to a dot-prefixed temp name beside `path`, then rename: readers see all or nothing.

    `durable` also flushes the file and the rename to disk, so that the write survives a power
    loss (for state the database refers to; derived reports can be rebuilt and skip the cost).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if durable:
        sync_to_disk(tmp)
    os.replace(tmp, path)
    if durable:
        sync_to_disk(path.parent)
    return path


def sync_to_disk(path: Path) -> None:
    """fsync a file, or a folder (which makes the renames and creations inside it durable).

    A folder is synced where the platform allows it: some systems and network filesystems
    refuse to open or fsync one, and a refusal there must not fail the write.
    """
    folder = path.is_dir()
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(descriptor)


def _ref(field: FieldSpec) -> str:
    """The column holding a field's value as text: the string itself, or JSON for arrays and
    objects (extracted once per line, see check_records)."""
    return f"f_{field.name}"


def _type_ref(field: FieldSpec) -> str:
    return f"t_{field.name}"


def _text_ref(field: FieldSpec) -> str:
    return f"s_{field.name}"


def _field_columns(field: FieldSpec) -> str:
    """A field's trimmed text, computed once for all of its rules."""
    return f"{_trim(_ref(field))} AS {_text_ref(field)}"


def _field_rules(field: FieldSpec) -> list[tuple[str, str, str]]:
    """(failing condition, reason, detail) for one field, in the order they are tried."""
    value = _ref(field)
    jtype = _type_ref(field)
    text = _text_ref(field)
    present = f"({jtype} IS NOT NULL AND {jtype} <> 'NULL')"
    rules: list[tuple[str, str, str]] = []
    if field.required:
        rules.append((f"NOT {present}", MISSING_FIELD, field.name))
    expected = {
        "string": "= 'VARCHAR'",
        "timestamp": "= 'VARCHAR'",
        "bool": "= 'BOOLEAN'",
        "number": f"IN {JSON_NUMBER_TYPES}",
        "object": "= 'OBJECT'",
        "number_map": "= 'OBJECT'",
        "number_array": "= 'ARRAY'",
    }[field.kind]
    rules.append((f"{present} AND NOT ({jtype} {expected})", INVALID_TYPE, field.name))
    if field.kind == "string":
        rules.append(
            (f"{present} AND length({text}) = 0", INVALID_VALUE, f"{field.name}: empty")
        )
    if field.kind == "number_array":
        rules.append(
            (
                f"{present} AND (json_array_length({value}) = 0 OR "
                f"NOT list_bool_and(list_transform(json_type({value}, '$[*]'), "
                f"lambda t: t IN {JSON_NUMBER_TYPES})))",
                INVALID_TYPE,
                f"{field.name}: must be a non-empty array of numbers",
            )
        )
        rules.append(
            (
                f"{present} AND NOT list_bool_and(list_transform("
                f"TRY_CAST(CAST({value} AS JSON) AS DOUBLE[]), lambda x: isfinite(x)))",
                INVALID_VALUE,
                f"{field.name}: numbers must be finite",
            )
        )
    if field.kind == "number_map":
        rules.append(
            (
                f"{present} AND NOT coalesce(list_bool_and(list_transform(json_type({value}, '$.*'), "
                f"lambda t: t IN {JSON_NUMBER_TYPES})), true)",
                INVALID_TYPE,
                f"{field.name}: must map labels to numbers",
            )
        )
        if field.minimum is not None and field.maximum is not None:
            rules.append(
                (
                    f"{present} AND NOT coalesce(list_bool_and(list_transform("
                    f"json_extract_string({value}, '$.*'), lambda v: TRY_CAST(v AS DOUBLE) "
                    f"BETWEEN {field.minimum} AND {field.maximum})), true)",
                    OUT_OF_RANGE,
                    f"{field.name}: values outside [{field.minimum}, {field.maximum}]",
                )
            )
    if field.max_length is not None:
        measure = (
            f"json_array_length({value})"
            if field.kind == "number_array"
            else f"length({value})"
            if field.kind in ("object", "number_map")
            else f"length({text})"
        )
        rules.append(
            (
                f"{present} AND {measure} > {field.max_length}",
                OVERSIZE_FIELD,
                f"{field.name}: longer than {field.max_length}",
            )
        )
    if field.allowed:
        allowed = ", ".join(f"'{value}'" for value in field.allowed)
        rules.append(
            (
                f"{present} AND {text} NOT IN ({allowed})",
                INVALID_VALUE,
                f"{field.name}: not one of {', '.join(field.allowed)}",
            )
        )
    if field.kind == "number" and (field.minimum is not None or field.maximum is not None):
        number = f"TRY_CAST({text} AS DOUBLE)"
        rules.append(
            (
                f"{present} AND NOT ({number} BETWEEN {field.minimum} AND {field.maximum})",
                OUT_OF_RANGE,
                f"{field.name}: outside [{field.minimum}, {field.maximum}]",
            )
        )
    if field.kind == "timestamp":
        parsed = f"TRY_CAST(upper({text}) AS TIMESTAMPTZ)"
        rules.append(
            (
                f"{present} AND (NOT regexp_matches({text}, '{ISO_TIMESTAMP}') "
                f"OR {parsed} IS NULL)",
                BAD_TIMESTAMP,
                f"{field.name}: not ISO-8601 with a time zone",
            )
        )
        rules.append(
            (
                f"{present} AND {parsed} < TIMESTAMPTZ '{EARLIEST_TIMESTAMP}'",
                OUT_OF_RANGE,
                f"{field.name}: before {EARLIEST_TIMESTAMP[:10]}",
            )
        )
        rules.append(
            (
                f"{present} AND {parsed} > now() + INTERVAL '{MAX_CLOCK_SKEW}'",
                OUT_OF_RANGE,
                f"{field.name}: more than {MAX_CLOCK_SKEW} in the future",
            )
        )
    return rules


def _extract(field: FieldSpec, author: str | None) -> str:
    value, text = _ref(field), _text_ref(field)
    if field.private:
        return f"p_{field.name} AS {field.name}"
    if field.free_text and field.kind == "object":
        return (
            f"CASE WHEN {_type_ref(field)} = 'NULL' THEN NULL ELSE {scrub_json_sql(value, author)} END "
            f"AS {field.name}"
        )
    if field.free_text:
        return f"{scrub_sql(value, author)} AS {field.name}"
    if field.kind == "string":
        return f"{text} AS {field.name}"
    if field.kind == "timestamp":
        return f"TRY_CAST(upper({text}) AS TIMESTAMPTZ) AS {field.name}"
    if field.kind == "number":
        return f"TRY_CAST({text} AS DOUBLE) AS {field.name}"
    if field.kind == "bool":
        return f"TRY_CAST({text} AS BOOLEAN) AS {field.name}"
    if field.kind in ("object", "number_map"):
        # An explicit JSON null is the same as an absent field.
        return f"CASE WHEN {_type_ref(field)} = 'NULL' THEN NULL ELSE {value} END AS {field.name}"
    if field.kind == "number_array":
        return (
            f"CASE WHEN {_type_ref(field)} = 'ARRAY' "
            f"THEN TRY_CAST(CAST({value} AS JSON) AS DOUBLE[]) END AS {field.name}"
        )
    raise ValueError(field.kind)


def check_records(
    lines: pl.DataFrame,
    spec: RecordSpec,
    source_file: str | None,
    con: duckdb.DuckDBPyConnection,
    key: bytes = b"",
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split lines into typed records and quarantine rows (structural checks only).

    `lines` holds line_no, line, bad_encoding and, when it spans several files, source_file
    (otherwise `source_file` names the one file). One call checks a whole batch at once.

    Private fields come out as keyed pseudonyms and free text scrubbed: raw values never leave
    this query. Accepted records carry `source_file`, `line_no`, `line_sha256` and a
    `payload_hash` of their (pseudonymized) fields, so a replay of the same event can be told
    from a conflicting one.
    """
    rules: list[tuple[str, str, str]] = [
        ("bad_encoding", INVALID_ENCODING, "bytes that are not UTF-8"),
        ("oversize", OVERSIZE_LINE, f"> {MAX_LINE_BYTES} bytes"),
        ("NOT valid", MALFORMED_JSON, "not valid JSON"),
        ("root <> 'OBJECT'", NOT_AN_OBJECT, "a JSON value that is not an object"),
        # Parsers disagree on which of two equal keys wins: the line is ambiguous (RFC 7493).
        ("duplicate_keys", MALFORMED_JSON, "a key appears more than once"),
    ]
    for field in spec.fields:
        rules.extend(_field_rules(field))
    private = [field for field in spec.fields if field.private]
    author = _text_ref(private[0]) if private else None
    # Keyed pseudonyms are computed once per distinct value, then joined back to every row.
    pseudonyms = "".join(
        f""", pseudonyms_{f.name} AS (
                SELECT {_text_ref(f)}, {pseudonym_sql(_text_ref(f), '$inner', '$outer')} AS p_{f.name}
                FROM (SELECT DISTINCT {_text_ref(f)} FROM judged)
            )"""
        for f in private
    )
    joins = " ".join(f"LEFT JOIN pseudonyms_{f.name} USING ({_text_ref(f)})" for f in private)
    extracted = ", ".join(_extract(field, author) for field in spec.fields)
    inner, outer = hmac_pads(key)
    hashed = ", ".join(f"coalesce(CAST({field.name} AS VARCHAR), '\\N')" for field in spec.fields)
    paths = ", ".join(f"'$.{field.name}'" for field in spec.fields)
    values = ", ".join(
        f"types[{i}] AS {_type_ref(field)}, texts[{i}] AS {_ref(field)}"
        for i, field in enumerate(spec.fields, start=1)
    )
    item_ref = "s_item_id" if any(f.name == "item_id" for f in spec.fields) else "NULL"
    described = ", ".join(_field_columns(field) for field in spec.fields)
    if "source_file" not in lines.columns:
        lines = lines.with_columns(source_file=pl.lit(source_file, pl.String))
    if "oversize" not in lines.columns:  # lines read whole: any over-long line is still in them
        lines = lines.with_columns(oversize=pl.lit(False), line_sha256=pl.lit(None, pl.String))
    whens = " ".join(f"WHEN {condition} THEN {n}" for n, (condition, _, _) in enumerate(rules, start=1))
    reasons = "[" + ", ".join(_quote(reason) for _, reason, _ in rules) + "]"
    details = "[" + ", ".join(_quote(detail) for _, _, detail in rules) + "]"
    if any(field.free_text for field in spec.fields):
        register_scrubber(con)
    con.register(
        "landing_lines",
        lines.select("source_file", "line_no", "line", "bad_encoding", "oversize", "line_sha256"),
    )
    try:
        # One pass: each line is parsed once into its fields' JSON values; every rule reads
        # those small values, the first failing rule's number names the reason, and the typed
        # values are extracted in the same query.
        checked = con.execute(
            f"""
            WITH base AS (
                -- a line the reader hashed instead of keeping (too long) arrives flagged, with its hash
                SELECT source_file, line_no, line, bad_encoding, line_sha256 AS read_sha256,
                       oversize OR octet_length(encode(line)) > {MAX_LINE_BYTES} AS oversize
                FROM landing_lines
            ), valid AS (
                SELECT *, NOT bad_encoding AND NOT oversize AND json_valid(line) AS valid FROM base
            ), rooted AS (
                SELECT *, CASE WHEN valid THEN json_type(line) END AS root FROM valid
            ), parsed AS (
                SELECT *,
                       CASE WHEN root = 'OBJECT' THEN json_type(line, [{paths}]) END AS types,
                       CASE WHEN root = 'OBJECT' THEN json_extract_string(line, [{paths}]) END AS texts,
                       CASE WHEN root = 'OBJECT' THEN json_keys(line) END AS keys
                FROM rooted
            ), fields AS (
                SELECT line, read_sha256, source_file, line_no, bad_encoding, oversize, valid, root,
                       coalesce(len(keys) <> list_unique(keys), false) AS duplicate_keys, {values}
                FROM parsed
            ), described AS (
                SELECT *, {described} FROM fields
            ), judged AS (
                SELECT *, CASE {whens} END AS rule_no FROM described
            ){pseudonyms}, typed AS (
                SELECT source_file, line_no, rule_no,
                       -- the raw line is never kept; its hash identifies a rejected one
                       CASE WHEN rule_no IS NOT NULL THEN coalesce(read_sha256, sha256(line)) END AS line_sha256,
                       left(s_{spec.key}, 256) AS record_id,
                       left({item_ref}, 256) AS quarantined_item_id,
                       {extracted}
                FROM judged {joins}
            )
            SELECT *, {reasons}[rule_no] AS reason, {details}[rule_no] AS detail,
                   CASE WHEN rule_no IS NULL THEN md5(concat_ws('|', {hashed})) END AS payload_hash
            FROM typed ORDER BY source_file, line_no
            """,
            {"inner": inner, "outer": outer} if private else [],
        ).pl()
    finally:
        con.unregister("landing_lines")
    failed = pl.col("reason").is_not_null()
    accepted = checked.filter(~failed).drop(
        "rule_no", "reason", "detail", "record_id", "quarantined_item_id"
    )
    # Ids are taken only from lines that parsed, so a hostile line cannot smuggle them in.
    quarantined = checked.filter(failed).select(
        pl.lit(spec.kind).alias("kind"),
        "source_file",
        "line_no",
        "reason",
        "detail",
        "record_id",
        pl.col("quarantined_item_id").alias("item_id"),
        "line_sha256",
    )
    return accepted, quarantined.cast(QUARANTINE_COLUMNS)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def landing_file_sha256(path: Path) -> str | None:
    """A landing file's SHA-256, read in chunks through a handle that refuses a link (a file
    refused for its size must not be read into memory to be hashed); None if it cannot be read."""
    try:
        with open_landing_file(path) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def whole_file_quarantine(kind: str, source_file: str, error: UnreadableFile, path: Path) -> pl.DataFrame:
    """One quarantine row for a file that could not be read at all."""
    digest = landing_file_sha256(path)
    return pl.DataFrame(
        {
            "kind": [kind],
            "source_file": [source_file],
            "line_no": [None],
            "reason": [error.reason],
            "detail": [error.detail],
            "record_id": [None],
            "item_id": [None],
            "line_sha256": [digest],
        },
        schema=QUARANTINE_COLUMNS,
    )


def quarantine_rows(frame: pl.DataFrame, kind: str, reason: str, detail: pl.Expr | str, key: str) -> pl.DataFrame:
    """Quarantine rows for accepted-so-far records that fail a semantic rule."""
    detail_expr = pl.lit(detail) if isinstance(detail, str) else detail
    return frame.select(
        pl.lit(kind).alias("kind"),
        pl.col("source_file"),
        pl.col("line_no"),
        pl.lit(reason).alias("reason"),
        detail_expr.alias("detail"),
        pl.col(key).alias("record_id"),
        (pl.col("item_id") if "item_id" in frame.columns else pl.col(key)).alias("item_id"),
        pl.col("line_sha256"),
    ).cast(QUARANTINE_COLUMNS)
