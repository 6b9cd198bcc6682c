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

The day a correction counts on is its *burst day*: the UTC day of its created_at, unless it
arrived late (more than `late_after_hours` after created_at on the store's clock), and then the
day it arrived. created_at is whatever the sender wrote; without this, a batch dated over many
old days spreads thin over their baselines and nothing stands out. The store's clock is the wall
clock at ingest (`escalation.clock: wall`), or, for replays and the demo (`clock: events`), the
newest created_at among the corrections stored before the batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date

import duckdb
import polars as pl

from labelloop_assets.core import store
from labelloop_assets.core.audit import SYSTEM_ACTOR, record_audit_rows
from labelloop_assets.core.contracts import USER_ROLES
from labelloop_assets.core.settings import LabelloopConfigError, config_number

CONTRIBUTOR = "contributor"
SEGMENT = "segment"
SCOPES = (CONTRIBUTOR, SEGMENT)
WARN, SEVERE = "warn", "severe"
# A burst's life: flagged (a warning, nothing held) or held (severe), until a reviewer
# releases it (its corrections count) or discards it (they never will).
FLAGGED, HELD, RELEASED, DISCARDED = "flagged", "held", "released", "discarded"
MAD_TO_SIGMA = 1.4826
BURST_PREFIX = "burst-"

VOLUME_SCHEMA = {"day": pl.Date, "scope": pl.String, "key": pl.String, "n": pl.Int64}
CLOCKS = ("wall", "events")
# The event clock (epoch microseconds) after the corrections each consumer has read: the newest
# created_at among them. Detection and staging each keep their own, next to their seq watermark,
# so both derive the same burst day for a correction whichever runs first.
RAW_CLOCK = "correction_bursts.event_clock"
STAGED_SEQ = "validated_labels.raw_seq"
STAGED_CLOCK = "validated_labels.event_clock"
NO_CLOCK = -1


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
    # A correction that arrives more than this long after its created_at counts on the day it
    # arrived: backdating cannot move volume onto old days.
    late_after_hours: float = 24.0
    # The store's clock (governance escalation.clock, not a bursts key): `wall` or `events`.
    clock: str = "wall"

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
        if not self.late_after_hours > 0:
            raise LabelloopConfigError("governance: bursts.late_after_hours must be positive")
        if self.clock not in CLOCKS:
            raise LabelloopConfigError("governance: escalation.clock must be `wall` or `events`")
        unknown = set(self.may_acknowledge) - set(USER_ROLES)
        if unknown or not self.may_acknowledge:
            raise LabelloopConfigError(
                f"governance: bursts.may_acknowledge must list roles from {', '.join(USER_ROLES)}"
            )

    @classmethod
    def from_mapping(cls, raw: dict | None, source: str = "governance", clock: str = "wall") -> BurstPolicy:
        """The `bursts` section; `clock` is the governance file's escalation.clock."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise LabelloopConfigError(f"{source}: `bursts` must be a mapping")
        known = set(cls.__dataclass_fields__) - {"clock"}
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
        return cls(**values, clock=clock)

    @classmethod
    def from_governance(cls, raw: dict, source: str = "governance") -> BurstPolicy:
        """From a whole governance mapping: its `bursts` section and its escalation.clock."""
        escalation = raw.get("escalation") or {}
        clock = escalation.get("clock", "wall") if isinstance(escalation, dict) else "wall"
        return cls.from_mapping(raw.get("bursts"), source, clock=str(clock))


def arrivals(
    con: duckdb.DuckDBPyConnection, rows: pl.DataFrame, policy: BurstPolicy, clock_state: str
) -> tuple[pl.DataFrame, int]:
    """`rows` (raw_corrections rows with at least seq, created_at, arrived_at, ingested_at) with
    `arrived_at` replaced by the store's clock when each arrived, and `burst_day`; and the event
    clock after them, to keep in `clock_state`.

    A batch is the rows of one ingest transaction (one arrival time). On the event clock, its
    arrival is the newest created_at stored before it; the very first batch has no such time
    and arrives at its own earliest created_at (nothing is late before anything is stored).
    """
    if rows.height == 0:
        return rows.with_columns(
            arrived_at=pl.lit(None, pl.Datetime("us", "UTC")), burst_day=pl.lit(None, pl.Date)
        ), store.get_state(con, clock_state, NO_CLOCK)
    created = pl.col("created_at").dt.convert_time_zone("UTC")
    # Wall arrival: ingest's arrived_at (rows from before it was kept: their ingested_at).
    wall = pl.coalesce("arrived_at", "ingested_at").dt.convert_time_zone("UTC")
    framed = rows.with_columns(_created=created, _wall=wall)
    prior = _event_clock_before(con, rows, clock_state)
    newest = int(framed["_created"].dt.epoch("us").max())
    after = max(prior, newest)
    if policy.clock == "wall":
        clock = pl.coalesce("_wall", "_created")
    else:
        # Each batch's clock: the newest created_at of everything stored before it.
        batches = (
            framed.group_by(pl.col("_wall").fill_null(pl.col("_created")).alias("_batch"))
            .agg(pl.col("seq").min().alias("_first"), pl.col("_created").max().alias("_newest"),
                 pl.col("_created").min().alias("_earliest"))
            .sort("_first")
            .with_columns(_before=pl.col("_newest").dt.epoch("us").cum_max().shift(1))
            .with_columns(
                _clock=pl.max_horizontal(pl.col("_before"), pl.lit(prior if prior != NO_CLOCK else None, pl.Int64))
            )
            .with_columns(
                _clock=pl.when(pl.col("_clock").is_not_null())
                .then(pl.from_epoch("_clock", "us").dt.replace_time_zone("UTC"))
                .otherwise("_earliest")
            )
        )
        framed = framed.with_columns(_batch=pl.col("_wall").fill_null(pl.col("_created"))).join(
            batches.select("_batch", "_clock"), on="_batch", how="left"
        ).drop("_batch")
        clock = pl.col("_clock")
    late = (clock - pl.col("_created")) > pl.duration(microseconds=int(policy.late_after_hours * 3_600_000_000))
    created_day, clock_day = pl.col("_created").dt.date(), clock.dt.date()
    on_time_day = pl.min_horizontal(created_day, clock_day) if policy.clock == "wall" else created_day
    zone = getattr(rows.schema["created_at"], "time_zone", None) or "UTC"
    out = framed.with_columns(
        arrived_at=clock.cast(pl.Datetime("us", "UTC")).dt.convert_time_zone(zone),
        burst_day=pl.when(late).then(clock_day).otherwise(on_time_day),
    ).drop("_created", "_wall", *(["_clock"] if "_clock" in framed.columns else []))
    # Read back in number order, the rows usually still are: a check is O(n), a sort is not.
    return (out if out["seq"].is_sorted() else out.sort("seq")), after


def _event_clock_before(con: duckdb.DuckDBPyConnection, rows: pl.DataFrame, clock_state: str) -> int:
    """The newest created_at (epoch us) of the corrections stored before `rows`, NO_CLOCK if none."""
    kept = store.get_state(con, clock_state, NO_CLOCK)
    if kept != NO_CLOCK:
        return kept
    # A store from before the event clock was kept (or the very first batch): read it once.
    found = store.scalar(
        con, "SELECT CAST(epoch_us(max(created_at)) AS BIGINT) FROM raw_corrections WHERE seq < ?",
        [int(rows["seq"].min())],
    )
    return NO_CLOCK if found is None else int(found)


def daily_volume(events: pl.DataFrame) -> pl.DataFrame:
    """Corrections per (day, scope, key) from events with created_at, user_pseudonym, source,
    corrected_label (and burst_day, when known: see `arrivals`)."""
    if events.height == 0:
        return pl.DataFrame(schema=VOLUME_SCHEMA)
    return (
        _keyed(events)
        .group_by("day", "scope", "key")
        .agg(pl.len().cast(pl.Int64).alias("n"))
        .sort("day", "scope", "key")
    )


def _keyed(events: pl.DataFrame, *carry: str) -> pl.DataFrame:
    """One row per event and scope: the `carry` columns, the burst day, the scope and its key."""
    return events.select(
        *carry,
        vote_day(events).alias("day"),
        pl.col("user_pseudonym").alias(CONTRIBUTOR),
        segment_key(pl.col("source"), pl.col("corrected_label")).alias(SEGMENT),
    ).unpivot(index=[*carry, "day"], on=list(SCOPES), variable_name="scope", value_name="key")


def vote_day(events: pl.DataFrame) -> pl.Expr:
    """The day a correction counts on: its burst_day, or (rows staged before burst days were
    kept, and hand-built frames) the UTC day of its created_at."""
    created = pl.col("created_at").dt.convert_time_zone("UTC").dt.date()
    return pl.coalesce("burst_day", created) if "burst_day" in events.columns else created


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
# A staged correction `v`'s day and keys in SQL, as `daily_volume` and `membership` derive them in
# Polars (rows staged before burst days were kept count on their created_at day).
VOTE_DAY = "coalesce(v.burst_day, CAST(timezone('UTC', v.created_at) AS DATE))"
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


# Appended to `... FROM validated_labels v` (or a CTE of its rows named v): keeps the rows counted.
NOT_BLOCKED_SQL = f"""
    ANTI JOIN {_BLOCKED.format(scope=CONTRIBUTOR)} bc ON bc.key = {VOTE_KEY[CONTRIBUTOR]} AND bc.day = {VOTE_DAY}
    ANTI JOIN {_BLOCKED.format(scope=SEGMENT)} bs ON bs.key = {VOTE_KEY[SEGMENT]} AND bs.day = {VOTE_DAY}
"""
COUNTED_VOTES_SQL = f"SELECT v.* FROM validated_labels v {NOT_BLOCKED_SQL}"
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
    new, clock_after = arrivals(
        con,
        store.rows_since(
            con, "raw_corrections",
            "seq, event_id, item_id, original_label, corrected_label, user_pseudonym, user_role, "
            "source, rationale, created_at, arrived_at, ingested_at",
            mark,
        ),
        policy,
        RAW_CLOCK,
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
        newly_held = _record(con, found, run_id, policy) if found.height else []
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
            store.set_state(con, RAW_CLOCK, clock_after)
    late = new.filter(pl.col("burst_day") != pl.col("created_at").dt.convert_time_zone("UTC").dt.date())
    return {
        "events": new.height,
        # corrections counted on their arrival day, not their created_at day (late, or dated ahead of arrival)
        "late": late.height,
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


def _record(con: duckdb.DuckDBPyConnection, found: pl.DataFrame, run_id: str, policy: BurstPolicy) -> list[str]:
    """Upsert the bursts found; a severe one is held unless a reviewer already acknowledged it."""
    # A handful of bursts: their ids and evidence are built one by one.
    ids = [burst_id(day, scope, key) for day, scope, key in found.select("day", "scope", "key").iter_rows()]
    rows = found.with_columns(
        burst_id=pl.Series(ids, dtype=pl.String),
        reason=describe(found),
        status=pl.when(pl.col("severity") == SEVERE).then(pl.lit(HELD)).otherwise(pl.lit(FLAGGED)),
        run_id=pl.lit(run_id),
    ).drop("note")
    rows = rows.with_columns(
        evidence=pl.Series([_evidence(con, r, policy) for r in rows.iter_rows(named=True)], dtype=pl.String)
    )
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
            {"regrowth": policy.regrowth},
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
        record_audit_rows(
            con,
            held.select(
                actor=pl.lit(SYSTEM_ACTOR), action=pl.lit("burst.hold"), target="burst_id",
                outcome=pl.lit(HELD), reason="reason", run_id="run_id",
            ),
        )
    return held["burst_id"].to_list()


EVENT_COLUMNS = (
    "event_id", "item_id", "original_label", "corrected_label", "user_pseudonym", "user_role",
    "source", "rationale", "created_at",
)
EVENT_SELECT = ", ".join(f"v.{c}" for c in EVENT_COLUMNS)


def burst_events(con: duckdb.DuckDBPyConnection, burst: dict, policy: BurstPolicy | None = None) -> pl.DataFrame:
    """The corrections a burst counted: those on its day (burst day) of its contributor or segment.

    Staged corrections carry their burst day. Those not staged yet (the batch being scored) get
    theirs from `policy`, as staging will; without a policy they count on their created_at day.
    """
    where = (
        "v.user_pseudonym = $key" if burst["scope"] == CONTRIBUTOR
        else "v.source || '/' || v.corrected_label = $key"
    )
    staged = store.frame(
        con,
        f"SELECT {EVENT_SELECT} FROM validated_labels v WHERE {VOTE_DAY} = CAST($day AS DATE) AND {where}",
        {"day": burst["day"], "key": burst["key"]},
    )
    pending = store.frame(
        con,
        f"SELECT v.seq, {EVENT_SELECT}, v.arrived_at, v.ingested_at FROM raw_corrections v "
        f"WHERE v.seq > $mark AND {where}",
        {"mark": store.get_state(con, STAGED_SEQ), "key": burst["key"]},
    )
    if pending.height and policy is not None:
        pending, _ = arrivals(con, pending, policy, STAGED_CLOCK)
    if pending.height:
        pending = pending.filter(vote_day(pending) == burst["day"]).select(EVENT_COLUMNS)
    # Disjoint by seq: staged rows are at or below the staging watermark, pending ones above it.
    return pl.concat([staged, pending.select(EVENT_COLUMNS)], how="vertical_relaxed").sort("created_at", "event_id")


def _evidence(con: duckdb.DuckDBPyConnection, burst: dict, policy: BurstPolicy) -> str:
    """What the burst's corrections asked for (label changes), and who sent them."""
    rows = burst_events(con, burst, policy).with_columns(
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
