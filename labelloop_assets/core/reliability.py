"""Contributor reliability (a one-coin Dawid–Skene model fitted by MAP EM, clamped by anchors) and
the accuracy of initial label sources, measured on a random audit.

Model. Each item i has an unknown true label z_i drawn from a class prior pi over K labels.
Contributor c gives the true label with probability p_c (their accuracy); otherwise they give
one of the other K-1 labels, uniformly at random. Votes are independent given the true labels.

Fit. EM alternates between the posterior over each item's true label (E-step) and the
accuracies and class prior that best explain those posteriors (M-step). Items with a
reviewer-confirmed label (anchors) are not inferred: their posterior is clamped to a one-hot
on the anchor, so they count as known truth, and every other item counts through the consensus.

Prior. Each p_c has a Beta prior worth `strength` pseudo-votes, a `mean` share of them correct
(a = mean * strength, b = (1 - mean) * strength), so the M-step is

    p_c = (expected correct votes of c + a) / (votes of c + a + b),

the posterior mode under Beta(a + 1, b + 1), a prior whose own mode is `mean`. A contributor
with a handful of votes stays near `mean`; with hundreds, the data decides. The estimate is
always strictly inside (0, 1).

Start. The first accuracies come from the anchored votes alone (the prior mean for anyone
without one), so a group that agrees among itself but not with the reviewers starts low and
cannot take over the consensus.

Blind votes only. A vote that names the label its item already had when the vote was staged
(`label_before`: what was published) is no evidence of anything: anyone can read the published
corpus and copy it. Such votes are left out of the fit (they still count in resolution, at their
weight), so agreeing with what is already published earns no accuracy; only votes that said
something the corpus did not yet say do, when anchors or other contributors bear them out.

Lone votes are no evidence either. An item without an anchor that only one contributor voted
on (blind) says nothing about that contributor: under the model, the chance of any one vote on
it does not depend on their accuracy. EM would still read it as agreement with itself (the
posterior follows the vote and the class prior tilts toward the labels the account pushes), so
an account flipping items no one else looks at would rate itself up. Such votes are left out;
the item counts once an anchor or a second contributor arrives.

Selection. An anchor is evidence about a label source only if the item was not chosen for review
*because* of that source's label. Reviews are mostly routed to doubted items (escalations, the
label-issue queue, review prompts on low-confidence predictions): the model doubts an item's label
chiefly when the label is wrong, so among reviewed items the labels of the source under review are
far more often wrong than among all its items. The share of reviewed items on which a source agrees
with the reviewer estimates P(right | chosen for review), not P(right): with 15% of a source's
labels wrong and reviews sent to the items the model doubts most, it comes out near 0.05 for a
source that is right 85% of the time. Taking the source's unreviewed items into the fit does not
help: an item only that source labeled carries no evidence about it (see "Lone votes" above), and
the selection depends on the item's features, which this model does not see, so the selection is
not ignorable (it is ignorable only when it depends on what the model sees: the votes).

The accuracy of an *initial label source* (the `label_source` that arrives with items: a vendor, a
heuristic, a previous model) is therefore measured on an audit sample only (`source_reliability`):
items drawn uniformly at random from the corpus (`draw_audit_sample`) and labeled by a reviewer or
domain expert, with correction `source` `audit_sample`. The draw does not look at any label, so a
source's audited items are a simple random sample of its items, and the share of them on which its
initial label agrees with the auditor's is an unbiased estimate of its accuracy, with standard error
sqrt(p(1 - p) / n) at n audited items (0.025 at n = 200 for p = 0.85). It is reported as the same
MAP estimate as above under the Beta prior (the prior's pull is (mean - p) * strength / (n +
strength), -0.003 at n = 200), with that standard error. Reviews of doubted items still decide
labels and anchor the contributor fit; they never enter a source's accuracy. Weighting each
reviewed item by the inverse of its chance of being chosen (Horvitz-Thompson) would also be unbiased,
but that chance is not known for reviews routed by people or by the queue, so it is not used. The
audit must be random in fact: `audit_sample` corrections on items someone picked are trusted as a
random draw; draw them with `labelloop review audit-sample`.

Limits. The one-coin model assumes independent errors: without anchors, colluders who outnumber
honest contributors on the same items look reliable. Items only one contributor labeled say
little about that contributor; with no anchors and no overlap their estimate rests on the prior
and on self-consistency (it drifts up when their labels concentrate on a few classes).

Selection, for contributors. The contributor fit still clamps every reviewer-confirmed label,
whatever chose the item for review. A choice made on the votes (an escalation opens on a
disagreement) is ignorable: the model sees the votes. A choice made on the model's doubt is not,
and it reaches contributors through their lone votes, which count only on anchored items: with
every vote lone, a quarter of the items hard, and the most doubted items reviewed, contributors
come out about 0.2 below their accuracy (labelloop_tests/test_reliability_selection.py), while
anchors drawn at random give every one within 0.05. Lone votes on non-random anchors are kept
anyway: leaving them out would also drop a reviewer's check of an annotator's own corrections (a
choice made on the votes, and today's way for an annotator to earn the right to flip alone), and
which reviews were routed by doubt is not recorded yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from labelloop_assets.core.bursts import COUNTED_VOTES_SQL

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

CONTRIBUTOR_SCHEMA = {
    "user_pseudonym": pl.String,
    "n_votes": pl.Int64,
    "n_anchored": pl.Int64,
    "n_anchor_agreements": pl.Int64,
    "accuracy": pl.Float64,
    "iterations": pl.Int64,
}
POSTERIOR_SCHEMA = {"item_id": pl.String, "label": pl.String, "probability": pl.Float64}
SOURCE_SCHEMA = {
    "label_source": pl.String,
    "n_audited": pl.Int64,
    "n_audit_agreements": pl.Int64,
    "accuracy": pl.Float64,
    "standard_error": pl.Float64,
}
AUDIT_SAMPLE_SCHEMA = {"item_id": pl.String, "draw": pl.Int64}

# The correction `source` of a review of an item drawn at random for audit (core/contracts.py).
AUDIT_SOURCE = "audit_sample"
# Each audited item's verdict: the latest counted `audit_sample` vote on it by a reviewer or domain
# expert (user_role is the granted role: claiming one does not make an auditor; a held or
# discarded burst's votes are no verdicts).
AUDIT_VERDICTS_SQL = f"""
    SELECT item_id, corrected_label AS label FROM ({COUNTED_VOTES_SQL})
    WHERE source = 'audit_sample' AND user_role IN ('reviewer', 'domain_expert')
    QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY created_at DESC, seq DESC) = 1
"""
# Every audited item with the label it arrived with and the auditor's verdict. An item that
# arrived without a source is `unknown`, as in the corpus (core/corpus.py).
AUDITED_INITIAL_LABELS_SQL = f"""
    SELECT i.item_id, coalesce(i.label_source, 'unknown') AS label_source, i.initial_label, a.label
    FROM items i JOIN ({AUDIT_VERDICTS_SQL}) a USING (item_id)
    WHERE i.initial_label IS NOT NULL
"""

# Pseudo-count per class in the class prior, so a label nobody voted keeps a finite log prior.
CLASS_PRIOR_PSEUDO_COUNT = 1.0


@dataclass(frozen=True)
class ReliabilityPrior:
    """Beta prior on a contributor's accuracy: `strength` pseudo-votes, a `mean` share correct."""

    mean: float = 0.7
    strength: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 < self.mean < 1.0:
            raise ValueError(f"reliability prior mean must be in (0, 1), got {self.mean}")
        if not (self.strength > 0.0 and math.isfinite(self.strength)):
            raise ValueError(f"reliability prior strength must be positive, got {self.strength}")

    @property
    def correct_pseudo_votes(self) -> float:
        return self.mean * self.strength


@dataclass(frozen=True)
class ReliabilityFit:
    """One EM fit: per-contributor accuracies and per-item posteriors over the label set."""

    contributors: pl.DataFrame
    item_posteriors: pl.DataFrame
    iterations: int
    converged: bool


@dataclass(frozen=True)
class _EncodedVotes:
    """Votes as integer codes: items and contributors in sorted order, labels in `labels` order."""

    item_ids: pl.Series
    user_pseudonyms: pl.Series
    vote_item: np.ndarray
    vote_user: np.ndarray
    vote_label: np.ndarray
    item_anchor: np.ndarray  # anchor label code per item, -1 where the item has no anchor


def fit_reliability(
    votes: pl.DataFrame,
    anchors: pl.DataFrame,
    labels: tuple[str, ...],
    prior: ReliabilityPrior = ReliabilityPrior(),
    max_iterations: int = 50,
    tolerance: float = 1e-6,
) -> ReliabilityFit:
    """Fit the anchored one-coin Dawid–Skene model; see `estimate_reliability` for the inputs."""
    import numpy as np
    labels = _checked_labels(labels)
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must not be negative, got {tolerance}")

    if anchors.is_empty():
        anchors = pl.DataFrame(schema={"item_id": pl.String, "label": pl.String})
    encoded = None if votes.is_empty() else _encode(votes, anchors, labels)
    if encoded is None or len(encoded.vote_item) == 0:
        # Contributors whose votes are all copies or lone votes: no evidence, the prior mean.
        users = encoded.user_pseudonyms if encoded is not None else pl.Series([], dtype=pl.String)
        zeros = np.zeros(len(users), dtype=np.int64)
        return ReliabilityFit(
            contributors=pl.DataFrame(
                {"user_pseudonym": users, "n_votes": zeros, "n_anchored": zeros, "n_anchor_agreements": zeros,
                 "accuracy": np.full(len(users), prior.mean), "iterations": zeros},
                schema=CONTRIBUTOR_SCHEMA,
            ),
            item_posteriors=pl.DataFrame(schema=POSTERIOR_SCHEMA),
            iterations=0,
            converged=True,
        )

    n_classes = len(labels)
    n_items = len(encoded.item_ids)
    n_users = len(encoded.user_pseudonyms)
    vote_item, vote_user, vote_label = encoded.vote_item, encoded.vote_user, encoded.vote_label
    vote_cell = vote_item * n_classes + vote_label

    anchored_items = np.flatnonzero(encoded.item_anchor >= 0)
    clamped = np.zeros((len(anchored_items), n_classes))
    clamped[np.arange(len(anchored_items)), encoded.item_anchor[anchored_items]] = 1.0

    vote_anchor = encoded.item_anchor[vote_item]
    vote_is_anchored = vote_anchor >= 0
    n_votes = np.bincount(vote_user, minlength=n_users)
    n_anchored = np.bincount(vote_user, weights=vote_is_anchored, minlength=n_users)
    n_anchor_agreements = np.bincount(
        vote_user, weights=vote_is_anchored & (vote_label == vote_anchor), minlength=n_users
    )

    def map_accuracy(expected_correct: np.ndarray, counted_votes: np.ndarray) -> np.ndarray:
        return (expected_correct + prior.correct_pseudo_votes) / (counted_votes + prior.strength)

    def e_step(accuracy: np.ndarray, class_prior: np.ndarray) -> np.ndarray:
        # Every vote on an item adds log((1-p)/(K-1)) to all K classes and, on the class it names,
        # log p - log((1-p)/(K-1)) on top. The first part is the same for every class of the item,
        # so it cancels in the normalisation and only the second part is accumulated.
        log_wrong = np.log1p(-accuracy) - math.log(n_classes - 1)
        evidence = np.bincount(
            vote_cell,
            weights=(np.log(accuracy) - log_wrong)[vote_user],
            minlength=n_items * n_classes,
        ).reshape(n_items, n_classes)
        log_posterior = evidence + np.log(class_prior)
        log_posterior -= log_posterior.max(axis=1, keepdims=True)
        posterior = np.exp(log_posterior)
        posterior /= posterior.sum(axis=1, keepdims=True)
        posterior[anchored_items] = clamped
        return posterior

    def m_step(posterior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        expected_correct = np.bincount(
            vote_user, weights=posterior.ravel()[vote_cell], minlength=n_users
        )
        class_counts = posterior.sum(axis=0) + CLASS_PRIOR_PSEUDO_COUNT
        return map_accuracy(expected_correct, n_votes), class_counts / class_counts.sum()

    accuracy = map_accuracy(n_anchor_agreements, n_anchored)
    class_prior = np.full(n_classes, 1.0 / n_classes)
    converged = False
    for iterations in range(1, max_iterations + 1):  # noqa: B007 -- read after the loop: the iterations run
        next_accuracy, next_class_prior = m_step(e_step(accuracy, class_prior))
        change = max(
            np.abs(next_accuracy - accuracy).max(), np.abs(next_class_prior - class_prior).max()
        )
        accuracy, class_prior = next_accuracy, next_class_prior
        if change < tolerance:
            converged = True
            break
    posterior = e_step(accuracy, class_prior)

    contributors = pl.DataFrame(
        {
            "user_pseudonym": encoded.user_pseudonyms,
            "n_votes": n_votes.astype(np.int64),
            "n_anchored": n_anchored.astype(np.int64),
            "n_anchor_agreements": n_anchor_agreements.astype(np.int64),
            "accuracy": accuracy,
            "iterations": np.full(n_users, iterations, dtype=np.int64),
        },
        schema=CONTRIBUTOR_SCHEMA,
    )
    item_posteriors = pl.DataFrame(
        {
            "item_id": np.repeat(encoded.item_ids.to_numpy(), n_classes),
            "label": np.tile(np.array(labels, dtype=object), n_items),
            "probability": posterior.ravel(),
        },
        schema=POSTERIOR_SCHEMA,
    )
    return ReliabilityFit(contributors, item_posteriors, iterations, converged)


def estimate_reliability(
    votes: pl.DataFrame,
    anchors: pl.DataFrame,
    labels: tuple[str, ...],
    prior: ReliabilityPrior = ReliabilityPrior(),
    max_iterations: int = 50,
    tolerance: float = 1e-6,
) -> pl.DataFrame:
    """Each contributor's accuracy, from agreement with the anchors and with the consensus.

    `votes` holds item_id, user_pseudonym, corrected_label, one row per contributor and item
    (should a pair repeat, its last row counts); labels outside `labels` and rows with nulls are
    ignored. With a `label_before` column (the item's label when the vote was staged), a vote
    that repeats it is not blind and is left out; so is a lone vote on an item without an
    anchor (see the module docstring). n_votes counts the votes the estimate rests on; a
    contributor with none is listed at the prior mean. `anchors` holds item_id, label:
    reviewer-confirmed labels, taken as truth (the last row per item counts; labels outside
    `labels` are ignored).

    Returns one row per contributor, sorted by user_pseudonym: user_pseudonym, n_votes,
    n_anchored (votes on anchored items), n_anchor_agreements, accuracy (MAP estimate, strictly
    inside (0, 1)) and iterations (EM iterations run, the same on every row).
    """
    return fit_reliability(votes, anchors, labels, prior, max_iterations, tolerance).contributors


def item_posteriors(
    votes: pl.DataFrame,
    anchors: pl.DataFrame,
    labels: tuple[str, ...],
    prior: ReliabilityPrior = ReliabilityPrior(),
    max_iterations: int = 50,
    tolerance: float = 1e-6,
) -> pl.DataFrame:
    """Per voted item, the posterior over `labels`: item_id, label, probability (K rows per item).

    Anchored items are one-hot on their anchor. Use `fit_reliability` to get these and the
    contributor accuracies from a single fit.
    """
    return fit_reliability(votes, anchors, labels, prior, max_iterations, tolerance).item_posteriors


def _checked_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    labels = tuple(labels)
    if len(labels) < 2:
        raise ValueError(f"need at least two labels, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels!r}")
    return labels


def _encode(votes: pl.DataFrame, anchors: pl.DataFrame, labels: tuple[str, ...]) -> _EncodedVotes:
    import numpy as np
    label_codes = pl.DataFrame(
        {"label": list(labels), "label_code": np.arange(len(labels), dtype=np.int64)},
        schema={"label": pl.String, "label_code": pl.Int64},
    )
    before = (
        pl.col("label_before").cast(pl.String) if "label_before" in votes.columns else pl.lit(None, pl.String)
    )
    voted = (
        votes.select(
            pl.col("item_id").cast(pl.String),
            pl.col("user_pseudonym").cast(pl.String),
            pl.col("corrected_label").cast(pl.String).alias("label"),
            before.alias("label_before"),
        )
        .drop_nulls(["item_id", "user_pseudonym", "label"])
        .unique(subset=["item_id", "user_pseudonym"], keep="last", maintain_order=True)
        .join(label_codes, on="label", how="inner")
    )
    anchor_codes = (
        anchors.select(pl.col("item_id").cast(pl.String), pl.col("label").cast(pl.String))
        .drop_nulls()
        .unique(subset="item_id", keep="last", maintain_order=True)
        .join(label_codes, on="label", how="inner")
        .select("item_id", pl.col("label_code").alias("anchor_code"))
    )
    coded = (
        # A copy of the published label is not blind: no evidence about its contributor.
        voted.filter(pl.col("label_before").is_null() | (pl.col("label") != pl.col("label_before")))
        .drop("label_before")
        .join(anchor_codes, on="item_id", how="left")
        # Nor is a lone vote on an item without an anchor.
        .filter(pl.col("anchor_code").is_not_null() | (pl.len().over("item_id") > 1))
        .drop("anchor_code")
        .join(
            voted.select("user_pseudonym").unique()
            .with_columns((pl.col("user_pseudonym").rank("dense").cast(pl.Int64) - 1).alias("user_code")),
            on="user_pseudonym",
        )
        .with_columns((pl.col("item_id").rank("dense").cast(pl.Int64) - 1).alias("item_code"))
    )
    items = (
        coded.select("item_id", "item_code")
        .unique()
        .sort("item_code")
        .join(anchor_codes, on="item_id", how="left", maintain_order="left")
        .with_columns(pl.col("anchor_code").fill_null(-1))
    )
    # Every contributor with a vote is listed, with or without evidence.
    users = voted.select("user_pseudonym").unique().sort("user_pseudonym")
    return _EncodedVotes(
        item_ids=items["item_id"],
        user_pseudonyms=users["user_pseudonym"],
        vote_item=coded["item_code"].to_numpy(),
        vote_user=coded["user_code"].to_numpy(),
        vote_label=coded["label_code"].to_numpy(),
        item_anchor=items["anchor_code"].to_numpy(),
    )


def source_reliability(
    initial: pl.DataFrame, audits: pl.DataFrame, prior: ReliabilityPrior = ReliabilityPrior()
) -> pl.DataFrame:
    """Each initial label source's accuracy, measured on the items audited at random.

    `initial` holds item_id, label_source, initial_label (the label each item arrived with);
    `audits` holds item_id, label: the auditor's label of each item drawn at random for audit
    (the last row per item counts). Items without an initial label or a source, and audits of
    items not in `initial`, are ignored. Reviews of items chosen for any other reason must not be
    passed: they are a biased sample (see "Selection" in the module docstring).

    Returns one row per source with at least one audited item, sorted by label_source:
    n_audited, n_audit_agreements, accuracy (the MAP estimate under `prior`, strictly inside
    (0, 1)) and standard_error (of the agreement share, sqrt(p (1 - p) / (n + strength)) at the
    estimate p; it shrinks as 1 / sqrt(n)).
    """
    verdicts = (
        audits.select(pl.col("item_id").cast(pl.String), pl.col("label").cast(pl.String).alias("audited"))
        .drop_nulls()
        .unique(subset="item_id", keep="last", maintain_order=True)
    )
    audited = (
        initial.select(
            pl.col("item_id").cast(pl.String),
            pl.col("label_source").cast(pl.String),
            pl.col("initial_label").cast(pl.String),
        )
        .drop_nulls()
        .unique(subset="item_id", keep="last", maintain_order=True)
        .join(verdicts, on="item_id", how="inner")
    )
    counts = audited.group_by("label_source").agg(
        n_audited=pl.len().cast(pl.Int64),
        n_audit_agreements=(pl.col("initial_label") == pl.col("audited")).sum().cast(pl.Int64),
    )
    accuracy = (pl.col("n_audit_agreements") + prior.correct_pseudo_votes) / (pl.col("n_audited") + prior.strength)
    return (
        counts.with_columns(accuracy=accuracy)
        .with_columns(
            standard_error=(pl.col("accuracy") * (1.0 - pl.col("accuracy")) / (pl.col("n_audited") + prior.strength))
            .sqrt()
        )
        .sort("label_source")
        .select(list(SOURCE_SCHEMA))
        .cast(SOURCE_SCHEMA)
    )


def stored_source_reliability(con, prior: ReliabilityPrior = ReliabilityPrior()) -> pl.DataFrame:
    """`source_reliability` of the store's initial label sources, from its audit verdicts."""
    audited = con.execute(AUDITED_INITIAL_LABELS_SQL).pl()
    return source_reliability(audited.select("item_id", "label_source", "initial_label"), audited, prior)


def draw_audit_sample(
    item_ids: pl.Series | list[str], size: int, seed: int, exclude: pl.Series | list[str] = ()
) -> pl.DataFrame:
    """A uniform random sample of `size` distinct items for audit, reproducible from `seed`.

    The draw looks at no label, score or doubt, only at the ids: that is what makes the audited
    items of every source a random sample of its items. `exclude` (e.g. items audited before)
    are not drawn again. Ids are sorted and deduplicated first, so the sample depends on the set
    of ids and the seed, not on their order. Fewer than `size` items are returned when fewer
    remain. Returns item_id and draw (1 for the first drawn), in draw order.
    """
    import numpy as np
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"audit sample size must be a positive whole number, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"audit sample seed must be a whole number >= 0, got {seed!r}")
    population = pl.Series("item_id", list(item_ids), dtype=pl.String).drop_nulls().unique().sort()
    population = population.filter(~population.is_in(pl.Series(list(exclude), dtype=pl.String).implode()))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(population), size=min(size, len(population)), replace=False)
    return pl.DataFrame(
        {"item_id": population.gather(chosen), "draw": np.arange(1, len(chosen) + 1)},
        schema=AUDIT_SAMPLE_SCHEMA,
    )
