"""Reviewer decisions (signed, verified against the contributor directory), escalations and the audit log."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from labelloop_assets.core import contracts as c
from labelloop_assets.core import store
from labelloop_assets.core.audit import SCHEMA as AUDIT_SCHEMA
from labelloop_assets.core.bursts import BURST_PREFIX
from labelloop_assets.core.directory import Directory
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.ingest import (
    IngestReport,
    _concat,
    _finish,
    _label_detail,
    _label_rule,
    _read_batch,
    _split_duplicates,
    pending_files,
    split_by_rules,
)
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.secret import check_pseudonymization_key
from labelloop_assets.core.settings import Home
from labelloop_assets.core.signing import REVIEW_DOMAIN, REVIEW_FIELDS, canonical, sign_review, verify

ACCEPT, REJECT, DEFER = c.ESCALATION_DECISIONS
# Burst acknowledgements travel as review decisions whose escalation_id is a burst id.
BURST_REASON = "burst"
CLOSING = (ACCEPT, REJECT)
# `labelloop review` lands the attempts it refused too (for the audit log) under this prefix.
REFUSED_PREFIX = "rev-refused-"
# The policy files a review ingest decides by (recorded with its run, see store.policy_rows).
REVIEW_POLICIES = ("governance.yaml", "contributors.yaml", "reviewers.yaml")
# A key id as `labelloop keys new` makes them; anything else in key_id is not echoed back.
_KEY_ID = re.compile(r"^ed25519:[0-9a-f]{24}$")
# Refusals of the signature check, in the order they are tried.
SIGNATURE_REASONS = (c.UNKNOWN_REVIEWER, c.UNSIGNED, c.UNKNOWN_KEY, c.BAD_SIGNATURE, c.REVOKED_KEY)


def directory(home: Home) -> Directory:
    """Who may act as a reviewer, and with which keys: contributors.yaml (and reviewers.yaml)."""
    return Directory.load(home.contributors_file, home.reviewers_file)


ESCALATIONS_SQL = """
WITH closing AS (
    SELECT item_id, max(ingested_at) AS closed_at, count(*) AS n_closed
    FROM review_decisions WHERE decision IN ('accept', 'reject') GROUP BY item_id
), recent AS (
    SELECT d.* FROM label_decisions d LEFT JOIN closing c USING (item_id)
    WHERE c.closed_at IS NULL OR d.decided_at > c.closed_at
), latest AS (
    SELECT * FROM recent
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY decision_id DESC) = 1
), still_open AS (
    SELECT * FROM latest WHERE status = 'escalate'
), breaks AS (
    SELECT item_id, max(decision_id) AS last_break FROM recent
    WHERE status <> 'escalate' GROUP BY item_id
), opened AS (
    SELECT r.item_id, min(CASE WHEN $event_clock THEN r.event_time ELSE r.decided_at END) AS opened_at
    FROM recent r JOIN still_open o USING (item_id) LEFT JOIN breaks b USING (item_id)
    WHERE r.status = 'escalate' AND r.decision_id > coalesce(b.last_break, 0)
    GROUP BY r.item_id
), clock AS (
    SELECT CASE WHEN $event_clock THEN (SELECT max(created_at) FROM validated_labels)
                ELSE now() END AS now
), confidence AS (
    SELECT v.item_id, max(v.prediction_confidence) AS model_confidence
    FROM validated_labels v JOIN still_open o USING (item_id) GROUP BY v.item_id
), ids AS (
    SELECT o.item_id, 'esc-' || o.item_id || '-' || (coalesce(c.n_closed, 0) + 1) AS escalation_id
    FROM still_open o LEFT JOIN closing c USING (item_id)
), deferrals AS (
    SELECT escalation_id, count(*) AS deferrals FROM review_decisions
    WHERE decision = 'defer' GROUP BY escalation_id
)
SELECT i.escalation_id, o.item_id, o.escalation_reason AS reason, o.current_label,
       o.proposed_label, o.support, o.share, o.n_contributors, o.event_ids, o.rationale,
       f.model_confidence, op.opened_at,
       op.opened_at + to_seconds(CAST($sla_hours * 3600 AS BIGINT)) AS sla_deadline,
       epoch(clock.now - op.opened_at) / 3600.0 AS age_hours,
       clock.now > op.opened_at + to_seconds(CAST($sla_hours * 3600 AS BIGINT)) AS sla_breached,
       coalesce(d.deferrals, 0)::INTEGER AS deferrals, now() AS refreshed_at
FROM still_open o
JOIN ids i USING (item_id)
JOIN opened op USING (item_id)
LEFT JOIN confidence f USING (item_id)
LEFT JOIN deferrals d ON d.escalation_id = i.escalation_id
CROSS JOIN clock
ORDER BY op.opened_at, o.item_id
"""


def open_escalations(
    con: duckdb.DuckDBPyConnection, policy: ResolutionPolicy
) -> pl.DataFrame:
    """Items whose latest decision since their last review is `escalate`, with age and SLA."""
    return store.frame(
        con,
        ESCALATIONS_SQL,
        {"sla_hours": policy.escalation_sla_hours, "event_clock": policy.escalation_clock == "events"},
    )


def ingest_reviews(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    ontology: Ontology,
    key: bytes,
    directory: Directory,
    policy: ResolutionPolicy,
    run_id: str,
    burst_deciders: tuple[str, ...] = ("reviewer", "domain_expert"),
) -> tuple[IngestReport, pl.DataFrame]:
    """New review decision files: each line's signature is verified against the contributor
    directory before anything else is believed; every refusal is quarantined *and* audited;
    accepted ones are stored for `production_corpus` to apply."""
    check_pseudonymization_key(con, key)
    spec = c.REVIEW_SPEC
    files = pending_files(home, con, spec.kind)
    lines: list[pl.DataFrame] = []
    batch, blank = _read_batch(files, spec, con, key, raw_lines=lines)
    records = _concat(batch.accepted)
    quarantined = list(batch.quarantined)
    audit = _audit_rows_for_quarantine(pl.concat(quarantined) if quarantined else None, run_id)
    if records.height:
        # The role a decision carries is the directory's role of the key's owner, nothing the line says.
        verdicts = signature_verdicts(
            [frame.join(records.select("source_file", "line_no"), on=["source_file", "line_no"], how="semi")
             for frame in lines],
            directory, datetime.now(UTC),
        )
        escalations = store.frame(con, "SELECT escalation_id, item_id, reason FROM escalations")
        closed = store.frame(
            con,
            "SELECT DISTINCT escalation_id, true AS closed FROM review_decisions "
            "WHERE decision IN ('accept', 'reject', 'release', 'discard')",
        )
        bursts_known = store.frame(
            con, "SELECT burst_id AS escalation_id, true AS burst_known FROM correction_bursts"
        )
        deciders = pl.DataFrame(
            [(reason, role) for reason in ("tie", "disagreement", "contradicts_confirmed")
             for role in policy.deciders(reason)]
            + [(BURST_REASON, role) for role in burst_deciders],
            schema={"reason": pl.String, "reviewer_role": pl.String}, orient="row",
        ).with_columns(allowed=pl.lit(True))
        label, label_bad = _label_rule(ontology, "label", required=False)
        is_burst = pl.col("escalation_id").str.starts_with(BURST_PREFIX)
        records = (
            records.join(verdicts, on=["source_file", "line_no"], how="left")
            # A line the check did not reach is not believed (it cannot happen: every line is read).
            .with_columns(
                _sig_reason=pl.when(pl.col("_verified").is_null()).then(pl.lit(c.BAD_SIGNATURE)).otherwise("_sig_reason"),
                _sig_detail=pl.when(pl.col("_verified").is_null()).then(pl.lit("signature not verified"))
                .otherwise("_sig_detail"),
            )
            .join(escalations, on="escalation_id", how="left")
            .join(bursts_known, on="escalation_id", how="left")
            .with_columns(reason=pl.when(is_burst).then(pl.lit(BURST_REASON)).otherwise("reason"))
            .join(closed, on="escalation_id", how="left")
            .join(deciders, on=["reason", "reviewer_role"], how="left")
        )
        rules = [
            # First: who signed. Nothing about the escalation is looked at for a line whose
            # signature does not verify as its reviewer's.
            *[(pl.col("_sig_reason") == reason, reason, pl.col("_sig_detail")) for reason in SIGNATURE_REASONS],
            (pl.col("closed").fill_null(False), c.ESCALATION_CLOSED, "escalation or burst already decided"),
            (~is_burst & pl.col("item_id").is_null(), c.UNKNOWN_ESCALATION, "escalation_id is not open"),
            (is_burst & pl.col("burst_known").is_null(), c.UNKNOWN_ESCALATION,
             "escalation_id names no detected correction burst"),
            (is_burst != pl.col("decision").is_in(list(c.BURST_DECISIONS)), c.DECISION_NOT_APPLICABLE,
             pl.when(is_burst)
             .then(pl.format("a correction burst takes {}, not {}", pl.lit(" or ".join(c.BURST_DECISIONS)), "decision"))
             .otherwise(
                 pl.format("an escalation takes {}, not {}", pl.lit(", ".join(c.ESCALATION_DECISIONS)), "decision")
             )),
            (pl.col("allowed").is_null(), c.ROLE_NOT_ALLOWED,
             pl.format("role {} may not decide a {} escalation", "reviewer_role", "reason")),
            ((pl.col("decision") == ACCEPT) & pl.col("label").is_null(), c.MISSING_FIELD,
             "label: required to accept"),
            (label_bad, c.UNKNOWN_LABEL, _label_detail("label")),
            # What the command line refused never takes effect, even if what was wrong then (an
            # escalation not open yet, say) is right by the time this run reads it.
            (pl.col("decision_id").str.starts_with(REFUSED_PREFIX), c.INVALID_VALUE,
             "decision_id: refused by `labelloop review` when it was submitted; kept for the audit log only"),
        ]
        records, rejected = split_by_rules(records, spec.kind, spec.key, rules)
        # Within one batch only the first valid closing decision (by decided_at) of an escalation
        # or burst closes it; later ones are refused as already decided.
        closing = pl.col("decision").is_in([*CLOSING, *c.BURST_DECISIONS])
        records, late = split_by_rules(
            records, spec.kind, spec.key,
            [(closing
              & (pl.int_range(pl.len()).over("escalation_id", closing, order_by=["decided_at", "decision_id"]) > 0),
              c.ESCALATION_CLOSED, "escalation or burst already decided earlier in the same batch")],
        )
        rejected = pl.concat([rejected, late])
        records, replayed = _split_duplicates(records, con, "review_decisions", spec.kind, spec.key)
        quarantined.extend([rejected, replayed])
        audit = pl.concat(
            [audit, _audit_rows_for_quarantine(pl.concat([rejected, replayed]), run_id)]
        )
        records = records.with_columns(label=label).select(
            "decision_id", "escalation_id", "item_id", "decision", "label",
            pl.col("reviewer_id").alias("reviewer_pseudonym"), "reviewer_role", "rationale",
            "decided_at", "payload_hash", "source_file", "line_no", "key_id", "signature",
        )
        audit = pl.concat(
            [
                audit,
                records.select(
                    pl.col("reviewer_pseudonym").alias("actor"),
                    pl.col("reviewer_role").alias("actor_role"),
                    pl.format("review.{}", "decision").alias("action"),
                    pl.col("escalation_id").alias("target"),
                    pl.lit("accepted").alias("outcome"),
                    pl.lit(None, pl.String).alias("reason"),
                    pl.col("rationale").str.slice(0, 500).alias("detail"),
                    pl.lit(run_id).alias("run_id"),
                ),
            ]
        )
    # The policies this batch was judged by, named with its run (reviewers.yaml only where it is read).
    used = tuple(name for name in REVIEW_POLICIES if (home.root / name).exists())
    report = _finish(
        con, spec.kind, "review_decisions", batch, records, quarantined, blank, run_id,
        extra=[("policy_uses", store.policy_rows(run_id, "review_decisions", used))], audit_rows=audit,
    )
    return report, records


def signature_verdicts(lines: list[pl.DataFrame], directory: Directory, now: datetime) -> pl.DataFrame:
    """(source_file, line_no) -> the signature check's refusal (reason, detail) or the signer's role.

    Review files are small: each line (one that passed the structural checks) is parsed here in
    Python and its canonical form rebuilt from the values as landed (before trimming, scrubbing,
    pseudonymization), then verified."""
    rows, authorities = [], directory.authorities()
    for frame in lines:
        for source_file, line_no, line in frame.select("source_file", "line_no", "line").iter_rows():
            reason, detail, role = _verdict(line, directory, authorities, now)
            rows.append((source_file, line_no, reason, detail, role))
    return pl.DataFrame(
        rows, orient="row",
        schema={"source_file": pl.String, "line_no": pl.Int64, "_sig_reason": pl.String,
                "_sig_detail": pl.String, "reviewer_role": pl.String},
    ).with_columns(_verified=pl.lit(True))


def _verdict(
    line: str, directory: Directory, authorities: dict[str, str], now: datetime
) -> tuple[str | None, str | None, str | None]:
    try:
        return _checked(json.loads(line), directory, authorities, now)
    except (ValueError, TypeError, RecursionError):
        # Text the structural checks let through but Python cannot read or re-encode (they
        # refuse such lines first): nothing to verify, so nothing is believed.
        return c.BAD_SIGNATURE, "the line could not be read to verify its signature", None


def _checked(
    raw, directory: Directory, authorities: dict[str, str], now: datetime
) -> tuple[str | None, str | None, str | None]:
    if not isinstance(raw, dict):
        return c.BAD_SIGNATURE, "the line could not be read to verify its signature", None
    reviewer = raw.get("reviewer_id")
    reviewer = reviewer.strip(c.TRIMMED) if isinstance(reviewer, str) else None
    role = authorities.get(reviewer) if reviewer else None
    if role is None:
        return c.UNKNOWN_REVIEWER, "reviewer_id is not a reviewer in contributors.yaml", None
    key_id, signature = raw.get("key_id"), raw.get("signature")
    if not key_id or not signature:
        return (c.UNSIGNED, "no key_id and signature: reviewer actions must be signed with the reviewer's key "
                "(`labelloop review ... --as ID` signs; `labelloop keys new ID --register` makes a key)", None)
    found = directory.key(key_id) if isinstance(key_id, str) else None
    shown = key_id if isinstance(key_id, str) and _KEY_ID.match(key_id) else "(not a key id)"
    if found is None:
        return c.UNKNOWN_KEY, f"key_id {shown} is not a key in contributors.yaml", None
    owner, public = found
    if owner.id != reviewer:
        return c.BAD_SIGNATURE, f"key {shown} belongs to another contributor than reviewer_id", None
    if not isinstance(signature, str) or not verify(
        public.raw, canonical(REVIEW_DOMAIN, raw, REVIEW_FIELDS), signature
    ):
        return (c.BAD_SIGNATURE, f"signature does not verify with key {shown}: the decision was changed "
                "after it was signed, or signed with another key", None)
    if public.revoked(now):
        return c.REVOKED_KEY, f"key {shown} was revoked at {public.revoked_at.isoformat()}", None
    return None, None, owner.role


def _audit_rows_for_quarantine(rows: pl.DataFrame | None, run_id: str) -> pl.DataFrame:
    schema = AUDIT_SCHEMA
    if rows is None or rows.height == 0:
        return pl.DataFrame(schema=schema)
    return rows.select(
        pl.lit("unverified").alias("actor"),
        pl.lit(None, pl.String).alias("actor_role"),
        pl.lit("review.decide").alias("action"),
        pl.format("{}:{}", "source_file", pl.col("line_no").cast(pl.String).fill_null("-")).alias("target"),
        pl.lit("refused").alias("outcome"),
        "reason",
        "detail",
        pl.lit(run_id).alias("run_id"),
    ).cast(schema)


def write_decision(
    home: Home,
    escalation_id: str,
    decision: str,
    reviewer_id: str,
    rationale: str,
    label: str | None = None,
    decided_at: datetime | None = None,
    refused: bool = False,
    signer: Ed25519PrivateKey | None = None,
) -> Path:
    """Land one review decision as a file (atomically), signed with `signer`; the next ingest run
    verifies and validates it.

    A `refused` attempt is landed only to be audited: ingest quarantines it whatever it says (it
    is signed when a usable key was found, so the audit log can tell who really tried)."""
    record = {
        "decision_id": f"{REFUSED_PREFIX if refused else 'rev-'}{uuid.uuid4()}",
        "escalation_id": escalation_id,
        "decision": decision,
        "reviewer_id": reviewer_id,
        "rationale": rationale,
        "decided_at": (decided_at or datetime.now(UTC)).isoformat(),
    }
    if label is not None:
        record["label"] = label
    if signer is not None:
        record = sign_review(signer, record)
    path = home.landing_dir("reviews") / f"{record['decision_id']}.jsonl"
    return write_atomically(path, json.dumps(record) + "\n")
