"""Correction bursts: daily correction volume per contributor and per segment, scored robustly.

A burst is judged by its *share* of the day's corrections, not its raw count: on a busy day every
contributor and segment grows together and nothing stands out, while one account mass-relabeling
a class takes a share it never had. For each (day, scope, key):

    expected = median(baseline shares) x corrections that day
    scale    = max(1.4826 x MAD(baseline shares) x corrections that day, sqrt(max(expected, 1)))
    score    = (corrections - expected) / scale

The baseline is the previous `baseline_days` days that had any corrections (a key absent on such
a day had share 0). 1.4826 x MAD estimates the standard deviation under normality and, unlike
it, is not pulled by the outliers it is meant to find; the Poisson floor keeps a near-constant
baseline from turning ordinary noise into huge scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date

import duckdb
import polars as pl

from labelloop_assets.core import store
from labelloop_assets.core.contracts import USER_ROLES
from labelloop_assets.core.settings import LabelloopConfigError, config_number

CONTRIBUTOR = "contributor"
SEGMENT = "segment"
SCOPES = (CONTRIBUTOR, SEGMENT)
WARN, SEVERE = "warn", "severe"
# A burst's life: flagged (a warning, nothing held) or held (severe), until a reviewer
# releases it (its corrections count) or discards it (they never will).
FLAGGED, HELD, RELEASED, DISCARDED = "flagged", "held", "released", "discarded"
ACKNOWLEDGED = {"release": RELEASED, "discard": DISCARDED}
MAD_TO_SIGMA = 1.4826
BURST_PREFIX = "burst-"

VOLUME_SCHEMA = {"day": pl.Date, "scope": pl.String, "key": pl.String, "n": pl.Int64}


@dataclass(frozen=True)
class BurstPolicy:
    """When correction volume is a burst, when it is severe enough to hold, and who may acknowledge it."""

    baseline_days: int = 14
    min_baseline_days: int = 3
    warn_score: float = 5.0
    severe_score: float = 10.0
    min_events: int = 20
    severe_min_events: int = 30
    # A key must also take this share of the day's corrections: a part-time or new contributor
    # (or a new label) has a baseline share of 0, and a handful of corrections is no attack.
    min_share: float = 0.05
    severe_min_share: float = 0.2
    # A released burst that grows past this multiple of what the reviewer saw is held again.
    regrowth: float = 1.5
    may_acknowledge: tuple[str, ...] = ("reviewer", "domain_expert")

    def __post_init__(self) -> None:
        if self.baseline_days < 1 or self.min_baseline_days < 1:
            raise LabelloopConfigError("governance: bursts.baseline_days and min_baseline_days must be at least 1")
        if self.min_baseline_days > self.baseline_days:
            raise LabelloopConfigError("governance: bursts.min_baseline_days cannot exceed baseline_days")
        if not 0 < self.warn_score <= self.severe_score:
            raise LabelloopConfigError("governance: bursts need 0 < warn_score <= severe_score")
        if not 1 <= self.min_events <= self.severe_min_events:
            raise LabelloopConfigError("governance: bursts need 1 <= min_events <= severe_min_events")
        if not 0 <= self.min_share <= self.severe_min_share <= 1:
            raise LabelloopConfigError("governance: bursts need 0 <= min_share <= severe_min_share <= 1")
        if self.regrowth < 1:
            raise LabelloopConfigError("governance: bursts.regrowth must be at least 1")
        unknown = set(self.may_acknowledge) - set(USER_ROLES)
        if unknown or not self.may_acknowledge:
            raise LabelloopConfigError(
                f"governance: bursts.may_acknowledge must list roles from {', '.join(USER_ROLES)}"
            )

    @classmethod
    def from_mapping(cls, raw: dict | None, source: str = "governance") -> "BurstPolicy":
        raw = raw or {}
        if not isinstance(raw, dict):
            raise LabelloopConfigError(f"{source}: `bursts` must be a mapping")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise LabelloopConfigError(f"{source}: bursts has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values: dict = {}
        for key, value in raw.items():
            if key == "may_acknowledge":
                if not isinstance(value, list):
                    raise LabelloopConfigError(f"{source}: bursts.may_acknowledge must be a list of roles")
                values[key] = tuple(str(role) for role in value)
                continue
            values[key] = config_number(value, getattr(cls, key), f"{source}: bursts.{key}")
        return cls(**values)


def daily_volume(events: pl.DataFrame) -> pl.DataFrame:
    """Corrections per (day, scope, key) from events with created_at, user_pseudonym, source, corrected_label."""
    if events.height == 0:
        return pl.DataFrame(schema=VOLUME_SCHEMA)
    return (
        _keyed(events)
        .group_by("day", "scope", "key")
        .agg(pl.len().cast(pl.Int64).alias("n"))
        .sort("day", "scope", "key")
    )


def _keyed(events: pl.DataFrame, *carry: str) -> pl.DataFrame:
    """One row per event and scope: the `carry` columns, the UTC day, the scope and its key."""
    return events.select(
        *carry,
        pl.col("created_at").dt.convert_time_zone("UTC").dt.date().alias("day"),
        pl.col("user_pseudonym").alias(CONTRIBUTOR),
        segment_key(pl.col("source"), pl.col("corrected_label")).alias(SEGMENT),
    ).unpivot(index=[*carry, "day"], on=list(SCOPES), variable_name="scope", value_name="key")


def segment_key(source: pl.Expr, label: pl.Expr) -> pl.Expr:
    """A segment is where corrections come from and what they ask for: `source/label`."""
    return pl.concat_str(source, pl.lit("/"), label)


def burst_id(day: date, scope: str, key: str) -> str:
    """Stable per (day, scope, key): a re-score of the same day updates the same burst."""
    digest = hashlib.sha256(f"{scope}\x1f{key}".encode()).hexdigest()[:10]
    return f"{BURST_PREFIX}{day.isoformat()}-{scope}-{digest}"


SCORE_SCHEMA = {
    "day": pl.Date, "scope": pl.String, "key": pl.String, "n_events": pl.Int64,
    "day_total": pl.Int64, "baseline_days": pl.Int64, "baseline_median_share": pl.Float64,
    "baseline_mad_share": pl.Float64, "expected": pl.Float64, "score": pl.Float64,
    "severity": pl.String, "note": pl.String,
}


def score_bursts(volume: pl.DataFrame, days: list[date], policy: BurstPolicy) -> pl.DataFrame:
    """Every key active on one of `days`, scored against its baseline; severity null = ordinary."""
    if volume.height == 0 or not days:
        return pl.DataFrame(schema=SCORE_SCHEMA)
    totals = (
        volume.filter(pl.col("scope") == CONTRIBUTOR).group_by("day").agg(pl.col("n").sum().alias("total"))
    )
    active_days = totals.filter(pl.col("total") > 0).sort("day")
    scored_days = pl.DataFrame({"day": sorted(set(days))}, schema={"day": pl.Date})
    # The baseline of day d: the last `baseline_days` days before d that had any corrections.
    baseline_days = (
        scored_days.join(active_days.rename({"day": "baseline_day"}), how="cross")
        .filter(pl.col("baseline_day") < pl.col("day"))
        .sort("day", "baseline_day", descending=[False, True])
        .group_by("day", maintain_order=True)
        .head(policy.baseline_days)
    )
    today = volume.join(scored_days, on="day").join(totals, on="day")
    shares = (
        today.select("day", "scope", "key")
        .join(baseline_days, on="day")
        .join(
            volume.rename({"day": "baseline_day", "n": "n_baseline"}),
            on=["baseline_day", "scope", "key"],
            how="left",
        )
        .with_columns(share=pl.col("n_baseline").fill_null(0) / pl.col("total"))
    )
    stats = (
        shares.group_by("day", "scope", "key")
        .agg(
            pl.len().alias("baseline_days"),
            pl.col("share").median().alias("baseline_median_share"),
            (pl.col("share") - pl.col("share").median()).abs().median().alias("baseline_mad_share"),
        )
    )
    enough = pl.col("baseline_days") >= policy.min_baseline_days
    scored = (
        today.rename({"n": "n_events", "total": "day_total"})
        .join(stats, on=["day", "scope", "key"], how="left")
        .with_columns(pl.col("baseline_days").fill_null(0).cast(pl.Int64))
        .with_columns(
            expected=pl.when(enough).then(pl.col("baseline_median_share") * pl.col("day_total")),
        )
        .with_columns(
            scale=pl.max_horizontal(
                MAD_TO_SIGMA * pl.col("baseline_mad_share") * pl.col("day_total"),
                pl.max_horizontal(pl.col("expected"), pl.lit(1.0)).sqrt(),
            )
        )
        .with_columns(
            score=(pl.col("n_events") - pl.col("expected")) / pl.col("scale"),
            share=pl.col("n_events") / pl.col("day_total"),
        )
        .with_columns(
            severity=pl.when(
                (pl.col("score") >= policy.severe_score) & (pl.col("n_events") >= policy.severe_min_events)
                & (pl.col("share") >= policy.severe_min_share)
            )
            .then(pl.lit(SEVERE))
            .when(
                (pl.col("score") >= policy.warn_score) & (pl.col("n_events") >= policy.min_events)
                & (pl.col("share") >= policy.min_share)
            )
            .then(pl.lit(WARN)),
            note=pl.when(~enough).then(
                pl.format(
                    "not scored: {} earlier day(s) with corrections, {} needed for a baseline",
                    "baseline_days", pl.lit(policy.min_baseline_days),
                )
            ),
        )
    )
    return scored.select(list(SCORE_SCHEMA)).cast(SCORE_SCHEMA).sort("day", "scope", "key")


def describe(scored: pl.DataFrame) -> pl.Series:
    """One sentence per scored burst: what happened, against what baseline, how unusual."""
    what = pl.when(pl.col("scope") == CONTRIBUTOR).then(
        pl.format("contributor {} sent", "key")
    ).otherwise(pl.format("segment {} (source/label) received", "key"))
    return scored.select(
        pl.format(
            "{} {} of the {} corrections on {}; expected {} from a {}-day baseline "
            "(median share {}); robust z {}",
            what, "n_events", "day_total", pl.col("day").cast(pl.String),
            pl.col("expected").round(1), "baseline_days",
            pl.col("baseline_median_share").round(3), pl.col("score").round(1),
        ).alias("reason")
    )["reason"]


RAW_SEQ = "correction_bursts.raw_seq"
# A correction `v`'s day and keys in SQL, as `daily_volume` and `membership` derive them in Polars.
VOTE_DAY = "CAST(timezone('UTC', v.created_at) AS DATE)"
VOTE_KEY = {CONTRIBUTOR: "v.user_pseudonym", SEGMENT: "v.source || '/' || v.corrected_label"}
# `v` falls in burst `b`.
IN_BURST = (
    f"b.day = {VOTE_DAY} AND b.key = CASE b.scope WHEN '{CONTRIBUTOR}' THEN {VOTE_KEY[CONTRIBUTOR]} "
    f"ELSE {VOTE_KEY[SEGMENT]} END"
)
# validated_labels rows that count: none in a held burst (yet) or a discarded one (ever).
# Membership is read at query time from (UTC day, contributor) and (UTC day, source/label), so a
# burst found later also covers the corrections staged before it crossed the threshold. Anti
# joins on equal keys: with no burst held, DuckDB skips the probe and this costs nothing.
_BLOCKED = "(SELECT day, key FROM correction_bursts WHERE status IN ('held', 'discarded') AND scope = '{scope}')"
COUNTED_VOTES_SQL = f"""
    SELECT v.* FROM validated_labels v
    ANTI JOIN {_BLOCKED.format(scope=CONTRIBUTOR)} bc ON bc.key = {VOTE_KEY[CONTRIBUTOR]} AND bc.day = {VOTE_DAY}
    ANTI JOIN {_BLOCKED.format(scope=SEGMENT)} bs ON bs.key = {VOTE_KEY[SEGMENT]} AND bs.day = {VOTE_DAY}
"""
# Items with a vote in a burst whose status changed after $since (epoch microseconds).
ITEMS_IN_CHANGED_BURSTS_SQL = f"""
    SELECT DISTINCT v.item_id FROM validated_labels v JOIN correction_bursts b ON {IN_BURST}
    WHERE epoch_us(b.status_changed_at) > $since
"""


def membership(votes: pl.DataFrame, burst_table: pl.DataFrame) -> pl.DataFrame:
    """(event_id, burst_id, status) for every vote that falls in a burst (by day and key)."""
    schema = {"event_id": pl.String, "burst_id": pl.String, "status": pl.String}
    if votes.height == 0 or burst_table.height == 0:
        return pl.DataFrame(schema=schema)
    return _keyed(votes, "event_id").join(
        burst_table.select("day", "scope", "key", "burst_id", "status"), on=["day", "scope", "key"]
    ).select(list(schema)).cast(schema)


def blocked_events(votes: pl.DataFrame, burst_table: pl.DataFrame, statuses=(HELD, DISCARDED)) -> pl.Series:
    """The event ids among `votes` that a burst with one of `statuses` keeps out."""
    found = membership(votes, burst_table)
    return found.filter(pl.col("status").is_in(list(statuses)))["event_id"].unique()


ACKS_SQL = """
    SELECT r.escalation_id AS burst_id, r.decision, r.reviewer_pseudonym, r.reviewer_role,
           r.decided_at, r.rationale
    FROM review_decisions r JOIN correction_bursts b ON b.burst_id = r.escalation_id
    WHERE r.decision IN ('release', 'discard') AND b.acknowledged_at IS NULL
    QUALIFY row_number() OVER (PARTITION BY r.escalation_id ORDER BY r.seq) = 1
"""


def detect(con: duckdb.DuckDBPyConnection, policy: BurstPolicy, run_id: str) -> dict:
    """Count the new corrections, score the days they touch, record bursts and apply acknowledgements.

    Cost grows with the batch: only the days it touches are scored, against their baseline days.
    """
    mark = store.get_state(con, RAW_SEQ)
    new = store.frame(
        con,
        "SELECT seq, created_at, user_pseudonym, source, corrected_label FROM raw_corrections "
        "WHERE seq > ? ORDER BY seq",
        [mark],
    )
    volume = daily_volume(new)
    days = volume["day"].unique().sort().to_list()
    with store.transaction(con):
        if volume.height:
            con.register("new_volume", volume)
            try:
                con.execute(
                    "MERGE INTO correction_volume t USING new_volume s "
                    "ON t.day = s.day AND t.scope = s.scope AND t.key = s.key "
                    "WHEN MATCHED THEN UPDATE SET n = t.n + s.n "
                    "WHEN NOT MATCHED THEN INSERT (day, scope, key, n) VALUES (s.day, s.scope, s.key, s.n)"
                )
            finally:
                con.unregister("new_volume")
        scored = score_bursts(_history(con, days, policy), days, policy) if days else pl.DataFrame(schema=SCORE_SCHEMA)
        found = scored.filter(pl.col("severity").is_not_null())
        newly_held = _record(con, found, run_id, policy.regrowth) if found.height else []
        acknowledged = store.frame(con, ACKS_SQL)
        if acknowledged.height:
            con.register("acks", acknowledged)
            try:
                con.execute(
                    """
                    UPDATE correction_bursts b SET
                        status = CASE a.decision WHEN 'release' THEN 'released' ELSE 'discarded' END,
                        acknowledged_by = a.reviewer_pseudonym, acknowledged_role = a.reviewer_role,
                        acknowledged_at = a.decided_at, acknowledgement = a.rationale, updated_at = now(),
                        status_changed_at = now(), n_events_acknowledged = b.n_events
                    FROM acks a WHERE a.burst_id = b.burst_id
                    """
                )
            finally:
                con.unregister("acks")
        if new.height:
            store.set_state(con, RAW_SEQ, int(new["seq"].max()))
    return {
        "events": new.height,
        "days_scored": [d.isoformat() for d in days],
        "keys_scored": scored.height,
        "not_scored": scored.filter(pl.col("note").is_not_null()).height,
        "found": found.height,
        "newly_held": newly_held,
        "acknowledged": acknowledged.height,
    }


def _history(con: duckdb.DuckDBPyConnection, days: list[date], policy: BurstPolicy) -> pl.DataFrame:
    """The volume of the scored days and of the baseline days before them, nothing older."""
    earliest = store.scalar(
        con,
        """
        SELECT min(day) FROM (
            SELECT DISTINCT day FROM correction_volume
            WHERE scope = 'contributor' AND day < ? ORDER BY day DESC LIMIT ?
        )
        """,
        [min(days), policy.baseline_days],
    ) or min(days)
    return store.frame(
        con, "SELECT day, scope, key, n FROM correction_volume WHERE day BETWEEN ? AND ?",
        [earliest, max(days)],
    )


def _record(con: duckdb.DuckDBPyConnection, found: pl.DataFrame, run_id: str, regrowth: float) -> list[str]:
    """Upsert the bursts found; a severe one is held unless a reviewer already acknowledged it."""
    # A handful of bursts: their ids and evidence are built one by one.
    ids = [burst_id(day, scope, key) for day, scope, key in found.select("day", "scope", "key").iter_rows()]
    rows = found.with_columns(
        burst_id=pl.Series(ids, dtype=pl.String),
        reason=describe(found),
        status=pl.when(pl.col("severity") == SEVERE).then(pl.lit(HELD)).otherwise(pl.lit(FLAGGED)),
        run_id=pl.lit(run_id),
    ).drop("note")
    rows = rows.with_columns(evidence=pl.Series([_evidence(con, r) for r in rows.iter_rows(named=True)]))
    before = store.frame(
        con, "SELECT burst_id, status FROM correction_bursts WHERE list_contains($ids, burst_id)",
        {"ids": rows["burst_id"].to_list()},
    )
    con.register("found_bursts", rows)
    try:
        con.execute(
            """
            MERGE INTO correction_bursts b USING found_bursts f ON b.burst_id = f.burst_id
            WHEN MATCHED THEN UPDATE SET
                n_events = f.n_events, day_total = f.day_total, baseline_days = f.baseline_days,
                baseline_median_share = f.baseline_median_share,
                baseline_mad_share = f.baseline_mad_share, expected = f.expected,
                score = f.score, severity = f.severity, reason = f.reason,
                evidence = f.evidence, updated_at = now(), run_id = f.run_id,
                -- an acknowledged burst keeps its decision, unless a released one has grown well
                -- past what the reviewer saw; a warning that turned severe is held
                status = CASE
                    WHEN b.status = 'released' AND f.severity = 'severe'
                     AND f.n_events > $regrowth * b.n_events_acknowledged THEN 'held'
                    WHEN b.status IN ('released', 'discarded', 'held')
                    THEN b.status ELSE f.status END,
                status_changed_at = CASE
                    WHEN b.status = 'released' AND f.severity = 'severe'
                     AND f.n_events > $regrowth * b.n_events_acknowledged THEN now()
                    WHEN b.status IN ('released', 'discarded', 'held') OR b.status = f.status
                    THEN b.status_changed_at ELSE now() END
            WHEN NOT MATCHED THEN INSERT (burst_id, day, scope, key, n_events, day_total,
                baseline_days, baseline_median_share, baseline_mad_share, expected, score, severity,
                status, reason, evidence, run_id)
            VALUES (f.burst_id, f.day, f.scope, f.key, f.n_events, f.day_total, f.baseline_days,
                    f.baseline_median_share, f.baseline_mad_share, f.expected, f.score, f.severity,
                    f.status, f.reason, f.evidence, f.run_id)
            """,
            {"regrowth": regrowth},
        )
    finally:
        con.unregister("found_bursts")
    after = store.frame(
        con, "SELECT burst_id, status FROM correction_bursts WHERE list_contains($ids, burst_id)",
        {"ids": rows["burst_id"].to_list()},
    )
    was = dict(before.iter_rows())
    held = rows.join(after.rename({"status": "now"}), on="burst_id").filter(
        (pl.col("now") == HELD)
        & ~pl.col("burst_id").replace_strict(was, default=None, return_dtype=pl.String).eq(HELD).fill_null(False)
    )
    if held.height:
        store.append(
            con,
            "audit_log",
            held.select(
                actor=pl.lit("labelloop"), action=pl.lit("burst.hold"), target="burst_id",
                outcome=pl.lit(HELD), reason="reason", run_id="run_id",
            ),
        )
    return held["burst_id"].to_list()


def burst_events(con: duckdb.DuckDBPyConnection, burst: dict) -> pl.DataFrame:
    """The corrections a burst counted: its day, and its contributor or segment."""
    where = "user_pseudonym = $key" if burst["scope"] == CONTRIBUTOR else "source || '/' || corrected_label = $key"
    return store.frame(
        con,
        f"""
        SELECT event_id, item_id, original_label, corrected_label, user_pseudonym, user_role,
               source, rationale, created_at
        FROM raw_corrections
        WHERE created_at >= CAST($day AS TIMESTAMP) AT TIME ZONE 'UTC'
          AND created_at < (CAST($day AS TIMESTAMP) + INTERVAL 1 DAY) AT TIME ZONE 'UTC' AND {where}
        ORDER BY created_at, event_id
        """,
        {"day": burst["day"], "key": burst["key"]},
    )


def _evidence(con: duckdb.DuckDBPyConnection, burst: dict) -> str:
    """What the burst's corrections asked for (label changes), and who sent them."""
    rows = burst_events(con, burst).with_columns(
        change=pl.concat_str(pl.col("original_label").fill_null("?"), pl.lit(" -> "), "corrected_label")
    )
    top = lambda column: dict(  # noqa: E731
        rows.group_by(column).len().sort(["len", column], descending=[True, False]).head(5).iter_rows()
    )
    return json.dumps(
        {
            "changes": top("change"),
            "contributors": top("user_pseudonym"),
            "sources": top("source"),
            "sample_event_ids": rows["event_id"].head(5).to_list(),
        }
    )
