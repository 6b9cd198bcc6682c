"""Landing records checked against their contracts (core/contracts.py) in SQL.

Each line of a landing file ends up either as a typed record or as a quarantine row with a
machine-readable reason. All checks are vectorized DuckDB expressions over the whole file.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from labelloop_assets.core.anonymize import hmac_pads, pseudonym_sql, register_scrubber, scrub_json_sql, scrub_sql
from labelloop_assets.core.contracts import (
    BAD_TIMESTAMP,
    EARLIEST_TIMESTAMP,
    INVALID_ENCODING,
    INVALID_TYPE,
    INVALID_VALUE,
    MALFORMED_JSON,
    MAX_CLOCK_SKEW,
    MAX_LINE_BYTES,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    OUT_OF_RANGE,
    OVERSIZE_FIELD,
    OVERSIZE_LINE,
    QUARANTINE_COLUMNS,
    TRIMMED,
    FieldSpec,
    RecordSpec,
)
from labelloop_assets.core.files import UnreadableFile, landing_file_sha256

JSON_NUMBER_TYPES = ("UBIGINT", "BIGINT", "DOUBLE", "HUGEINT")
# ISO-8601 date and time with a zone; a bare date or a zone-less time is refused.
ISO_TIMESTAMP = (
    r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]([01]\d|2[0-3])(:?[0-5]\d)?)$"
)


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


def _ref(field: FieldSpec) -> str:
    """The column holding a field's value as text: the string itself, or JSON for arrays and
    objects (extracted once per line, see check_records)."""
    return f"f_{field.name}"


def _type_ref(field: FieldSpec) -> str:
    return f"t_{field.name}"


def _text_ref(field: FieldSpec) -> str:
    return f"s_{field.name}"


def _present_ref(field: FieldSpec) -> str:
    return f"h_{field.name}"


def _field_columns(field: FieldSpec) -> str:
    """A field's trimmed text and whether it holds a value, computed once for all of its rules
    (written out in each rule, the same test made the query's plan a fifth larger and slower to
    make: each check query spent 52 ms planning before it read a line, now 37 ms)."""
    jtype = _type_ref(field)
    return (
        f"{_trim(_ref(field))} AS {_text_ref(field)}, "
        f"({jtype} IS NOT NULL AND {jtype} <> 'NULL') AS {_present_ref(field)}"
    )


def _time_ref(field: FieldSpec) -> str:
    return f"ts_{field.name}"


def _time_columns(spec: RecordSpec) -> str:
    """Each timestamp field's parsed value, computed once for its three rules and its extraction
    (a time-zone-aware cast is among the query's dearest expressions)."""
    return "".join(
        f", TRY_CAST(upper({_text_ref(field)}) AS TIMESTAMPTZ) AS {_time_ref(field)}"
        for field in spec.fields if field.kind == "timestamp"
    )


def _field_rules(field: FieldSpec) -> list[tuple[str, str, str]]:
    """(failing condition, reason, detail) for one field, in the order they are tried."""
    value = _ref(field)
    jtype = _type_ref(field)
    text = _text_ref(field)
    present = _present_ref(field)
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
    if field.kind == "string" and not (field.free_text or field.private or field.content):
        # An id, term or reference is looked up by value; on the lake, DuckLake writes the value
        # into the SQL of its file pruning, and DuckDB's parser ends a query at a NUL character:
        # one such line failed the whole run. (Free text and an item's content are never looked
        # up; a private id is stored as its pseudonym.)
        rules.append(
            (f"{present} AND contains({text}, chr(0))", INVALID_VALUE, f"{field.name}: holds a NUL character")
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
        parsed = _time_ref(field)
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


def _hashed_text(field: FieldSpec) -> str:
    """A field as text for the payload hash. A timestamp is written in UTC whatever the session's
    time zone (a cast would follow it), so a replay landed on a machine in another zone is the same
    event; the text is what a cast gives in a UTC session, so hashes stored before are unchanged."""
    if field.kind == "timestamp":
        return f"CAST(timezone('UTC', {field.name}) AS VARCHAR) || '+00'"
    return f"CAST({field.name} AS VARCHAR)"


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
        return f"{_time_ref(field)} AS {field.name}"
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
    hashed = ", ".join(f"coalesce({_hashed_text(field)}, '\\N')" for field in spec.fields)
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
                       oversize OR strlen(line) > {MAX_LINE_BYTES} AS oversize
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
                       -- Keys all distinct when there are only as many as the spec's fields found
                       -- (each found field's key is among them): only other lines are counted
                       -- (list_unique was a fifth of the query's time).
                       CASE WHEN len(keys) = list_aggregate(types, 'count') THEN false
                            ELSE coalesce(len(keys) <> list_unique(keys), false) END AS duplicate_keys,
                       {values}
                FROM parsed
            ), described AS (
                SELECT *, {described} FROM fields
            ), timed AS (
                SELECT *{_time_columns(spec)} FROM described
            ), ruled AS (
                SELECT *, CASE {whens} END AS rule_no FROM timed
            ), judged AS (
                -- The raw line is never kept; its hash identifies a rejected one. Taken here, so
                -- the lines are not carried into the rows the pseudonyms are joined to.
                SELECT * EXCLUDE (line, read_sha256),
                       CASE WHEN rule_no IS NOT NULL THEN coalesce(read_sha256, sha256(line)) END AS line_sha256
                FROM ruled
            ){pseudonyms}, typed AS (
                SELECT source_file, line_no, rule_no, line_sha256,
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
