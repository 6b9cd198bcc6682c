"""Privacy by default: keyed pseudonyms for user ids and PII scrubbing of free text, in SQL."""

from __future__ import annotations

import hashlib
import hmac

_BLOCK = 64  # SHA-256 block size in bytes, as HMAC (RFC 2104) defines it

# The SQL fast path: shapes that are personal data whatever surrounds them, replaced by DuckDB
# over the whole batch. Each is valid both for RE2 (DuckDB) and Python's re (the pandas baseline).
# What needs a checksum, a phone-number library or Unicode normalization is left to Python
# (core/scrub.py), so no regex here may take part of a longer number (an IBAN once came out as
# `DE89370[phone]`). Order matters: URLs with credentials before e-mail (which would leave the
# user name).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|0?[0-9]?[0-9])"
SCRUB_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@]+@[^\s]*", "[url-with-credentials]"),
    # Any local part (it may hold letters outside ASCII), an ASCII or punycode domain; an IDN
    # domain is left to Python.
    (r"[^\s@<>()\[\]{},;:\"]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.(?:xn--[A-Za-z0-9-]+|[A-Za-z]{2,})", "[email]"),
    (rf"\b(?:{_OCTET}\.){{3}}{_OCTET}\b", "[ip]"),
    (r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b", "[ip]"),
    (r"\b(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}\b", "[ip]"),
    (r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", "[national-id]"),
    # International numbers: a `+`, a country code, at least two more groups of 2 to 5 digits.
    (r"\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?)?(?:[ .-]?[0-9]{2,5}){2,5}", "[phone]"),
)

# After the fast path, a text goes through the Python scrubber only if it still holds one of
# these: a digit of another script, a full-width form, an invisible character (above) or a
# circled or superscript digit; an `@`; six digits or more, possibly separated; an
# `(at)`/`[dot]`-style or `x at y dot z`-style obfuscation; the shape of an Italian fiscal code.
# Other text outside ASCII (accents, dashes, quotes, other scripts) stays in SQL. RE2 syntax (for
# DuckDB, and for pandas' Arrow-backed strings in the baseline).
# Invisible characters: format characters (zero-width space, joiners, bidi marks) and control
# characters (tab and line breaks aside). The detectors read a text without them, so one between
# two digits cannot split a number; a text holding one skips the SQL fast path, which would see
# the number cut in two and replace only its first part.
INVISIBLE_PATTERN = r"\p{Cf}|[\x{00}-\x{08}\x{0B}\x{0C}\x{0E}-\x{1F}\x{7F}-\x{9F}]"
RESIDUAL_PATTERN = "|".join(
    (
        r"[^\P{Nd}0-9]|[\x{FF01}-\x{FF5E}\x{FE6B}]|\p{No}",
        INVISIBLE_PATTERN,
        r"@|%40|&#0*64;|&#[xX]0*40;|&commat;",
        r"[0-9](?:[\s().\-/_*,\x{00B7}\p{Pd}\p{Zs}]*[0-9]){5,}",
        r"(?i:[^\s(\[{<]\s*[(\[{<]\s*(?:at|dot)\s*[)\]}>])",
        r"(?i:\S\s+at\s+[\pL\pN-]+(?:\s+dot\s+|\.)\pL)",
        r"[A-Za-z]{6}[0-9]{2}[A-Za-z][0-9]{2}[A-Za-z][0-9]{3}[A-Za-z]",
    )
)

# The Python scrubber as SQL functions (register_scrubber puts them on a connection).
SCRUB_TEXT_FUNCTION = "labelloop_scrub_text"
SCRUB_JSON_FUNCTION = "labelloop_scrub_json"


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The inner and outer padded keys of HMAC-SHA256, so SQL can finish the hash per row."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pseudonym_sql(column: str, inner_param: str, outer_param: str) -> str:
    """HMAC-SHA256(key, column) as hex, computed by DuckDB on every row at once."""
    return (
        f"CASE WHEN {column} IS NULL THEN NULL ELSE "
        f"'u_' || left(sha256({outer_param}::BLOB || unhex(sha256({inner_param}::BLOB || "
        f"encode({column})))), 32) END"
    )


def pseudonym(key: bytes, user_id: str) -> str:
    """The same pseudonym computed in Python, for look-ups by a known user id."""
    return "u_" + hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def scrub_sql(text_column: str, author_column: str | None = None, json_object: bool = False) -> str:
    """Free text with e-mail addresses, phone numbers, card and account numbers, IBANs, national
    ids, IP addresses and URLs with credentials replaced by placeholders, then the author's own id
    by [user]. With `json_object`, the column holds a JSON object whose every string is scrubbed
    that way (see scrub_json_sql).

    The connection that runs the expression needs register_scrubber(con) first.
    """
    # One test for every shape first: most text holds none and skips the rest.
    flagged = _literal("|".join(f"(?:{p})" for p in (*[p for p, _ in SCRUB_PATTERNS], RESIDUAL_PATTERN)))
    if json_object:
        # Everything in Python (string by string, the JSON kept valid), for objects that may
        # hold anything at all; most hold nothing and never leave SQL.
        author = f"coalesce({author_column}, '')" if author_column is not None else "''"
        mentions_author = (
            f" OR (coalesce({author_column}, '') <> '' AND contains(lower({text_column}), lower({author_column})))"
            if author_column is not None else ""
        )
        return (
            f"CASE WHEN {text_column} IS NOT NULL AND (regexp_matches({text_column}, {flagged}){mentions_author}) "
            f"THEN {SCRUB_JSON_FUNCTION}({text_column}, {author}) ELSE {text_column} END"
        )
    # Each step reads the one before through a lambda, so DuckDB computes it once per row (an
    # expression written out three times in a CASE is computed three times).
    then = lambda expr, body: f"list_transform([{expr}], lambda scrub_v: {body})[1]"  # noqa: E731

    unsigned = (
        (lambda expr: expr) if author_column is None else lambda expr: (
            f"CASE WHEN coalesce({author_column}, '') <> '' AND contains(lower({expr}), lower({author_column})) "
            f"THEN regexp_replace({expr}, '(?i)' || regexp_escape({author_column}), '[user]', 'g') ELSE {expr} END"
        )
    )
    scrubbed = text_column
    for pattern, placeholder in SCRUB_PATTERNS:
        scrubbed = f"regexp_replace({scrubbed}, {_literal(pattern)}, '{placeholder}', 'g')"
    # Most text holds none of them: one combined test spares it the whole chain.
    any_pattern = _literal("|".join(f"(?:{pattern})" for pattern, _ in SCRUB_PATTERNS))
    fast = (
        f"CASE WHEN regexp_matches({text_column}, {any_pattern}) "
        f"AND NOT regexp_matches({text_column}, {_literal(INVISIBLE_PATTERN)}) "
        f"THEN {scrubbed} ELSE {text_column} END"
    )
    # What may still hold personal data goes through the Python scrubber.
    shaped = then(
        fast,
        f"CASE WHEN regexp_matches(scrub_v, {_literal(RESIDUAL_PATTERN)}) "
        f"THEN {SCRUB_TEXT_FUNCTION}(scrub_v) ELSE scrub_v END",
    )
    full = f"CASE WHEN regexp_matches({text_column}, {flagged}) THEN {shaped} ELSE {text_column} END"
    # People sign their rationale with their own id, in any case; it must not survive either.
    return full if author_column is None else then(full, unsigned("scrub_v"))


def scrub_json_sql(column: str, author_column: str | None = None) -> str:
    """A JSON object column (such as a correction's `context`) with every string value in it
    scrubbed as free text (scrub_sql), keys, numbers and structure kept: one SQL expression,
    so the object is scrubbed in the same query that extracts it."""
    return scrub_sql(column, author_column, json_object=True)


def register_scrubber(con) -> None:
    """Put the Python scrubber (core/scrub.py) on `con` as the SQL functions scrub_sql and
    scrub_json_sql call; a connection that has them already (or whose database has them, from
    another cursor) is left as it is."""
    import duckdb
    from duckdb.func import PythonUDFType

    from labelloop_assets.core import scrub

    for name, function, parameters in (
        (SCRUB_TEXT_FUNCTION, scrub.scrub_text_batch, ["VARCHAR"]),
        (SCRUB_JSON_FUNCTION, scrub.scrub_json_batch, ["VARCHAR", "VARCHAR"]),
    ):
        try:
            con.create_function(name, function, parameters, "VARCHAR", type=PythonUDFType.ARROW)
        except (duckdb.NotImplementedException, duckdb.CatalogException) as error:
            # Registered on this connection already, or on another cursor of the same database
            # (the lake's connections are cursors of one attached database): it is there.
            if "already" not in str(error):
                raise


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
