"""core/reliability.py: anchored one-coin Dawid–Skene accuracies on simulated contributors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from labelloop_assets.core.reliability import (
    CONTRIBUTOR_SCHEMA,
    POSTERIOR_SCHEMA,
    ReliabilityPrior,
    estimate_reliability,
    fit_reliability,
    item_posteriors,
)

TEN_LABELS = tuple(f"class_{k}" for k in range(10))
PRIOR = ReliabilityPrior()


@dataclass(frozen=True)
class World:
    votes: pl.DataFrame
    anchors: pl.DataFrame
    labels: tuple[str, ...]
    truth: dict[str, str]
    true_accuracy: dict[str, float]


def pseudonym(n: int) -> str:
    return f"u_{n:04x}"


def simulate(
    seed: int,
    accuracies: np.ndarray,
    n_items: int,
    n_classes: int = 10,
    votes_per_item: tuple[int, int] = (3, 5),
    anchored_share: float = 0.1,
) -> World:
    """Items with a skewed class mix, each labeled by a few distinct random contributors.

    A contributor is right with their accuracy and otherwise names another class uniformly,
    exactly the one-coin model; a share of the items is anchored with the true label.
    """
    rng = np.random.default_rng(seed)
    labels = tuple(f"class_{k}" for k in range(n_classes))
    class_mix = rng.dirichlet(np.full(n_classes, 5.0))
    truth = rng.choice(n_classes, size=n_items, p=class_mix)
    n_users = len(accuracies)
    fewest, most = votes_per_item
    most = min(most, n_users)
    voters = np.argsort(rng.random((n_items, n_users)), axis=1)[:, :most]
    takes_vote = np.arange(most) < rng.integers(fewest, most + 1, size=n_items)[:, None]
    vote_item = np.broadcast_to(np.arange(n_items)[:, None], voters.shape)[takes_vote]
    vote_user = voters[takes_vote]
    is_right = rng.random(len(vote_item)) < accuracies[vote_user]
    wrong = (truth[vote_item] + rng.integers(1, n_classes, size=len(vote_item))) % n_classes
    vote_label = np.where(is_right, truth[vote_item], wrong)
    anchored = np.flatnonzero(rng.random(n_items) < anchored_share)

    item_ids = np.array([f"item-{i:06d}" for i in range(n_items)], dtype=object)
    label_names = np.array(labels, dtype=object)
    users = np.array([pseudonym(u) for u in range(n_users)], dtype=object)
    votes = pl.DataFrame(
        {
            "item_id": item_ids[vote_item],
            "user_pseudonym": users[vote_user],
            "corrected_label": label_names[vote_label],
        },
        schema={"item_id": pl.String, "user_pseudonym": pl.String, "corrected_label": pl.String},
    )
    anchors = pl.DataFrame(
        {"item_id": item_ids[anchored], "label": label_names[truth[anchored]]},
        schema={"item_id": pl.String, "label": pl.String},
    )
    return World(
        votes=votes,
        anchors=anchors,
        labels=labels,
        truth=dict(zip(item_ids, label_names[truth], strict=True)),
        true_accuracy=dict(zip(users, accuracies.tolist(), strict=True)),
    )


def vote_rows(*rows: tuple[str, str, str]) -> pl.DataFrame:
    """rows: (item_id, user_pseudonym, corrected_label)."""
    return pl.DataFrame(
        rows,
        schema={"item_id": pl.String, "user_pseudonym": pl.String, "corrected_label": pl.String},
        orient="row",
    )


def anchor_rows(*rows: tuple[str, str]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"item_id": pl.String, "label": pl.String}, orient="row")


def accuracy_of(estimates: pl.DataFrame, user: str) -> float:
    return estimates.filter(pl.col("user_pseudonym") == user)["accuracy"].item()


@pytest.fixture(scope="module")
def crowd() -> World:
    accuracies = np.random.default_rng(7).permutation(np.linspace(0.45, 0.98, 30))
    return simulate(seed=11, accuracies=accuracies, n_items=3000)


@pytest.fixture(scope="module")
def crowd_fit(crowd):
    return fit_reliability(crowd.votes, crowd.anchors, crowd.labels)


# --------------------------------------------------------------------------- recovery


def test_accuracies_of_a_simulated_crowd_are_recovered(crowd, crowd_fit):
    estimates = crowd_fit.contributors.filter(pl.col("n_votes") >= 50)
    assert estimates.height == 30
    true = np.array([crowd.true_accuracy[u] for u in estimates["user_pseudonym"]])
    estimated = estimates["accuracy"].to_numpy()
    assert np.mean(np.abs(estimated - true)) < 0.05
    assert spearmanr(estimated, true).statistic > 0.9
    assert crowd_fit.converged


def test_posteriors_beat_majority_vote_on_unanchored_items(crowd, crowd_fit):
    posteriors = crowd_fit.item_posteriors
    assert posteriors.height == 3000 * len(crowd.labels)
    sums = posteriors.group_by("item_id").agg(pl.col("probability").sum())["probability"]
    assert np.allclose(sums.to_numpy(), 1.0)

    unanchored = crowd.votes.join(crowd.anchors, on="item_id", how="anti")
    truth = pl.DataFrame({"item_id": list(crowd.truth), "true_label": list(crowd.truth.values())})
    # Ties go to the alphabetically first label, deterministically.
    majority = (
        unanchored.group_by("item_id", "corrected_label")
        .len()
        .sort("item_id", "len", "corrected_label", descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .first()
        .join(truth, on="item_id")
    )
    best = (
        posteriors.join(unanchored.select("item_id").unique(), on="item_id")
        .sort("item_id", "probability", descending=[False, True])
        .group_by("item_id", maintain_order=True)
        .first()
        .join(truth, on="item_id")
    )
    majority_hits = (majority["corrected_label"] == majority["true_label"]).mean()
    model_hits = (best["label"] == best["true_label"]).mean()
    assert model_hits > majority_hits + 0.01
    assert model_hits > 0.9


def test_anchored_items_are_clamped_to_their_anchor(crowd, crowd_fit):
    anchored = crowd_fit.item_posteriors.join(crowd.anchors, on="item_id", suffix="_anchor")
    assert anchored["item_id"].n_unique() == crowd.anchors.height
    expected = (anchored["label"] == anchored["label_anchor"]).cast(pl.Float64)
    assert (anchored["probability"] == expected).all()


def test_counts_and_iterations_are_reported(crowd, crowd_fit):
    estimates = crowd_fit.contributors
    assert estimates.schema == pl.Schema(CONTRIBUTOR_SCHEMA)
    assert estimates["user_pseudonym"].to_list() == sorted(crowd.true_accuracy)
    assert estimates["n_votes"].sum() == crowd.votes.height
    on_anchors = crowd.votes.join(crowd.anchors, on="item_id")
    assert estimates["n_anchored"].sum() == on_anchors.height
    assert (
        estimates["n_anchor_agreements"].sum()
        == (on_anchors["corrected_label"] == on_anchors["label"]).sum()
    )
    assert estimates["iterations"].n_unique() == 1
    assert 1 <= estimates["iterations"][0] == crowd_fit.iterations <= 50
    assert ((estimates["accuracy"] > 0) & (estimates["accuracy"] < 1)).all()


def test_contributors_without_anchored_votes_are_estimated_from_consensus(crowd):
    # Drop every anchor a reliable and an unreliable contributor voted on: both keep
    # hundreds of votes on items the rest of the crowd labeled.
    true = crowd.true_accuracy
    reliable, unreliable = max(true, key=true.get), min(true, key=true.get)
    theirs = crowd.votes.filter(pl.col("user_pseudonym").is_in([reliable, unreliable]))
    anchors = crowd.anchors.join(theirs.select("item_id").unique(), on="item_id", how="anti")
    estimates = estimate_reliability(crowd.votes, anchors, crowd.labels)

    for user in (reliable, unreliable):
        row = estimates.filter(pl.col("user_pseudonym") == user)
        assert row["n_anchored"].item() == 0
        assert abs(row["accuracy"].item() - true[user]) < 0.07


# --------------------------------------------------------------------------- prior and anchors


def test_new_contributor_with_two_votes_is_shrunk_toward_the_prior(crowd):
    # Both votes agree with the anchor; the raw rate would be 1.0.
    first_two = crowd.anchors.head(2)
    newcomer = first_two.select(
        "item_id",
        pl.lit("u_newcomer").alias("user_pseudonym"),
        pl.col("label").alias("corrected_label"),
    )
    estimates = estimate_reliability(
        pl.concat([crowd.votes, newcomer]), crowd.anchors, crowd.labels
    )
    row = estimates.filter(pl.col("user_pseudonym") == "u_newcomer")
    assert (
        row["n_votes"].item() == row["n_anchored"].item() == row["n_anchor_agreements"].item() == 2
    )
    assert abs(row["accuracy"].item() - PRIOR.mean) <= 0.15
    assert row["accuracy"].item() > PRIOR.mean


def test_a_stronger_prior_shrinks_harder(crowd):
    loose = ReliabilityPrior(mean=0.5, strength=1.0)
    tight = ReliabilityPrior(mean=0.5, strength=400.0)
    best = max(crowd.true_accuracy, key=crowd.true_accuracy.get)
    at_loose = accuracy_of(
        estimate_reliability(crowd.votes, crowd.anchors, crowd.labels, loose), best
    )
    at_tight = accuracy_of(
        estimate_reliability(crowd.votes, crowd.anchors, crowd.labels, tight), best
    )
    assert at_loose > 0.9
    assert 0.5 < at_tight < at_loose - 0.15


def test_contributor_who_always_contradicts_the_anchors_is_rated_low(crowd):
    rng = np.random.default_rng(3)
    anchored = crowd.anchors.head(200)
    codes = np.array([crowd.labels.index(label) for label in anchored["label"]])
    wrong = (codes + rng.integers(1, len(crowd.labels), size=len(codes))) % len(crowd.labels)
    contrarian = pl.DataFrame(
        {
            "item_id": anchored["item_id"],
            "user_pseudonym": ["u_contrarian"] * len(codes),
            "corrected_label": np.array(crowd.labels, dtype=object)[wrong],
        },
        schema={"item_id": pl.String, "user_pseudonym": pl.String, "corrected_label": pl.String},
    )
    estimates = estimate_reliability(
        pl.concat([crowd.votes, contrarian]), crowd.anchors, crowd.labels
    )
    row = estimates.filter(pl.col("user_pseudonym") == "u_contrarian")
    assert row["n_anchored"].item() == 200 and row["n_anchor_agreements"].item() == 0
    assert row["accuracy"].item() < 0.3


def colluding_world(anchor_their_items: bool) -> tuple[World, list[str], list[str]]:
    """12 honest contributors (0.85) and 3 colluders who name the same wrong label together.

    The colluders outnumber the two honest voters on each of their 300 items, so majority vote
    sides with them there; 20% of their items are anchored (or none, for the contrast).
    """
    rng = np.random.default_rng(5)
    honest = simulate(seed=6, accuracies=np.full(12, 0.85), n_items=700, votes_per_item=(3, 3))
    n_classes = len(honest.labels)
    label_names = np.array(honest.labels, dtype=object)
    colluders = [f"u_colluder_{n}" for n in range(3)]
    item_ids = np.array([f"colluded-{i:04d}" for i in range(300)], dtype=object)
    truth = rng.integers(0, n_classes, size=300)
    agreed_wrong = (truth + rng.integers(1, n_classes, size=300)) % n_classes

    colluder_votes = pl.DataFrame(
        {
            "item_id": np.repeat(item_ids, 3),
            "user_pseudonym": np.tile(np.array(colluders, dtype=object), 300),
            "corrected_label": np.repeat(label_names[agreed_wrong], 3),
        }
    )
    honest_voters = np.argsort(rng.random((300, 12)), axis=1)[:, :2].ravel()
    honest_right = rng.random(600) < 0.85
    honest_wrong = (np.repeat(truth, 2) + rng.integers(1, n_classes, size=600)) % n_classes
    honest_votes = pl.DataFrame(
        {
            "item_id": np.repeat(item_ids, 2),
            "user_pseudonym": np.array([pseudonym(u) for u in honest_voters], dtype=object),
            "corrected_label": label_names[
                np.where(honest_right, np.repeat(truth, 2), honest_wrong)
            ],
        }
    )
    anchored = rng.choice(300, size=60, replace=False) if anchor_their_items else np.array([], int)
    anchors = pl.concat(
        [
            honest.anchors,
            pl.DataFrame(
                {"item_id": item_ids[anchored], "label": label_names[truth[anchored]]},
                schema={"item_id": pl.String, "label": pl.String},
            ),
        ]
    )
    world = World(
        votes=pl.concat([honest.votes, colluder_votes, honest_votes]),
        anchors=anchors,
        labels=honest.labels,
        truth={},
        true_accuracy={},
    )
    return world, colluders, [pseudonym(u) for u in range(12)]


def test_anchors_keep_colluders_below_honest_contributors():
    world, colluders, honest = colluding_world(anchor_their_items=True)
    estimates = estimate_reliability(world.votes, world.anchors, world.labels)
    by_user = dict(zip(estimates["user_pseudonym"], estimates["accuracy"], strict=True))
    assert max(by_user[c] for c in colluders) < 0.5
    assert max(by_user[c] for c in colluders) < min(by_user[h] for h in honest)
    assert min(by_user[h] for h in honest) > 0.75


def test_without_anchors_on_their_items_colluders_pass_as_reliable():
    # The contrast to the test above: the one-coin model trusts agreement, so it is the anchors
    # (not the consensus) that expose a colluding majority.
    world, colluders, _ = colluding_world(anchor_their_items=False)
    estimates = estimate_reliability(world.votes, world.anchors, world.labels)
    by_user = dict(zip(estimates["user_pseudonym"], estimates["accuracy"], strict=True))
    assert min(by_user[c] for c in colluders) > 0.5


# --------------------------------------------------------------------------- edge cases


def test_empty_votes_give_empty_frames_with_the_schema():
    empty = pl.DataFrame(
        schema={"item_id": pl.String, "user_pseudonym": pl.String, "corrected_label": pl.String}
    )
    estimates = estimate_reliability(empty, anchor_rows(("a", "x")), ("x", "y"))
    assert estimates.height == 0 and estimates.schema == pl.Schema(CONTRIBUTOR_SCHEMA)
    posteriors = item_posteriors(empty, anchor_rows(), ("x", "y"))
    assert posteriors.height == 0 and posteriors.schema == pl.Schema(POSTERIOR_SCHEMA)
    # Votes whose labels are all outside the label set count as no votes.
    outside = estimate_reliability(vote_rows(("a", "u_1", "z")), anchor_rows(), ("x", "y"))
    assert outside.height == 0 and outside.schema == pl.Schema(CONTRIBUTOR_SCHEMA)


def test_single_contributor_on_anchored_items_gets_the_map_of_their_anchor_record():
    votes = vote_rows(*[(f"i{n}", "u_solo", "x" if n < 7 else "y") for n in range(10)])
    anchors = anchor_rows(*[(f"i{n}", "x") for n in range(10)])
    estimates = estimate_reliability(votes, anchors, ("x", "y"))
    assert estimates.height == 1
    row = estimates.row(0, named=True)
    assert (row["n_votes"], row["n_anchored"], row["n_anchor_agreements"]) == (10, 10, 7)
    expected = (7 + PRIOR.mean * PRIOR.strength) / (10 + PRIOR.strength)
    assert row["accuracy"] == pytest.approx(expected, abs=1e-12)


def test_single_contributor_without_anchors_stays_at_the_prior_mean():
    # Alone, unanchored and with balanced labels, their votes are no evidence either way.
    votes = vote_rows(*[(f"i{n}", "u_solo", ("x", "y", "z")[n % 3]) for n in range(30)])
    estimates = estimate_reliability(votes, anchor_rows(), ("x", "y", "z"))
    assert estimates.height == 1 and estimates["n_anchored"].item() == 0
    assert estimates["accuracy"].item() == pytest.approx(PRIOR.mean, abs=1e-6)


def test_two_classes():
    world = simulate(
        seed=21,
        accuracies=np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7]),
        n_items=1500,
        n_classes=2,
        votes_per_item=(3, 4),
    )
    estimates = estimate_reliability(world.votes, world.anchors, world.labels)
    true = np.array([world.true_accuracy[u] for u in estimates["user_pseudonym"]])
    assert np.max(np.abs(estimates["accuracy"].to_numpy() - true)) < 0.05


def test_all_items_anchored_reduces_to_anchor_agreement():
    world = simulate(seed=4, accuracies=np.array([0.9, 0.6, 0.3]), n_items=200, anchored_share=1.0)
    fit = fit_reliability(world.votes, world.anchors, world.labels)
    estimates = fit.contributors
    assert (estimates["n_anchored"] == estimates["n_votes"]).all()
    expected = (estimates["n_anchor_agreements"] + PRIOR.mean * PRIOR.strength) / (
        estimates["n_votes"] + PRIOR.strength
    )
    assert np.allclose(estimates["accuracy"].to_numpy(), expected.to_numpy(), atol=1e-12)
    assert fit.converged


def test_out_of_set_labels_nulls_and_repeated_votes_are_handled():
    votes = vote_rows(
        ("a", "u_1", "y"),  # superseded by the later row for (a, u_1)
        ("a", "u_1", "x"),
        ("a", "u_2", "x"),
        ("b", "u_1", "x"),
        ("b", "u_2", "unknown"),  # outside the label set
        ("c", "u_2", None),
    )
    anchors = anchor_rows(("a", "x"), ("b", "unknown"))
    estimates = estimate_reliability(votes, anchors, ("x", "y"))
    counts = {
        r["user_pseudonym"]: (r["n_votes"], r["n_anchored"], r["n_anchor_agreements"])
        for r in estimates.iter_rows(named=True)
    }
    # u_1's vote on b is alone there once u_2's is dropped, and b has no usable anchor: no evidence.
    assert counts == {"u_1": (1, 1, 1), "u_2": (1, 1, 1)}


# --------------------------------------------------------------------------- blind votes only


def blind_rows(*rows: tuple[str, str, str, str | None]) -> pl.DataFrame:
    """rows: (item_id, user_pseudonym, corrected_label, label_before)."""
    return pl.DataFrame(
        rows,
        schema={"item_id": pl.String, "user_pseudonym": pl.String, "corrected_label": pl.String,
                "label_before": pl.String},
        orient="row",
    )


def test_copies_of_the_published_label_earn_nothing():
    # 30 votes that repeat reviewer-confirmed labels: without label_before they look like a
    # near-perfect record; with it they are no evidence and the account stays at the prior.
    copies = blind_rows(*[(f"i{n}", "u_farm", "x" if n % 2 else "y", "x" if n % 2 else "y") for n in range(30)])
    anchors = anchor_rows(*[(f"i{n}", "x" if n % 2 else "y") for n in range(30)])
    farmed = estimate_reliability(copies.drop("label_before"), anchors, ("x", "y")).row(0, named=True)
    assert farmed["accuracy"] > 0.9 and farmed["n_votes"] == 30
    row = estimate_reliability(copies, anchors, ("x", "y")).row(0, named=True)
    assert (row["n_votes"], row["n_anchored"], row["accuracy"]) == (0, 0, PRIOR.mean)


def test_a_blind_vote_that_an_anchor_bears_out_earns_and_a_wrong_one_costs():
    # The label before was "y"; the contributor said "x" before any reviewer did.
    right = blind_rows(*[(f"i{n}", "u_ann", "x", "y") for n in range(20)])
    anchors = anchor_rows(*[(f"i{n}", "x") for n in range(20)])
    row = estimate_reliability(right, anchors, ("x", "y")).row(0, named=True)
    assert (row["n_votes"], row["n_anchor_agreements"]) == (20, 20) and row["accuracy"] > 0.9
    wrong = estimate_reliability(right, anchor_rows(*[(f"i{n}", "y") for n in range(20)]), ("x", "y"))
    assert wrong["accuracy"].item() < 0.2


def test_lone_votes_on_unanchored_items_do_not_rate_their_contributor_up():
    # An account flips 40 items no one else touched, all to one label, next to a crowd whose
    # items skew towards that label: EM would read the lone flips as self-agreement.
    crowd = [(f"c{n}", f"u_{k}", "x", None) for n in range(60) for k in range(3)]
    flips = [(f"f{n}", "u_farm", "x", "y") for n in range(40)]
    with_lone = fit_reliability(blind_rows(*crowd, *flips), anchor_rows(), ("x", "y", "z"))
    farm = with_lone.contributors.filter(pl.col("user_pseudonym") == "u_farm").row(0, named=True)
    assert (farm["n_votes"], farm["accuracy"]) == (0, PRIOR.mean)
    # A second contributor on those items makes them evidence again (here: agreeing).
    second = [(f"f{n}", "u_other", "x", "y") for n in range(40)]
    fit = fit_reliability(blind_rows(*crowd, *flips, *second), anchor_rows(), ("x", "y", "z"))
    assert fit.contributors.filter(pl.col("user_pseudonym") == "u_farm")["n_votes"].item() == 40


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": ("x",)},
        {"labels": ("x", "x")},
        {"max_iterations": 0},
        {"tolerance": -1.0},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    arguments = {"labels": ("x", "y")} | kwargs
    with pytest.raises(ValueError):
        estimate_reliability(vote_rows(("a", "u_1", "x")), anchor_rows(), **arguments)


@pytest.mark.parametrize(
    "mean, strength", [(0.0, 4.0), (1.0, 4.0), (0.7, 0.0), (0.7, float("nan"))]
)
def test_invalid_priors_are_rejected(mean, strength):
    with pytest.raises(ValueError):
        ReliabilityPrior(mean=mean, strength=strength)
