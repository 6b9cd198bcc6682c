"""Review tasks: each day's work list for annotators and reviewers, under a budget, ordered by what
an answer is expected to fix, written to an outbox that annotation tools read.

Who looks at what. The annotators' budget is split between routing policies ("arms"): `loop`
(the expected benefit below), and two controls the loop is measured against, `least_confidence`
(the items the model is least sure of) and `random`. The arms' tasks are interleaved at random in
the work list, so an annotator who stops halfway has answered each arm in proportion: the
efficacy figures (`efficacy`) compare like with like. Reviewers get blind audits drawn at random
(answered with source `audit_sample`), the sample that source reliability is measured on
(core/reliability.py).

Expected benefit (the loop arm). Each candidate item gets components in [0, 1]:
  - label_issue: the label-issue queue's score, the probability that the current label is wrong;
  - uncertainty: 1 - the champion's probability of its own prediction;
  - disagreement: 1 when the item's latest resolution is pending or escalated (votes disagree
    with the current label and one more answer may settle it);
  - shortfall: how far the predicted class is below an even share of the corpus (1 for an item
    with no label at all);
  - drift: the predicted class's share of the drift signal (per-label PSI term / the warn threshold);
  - overdue: a task for the item expired unanswered (re-issued, attempt 2 and later), or the
    item's escalation is past its SLA (one more answer may settle what reviewers have not reached).
`score` is their weighted sum (weights in review_tasks.yaml).

Open tasks are never duplicated: an item with an open task gets no other. A task is answered
once `answers_wanted` different people granted at least its role sent an accepted correction
with its task_id, and expired once its `expires_at` passes first; an expired annotator task is
re-issued (attempt + 1, `reissue_of`) in its own arm, up to `max_attempts`, after which the item
rests for `cooldown_days`. Items answered within `cooldown_days` wait unless votes still disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from labelloop_assets.core import store
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.reliability import AUDIT_VERDICTS_SQL
from labelloop_assets.core.settings import LabelloopConfigError, config_number, load_yaml_mapping

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

ARMS = ("loop", "least_confidence", "random")
COMPONENTS = ("label_issue", "uncertainty", "disagreement", "shortfall", "drift", "overdue")
ANNOTATOR, REVIEWER = "annotator", "reviewer"
# The correction source an answer carries: audits are the random sample reliability is measured on.
ANSWER_SOURCE = {ANNOTATOR: "review_prompt", REVIEWER: "audit_sample"}
OPEN, ANSWERED, EXPIRED = "open", "answered", "expired"
OUTBOX = Path("outbox") / "review_tasks"

TASK_SCHEMA = {
    "task_id": pl.String, "item_id": pl.String, "role": pl.String, "policy": pl.String, "rank": pl.Int64,
    "score": pl.Float64, "reasons": pl.List(pl.String), "why": pl.String, "current_label": pl.String,
    "suggested_label": pl.String, "model_version": pl.String, "predicted_label": pl.String,
    "predicted_probability": pl.Float64, **{name: pl.Float64 for name in COMPONENTS},
    "answers_wanted": pl.Int32, "attempt": pl.Int32, "reissue_of": pl.String,
    "issued_at": pl.Datetime("us", "UTC"), "expires_at": pl.Datetime("us", "UTC"),
}


@dataclass(frozen=True)
class TaskSettings:
    """review_tasks.yaml: budgets, the arms' shares, the benefit weights, expiry and re-issue."""

    annotator_budget: int = 120
    reviewer_budget: int = 25
    arms: dict[str, float] = field(default_factory=lambda: {"loop": 0.8, "least_confidence": 0.1, "random": 0.1})
    weights: dict[str, float] = field(default_factory=lambda: {
        "label_issue": 1.0, "uncertainty": 0.3, "disagreement": 0.5, "shortfall": 0.2, "drift": 0.2, "overdue": 0.2,
    })
    expire_hours: float = 20.0
    max_attempts: int = 3
    answers_wanted: int = 1
    answers_wanted_disputed: int = 2
    second_opinion_below: float = 0.5
    cooldown_days: float = 7.0
    seed: int = 0

    @classmethod
    def load(cls, path: Path) -> TaskSettings:
        raw = load_yaml_mapping(path, "review tasks")
        where = f"review tasks file {path}"
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise LabelloopConfigError(f"{where}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        defaults = cls()
        values: dict = {}
        for name in known - {"arms", "weights"}:
            if name in raw:
                values[name] = config_number(raw[name], getattr(defaults, name), f"{where}: {name}")
        values["arms"] = _shares(raw.get("arms", defaults.arms), ARMS, f"{where}: arms", defaults.arms)
        values["weights"] = _shares(raw.get("weights", {}), COMPONENTS, f"{where}: weights", defaults.weights,
                                    merge=True)
        settings = cls(**values)
        problems = [
            text for broken, text in (
                (min(settings.annotator_budget, settings.reviewer_budget) < 0, "budgets must be 0 or more"),
                (abs(sum(settings.arms.values()) - 1.0) > 1e-9, "arms must add up to 1"),
                (settings.expire_hours <= 0, "expire_hours must be positive"),
                (settings.max_attempts < 1, "max_attempts must be at least 1"),
                (min(settings.answers_wanted, settings.answers_wanted_disputed) < 1,
                 "answers_wanted and answers_wanted_disputed must be at least 1"),
                (settings.cooldown_days < 0, "cooldown_days must be 0 or more"),
                (not 0 <= settings.second_opinion_below <= 1, "second_opinion_below must be in [0, 1]"),
                (settings.seed < 0, "seed must be 0 or more"),
            ) if broken
        ]
        if problems:
            raise LabelloopConfigError(f"{where}: " + "; ".join(problems))
        return settings


def _shares(raw, names: tuple[str, ...], where: str, defaults: dict[str, float], merge: bool = False) -> dict:
    """A mapping of known names to finite numbers >= 0 (weights: merged over the defaults)."""
    if not isinstance(raw, dict):
        raise LabelloopConfigError(f"{where} must be a mapping of {', '.join(names)} to numbers")
    unknown = set(raw) - set(names)
    if unknown:
        raise LabelloopConfigError(f"{where}: unknown names {sorted(unknown)}; known: {list(names)}")
    values = {name: config_number(v, 0.0, f"{where}.{name}") for name, v in raw.items()}
    negative = [name for name, v in values.items() if not math.isfinite(v) or v < 0]
    if negative:
        raise LabelloopConfigError(f"{where}: {', '.join(negative)} must be finite numbers of 0 or more")
    base = dict(defaults) if merge else {name: 0.0 for name in names}
    return {**base, **values}


# What each corpus or unlabelled item offers a task: the queue's score, the latest resolution,
# whether it has ever been audited at random, and its latest task answer.
SIGNALS_SQL = f"""
WITH pool AS (
    SELECT i.item_id, c.label AS current_label FROM items i
    LEFT JOIN production_corpus c USING (item_id)
    WHERE i.gold_label IS NULL
), issues AS (
    SELECT item_id, score AS label_issue, suggested_label FROM label_issue_candidates
), decided AS (
    SELECT item_id, status IN ('pending', 'escalate') AS disputed FROM latest_label_decisions
), breached AS (
    SELECT DISTINCT item_id FROM escalations WHERE sla_breached
), audited AS (
    -- Audited as source reliability counts it: a reviewer's or domain expert's blind verdict.
    SELECT DISTINCT item_id FROM ({AUDIT_VERDICTS_SQL})
), answered AS (
    SELECT t.item_id, max(CASE WHEN $event_clock THEN r.created_at ELSE r.arrived_at END) AS last_answer_at
    FROM raw_corrections r JOIN review_tasks t USING (task_id) GROUP BY t.item_id
)
SELECT p.item_id, p.current_label, coalesce(s.label_issue, 0.0) AS label_issue, s.suggested_label,
       coalesce(d.disputed, false) AS disputed, b.item_id IS NOT NULL AS sla_breached,
       a.item_id IS NOT NULL AS audited, w.last_answer_at
FROM pool p LEFT JOIN issues s USING (item_id) LEFT JOIN decided d USING (item_id)
LEFT JOIN breached b USING (item_id) LEFT JOIN audited a USING (item_id) LEFT JOIN answered w USING (item_id)
ORDER BY p.item_id
"""

# The accepted corrections that count as answers to their task: from someone granted at least the
# task's role (user_role is the granted role), so an end user cannot close a reviewer's audit.
# Roles in USER_ROLES' order (a test checks it).
COUNTED_ANSWERS_SQL = """
SELECT r.task_id, r.event_id, r.user_pseudonym, r.corrected_label, r.seq
FROM raw_corrections r JOIN review_tasks k USING (task_id)
WHERE list_position(['end_user', 'annotator', 'reviewer', 'domain_expert'], r.user_role)
   >= list_position(['end_user', 'annotator', 'reviewer', 'domain_expert'], k.role)
"""
# Every task with its counted answers so far; status as of $now. A task is answered once that many
# different people answered it: one person sending two lines is still one opinion.
STATUS_SQL = f"""
SELECT t.*, coalesce(a.answers, 0) AS answers, coalesce(a.answerers, 0) AS answerers,
       CASE WHEN coalesce(a.answerers, 0) >= t.answers_wanted THEN 'answered'
            WHEN t.expires_at <= $now THEN 'expired' ELSE 'open' END AS status
FROM review_tasks t LEFT JOIN (
    SELECT task_id, count(*) AS answers, count(DISTINCT user_pseudonym) AS answerers
    FROM ({COUNTED_ANSWERS_SQL}) GROUP BY task_id
) a USING (task_id)
"""


def signals(con: duckdb.DuckDBPyConnection, event_clock: bool) -> pl.DataFrame:
    """SIGNALS_SQL's rows, with answer times on the store's clock."""
    return store.frame(con, SIGNALS_SQL, {"event_clock": event_clock})


def clock(con: duckdb.DuckDBPyConnection, event_clock: bool) -> datetime:
    """Now on the store's clock (governance escalation.clock): the wall clock, or for replays and
    the demo the newest event's time (a correction's created_at or a prediction's served_at); the
    wall clock until there is any."""
    if event_clock:
        newest = store.scalar(con, "SELECT greatest((SELECT max(created_at) FROM raw_corrections), "
                                   "(SELECT max(served_at) FROM predictions))")
        if newest is not None:
            return newest.astimezone(UTC)
    return datetime.now(UTC)


def task_status(con: duckdb.DuckDBPyConnection, now: datetime) -> pl.DataFrame:
    """Every issued task with its counted `answers`, `answerers` and `status` (open, answered, expired) at `now`."""
    found = store.frame(con, STATUS_SQL + " ORDER BY t.issued_at, t.rank", {"now": now})
    return found.with_columns(pl.col("issued_at", "expires_at").cast(pl.Datetime("us", "UTC")))


def plan(
    signals: pl.DataFrame,
    model_view: pl.DataFrame,
    drift_terms: dict[str, float],
    tasks: pl.DataFrame,
    settings: TaskSettings,
    now: datetime,
) -> pl.DataFrame:
    """The tasks to issue now (TASK_SCHEMA, rank 1 first); empty when nothing is worth asking.

    `signals`: SIGNALS_SQL's rows; `model_view`: item_id, model_version, predicted_label,
    predicted_probability (the champion's view of each item, or the latest served prediction);
    `drift_terms`: label -> drift component; `tasks`: `task_status` at `now`.
    """
    import numpy as np
    frame = signals.join(model_view, on="item_id", how="left").with_columns(
        pl.col("last_answer_at").cast(pl.Datetime("us", "UTC"))
    )
    cooldown = now - timedelta(days=settings.cooldown_days)
    expired, resting = _to_reissue(tasks, settings, cooldown)
    busy = tasks.filter(pl.col("status") == OPEN)["item_id"] if tasks.height else pl.Series([], dtype=pl.String)
    frame = frame.filter(~pl.col("item_id").is_in(pl.concat([busy, resting]).implode()))
    frame = _components(frame, drift_terms).join(expired, on="item_id", how="left").with_columns(
        overdue=(pl.col("reissue_of").is_not_null() | pl.col("sla_breached")).cast(pl.Float64),
        attempt=pl.col("attempt").fill_null(1).cast(pl.Int32),
    )
    weights = settings.weights
    frame = frame.with_columns(
        score=pl.sum_horizontal([pl.col(name) * weights[name] for name in COMPONENTS])
    )
    # Seeded by the store's history, not the clock: the same store and settings draw the same items.
    rng = np.random.default_rng([settings.seed, tasks.height])
    audits = _audits(frame, settings.reviewer_budget, rng)
    rest = frame.filter(~pl.col("item_id").is_in(audits["item_id"].implode()))
    # Items answered recently wait out the cooldown unless their votes still disagree; re-issues do not.
    rest = rest.filter(
        pl.col("last_answer_at").is_null() | (pl.col("last_answer_at") < cooldown)
        | pl.col("disputed") | pl.col("reissue_of").is_not_null()
    )
    chosen = _annotator_tasks(rest, settings, rng)
    issued = pl.concat([chosen, audits], how="diagonal_relaxed") if chosen.height or audits.height else chosen
    if issued.height == 0:
        return pl.DataFrame(schema=TASK_SCHEMA)
    return _finish(issued, settings, now)


def _to_reissue(tasks: pl.DataFrame, settings: TaskSettings, cooldown: datetime) -> tuple[pl.DataFrame, pl.Series]:
    """(item_id -> policy, attempt, reissue_of of the latest expired, unanswered annotator task per
    item that may be issued again; the items whose last attempt expired unanswered within the
    cooldown, which rest until it has passed)."""
    due = pl.DataFrame(schema={"item_id": pl.String, "arm": pl.String, "attempt": pl.Int32, "reissue_of": pl.String})
    if tasks.height == 0:
        return due, pl.Series([], dtype=pl.String)
    latest = tasks.sort("issued_at").group_by("item_id").last().filter(
        (pl.col("status") == EXPIRED) & (pl.col("role") == ANNOTATOR)
    )
    exhausted = pl.col("attempt") >= settings.max_attempts
    resting = latest.filter(exhausted & (pl.col("expires_at") > cooldown))["item_id"]
    due = latest.filter(~exhausted).select(
        "item_id", pl.col("policy").alias("arm"), (pl.col("attempt") + 1).cast(pl.Int32),
        pl.col("task_id").alias("reissue_of"),
    )
    return due, resting


def _components(frame: pl.DataFrame, drift_terms: dict[str, float]) -> pl.DataFrame:
    """The benefit components in [0, 1] (see the module docstring)."""
    predicted = pl.col("predicted_label")
    counts = frame.filter(pl.col("current_label").is_not_null()).group_by("current_label").len()
    even = frame.height / max(counts.height, 1)
    deficit = {row[0]: max(0.0, 1.0 - row[1] / even) for row in counts.iter_rows()} if even else {}
    return frame.with_columns(
        label_issue=pl.col("label_issue").clip(0.0, 1.0),
        uncertainty=(1.0 - pl.col("predicted_probability")).fill_null(0.0).clip(0.0, 1.0),
        disagreement=pl.col("disputed").cast(pl.Float64),
        shortfall=pl.when(pl.col("current_label").is_null()).then(1.0)
        .otherwise(predicted.replace_strict(deficit, default=0.0, return_dtype=pl.Float64)).fill_null(0.0),
        drift=predicted.replace_strict(drift_terms, default=0.0, return_dtype=pl.Float64).fill_null(0.0).clip(0.0, 1.0),
    )


def _audits(frame: pl.DataFrame, budget: int, rng: np.random.Generator) -> pl.DataFrame:
    """Blind audits for reviewers: labelled items never audited, drawn uniformly at random."""
    import numpy as np
    pool = frame.filter(pl.col("current_label").is_not_null() & ~pl.col("audited") & pl.col("reissue_of").is_null())
    take = min(budget, pool.height)
    if take == 0:
        return pool.head(0).with_columns(policy=pl.lit("random"), role=pl.lit(REVIEWER))
    picked = np.sort(rng.choice(pool.height, size=take, replace=False))
    return pool[picked].with_columns(policy=pl.lit("random"), role=pl.lit(REVIEWER))


def _annotator_tasks(frame: pl.DataFrame, settings: TaskSettings, rng: np.random.Generator) -> pl.DataFrame:
    """Each arm's share of the annotator budget, re-issues first in their own arm, then the arm's order."""
    import numpy as np
    budget = settings.annotator_budget
    quotas = _quotas(budget, settings.arms)
    # A re-issue whose arm gets no share now (switched off) joins the other arms' pools as it is.
    active = [arm for arm in ARMS if quotas[arm]]
    frame = frame.with_columns(arm=pl.when(pl.col("arm").is_in(active)).then(pl.col("arm")))
    chosen: list[pl.DataFrame] = []
    taken: set[str] = set()
    for arm in ARMS:
        quota = quotas[arm]
        if quota == 0:
            continue
        free = frame.filter(~pl.col("item_id").is_in(sorted(taken)))
        again = free.filter(pl.col("arm") == arm).sort("score", descending=True).head(quota)
        fresh = free.filter(pl.col("arm").is_null())
        need = quota - again.height
        if arm == "loop":
            fresh = fresh.filter(pl.col("score") > 0).sort(["score", "item_id"], descending=[True, False]).head(need)
        elif arm == "least_confidence":
            fresh = fresh.filter(pl.col("predicted_probability").is_not_null()).sort(
                ["predicted_probability", "item_id"]).head(need)
        else:
            picked = np.sort(rng.choice(fresh.height, size=min(need, fresh.height), replace=False))
            fresh = fresh[picked]
        arm_tasks = pl.concat([again, fresh], how="vertical_relaxed").with_columns(
            policy=pl.lit(arm), role=pl.lit(ANNOTATOR)
        )
        taken.update(arm_tasks["item_id"].to_list())
        chosen.append(arm_tasks)
    if not chosen:
        return frame.head(0).with_columns(policy=pl.lit("loop"), role=pl.lit(ANNOTATOR))
    tasks = pl.concat(chosen, how="vertical_relaxed")
    # Interleaved at random across arms, each arm keeping its own order: whoever stops halfway
    # has answered every arm in proportion.
    slots = rng.permutation(tasks.height)
    order = tasks.with_columns(slot=pl.Series(slots)).with_columns(
        slot=pl.col("slot").sort().over("policy")
    )
    return order.sort("slot").drop("slot")


def _quotas(budget: int, arms: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of the budget by the arms' shares."""
    exact = {arm: budget * arms.get(arm, 0.0) for arm in ARMS}
    quotas = {arm: int(math.floor(v)) for arm, v in exact.items()}
    for arm in sorted(ARMS, key=lambda a: exact[a] - quotas[a], reverse=True)[: budget - sum(quotas.values())]:
        quotas[arm] += 1
    return quotas


def _finish(issued: pl.DataFrame, settings: TaskSettings, now: datetime) -> pl.DataFrame:
    """Ids, ranks, reasons, answers wanted and times, in TASK_SCHEMA."""
    stamp = now.astimezone(UTC)
    ids = [
        f"tsk-{stamp:%Y%m%d}-" + hashlib.sha256(f"{item}|{stamp.isoformat()}|{attempt}".encode()).hexdigest()[:12]
        for item, attempt in issued.select("item_id", "attempt").iter_rows()
    ]
    reasons = [_reasons(row) for row in issued.iter_rows(named=True)]
    return issued.with_columns(
        task_id=pl.Series(ids),
        rank=pl.int_range(1, issued.height + 1, dtype=pl.Int64),
        reasons=pl.Series(reasons, dtype=pl.List(pl.String)),
        why=pl.Series([_why(row) for row in issued.iter_rows(named=True)]),
        # Where the label is more likely right than wrong, one mistaken answer must not flip it:
        # the task asks for a second opinion, as it does where votes already disagree.
        answers_wanted=pl.when(
            (pl.col("role") == ANNOTATOR)
            & (pl.col("disputed") | (pl.col("label_issue") < settings.second_opinion_below))
        ).then(settings.answers_wanted_disputed).otherwise(settings.answers_wanted).cast(pl.Int32),
        issued_at=pl.lit(stamp, pl.Datetime("us", "UTC")),
        expires_at=pl.lit(stamp + timedelta(hours=settings.expire_hours), pl.Datetime("us", "UTC")),
    ).select(list(TASK_SCHEMA)).cast(TASK_SCHEMA)


def _reasons(row: dict) -> list[str]:
    if row["role"] == REVIEWER:
        return ["audit"]
    found = [name for name in COMPONENTS if (row.get(name) or 0.0) > 0]
    return found or ["control"]


def _why(row: dict) -> str:
    """One sentence for the person answering."""
    if row["role"] == REVIEWER:
        return ("blind audit: drawn at random to measure how reliable labels are; "
                "label it without looking at the current one")
    parts = []
    if (row.get("label_issue") or 0) >= 0.5 and row.get("suggested_label"):
        parts.append(f"the label {row['current_label']} looks wrong ({row['label_issue']:.2f}); "
                     f"the model suggests {row['suggested_label']}")
    elif row.get("current_label") is None:
        parts.append("the item has no label yet")
    if row.get("disputed"):
        parts.append("votes disagree with the current label")
    if row.get("predicted_label") is not None and (row.get("uncertainty") or 0) >= 0.4:
        parts.append(f"the model is unsure ({row['predicted_label']} at {row['predicted_probability']:.2f})")
    if row.get("reissue_of"):
        parts.append(f"asked before ({row['reissue_of']}) and not answered in time")
    if not parts:
        parts.append({"least_confidence": "among the items the model is least sure of",
                      "random": "drawn at random (a control sample)"}.get(row["policy"], "worth a second look"))
    return "; ".join(parts)


def outbox_lines(tasks: pl.DataFrame, items: pl.DataFrame) -> list[str]:
    """The outbox contract: one JSON object per task, with what the item carries."""
    joined = tasks.join(items, on="item_id", how="left")
    lines = []
    for row in joined.iter_rows(named=True):
        prediction = (
            {"model_version": row["model_version"], "label": row["predicted_label"],
             "probability": round(row["predicted_probability"], 4)}
            if row["predicted_label"] is not None and row["predicted_probability"] is not None else None
        )
        lines.append(json.dumps({
            "task_id": row["task_id"], "item_id": row["item_id"], "role": row["role"], "policy": row["policy"],
            "answer_source": ANSWER_SOURCE[row["role"]], "rank": row["rank"], "score": round(row["score"], 4),
            "reasons": row["reasons"], "why": row["why"],
            "current_label": None if row["role"] == REVIEWER else row["current_label"],
            "suggested_label": None if row["role"] == REVIEWER else row["suggested_label"],
            "prediction": None if row["role"] == REVIEWER else prediction,
            "text": row.get("text"), "features": row.get("features"), "uri": row.get("uri"),
            "issued_at": _iso(row["issued_at"]), "expires_at": _iso(row["expires_at"]),
            "attempt": row["attempt"], "reissue_of": row["reissue_of"], "answers_wanted": row["answers_wanted"],
        }, separators=(",", ":")))  # ASCII: a text's U+2028 must not split the line for a reader
    return lines


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def outbox_path(root: Path, issued_at: datetime, run_id: str) -> Path:
    """The next work list's file, relative to the home: numbered, so that the names sort in the
    order of issue whatever the clock said."""
    folder = root / OUTBOX
    found = folder.glob("review-tasks-*.jsonl") if folder.exists() else []
    numbers = [int(p.name.split("-")[2]) for p in found if p.name.split("-")[2].isdigit()]
    return OUTBOX / f"review-tasks-{1 + max(numbers, default=0):06d}-{issued_at:%Y%m%dT%H%M%SZ}-{run_id[:8]}.jsonl"


def write_outbox(path: Path, lines: list[str]) -> Path:
    """Write the work list whole and durably (a temporary file renamed into place): a reader never sees half of it."""
    return write_atomically(path, "".join(line + "\n" for line in lines), durable=True)


def latest_outbox(root: Path) -> Path | None:
    """The newest work list in the outbox, or None."""
    files = sorted((root / OUTBOX).glob("review-tasks-*.jsonl")) if (root / OUTBOX).exists() else []
    return files[-1] if files else None


# Per arm and role: tasks issued, answered, answers, and answers behind a label change. A change
# counts for an answer when the answer's event is among the events the change was decided on.
EFFICACY_SQL = f"""
WITH changed AS (
    SELECT DISTINCT e.event_id FROM label_history h, unnest(h.event_ids) AS e(event_id)
    WHERE h.previous_label IS NOT NULL AND h.previous_label <> h.label
), per_task AS (
    SELECT t.task_id, t.policy, t.role, t.answers_wanted, count(a.event_id) AS answers,
           count(DISTINCT a.user_pseudonym) AS answerers, count(c.event_id) AS changing
    FROM review_tasks t LEFT JOIN ({COUNTED_ANSWERS_SQL}) a USING (task_id)
    LEFT JOIN changed c ON c.event_id = a.event_id
    GROUP BY t.task_id, t.policy, t.role, t.answers_wanted
)
SELECT policy, role, count(*) AS tasks_issued,
       count(*) FILTER (WHERE answerers >= answers_wanted) AS tasks_answered,
       sum(answers)::BIGINT AS answers, sum(changing)::BIGINT AS answers_changing_a_label,
       round(100.0 * sum(changing) / nullif(sum(answers), 0), 1) AS label_changes_per_100_answers
FROM per_task GROUP BY policy, role ORDER BY role, policy
"""


def efficacy(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Label changes per 100 answers, by routing policy: what each arm's answers changed."""
    return store.frame(con, EFFICACY_SQL)


# What the item carries, for the outbox and for the champion's view of the pool.
POOL_ITEMS_SQL = "SELECT item_id, text, features, uri FROM items WHERE gold_label IS NULL ORDER BY item_id"
# The latest served prediction of each item: the model view where the champion cannot judge items itself.
SERVED_SQL = """
SELECT item_id, model_version, predicted_label, confidence AS predicted_probability FROM predictions
QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY served_at DESC, prediction_id DESC) = 1
"""


def model_view(version: str | None, model, items: pl.DataFrame, served: pl.DataFrame) -> pl.DataFrame:
    """item_id, model_version, predicted_label, predicted_probability: the champion's own view of
    each item where it can give one (probabilities from its pipeline or, for an external champion,
    those its trainer reported), else the latest served prediction."""
    import numpy as np
    schema = {"item_id": pl.String, "model_version": pl.String, "predicted_label": pl.String,
              "predicted_probability": pl.Float64}
    own = pl.DataFrame(schema=schema)
    if model is not None and items.height:
        stored = getattr(model, "stored", None)
        probabilities = stored(items["item_id"]) if stored else model.predict_proba(items)
        judged = ~np.isnan(probabilities).any(axis=1)
        if judged.any():
            best = probabilities[judged].argmax(axis=1)
            own = pl.DataFrame({
                "item_id": items["item_id"].filter(pl.Series(judged)),
                "model_version": version,
                "predicted_label": model.classes[best].astype(str),
                "predicted_probability": probabilities[judged].max(axis=1),
            }, schema=schema)
    rest = served.cast(schema).filter(~pl.col("item_id").is_in(own["item_id"].implode()))
    return pl.concat([own, rest], how="vertical")


def drift_terms(con: duckdb.DuckDBPyConnection, psi_warn: float) -> dict[str, float]:
    """label -> drift component: the latest predicted-label drift's per-label PSI term over the warn
    threshold, for classes whose share grew (more of them arriving than the baseline had)."""
    found = store.frame(
        con, "SELECT detail FROM label_drift WHERE signal = 'predicted_labels' AND detail IS NOT NULL "
        "ORDER BY computed_at DESC LIMIT 1",
    )
    if found.height == 0:
        return {}
    try:
        per_label = json.loads(found["detail"][0]) or []
    except (TypeError, ValueError):
        return {}
    return {
        str(row["label"]): min(1.0, float(row["psi_term"]) / psi_warn)
        for row in per_label
        if row.get("psi_term") is not None and (row.get("current_share") or 0) > (row.get("baseline_share") or 0)
    }
