"""Reviewers, escalations, review decisions and the audit log."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from labelloop_assets.core import contracts as c
from labelloop_assets.core import store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.bursts import BURST_PREFIX
from labelloop_assets.core.ingest import (
    IngestReport,
    _concat,
    _finish,
    _label_detail,
    _label_rule,
    _read_batch,
    _split_duplicates,
    check_pseudonymization_key,
    pending_files,
    split_by_rules,
)
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.settings import Home, LabelloopConfigError, load_yaml_mapping

ACCEPT, REJECT, DEFER = c.ESCALATION_DECISIONS
# Burst acknowledgements travel as review decisions whose escalation_id is a burst id.
BURST_REASON = "burst"
CLOSING = (ACCEPT, REJECT)
# `labelloop review` lands the attempts it refused too (for the audit log) under this prefix.
REFUSED_PREFIX = "rev-refused-"


def load_reviewers(path: Path) -> dict[str, str]:
    """reviewers.yaml: reviewer id -> role."""
    raw = load_yaml_mapping(path, "reviewers")
    entries = raw.get("reviewers") or []
    if not isinstance(entries, list):
        raise LabelloopConfigError(f"reviewers file {path}: `reviewers` must be a list")
    reviewers: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("id") or not entry.get("role"):
            raise LabelloopConfigError(f"reviewers file {path}: each entry needs `id` and `role`")
        if entry["role"] not in c.USER_ROLES:
            raise LabelloopConfigError(
                f"reviewers file {path}: role {entry['role']!r} of {entry['id']!r} is not one of "
                f"{', '.join(c.USER_ROLES)}"
            )
        reviewers[str(entry["id"])] = str(entry["role"])
    return reviewers


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
    reviewers: dict[str, str],
    policy: ResolutionPolicy,
    run_id: str,
    burst_deciders: tuple[str, ...] = ("reviewer", "domain_expert"),
) -> tuple[IngestReport, pl.DataFrame]:
    """New review decision files: every refusal is quarantined *and* audited; accepted ones are
    stored for `production_corpus` to apply."""
    check_pseudonymization_key(con, key)
    spec = c.REVIEW_SPEC
    files = pending_files(home, con, spec.kind)
    batch, blank = _read_batch(home, files, spec, con, key)
    records = _concat(batch.accepted)
    quarantined = list(batch.quarantined)
    audit = _audit_rows_for_quarantine(pl.concat(quarantined) if quarantined else None, run_id)
    if records.height:
        roles = pl.DataFrame(
            {"reviewer_id": [pseudonym(key, r) for r in reviewers],
             "reviewer_role": list(reviewers.values())},
            schema={"reviewer_id": pl.String, "reviewer_role": pl.String},
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
            records.join(roles, on="reviewer_id", how="left")
            .join(escalations, on="escalation_id", how="left")
            .join(bursts_known, on="escalation_id", how="left")
            .with_columns(reason=pl.when(is_burst).then(pl.lit(BURST_REASON)).otherwise("reason"))
            .join(closed, on="escalation_id", how="left")
            .join(deciders, on=["reason", "reviewer_role"], how="left")
        )
        rules = [
            (pl.col("reviewer_role").is_null(), c.UNKNOWN_REVIEWER,
             "reviewer_id is not in reviewers.yaml"),
            (pl.col("closed").fill_null(False), c.ESCALATION_CLOSED, "escalation or burst already decided"),
            (~is_burst & pl.col("item_id").is_null(), c.UNKNOWN_ESCALATION, "escalation_id is not open"),
            (is_burst & pl.col("burst_known").is_null(), c.UNKNOWN_ESCALATION,
             "escalation_id names no detected correction burst"),
            (is_burst != pl.col("decision").is_in(list(c.BURST_DECISIONS)), c.DECISION_NOT_APPLICABLE,
             pl.when(is_burst)
             .then(pl.format("a correction burst takes {}, not {}", pl.lit(" or ".join(c.BURST_DECISIONS)), "decision"))
             .otherwise(pl.format("an escalation takes {}, not {}", pl.lit(", ".join(c.ESCALATION_DECISIONS)), "decision"))),
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
            [(closing & (pl.int_range(pl.len()).over("escalation_id", closing, order_by=["decided_at", "decision_id"]) > 0),
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
            "decided_at", "payload_hash", "source_file", "line_no",
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
    report = _finish(
        con, spec.kind, "review_decisions", batch, records, quarantined, blank, run_id,
        extra=[("audit_log", audit)],
    )
    return report, records


def _audit_rows_for_quarantine(rows: pl.DataFrame | None, run_id: str) -> pl.DataFrame:
    schema = {
        "actor": pl.String, "actor_role": pl.String, "action": pl.String, "target": pl.String,
        "outcome": pl.String, "reason": pl.String, "detail": pl.String, "run_id": pl.String,
    }
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
) -> Path:
    """Land one review decision as a file (atomically); the next ingest run validates it.

    A `refused` attempt is landed only to be audited: ingest quarantines it whatever it says."""
    record = {
        "decision_id": f"{REFUSED_PREFIX if refused else 'rev-'}{uuid.uuid4()}",
        "escalation_id": escalation_id,
        "decision": decision,
        "reviewer_id": reviewer_id,
        "rationale": rationale,
        "decided_at": (decided_at or datetime.now(timezone.utc)).isoformat(),
    }
    if label is not None:
        record["label"] = label
    path = home.landing_dir("reviews") / f"{record['decision_id']}.jsonl"
    return c.write_atomically(path, json.dumps(record) + "\n")
