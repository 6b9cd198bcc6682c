"""Which corpus labels are likely wrong: a model's out-of-sample doubt fused with human signals.

Passive signal. K-fold out-of-sample probabilities from the production model family
(StandardScaler + LogisticRegression with the champion's parameters), so no item is judged by a model
that saw its own label. From them, per item: self-confidence (p of the given label), the
normalized margin, and confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning:
Estimating Uncertainty in Dataset Labels"): class j's threshold t_j is the mean p_j over the items
labeled j; an item is counted for j* = argmax p_j over the classes with p_j >= t_j, and it is an
issue when j* exists and differs from its given label (an off-diagonal cell of the confident joint).

Active signals. Recent human votes on the item (weighted by reliability), an open escalation or
pending correction, the estimated accuracy of whoever set the current label, and a reviewer's
confirmation.

Fusion. Every signal is evidence in nats (natural log-odds) that the current label is wrong, summed
naive-Bayes style and squashed with a logistic, so `score` reads as the probability that the label
is wrong if the signals were independent and the model calibrated (they are not quite: treat it as
a ranking score in [0, 1], comparable across runs with the same weights):

    log_odds = prior + passive * (logit(1 - self_confidence) - prior)   # the model's own odds
             + confident_learning * [off-diagonal]
             - normalized_margin * (c_given - max_{j != given} c_j)       # c_j = min(p_j / t_j, 1)
             + votes_against * votes_against * LLR_against(K, a)        # per unit of vote weight
             - votes_for * votes_for * LLR_for(K, a)
             + disagreement * [escalated or pending]
             + source_reliability * (logit(1 - r) - logit(1 - a))       # r: accuracy of the source
             + reviewer_confirmed * [reviewer confirmed]                # a negative weight
    score = 1 / (1 + exp(-log_odds))

`prior` is the model's mean estimated error rate, 1 - mean self-confidence (what an item without
a finite feature row gets). The vote terms follow the one-coin model of core/reliability.py: a
unit of vote weight is one vote from a contributor of the reference accuracy a (the reliability
prior mean, 0.7: core/resolve.py scales a vote by accuracy / prior mean, so such a contributor
weighs 1 per unit of role weight). With K classes, a vote for another label has likelihood ratio

    LLR_against = log((a + (K - 2)(1 - a)/(K - 1)) / (1 - a))   (1.17 nats at K = 10, 0.85 at K = 2)

and a vote for the current label LLR_for = log(a (K - 1) / (1 - a)) (3.05 nats at K = 10; 0.85 at
K = 2): with many classes a wrong label rarely attracts a second, independent vote.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from labelloop_assets.core import bursts, reliability, store, train
from labelloop_assets.core.pipelines import FEATURES, TEXT, PipelineSpec, preset_spec
from labelloop_assets.core.settings import LabelloopConfigError

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

# Active signals, one row per item (items missing = no human signal). votes_against / votes_for:
# summed weight of recent votes for another label / for the current one, each vote weighted as in
# core/resolve.py (role weight x accuracy / reliability prior mean, so a typical end user's vote is
# 1.0); n_contributors: distinct contributors who voted; source_reliability: estimated accuracy of
# whoever set the current label, null when unknown.
ACTIVE_SCHEMA = {
    "item_id": pl.String,
    "votes_against": pl.Float64,
    "votes_for": pl.Float64,
    "n_contributors": pl.Int64,
    "escalated_or_pending": pl.Boolean,
    "reviewer_confirmed": pl.Boolean,
    "source_reliability": pl.Float64,
}
# confident_label is j*, null when no class clears its threshold (or the item has no probabilities).
PASSIVE_COLUMNS = (
    "given_label",
    "self_confidence",
    "suggested_label",
    "margin",
    "normalized_margin",
    "confident_label",
    "cl_off_diagonal",
    "cl_issue",
)
CANDIDATE_COLUMNS = (
    "rank",
    "item_id",
    "label",
    "suggested_label",
    "score",
    "self_confidence",
    "margin",
    "cl_issue",
    "votes_against",
    "votes_for",
    "reviewer_confirmed",
    "reasons",
)
# Probabilities are clipped this far from 0 and 1 so one overconfident model output stays finite
# (at most 9.2 nats) and active signals can still move it.
PROBABILITY_FLOOR = 1e-4
# Estimated accuracies are clipped to this range before they become log-odds.
ACCURACY_RANGE = (0.01, 0.99)


@dataclass(frozen=True)
class IssueWeights:
    """How much each signal counts, in nats (log-odds) that the current label is wrong.

    passive: multiplies the model's out-of-sample log-odds against the label (1 = take them as is).
    confident_learning: added when the item is off-diagonal in the confident joint; the per-class
        thresholds correct the model's class-dependent over- or under-confidence.
    normalized_margin: multiplies minus the threshold-normalized margin, c_given -
        max_{j != given} c_j with c_j = min(p_j / t_j, 1). Read against the per-class thresholds,
        a label the model typically gives with low confidence is not suspect for that alone,
        while an item that looks like a confidently-predicted other class is: this is what
        catches systematic (class-pair) noise, which lowers the given class's own confidence
        everywhere. Capped at the threshold because clearing it is all confident learning asks
        of a class: uncapped, a rare or hard class (low t_j) turns small probabilities into large
        ratios and pushes its look-alikes' clean items up the queue.
    votes_against / votes_for: multiply the one-coin likelihood ratio of a unit of vote weight
        against / for the current label (1 = independent votes, as the reliability model assumes).
    disagreement: added for an open escalation or pending correction; small, because the votes
        behind it are already counted.
    source_reliability: multiplies the log-odds of the current label's source erring, relative to
        a contributor of reference accuracy (below it adds evidence, above it subtracts).
    reviewer_confirmed: added when a reviewer confirmed the label; negative and larger than the
        strongest model doubt (9.2 nats at the probability floor, plus confident learning), so a
        confirmed label ranks below every unconfirmed item the model gives even odds of being
        wrong, but stays in the list.
    reference_accuracy: the accuracy a unit of vote weight stands for (the reliability prior mean).
    """

    passive: float = 1.0
    confident_learning: float = 2.0
    normalized_margin: float = 1.0
    votes_against: float = 1.0
    votes_for: float = 1.0
    disagreement: float = 0.5
    source_reliability: float = 1.0
    reviewer_confirmed: float = -12.0
    reference_accuracy: float = 0.7

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
            ):
                raise LabelloopConfigError(
                    f"label issue weight {field.name}={value!r} is not a finite number"
                )
        negative = [
            f.name
            for f in fields(self)
            if f.name != "reviewer_confirmed" and getattr(self, f.name) < 0
        ]
        if negative:
            raise LabelloopConfigError(f"label issue weights {negative} must not be negative")
        if self.reviewer_confirmed > 0:
            raise LabelloopConfigError(
                "label issue weight reviewer_confirmed must not be positive (it ranks down)"
            )
        if not 0.5 < self.reference_accuracy < 1.0:
            raise LabelloopConfigError(
                f"label issue weight reference_accuracy={self.reference_accuracy} "
                "must be in (0.5, 1)"
            )

    @classmethod
    def from_mapping(cls, raw: dict | None) -> IssueWeights:
        """Weights from a configuration mapping (None or {} = the defaults)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise LabelloopConfigError(
                f"label issue weights must be a mapping, got {type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise LabelloopConfigError(
                f"label issue weights: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**raw)

    def as_dict(self) -> dict[str, float]:
        """The weights as a plain mapping (for run metadata)."""
        return asdict(self)


def vote_log_likelihood_ratios(n_classes: int, accuracy: float) -> tuple[float, float]:
    """(nats of one vote against the current label, nats of one vote for it): one-coin model."""
    k = max(int(n_classes), 2)
    a = float(accuracy)
    against = math.log((a + (k - 2) * (1 - a) / (k - 1)) / (1 - a))
    for_ = math.log(a * (k - 1) / (1 - a))
    return against, for_


def out_of_sample_probabilities(
    items: np.ndarray | pl.DataFrame,
    labels: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    spec: PipelineSpec | None = None,
) -> tuple[np.ndarray | None, np.ndarray, str | None]:
    """K-fold out-of-sample probabilities from the production pipeline: (probs, classes, note).

    `items` is a features matrix, or a frame with text and/or features as `spec` reads them
    (None: the default pipeline for features)."""
    import numpy as np
    labels = np.asarray(labels)
    if isinstance(items, pl.DataFrame):
        if spec is None:
            raise ValueError("a frame of items needs the pipeline that reads it")
        features = train.features_matrix(items) if spec.input != TEXT else np.zeros((items.height, 1))
    else:
        features = np.asarray(items, dtype=np.float64)
        spec = spec or preset_spec("logistic_regression", FEATURES)
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be (n, d) and labels (n,), got {features.shape} and {labels.shape}"
        )
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    classes = np.unique(labels)
    notes: list[str] = []

    finite = np.isfinite(features).all(axis=1)
    n_dropped = int((~finite).sum())
    if n_dropped:
        notes.append(
            f"{n_dropped} row(s) with non-finite features were left out of fitting and have NaN "
            "probabilities (no passive signal)"
        )

    def degenerate(reason: str) -> tuple[None, np.ndarray, str]:
        return None, classes, "; ".join([*notes, reason])

    usable = np.flatnonzero(finite)
    fit_classes, counts = np.unique(labels[usable], return_counts=True)
    if len(fit_classes) < 2:
        return degenerate(
            f"out-of-sample probabilities need two classes; the usable rows have {len(fit_classes)}"
        )
    if len(usable) < 2 * folds:
        return degenerate(
            f"out-of-sample probabilities need at least {2 * folds} usable rows for {folds} "
            f"folds, got {len(usable)}"
        )

    singleton_classes = fit_classes[counts == 1]
    repeated_counts = counts[counts > 1]
    if repeated_counts.size == 0:
        return degenerate("every class has a single member: nothing can be predicted out of sample")
    n_splits = folds
    if repeated_counts.min() < folds:
        n_splits = max(2, int(repeated_counts.min()))
        notes.append(
            f"folds lowered from {folds} to {n_splits}: the smallest class has {n_splits} members"
        )

    is_singleton = np.isin(labels[usable], singleton_classes)
    singletons = usable[is_singleton]
    splittable = usable[~is_singleton]
    column = {str(c): i for i, c in enumerate(classes)}
    probs = np.full((len(labels), len(classes)), np.nan)

    def rows(selected: np.ndarray) -> np.ndarray | pl.DataFrame:
        # A features pipeline reads the matrix already built; text is read from the frame.
        return features[selected] if spec.input == FEATURES else items[selected]

    def predict_into(rows_fit: np.ndarray, rows_out: np.ndarray) -> None:
        model = train.fit(rows(rows_fit), labels[rows_fit], spec, features.shape[1] if spec.input != TEXT else None)
        columns = np.array([column[str(c)] for c in model.classes])
        block = np.zeros((len(rows_out), len(classes)))
        block[:, columns] = model.predict_proba(rows(rows_out))
        probs[rows_out] = block

    # imported where used: loading the code location must not pay for scikit-learn
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fit_part, out_part in splitter.split(splittable, labels[splittable]):
        # Single-member classes stay in every training fold so other items can be told from them.
        predict_into(np.concatenate([splittable[fit_part], singletons]), splittable[out_part])
    if singletons.size:
        predict_into(usable, singletons)
        named = ", ".join(map(str, singleton_classes[:5]))
        named += ", ..." if singleton_classes.size > 5 else ""
        notes.append(
            f"{singletons.size} item(s) in classes with a single member ({named}) "
            "cannot be predicted out of sample: "
            "they get the probabilities of a model fitted on all rows (in-sample, so optimistic)"
        )
    return probs, classes, "; ".join(notes) or None


def _label_indices(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    import numpy as np
    labels = np.asarray(labels)
    index = np.searchsorted(classes, labels)
    index = np.clip(index, 0, len(classes) - 1)
    unknown = classes[index] != labels
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} label(s) are not among the classes, e.g. {labels[unknown][0]!r}"
        )
    return index


def class_thresholds(probs: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Confident-learning thresholds t_j = mean p_j over items labeled j (inf if there are none)."""
    import numpy as np
    probs = np.asarray(probs, dtype=np.float64)
    given = _label_indices(labels, classes)
    rows = np.isfinite(probs).all(axis=1)
    k = len(classes)
    sums = np.zeros((k, k))
    np.add.at(sums, given[rows], probs[rows])
    counts = np.bincount(given[rows], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        thresholds = np.diagonal(sums) / counts
    return np.where(counts > 0, thresholds, np.inf)


def confident_learning(probs: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> pl.DataFrame:
    """The passive signals per item, in row order (the columns are PASSIVE_COLUMNS)."""
    import numpy as np
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.asarray(classes)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape != (len(labels), len(classes)):
        raise ValueError(
            f"probs must be (n_items, n_classes) = ({len(labels)}, {len(classes)}), "
            f"got {probs.shape}"
        )
    given = _label_indices(labels, classes)
    n = len(labels)
    rows = np.arange(n)
    has_probs = np.isfinite(probs).all(axis=1)

    self_confidence = probs[rows, given]
    others = probs.copy()
    others[rows, given] = -np.inf
    margin = self_confidence - others.max(axis=1) if len(classes) > 1 else np.ones(n)
    suggested = np.where(has_probs, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), 0)

    thresholds = class_thresholds(probs, labels, classes)
    # Capped at 1 (see IssueWeights.normalized_margin): a class at or above its threshold is
    # confident, and how far above tells nothing more about this label.
    normalized = np.minimum(probs / np.where(np.isfinite(thresholds) & (thresholds > 0), thresholds, np.inf), 1.0)
    normalized_others = normalized.copy()
    normalized_others[rows, given] = -np.inf
    normalized_margin = (
        normalized[rows, given] - normalized_others.max(axis=1) if len(classes) > 1 else np.ones(n)
    )
    confident = np.where(probs >= thresholds, probs, -np.inf)
    confident_index = confident.argmax(axis=1)
    has_confident = has_probs & np.isfinite(confident[rows, confident_index])

    off_diagonal = has_confident & (confident_index != given)
    pruned = prune_by_noise_rate(probs, given, confident_index, has_confident, has_probs)
    return pl.DataFrame(
        {
            "given_label": pl.Series(classes[given]),
            "self_confidence": np.where(has_probs, self_confidence, np.nan),
            "suggested_label": pl.Series(classes[suggested]),
            "margin": np.where(has_probs, margin, np.nan),
            "normalized_margin": np.where(has_probs, normalized_margin, np.nan),
            "confident_label": pl.Series(classes[confident_index]),
            "cl_off_diagonal": off_diagonal,
            "cl_issue": pruned,
            "_has_probs": has_probs,
            "_has_confident": has_confident,
        }
    ).select(
        "given_label",
        pl.col("self_confidence").fill_nan(None),
        pl.when("_has_probs").then("suggested_label").alias("suggested_label"),
        pl.col("margin").fill_nan(None),
        pl.col("normalized_margin").fill_nan(None),
        pl.when("_has_confident").then("confident_label").alias("confident_label"),
        "cl_off_diagonal",
        "cl_issue",
    )


def prune_by_noise_rate(
    probs: np.ndarray, given: np.ndarray, confident_index: np.ndarray, has_confident: np.ndarray,
    has_probs: np.ndarray,
) -> np.ndarray:
    """Confident learning's prune-by-noise-rate: per (given i, true j) cell, the estimated number of
    errors, taken from the items labeled i with the largest margin p_j - p_i.

    The confident joint C[i, j] counts items labeled i whose confident class is j; each row is
    calibrated to the number of items labeled i, and off-diagonal cell (i, j) then estimates how
    many items labeled i truly belong to j (Northcutt et al. 2021, section 3). One loop step per
    class pair, vectorized within.
    """
    import numpy as np
    n_classes = probs.shape[1]
    flagged = np.zeros(len(given), dtype=bool)
    if n_classes < 2:
        return flagged
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (given[has_confident], confident_index[has_confident]), 1.0)
    per_class = np.bincount(given[has_probs], minlength=n_classes).astype(np.float64)
    row_sums = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, row_sums, out=np.zeros_like(joint), where=row_sums > 0) * per_class[:, None]
    estimated = np.rint(calibrated).astype(int)
    np.fill_diagonal(estimated, 0)
    for i, j in zip(*np.nonzero(estimated), strict=True):
        members = np.flatnonzero(has_probs & (given == i))
        if members.size == 0:
            continue
        count = min(int(estimated[i, j]), members.size)
        margin = probs[members, j] - probs[members, i]
        flagged[members[np.argsort(-margin, kind="stable")[:count]]] = True
    # As in cleanlab: an item the model itself predicts as its given label is not an issue.
    return flagged & (np.nan_to_num(probs, nan=-1.0).argmax(axis=1) != given)


def empty_active() -> pl.DataFrame:
    """An active-signal frame with no rows (every item without human signal)."""
    return pl.DataFrame(schema=ACTIVE_SCHEMA)


def _checked_active(active: pl.DataFrame | None, id_dtype: pl.DataType) -> pl.DataFrame:
    if active is None:
        active = empty_active()
    missing = [c for c in ACTIVE_SCHEMA if c not in active.columns]
    if missing:
        raise ValueError(f"active signals lack column(s) {missing}; expected {list(ACTIVE_SCHEMA)}")
    active = active.select(
        pl.col("item_id").cast(id_dtype),
        *(pl.col(c).cast(t) for c, t in ACTIVE_SCHEMA.items() if c != "item_id"),
    )
    if active["item_id"].is_duplicated().any():
        raise ValueError("active signals must hold at most one row per item_id")
    return active


def _fmt(expr: pl.Expr, decimals: int = 2) -> pl.Expr:
    return expr.round(decimals).cast(pl.String)


def _probability(expr: pl.Expr) -> pl.Expr:
    return pl.when(expr < 0.005).then(pl.lit("<0.01")).otherwise(_fmt(expr))


def _quoted(expr: pl.Expr) -> pl.Expr:
    return pl.format("'{}'", expr.cast(pl.String))


def rank_candidates(
    items: pl.DataFrame,
    passive: pl.DataFrame | None,
    active: pl.DataFrame | None,
    weights: IssueWeights,
    limit: int | None = None,
) -> pl.DataFrame:
    """Items ranked by the fused score that their label is wrong, with reasons (see module doc)."""
    for column in ("item_id", "label"):
        if column not in items.columns:
            raise ValueError(f"items lack column {column!r}")
    if passive is None:  # no model (e.g. a degenerate corpus): every item gets the prior only
        passive = pl.DataFrame(
            {"given_label": items["label"]},
        ).with_columns(
            self_confidence=pl.lit(None, pl.Float64),
            suggested_label=pl.lit(None, items["label"].dtype),
            margin=pl.lit(None, pl.Float64),
            normalized_margin=pl.lit(None, pl.Float64),
            confident_label=pl.lit(None, items["label"].dtype),
            cl_issue=pl.lit(False),
        )
    if passive.height != items.height:
        raise ValueError(
            f"passive has {passive.height} rows for {items.height} items; they must align by row"
        )
    if "confident_label" not in passive.columns:
        passive = passive.with_columns(confident_label=pl.lit(None, passive["given_label"].dtype))
    misaligned = items["label"].cast(pl.String) != passive["given_label"].cast(pl.String)
    if misaligned.any():
        raise ValueError(
            f"{int(misaligned.sum())} item label(s) differ from passive given_label: "
            "items and passive must be in the same row order"
        )

    n_classes = max(2, items["label"].n_unique())
    against_nats, for_nats = vote_log_likelihood_ratios(n_classes, weights.reference_accuracy)
    self_conf = passive["self_confidence"].drop_nulls()
    mean_error = float(1.0 - self_conf.mean()) if self_conf.len() else 0.1
    mean_error = min(max(mean_error, PROBABILITY_FLOOR), 1 - PROBABILITY_FLOOR)
    prior = math.log(mean_error / (1 - mean_error))
    reference = weights.reference_accuracy
    reference_odds = math.log((1 - reference) / reference)

    frame = (
        pl.concat(
            [
                items.select("item_id", "label"),
                passive.select(
                    "self_confidence", "suggested_label", "margin", "normalized_margin",
                    "confident_label", "cl_issue",
                ),
            ],
            how="horizontal",
        )
        .join(
            _checked_active(active, items["item_id"].dtype),
            on="item_id",
            how="left",
            maintain_order="left",
        )
        .with_columns(
            pl.col("votes_against", "votes_for").fill_null(0.0).clip(lower_bound=0.0),
            pl.col("n_contributors").fill_null(0),
            pl.col("escalated_or_pending", "reviewer_confirmed", "cl_issue").fill_null(False),
        )
    )
    sc = pl.col("self_confidence").clip(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    r = pl.col("source_reliability").clip(*ACCURACY_RANGE)
    source_odds = ((1 - r) / r).log() - reference_odds
    frame = frame.with_columns(
        _passive=pl.when(sc.is_null())
        .then(pl.lit(prior))
        .otherwise(prior + weights.passive * (((1 - sc) / sc).log() - prior)),
        _cl=pl.col("cl_issue").cast(pl.Float64) * weights.confident_learning,
        _normalized=(-pl.col("normalized_margin") * weights.normalized_margin).fill_null(0.0),
        _against=pl.col("votes_against") * (weights.votes_against * against_nats),
        _for=-pl.col("votes_for") * (weights.votes_for * for_nats),
        _disagreement=pl.col("escalated_or_pending").cast(pl.Float64) * weights.disagreement,
        _source=(weights.source_reliability * source_odds).fill_null(0.0),
        _confirmed=pl.col("reviewer_confirmed").cast(pl.Float64) * weights.reviewer_confirmed,
    ).with_columns(
        _log_odds=pl.sum_horizontal(
            "_passive", "_cl", "_normalized", "_against", "_for", "_disagreement", "_source", "_confirmed"
        ),
    )

    label_q = _quoted(pl.col("label"))
    reasons = [
        pl.when(pl.col("self_confidence").is_null()).then(
            pl.lit("no model signal (no out-of-sample probability for this item)")
        ),
        pl.when(
            pl.col("self_confidence").is_not_null() & (pl.col("suggested_label") != pl.col("label"))
        ).then(
            pl.format(
                "model (out-of-sample) gives the label {}; suggests {} at {}",
                _probability(pl.col("self_confidence")),
                _quoted(pl.col("suggested_label")),
                _probability(pl.col("self_confidence") - pl.col("margin")),
            )
        ),
        pl.when(
            pl.col("self_confidence").is_not_null() & (pl.col("suggested_label") == pl.col("label"))
        ).then(
            pl.format(
                "model (out-of-sample) agrees with the label at {}",
                _probability(pl.col("self_confidence")),
            )
        ),
        pl.when(pl.col("cl_issue") & pl.col("confident_label").is_not_null()).then(
            pl.format(
                "confident learning: off-diagonal (given {}, confidently {})",
                label_q,
                _quoted(pl.col("confident_label")),
            )
        ),
        pl.when(pl.col("cl_issue") & pl.col("confident_label").is_null()).then(
            pl.format(
                "confident learning: among the items labelled {} most likely to be {} "
                "(pruned by noise rate)",
                label_q,
                _quoted(pl.col("suggested_label")),
            )
        ),
        pl.when(pl.col("votes_against") > 0).then(
            pl.format(
                "human votes against the label (weight {}; {} contributor(s) voted)",
                _fmt(pl.col("votes_against"), 1),
                pl.col("n_contributors"),
            )
        ),
        pl.when(pl.col("votes_for") > 0).then(
            pl.format(
                "human votes for the label (weight {}): ranked down", _fmt(pl.col("votes_for"), 1)
            )
        ),
        pl.when(pl.col("escalated_or_pending")).then(
            pl.lit("an escalation or correction is open on it")
        ),
        pl.when(pl.col("source_reliability") < reference).then(
            pl.format(
                "current label set by a contributor with estimated accuracy {}",
                _fmt(pl.col("source_reliability")),
            )
        ),
        pl.when(pl.col("source_reliability") > reference).then(
            pl.format(
                "current label set by a contributor with estimated accuracy {}: ranked down",
                _fmt(pl.col("source_reliability")),
            )
        ),
        pl.when(pl.col("reviewer_confirmed")).then(pl.lit("reviewer confirmed: ranked down")),
    ]
    ranked = (
        frame.with_columns(
            score=1.0 / (1.0 + (-pl.col("_log_odds")).exp()),
            reasons=pl.concat_list(reasons).list.drop_nulls(),
        )
        .sort(
            ["_log_odds", "self_confidence", "item_id"],
            descending=[True, False, False],
            nulls_last=True,
        )
        .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64))
        .select(CANDIDATE_COLUMNS)
    )
    return ranked if limit is None else ranked.head(limit)


# Active signals per corpus item, from the store. Votes are each contributor's latest counted
# vote since the item's last closing review, weighted as resolve.py weighs them. The source of
# an initial label (vendor, heuristic, ...) is scored on the items audited at random
# (core/reliability.py `source_reliability`, joined in `active_signals`: reviewer-confirmed items
# were chosen because they were doubted, and rate a good source near zero); a corrected
# label by the reliability of the contributors behind it.
ACTIVE_SQL = f"""
WITH reviewed AS (
    SELECT item_id, max(ingested_at) AS reviewed_at FROM review_decisions
    WHERE decision IN ('accept', 'reject') GROUP BY item_id
), latest AS (
    SELECT v.item_id, v.user_pseudonym, v.corrected_label, v.user_role, v.vote_weight
    FROM ({bursts.COUNTED_VOTES_SQL}) v LEFT JOIN reviewed r USING (item_id)
    WHERE r.reviewed_at IS NULL OR v.staged_at > r.reviewed_at
    QUALIFY row_number() OVER (PARTITION BY v.item_id, v.user_pseudonym ORDER BY v.seq DESC) = 1
), weighted AS (
    SELECT l.item_id, l.user_pseudonym, l.corrected_label,
           l.vote_weight * CASE WHEN l.user_role IN ('end_user', 'annotator') AND r.accuracy IS NOT NULL
                                THEN r.accuracy / $prior_mean ELSE 1.0 END AS weight
    FROM latest l LEFT JOIN contributor_reliability r USING (user_pseudonym)
), votes AS (
    SELECT w.item_id,
           sum(w.weight) FILTER (WHERE w.corrected_label <> c.label) AS votes_against,
           sum(w.weight) FILTER (WHERE w.corrected_label = c.label) AS votes_for,
           count(DISTINCT w.user_pseudonym) AS n_contributors
    FROM weighted w JOIN production_corpus c USING (item_id) GROUP BY w.item_id
), open_decision AS (
    SELECT item_id, status IN ('pending', 'escalate') AS open FROM latest_label_decisions
), current_change AS (
    SELECT h.item_id, h.change_kind, h.label_source, h.event_ids FROM label_history h
    JOIN production_corpus c ON c.item_id = h.item_id AND c.updated_version = h.corpus_version
    QUALIFY row_number() OVER (PARTITION BY h.item_id ORDER BY h.change_order DESC) = 1
), change_sources AS (
    SELECT h.item_id, avg(r.accuracy) AS accuracy
    FROM current_change h, unnest(h.event_ids) AS e(event_id)
    JOIN validated_labels v ON v.event_id = e.event_id
    JOIN contributor_reliability r ON r.user_pseudonym = v.user_pseudonym
    WHERE v.user_role IN ('end_user', 'annotator')
    GROUP BY h.item_id
)
SELECT c.item_id,
       coalesce(v.votes_against, 0.0) AS votes_against,
       coalesce(v.votes_for, 0.0) AS votes_for,
       coalesce(v.n_contributors, 0) AS n_contributors,
       coalesce(o.open, false) AS escalated_or_pending,
       c.reviewer_confirmed,
       CASE WHEN h.change_kind = 'initial' THEN h.label_source END AS initial_source,
       cs.accuracy AS change_accuracy
FROM production_corpus c
LEFT JOIN votes v USING (item_id)
LEFT JOIN open_decision o USING (item_id)
LEFT JOIN current_change h USING (item_id)
LEFT JOIN change_sources cs USING (item_id)
"""


def active_signals(
    con: duckdb.DuckDBPyConnection, prior_mean: float, prior_strength: float, min_anchors: int = 10
) -> pl.DataFrame:
    """Per corpus item: human votes for and against its label, open conflicts, review, source reliability.

    An initial label's source reliability is its source's accuracy on the audit sample, once at
    least `min_anchors` of its items were audited (null before: no estimate beats a biased one).
    """
    signals = store.frame(con, ACTIVE_SQL, {"prior_mean": prior_mean})
    sources = reliability.stored_source_reliability(con, reliability.ReliabilityPrior(prior_mean, prior_strength))
    audited = sources.filter(pl.col("n_audited") >= min_anchors).select(
        pl.col("label_source").alias("initial_source"), pl.col("accuracy").alias("initial_accuracy")
    )
    return (
        signals.join(audited, on="initial_source", how="left", maintain_order="left")
        .with_columns(
            source_reliability=pl.when(pl.col("initial_source").is_not_null())
            .then("initial_accuracy")
            .otherwise("change_accuracy")
        )
        .select(list(ACTIVE_SCHEMA))
        .cast(ACTIVE_SCHEMA)
    )
