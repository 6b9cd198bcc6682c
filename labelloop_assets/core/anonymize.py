"""Privacy by default: keyed pseudonyms for user ids and PII scrubbing of free text, in SQL."""

from __future__ import annotations

import hashlib
import hmac

_BLOCK = 64  # SHA-256 block size in bytes, as HMAC (RFC 2104) defines it

# Order matters: URLs with credentials before e-mail (which would leave the user name), and the
# specific phone shapes before the generic one.
SCRUB_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@]+@[^\s]*", "[url-with-credentials]"),
    (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "[email]"),
    (r"\b(?:\d{1,3}\.){3}\d{1,3}\b", "[ip]"),
    (r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b", "[ip]"),
    (r"(?:\b[0-9A-Fa-f]{1,4})?(?::[0-9A-Fa-f]{1,4}){0,6}::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?\b", "[ip]"),
    (r"\b\d{3}-\d{2}-\d{4}\b", "[national-id]"),
    (r"\b\d(?:[ -]?\d){12,18}\b", "[card-or-account]"),
    (r"(?:\+|\b00)\d{1,3}(?:[ .-]?\(?\d+\)?){2,7}", "[phone]"),
    (r"\b0\d(?:[ .-]?\d\d){4}\b", "[phone]"),
    (r"\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}\b", "[phone]"),
    (r"(?:\+|00)?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b", "[phone]"),
)


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


def scrub_sql(text_column: str, author_column: str | None = None) -> str:
    """Replace e-mail addresses, phone numbers and similar in free text with placeholders."""
    scrubbed = text_column
    for pattern, placeholder in SCRUB_PATTERNS:
        scrubbed = f"regexp_replace({scrubbed}, {_literal(pattern)}, '{placeholder}', 'g')"
    # Most text holds none of them: one combined test spares it the whole chain.
    any_pattern = _literal("|".join(f"(?:{pattern})" for pattern, _ in SCRUB_PATTERNS))
    expr = f"CASE WHEN regexp_matches({text_column}, {any_pattern}) THEN {scrubbed} ELSE {text_column} END"
    if author_column is not None:
        # People sign their rationale with their own id, in any case; it must not survive either.
        expr = (
            f"CASE WHEN coalesce({author_column}, '') <> '' AND "
            f"contains(lower({expr}), lower({author_column})) THEN "
            f"regexp_replace({expr}, '(?i)' || regexp_escape({author_column}), '[user]', 'g') "
            f"ELSE {expr} END"
        )
    return expr


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
