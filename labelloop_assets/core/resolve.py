"""Staging and the first resolution rule: corrections are votes weighted by role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from labelloop_assets.core.contracts import USER_ROLES
from labelloop_assets.core.settings import LabelloopConfigError, load_yaml_mapping

PROMOTE = "promote"
CONFIRMED = "confirmed"
PENDING = "pending"
CONFLICT = "conflict"
DECISION_STATUSES = (PROMOTE, CONFIRMED, PENDING, CONFLICT)


@dataclass(frozen=True)
class ResolutionPolicy:
    """Role weights and the support a label needs before it replaces the current one."""

    role_weights: dict[str, float]
    min_support: float = 2.0
    min_share: float = 0.6

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

    @classmethod
    def load(cls, path: Path) -> "ResolutionPolicy":
        raw = load_yaml_mapping(path, "governance")
        try:
            return cls(
                role_weights={str(k): float(v) for k, v in (raw.get("role_weights") or {}).items()},
                min_support=float(raw.get("min_support", 2.0)),
                min_share=float(raw.get("min_share", 0.6)),
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
    `current` holds item_id, label (the corpus label when the correction is staged).
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
    )


def resolve(votes: pl.DataFrame, current: pl.DataFrame, policy: ResolutionPolicy) -> pl.DataFrame:
    """One decision per item from all its staged votes (each contributor's latest counts once).

    `votes` are validated_labels rows of the items touched by a batch, whatever their age;
    `current` holds item_id, label. Returns item_id, current_label, proposed_label, support,
    total_weight, share, n_contributors, status, event_ids, rationale.
    """
    latest = votes.sort("created_at", "seq").group_by("item_id", "user_pseudonym").last()
    per_label = (
        latest.group_by("item_id", "corrected_label")
        .agg(
            support=pl.col("vote_weight").sum(),
            event_ids=pl.col("event_id").sort(),
            rationale=pl.col("rationale").sort_by("event_id").drop_nulls().str.slice(0, 200).str.join(" | "),
        )
        .with_columns(
            total_weight=pl.col("support").sum().over("item_id"),
            _rank=pl.col("support").rank("ordinal", descending=True).over(
                "item_id", order_by="corrected_label"
            ),
            _runner_up=pl.col("support").sort(descending=True).slice(1, 1).first().over("item_id"),
        )
    )
    contributors = latest.group_by("item_id").agg(n_contributors=pl.len().cast(pl.Int32))
    top = (
        per_label.filter(pl.col("_rank") == 1)
        .join(contributors, on="item_id")
        .join(current.select("item_id", pl.col("label").alias("current_label")), on="item_id", how="left")
        .with_columns(
            share=pl.when(pl.col("total_weight") > 0)
            .then(pl.col("support") / pl.col("total_weight"))
            .otherwise(0.0),
            _tied=pl.col("_runner_up").fill_null(-1.0) == pl.col("support"),
        )
    )
    strong = (pl.col("support") >= policy.min_support) & (pl.col("share") >= policy.min_share)
    same = pl.col("corrected_label") == pl.col("current_label")
    supported = pl.col("support") >= policy.min_support
    # A tie is a disagreement whichever label it involves: never promoted, never confirmed.
    status = (
        pl.when(pl.col("_tied") & supported).then(pl.lit(CONFLICT))
        .when(strong & ~pl.col("_tied") & same.fill_null(False)).then(pl.lit(CONFIRMED))
        .when(strong & ~pl.col("_tied")).then(pl.lit(PROMOTE))
        .when(supported & ~same.fill_null(False)).then(pl.lit(CONFLICT))
        .otherwise(pl.lit(PENDING))
    )
    return top.select(
        "item_id",
        "current_label",
        pl.col("corrected_label").alias("proposed_label"),
        pl.col("support").cast(pl.Float64),
        pl.col("total_weight").cast(pl.Float64),
        pl.col("share").cast(pl.Float64),
        "n_contributors",
        status.alias("status"),
        "event_ids",
        pl.col("rationale").replace("", None),
    ).sort("item_id")
