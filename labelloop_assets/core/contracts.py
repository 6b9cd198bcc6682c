"""Landing-file contracts: what a landing record may hold (field and record specs, limits) and
the machine-readable reasons it is quarantined for.

The records are checked against these specs in core/validation.py; the files are listed and
read through core/files.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

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
# Trust: authority is granted by the deployment, and reviewer actions are signed.
ROLE_NOT_GRANTED = "role_not_granted"  # an audit reason: the claim counts at the granted role
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
REVOKED_KEY = "revoked_key"
UNKNOWN_MODEL_VERSION = "unknown_model_version"
GOLD_NOT_DECLARED = "gold_not_declared"
ITEM_CONTENT_MISMATCH = "item_content_mismatch"
UNKNOWN_TASK = "unknown_task"
# Every code a quarantine row may carry (ROLE_NOT_GRANTED is an audit reason, never quarantined):
# `labelloop quarantine --reason` accepts these and names them when given another.
QUARANTINE_REASONS = (
    MALFORMED_JSON, NOT_AN_OBJECT, INVALID_ENCODING, OVERSIZE_LINE, MISSING_FIELD, INVALID_TYPE, INVALID_VALUE,
    OUT_OF_RANGE, BAD_TIMESTAMP, OVERSIZE_FIELD, UNKNOWN_LABEL, UNKNOWN_ITEM, GOLD_ITEM, NO_CONSENT,
    DUPLICATE_EVENT, CONFLICTING_DUPLICATE, UNKNOWN_REVIEWER, ROLE_NOT_ALLOWED, UNKNOWN_ESCALATION,
    ESCALATION_CLOSED, DECISION_NOT_APPLICABLE, FEATURE_LENGTH_MISMATCH, UNREADABLE_FILE, UNSUPPORTED_FORMAT,
    FILE_TOO_LARGE, TOO_MANY_LINES, DECOMPRESSED_TOO_LARGE, RESOURCE_LIMIT, UNSIGNED, BAD_SIGNATURE,
    UNKNOWN_KEY, REVOKED_KEY, UNKNOWN_MODEL_VERSION, GOLD_NOT_DECLARED, ITEM_CONTENT_MISMATCH,
    UNKNOWN_TASK,
)

# What the contract trims from both ends of a string field; the CLI and the signature check
# trim ids the same way in Python (str.strip(TRIMMED)), so they look up what ingest stores.
TRIMMED = " \t\r\n"


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
    content: bool = False  # an item's own content: kept as it came, compared but never looked up


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
        # An answer to a review task the loop issued (core/tasks.py): it must name a task for this item.
        FieldSpec("task_id", "string", required=False, max_length=64),
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

# Characters of text one item may carry (a long support ticket, not a book).
MAX_ITEM_TEXT = 20_000
# An item's uri: a scheme, then no whitespace (labelloop stores it and never follows it).
URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$"

ITEM_SPEC = RecordSpec(
    kind="items",
    key="item_id",
    fields=(
        FieldSpec("item_id", "string"),
        # Text, features or both (core/item_content.py); uri is the payload's address, never read.
        FieldSpec("text", "string", required=False, max_length=MAX_ITEM_TEXT, content=True),
        FieldSpec("features", "number_array", required=False, max_length=4096),
        FieldSpec("uri", "string", required=False, max_length=2048),
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
