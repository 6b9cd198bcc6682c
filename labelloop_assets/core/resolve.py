"""Staging and resolution: corrections are votes, weighed by role, by the contributor's
estimated reliability and by how established the contributor is; governance rules decide what a
vote may change on its own.

Newcomers. Anyone can send a correction under a user id nobody has seen, so a fresh pseudonym is
cheap and a crowd of them is cheaper still. A vote whose contributor had counted votes on fewer
than `newcomers.min_history` earlier days when it arrived (its *history*) counts at
`newcomers.weight` of its weight and never flips a label alone. Days, not votes: votes can be
minted by the thousand in a minute, days cannot be hurried on the wall clock. Only votes the
store already had (an earlier arrival) on an earlier burst day count, and none that a held or
discarded burst keeps out, so one batch cannot give itself a history and backdating adds no
days (late corrections count on their arrival day, see core/bursts.py). Reviewers and domain
experts (roles only the contributor directory grants) are exempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from labelloop_assets.core import bursts, store
from labelloop_assets.core.contracts import USER_ROLES
from labelloop_assets.core.settings import LabelloopConfigError, config_number, load_yaml_mapping

PROMOTE = "promote"
CONFIRMED = "confirmed"
PENDING = "pending"
ESCALATE = "escalate"
# The votes behind the current label turned out to be in a held or discarded correction burst:
# the label goes back to what it was before them.
REVERT = "revert"
DECISION_STATUSES = (PROMOTE, CONFIRMED, PENDING, ESCALATE)

# Why an item needs a reviewer (label_decisions.escalation_reason, escalations.reason).
DISAGREEMENT = "disagreement"
TIE = "tie"
CONTRADICTS_CONFIRMED = "contradicts_confirmed"
ESCALATION_REASONS = (DISAGREEMENT, TIE, CONTRADICTS_CONFIRMED)
AUTHORITY_ROLES = ("reviewer", "domain_expert")
# Weights and supports are rounded to this many decimals. Unrounded, the same votes could sum to
# values a last bit apart (Polars divides a short column and a long one differently, and a float
# sum depends on its order), so unrelated votes in the batch, or their order, could decide a tie
# or a threshold.
WEIGHT_DECIMALS = 9


@dataclass(frozen=True)
class ResolutionPolicy:
    """Role weights, the support a change needs, and what a vote may change on its own."""

    role_weights: dict[str, float]
    min_support: float = 2.0
    min_share: float = 0.6
    min_contributors: int = 1
    # A lone contributor who is not a reviewer or domain expert may flip a label only with an
    # estimated accuracy this high, measured on at least this many votes.
    solo_min_accuracy: float = 0.85
    solo_min_votes: int = 20
    # Reliability weighting: weight x accuracy / prior mean, so a typical contributor keeps the
    # role weight; reviewers and domain experts are the reference and are not re-weighed.
    reliability_prior_mean: float = 0.7
    reliability_prior_strength: float = 4.0
    escalation_sla_hours: float = 48.0
    # SLA ages run on the wall clock, or on the event clock (the newest correction's time), which
    # is what a replay or a simulation of past days needs.
    escalation_clock: str = "wall"
    # Which roles may decide an escalation, by its reason.
    may_decide: dict[str, tuple[str, ...]] | None = None
    # A contributor with counted votes on fewer earlier days than this is a newcomer: their vote
    # counts at newcomer_weight of its weight, and never alone. Two fresh ids (2 x 1.0 x 0.25)
    # are far from min_support; it takes eight agreeing fresh end users to reach it.
    newcomer_min_history: int = 2
    newcomer_weight: float = 0.25
    newcomer_exempt_roles: tuple[str, ...] = AUTHORITY_ROLES

    def deciders(self, reason: str) -> tuple[str, ...]:
        table = self.may_decide or {}
        return tuple(table.get(reason, AUTHORITY_ROLES))

    def __post_init__(self) -> None:
        missing = set(USER_ROLES) - set(self.role_weights)
        if missing:
            raise LabelloopConfigError(f"governance: role_weights lacks {sorted(missing)}")
        if any(w < 0 for w in self.role_weights.values()):
            raise LabelloopConfigError("governance: role weights must not be negative")
        if not 0.5 <= self.min_share <= 1.0:
            raise LabelloopConfigError("governance: min_share must be in [0.5, 1]")
        if self.min_support <= 0:
            raise LabelloopConfigError("governance: min_support must be positive")
        if self.min_contributors < 1:
            raise LabelloopConfigError("governance: min_contributors must be at least 1")
        if not 0 < self.reliability_prior_mean < 1:
            raise LabelloopConfigError("governance: reliability.prior_mean must be in (0, 1)")
        if self.escalation_clock not in ("wall", "events"):
            raise LabelloopConfigError("governance: escalation.clock must be `wall` or `events`")
        if self.escalation_sla_hours <= 0:
            raise LabelloopConfigError("governance: escalation.sla_hours must be positive")
        if self.newcomer_min_history < 0:
            raise LabelloopConfigError("governance: newcomers.min_history must not be negative")
        if not 0.0 <= self.newcomer_weight <= 1.0:
            raise LabelloopConfigError("governance: newcomers.weight must be in [0, 1]")
        unknown = set(self.newcomer_exempt_roles) - set(USER_ROLES)
        if unknown:
            raise LabelloopConfigError(f"governance: newcomers.exempt_roles names unknown roles {sorted(unknown)}")
        for reason, roles in (self.may_decide or {}).items():
            if reason not in ESCALATION_REASONS:
                raise LabelloopConfigError(
                    f"governance: may_decide names an unknown reason {reason!r}; "
                    f"reasons are {', '.join(ESCALATION_REASONS)}"
                )
            unknown = set(roles) - set(USER_ROLES)
            if unknown:
                raise LabelloopConfigError(f"governance: may_decide.{reason} names unknown roles {sorted(unknown)}")

    @classmethod
    def load(cls, path: Path) -> ResolutionPolicy:
        raw = load_yaml_mapping(path, "governance")
        try:
            reliability = raw.get("reliability") or {}
            solo = raw.get("solo_flip") or {}
            escalation = raw.get("escalation") or {}
            may_decide = escalation.get("may_decide")
            newcomers = raw.get("newcomers") or {}
            if not isinstance(newcomers, dict):
                raise LabelloopConfigError("`newcomers` must be a mapping")
            unknown = set(newcomers) - {"min_history", "weight", "exempt_roles"}
            if unknown:
                raise LabelloopConfigError(
                    f"newcomers has unknown keys {sorted(unknown)}; known: min_history, weight, exempt_roles"
                )
            exempt = newcomers.get("exempt_roles", list(AUTHORITY_ROLES))
            if not isinstance(exempt, list):
                raise LabelloopConfigError("newcomers.exempt_roles must be a list of roles")
            return cls(
                role_weights={str(k): float(v) for k, v in (raw.get("role_weights") or {}).items()},
                min_support=float(raw.get("min_support", 2.0)),
                min_share=float(raw.get("min_share", 0.6)),
                min_contributors=int(raw.get("min_contributors", 1)),
                solo_min_accuracy=float(solo.get("min_accuracy", 0.85)),
                solo_min_votes=int(solo.get("min_votes", 20)),
                reliability_prior_mean=float(reliability.get("prior_mean", 0.7)),
                reliability_prior_strength=float(reliability.get("prior_strength", 4.0)),
                escalation_sla_hours=float(escalation.get("sla_hours", 48.0)),
                escalation_clock=str(escalation.get("clock", "wall")),
                may_decide=(
                    {str(k): tuple(str(r) for r in v) for k, v in may_decide.items()}
                    if may_decide else None
                ),
                newcomer_min_history=config_number(
                    newcomers.get("min_history", 2), 2, "newcomers.min_history"
                ),
                newcomer_weight=config_number(
                    newcomers.get("weight", 0.25), 0.25, "newcomers.weight"
                ),
                newcomer_exempt_roles=tuple(str(r) for r in exempt),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise LabelloopConfigError(f"governance file {path}: {exc}") from None


def stage(
    corrections: pl.DataFrame,
    predictions: pl.DataFrame,
    current: pl.DataFrame,
    policy: ResolutionPolicy,
) -> pl.DataFrame:
    """Join new corrections to the prediction and model version they correct, and weigh them.

    `predictions` holds prediction_id, item_id, predicted_label, confidence, model_version;
    `current` holds item_id, label (the corpus label when the correction is staged). The
    corrections' `arrived_at` and `burst_day` (core/bursts.py `arrivals`) are kept when given.
    """
    weights = pl.DataFrame(
        {"user_role": list(policy.role_weights), "vote_weight": list(policy.role_weights.values())}
    )
    prediction = predictions.select(
        "prediction_id",
        pl.col("item_id").alias("predicted_item_id"),
        "predicted_label",
        pl.col("confidence").alias("prediction_confidence"),
        pl.col("model_version").alias("predicted_model_version"),
    )
    staged = (
        corrections.join(prediction, on="prediction_id", how="left")
        .join(current.select("item_id", pl.col("label").alias("label_before")), on="item_id", how="left")
        .join(weights, on="user_role", how="left")
    )
    # A prediction of another item is not evidence about this one.
    matches = pl.col("predicted_item_id") == pl.col("item_id")
    return staged.select(
        "seq",
        "event_id",
        "item_id",
        "corrected_label",
        "original_label",
        "label_before",
        pl.when(matches).then("predicted_label").alias("predicted_label"),
        pl.when(matches).then("prediction_confidence").alias("prediction_confidence"),
        pl.coalesce(pl.when(matches).then("predicted_model_version"), "model_version").alias(
            "model_version"
        ),
        "prediction_id",
        matches.fill_null(False).alias("prediction_found"),
        "user_pseudonym",
        "user_role",
        "source",
        pl.col("vote_weight").fill_null(0.0),
        "created_at",
        "rationale",
        *(c for c in ("arrived_at", "burst_day") if c in staged.columns),
    )


HISTORY_SQL = f"""
    WITH mine AS (SELECT v.* FROM validated_labels v JOIN history_users u USING (user_pseudonym))
    SELECT user_pseudonym, day, min(arrived_at) AS first_arrived, bool_or(arrived_at IS NULL) AS before_arrivals
    FROM (SELECT v.user_pseudonym, {bursts.VOTE_DAY} AS day, v.arrived_at FROM mine v {bursts.NOT_BLOCKED_SQL})
    GROUP BY user_pseudonym, day
"""


def with_history(con, votes: pl.DataFrame) -> pl.DataFrame:
    """`votes` with `history`: the earlier burst days on which the contributor had counted votes
    that the store held before this vote arrived (see the module docstring).

    Reads each contributor's active days once (one row per contributor and day), whatever the
    number of votes. Rows staged before arrival times were kept (null arrived_at) came before
    every vote that has one.
    """
    if votes.height == 0:
        return votes.with_columns(history=pl.lit(0, pl.Int64))
    con.register("history_users", votes.select("user_pseudonym").unique())
    try:
        days = store.frame(con, HISTORY_SQL)
    finally:
        con.unregister("history_users")
    keyed = votes.select(
        "event_id", "user_pseudonym",
        bursts.vote_day(votes).alias("_day"),
        (
            pl.col("arrived_at").dt.convert_time_zone("UTC") if "arrived_at" in votes.columns
            else pl.lit(None, pl.Datetime("us", "UTC"))
        ).alias("_arrived"),
    ).unique(["event_id", "user_pseudonym"])
    days = days.with_columns(pl.col("first_arrived").dt.convert_time_zone("UTC"))
    earlier = (
        keyed.join(days, on="user_pseudonym")
        .filter(
            (pl.col("day") < pl.col("_day"))
            & (
                pl.col("before_arrivals")
                | (pl.col("_arrived").is_not_null() & (pl.col("first_arrived") < pl.col("_arrived")))
            )
        )
        .group_by("event_id", "user_pseudonym")
        .agg(history=pl.len().cast(pl.Int64), _arrived=pl.col("_arrived").first())
    )
    # History is also capped by the whole days that passed on the store's clock since the
    # contributor's first counted vote arrived: two votes landed either side of midnight, a
    # quarter of an hour apart, fall on two days but are no two days of history.
    first = days.group_by("user_pseudonym").agg(
        _first=pl.col("first_arrived").min(), _before=pl.col("before_arrivals").any()
    )
    elapsed = ((pl.col("_arrived") - pl.col("_first")).dt.total_seconds() // 86_400).cast(pl.Int64)
    earlier = earlier.join(first, on="user_pseudonym", how="left").with_columns(
        history=pl.when(pl.col("_before") | pl.col("_arrived").is_null() | pl.col("_first").is_null())
        .then("history")
        .otherwise(pl.min_horizontal("history", elapsed))
    ).select("event_id", "user_pseudonym", "history")
    return votes.join(earlier, on=["event_id", "user_pseudonym"], how="left").with_columns(
        pl.col("history").fill_null(0)
    )


def is_newcomer(policy: ResolutionPolicy) -> pl.Expr:
    """A vote (user_role, history) that counts at the newcomer weight; a null history is none."""
    return ~pl.col("user_role").is_in(list(policy.newcomer_exempt_roles)) & (
        pl.col("history").fill_null(0) < policy.newcomer_min_history
    )


def resolve(
    votes: pl.DataFrame,
    current: pl.DataFrame,
    policy: ResolutionPolicy,
    reliability: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One decision per item from all its staged votes (each contributor's latest counts once).

    `votes` are validated_labels rows of the items touched by a batch, whatever their age, with
    `history` (`with_history`; a vote without one is a newcomer's); `current` holds item_id,
    label and optionally reviewer_confirmed; `reliability` holds user_pseudonym, accuracy,
    n_votes (contributors missing from it count at the prior mean).
    Returns item_id, current_label, proposed_label, support, total_weight, share,
    n_contributors, n_supporters, status, escalation_reason, event_ids, rationale.
    """
    if reliability is None or reliability.height == 0:
        reliability = pl.DataFrame(
            schema={"user_pseudonym": pl.String, "accuracy": pl.Float64, "n_votes": pl.Int64}
        )
    authority = pl.col("user_role").is_in(list(AUTHORITY_ROLES))
    if "history" not in votes.columns:
        votes = votes.with_columns(history=pl.lit(0, pl.Int64))
    newcomer = is_newcomer(policy)
    latest = (
        votes.sort("created_at", "seq")
        .group_by("item_id", "user_pseudonym")
        .last()
        .join(reliability.select("user_pseudonym", "accuracy", "n_votes"), on="user_pseudonym", how="left")
        .with_columns(
            pl.col("accuracy").fill_null(policy.reliability_prior_mean),
            pl.col("n_votes").fill_null(0),
        )
        .with_columns(
            effective_weight=(
                pl.when(authority)
                .then(pl.col("vote_weight"))
                .otherwise(pl.col("vote_weight") * pl.col("accuracy") / policy.reliability_prior_mean)
                * pl.when(newcomer).then(pl.lit(policy.newcomer_weight)).otherwise(pl.lit(1.0))
            ).round(WEIGHT_DECIMALS),
            authority=authority,
            trusted_alone=~authority
            & ~newcomer
            & (pl.col("accuracy") >= policy.solo_min_accuracy)
            & (pl.col("n_votes") >= policy.solo_min_votes),
        )
    )
    per_label = (
        latest.group_by("item_id", "corrected_label")
        .agg(
            support=pl.col("effective_weight").sum().round(WEIGHT_DECIMALS),
            n_supporters=pl.len().cast(pl.Int32),
            has_authority=pl.col("authority").any(),
            trusted_alone=pl.col("trusted_alone").any(),
            event_ids=pl.col("event_id").sort(),
            rationale=pl.col("rationale").sort_by("event_id").drop_nulls().str.slice(0, 200).str.join(" | "),
        )
        .with_columns(
            total_weight=pl.col("support").sum().over("item_id").round(WEIGHT_DECIMALS),
            _rank=pl.col("support").rank("ordinal", descending=True).over(
                "item_id", order_by="corrected_label"
            ),
            _runner_up=pl.col("support").sort(descending=True).slice(1, 1).first().over("item_id"),
        )
    )
    contributors = latest.group_by("item_id").agg(
        n_contributors=pl.len().cast(pl.Int32), event_time=pl.col("created_at").max()
    )
    if "reviewer_confirmed" not in current.columns:
        current = current.with_columns(reviewer_confirmed=pl.lit(False))
    top = (
        per_label.filter(pl.col("_rank") == 1)
        .join(contributors, on="item_id")
        .join(
            current.select(
                "item_id", pl.col("label").alias("current_label"), "reviewer_confirmed"
            ),
            on="item_id",
            how="left",
        )
        .with_columns(
            share=pl.when(pl.col("total_weight") > 0)
            .then(pl.col("support") / pl.col("total_weight"))
            .otherwise(0.0),
            _tied=pl.col("_runner_up").fill_null(-1.0) == pl.col("support"),
            reviewer_confirmed=pl.col("reviewer_confirmed").fill_null(False),
        )
    )
    supported = pl.col("support") >= policy.min_support
    strong = supported & (pl.col("share") >= policy.min_share) & ~pl.col("_tied")
    same = (pl.col("corrected_label") == pl.col("current_label")).fill_null(False)
    alone = pl.col("n_supporters") == 1
    protected = pl.col("reviewer_confirmed") & ~pl.col("has_authority")
    status = (
        # A tie is a disagreement whichever label it involves: never promoted, never confirmed.
        pl.when(pl.col("_tied") & supported).then(pl.lit(ESCALATE))
        .when(strong & same).then(pl.lit(CONFIRMED))
        .when(strong & protected).then(pl.lit(ESCALATE))
        .when(strong & (pl.col("n_supporters") < policy.min_contributors)).then(pl.lit(PENDING))
        .when(strong & alone & ~pl.col("has_authority") & ~pl.col("trusted_alone")).then(pl.lit(PENDING))
        .when(strong).then(pl.lit(PROMOTE))
        .when(supported & ~same).then(pl.lit(ESCALATE))
        .otherwise(pl.lit(PENDING))
    )
    reason = (
        pl.when(pl.col("status") != ESCALATE).then(None)
        .when(pl.col("_tied")).then(pl.lit(TIE))
        .when(protected & ~same).then(pl.lit(CONTRADICTS_CONFIRMED))
        .otherwise(pl.lit(DISAGREEMENT))
    )
    return (
        top.with_columns(status=status)
        .with_columns(escalation_reason=reason)
        .select(
            "item_id",
            "current_label",
            pl.col("corrected_label").alias("proposed_label"),
            pl.col("support").cast(pl.Float64),
            pl.col("total_weight").cast(pl.Float64),
            pl.col("share").cast(pl.Float64),
            "n_contributors",
            "n_supporters",
            pl.col("has_authority").alias("by_authority"),
            "status",
            "escalation_reason",
            "event_ids",
            pl.col("rationale").replace("", None),
            "event_time",
        )
        .sort("item_id")
    )
