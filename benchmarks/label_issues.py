"""Label-issue detection against cleanlab, on data sets with injected label noise of known truth.

    python -m benchmarks.label_issues            # prints the table; run(seed) returns the numbers

Data: scikit-learn's digits (1797 x 64, bundled) and a make_classification set (20k x 20,
10 classes), each with ~10% of labels flipped two ways: uniformly (to any other class) and
class-conditionally (class c to one fixed confusable class, at per-class rates proportional to
U(0, 1) draws, scaled so that 10% of all labels are flipped in expectation).

Out-of-sample probabilities are computed once per data set with labelloop's
`out_of_sample_probabilities` (5-fold, the production model family) and shared by every method:

- cleanlab: `cleanlab.filter.find_label_issues(labels, probs)` (default filter,
  prune_by_noise_rate) gives the flagged set and the review budget k = its size; its ranked list is
  that set ranked by self-confidence (`return_indices_ranked_by="self_confidence"`), continued past
  k with the other items by cleanlab's self-confidence label quality score, to fill larger budgets.
- ours passive: `rank_candidates` with no active signal, default `IssueWeights`.
- ours fused: `rank_candidates` with simulated human votes, default `IssueWeights` (the product's).

Simulated votes: 30% of ALL items (noisy or not) get 1-3 votes, each from one of 200 contributors
with accuracy U(0.6, 0.95); a vote is the true label with probability = accuracy, else a uniformly
random wrong label. Reliability is known only as an estimate (true accuracy + N(0, 0.05), clipped
to [0.5, 0.99]); a vote weighs estimate / 0.7 (core/resolve.py's weighting for a role weight of 1).
votes_against / votes_for compare each vote with the noisy given label. No escalations, reviewer
confirmations or label sources are simulated. Clean items receive wrong votes too, so the votes
reveal only what real votes would. Fused uses information cleanlab does not have: it is there to
show what the votes add, not as a like-for-like comparison; "ours passive" is that one.

Metrics: precision, recall and F1 of the top-b items against the truly flipped set, at b = k and at
2%, 5% and 10% of the items; seconds per method (out-of-sample probabilities reported separately).
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.datasets import load_digits, make_classification

from labelloop_assets.core.label_issues import (
    ACTIVE_SCHEMA,
    IssueWeights,
    confident_learning,
    out_of_sample_probabilities,
    rank_candidates,
)

NOISE_RATE = 0.10
VOTED_SHARE = 0.30
VOTES_PER_ITEM = (1, 3)
CONTRIBUTORS = 200
ACCURACY_RANGE = (0.6, 0.95)
RELIABILITY_ESTIMATE_NOISE = 0.05
RELIABILITY_PRIOR_MEAN = 0.7
BUDGET_SHARES = (0.02, 0.05, 0.10)
METHODS = ("cleanlab", "ours passive", "ours fused")
# Digits that are easy to mistake for each other, for the class-conditional noise on digits.
DIGIT_CONFUSIONS = {0: 6, 1: 7, 2: 3, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}


def datasets(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """name -> (features, true labels, the class each class is mistaken for in structured noise)."""
    digits_x, digits_y = load_digits(return_X_y=True)
    synthetic_x, synthetic_y = make_classification(
        n_samples=20_000,
        n_features=20,
        n_informative=12,
        n_redundant=4,
        n_classes=10,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=seed,
    )
    return {
        "digits": (
            digits_x.astype(np.float64),
            digits_y,
            np.array([DIGIT_CONFUSIONS[c] for c in range(10)]),
        ),
        "synthetic-20k": (synthetic_x, synthetic_y, (np.arange(10) + 1) % 10),
    }


def inject_uniform(truth: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly NOISE_RATE of the labels moved to a uniformly random other class."""
    noisy = truth.copy()
    flipped = rng.choice(len(truth), int(round(NOISE_RATE * len(truth))), replace=False)
    noisy[flipped] = (truth[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    return noisy


def inject_structured(
    truth: np.ndarray, confused_with: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Class c relabeled as confused_with[c] at uneven per-class rates, NOISE_RATE overall."""
    rates = rng.uniform(0.0, 1.0, len(confused_with))
    rates *= NOISE_RATE / rates[truth].mean()
    chosen = rng.random(len(truth)) < rates[truth]
    return np.where(chosen, confused_with[truth], truth)


def simulate_votes(
    truth: np.ndarray, given: np.ndarray, n_classes: int, rng: np.random.Generator
) -> pl.DataFrame:
    """Active signals from simulated human votes (see the module doc), one row per voted item."""
    n = len(truth)
    voted = rng.choice(n, int(round(VOTED_SHARE * n)), replace=False)
    per_item = rng.integers(VOTES_PER_ITEM[0], VOTES_PER_ITEM[1] + 1, len(voted))
    vote_item = np.repeat(voted, per_item)
    accuracy = rng.uniform(*ACCURACY_RANGE, CONTRIBUTORS)
    estimate = np.clip(
        accuracy + rng.normal(0.0, RELIABILITY_ESTIMATE_NOISE, CONTRIBUTORS), 0.5, 0.99
    )
    voter = rng.integers(0, CONTRIBUTORS, len(vote_item))
    correct = rng.random(len(vote_item)) < accuracy[voter]
    wrong = (truth[vote_item] + rng.integers(1, n_classes, len(vote_item))) % n_classes
    vote = np.where(correct, truth[vote_item], wrong)
    weight = estimate[voter] / RELIABILITY_PRIOR_MEAN
    against = vote != given[vote_item]
    votes_against = np.bincount(vote_item, weights=weight * against, minlength=n)
    votes_for = np.bincount(vote_item, weights=weight * ~against, minlength=n)
    n_contributors = np.bincount(vote_item, minlength=n)
    return pl.DataFrame(
        {
            "item_id": voted.astype(str),
            "votes_against": votes_against[voted],
            "votes_for": votes_for[voted],
            "n_contributors": n_contributors[voted],
            "escalated_or_pending": np.zeros(len(voted), dtype=bool),
            "reviewer_confirmed": np.zeros(len(voted), dtype=bool),
            "source_reliability": pl.Series([None] * len(voted), dtype=pl.Float64),
        },
        schema=ACTIVE_SCHEMA,
    )


def scores_at(order: np.ndarray, is_noisy: np.ndarray, budget: int) -> dict[str, float]:
    """Precision, recall and F1 of reviewing the first `budget` items of `order`."""
    hits = int(is_noisy[order[:budget]].sum())
    precision = hits / budget if budget else 0.0
    recall = hits / int(is_noisy.sum()) if is_noisy.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def evaluate(features: np.ndarray, truth: np.ndarray, noisy: np.ndarray, seed: int) -> dict:
    """Every method on one noisy data set; the same out-of-sample probabilities for all."""
    rng = np.random.default_rng(seed + 1)
    n, is_noisy = len(noisy), noisy != truth

    started = time.perf_counter()
    probs, classes, note = out_of_sample_probabilities(features, noisy, seed=seed)
    probs_seconds = time.perf_counter() - started
    n_classes = len(classes)
    assert probs is not None and np.array_equal(classes, np.arange(n_classes)), note

    started = time.perf_counter()
    flagged = find_label_issues(noisy, probs)
    flagged_ranked = find_label_issues(noisy, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(noisy, probs, method="self_confidence")
    rest = np.setdiff1d(np.argsort(quality, kind="stable"), flagged_ranked, assume_unique=True)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    cleanlab_order = np.concatenate([flagged_ranked, rest])
    cleanlab_seconds = time.perf_counter() - started
    k = int(flagged.sum())

    items = pl.DataFrame({"item_id": np.arange(n).astype(str), "label": noisy})
    weights = IssueWeights()
    started = time.perf_counter()
    passive = confident_learning(probs, noisy, classes)
    passive_order = (
        rank_candidates(items, passive, None, weights)["item_id"].cast(pl.Int64).to_numpy()
    )
    passive_seconds = time.perf_counter() - started
    active = simulate_votes(truth, noisy, n_classes, rng)
    started = time.perf_counter()
    fused_order = (
        rank_candidates(items, passive, active, weights)["item_id"].cast(pl.Int64).to_numpy()
    )
    fused_seconds = time.perf_counter() - started + passive_seconds

    orders = {"cleanlab": cleanlab_order, "ours passive": passive_order, "ours fused": fused_order}
    at_k = {name: scores_at(order, is_noisy, k) for name, order in orders.items()}
    # At k, cleanlab's ranked list is exactly its flagged set.
    assert set(cleanlab_order[:k]) == set(np.flatnonzero(flagged))
    budgets = {
        f"{share:.0%}": {
            name: scores_at(order, is_noisy, int(round(share * n)))
            for name, order in orders.items()
        }
        for share in BUDGET_SHARES
    }
    return {
        "n_items": n,
        "n_noisy": int(is_noisy.sum()),
        "noise_rate": round(float(is_noisy.mean()), 4),
        "k_cleanlab": k,
        "n_voted_items": active.height,
        "n_noisy_voted": int(is_noisy[active["item_id"].cast(pl.Int64).to_numpy()].sum()),
        "at_k": at_k,
        "budgets": budgets,
        "seconds": {
            "out_of_sample_probabilities": round(probs_seconds, 3),
            "cleanlab": round(cleanlab_seconds, 3),
            "ours passive": round(passive_seconds, 3),
            "ours fused": round(fused_seconds, 3),
        },
        "note": note,
    }


def markdown(results: dict[str, dict]) -> str:
    """A row per data set, noise and method: P/R/F1 at cleanlab's k, F1 at fixed budgets, time."""
    shares = [f"{share:.0%}" for share in BUDGET_SHARES]
    header = (
        "| data set | noise | method | k | P@k | R@k | F1@k | "
        + " | ".join(f"F1@{s}" for s in shares)
        + " | seconds |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, result in results.items():
        data, noise = name.split("/")
        for method in METHODS:
            at_k = result["at_k"][method]
            lines.append(
                f"| {data} | {noise} ({result['noise_rate']:.1%}) | {method} "
                f"| {result['k_cleanlab']} "
                f"| {at_k['precision']:.3f} | {at_k['recall']:.3f} | {at_k['f1']:.3f} | "
                + " | ".join(f"{result['budgets'][s][method]['f1']:.3f}" for s in shares)
                + f" | {result['seconds'][method]:.2f} |"
            )
    return "\n".join(lines)


def run(seed: int = 0) -> dict:
    """Every data set under both kinds of noise; numbers per data set plus a markdown table."""
    rng = np.random.default_rng(seed)
    results: dict[str, dict] = {}
    for name, (features, truth, confused_with) in datasets(seed).items():
        n_classes = len(np.unique(truth))
        for noise, noisy in (
            ("uniform", inject_uniform(truth, n_classes, rng)),
            ("structured", inject_structured(truth, confused_with, rng)),
        ):
            results[f"{name}/{noise}"] = evaluate(features, truth, noisy, seed)
    return {
        "seed": seed,
        "weights": IssueWeights().as_dict(),
        "simulation": {
            "voted_share": VOTED_SHARE,
            "votes_per_item": VOTES_PER_ITEM,
            "contributor_accuracy": ACCURACY_RANGE,
            "reliability_estimate_noise": RELIABILITY_ESTIMATE_NOISE,
        },
        "datasets": results,
        "markdown": markdown(results),
    }


# Held out: the default fusion weights were chosen on seeds 0-2; these seeds report.
SEEDS = (3, 4, 5)


def run_seeds(seeds: tuple[int, ...] = SEEDS) -> dict:
    """`run` for several seeds: the detailed table of the first, and F1@k per seed for all."""
    runs = [run(seed) for seed in seeds]
    keys = list(runs[0]["datasets"])
    f1 = {
        key: {method: [r["datasets"][key]["at_k"][method]["f1"] for r in runs] for method in METHODS}
        for key in keys
    }
    lines = [
        "| data set / noise | " + " | ".join(f"{m} F1@k (mean of {len(seeds)} seeds)" for m in METHODS)
        + " | fused beats cleanlab |",
        "|---|" + "---:|" * len(METHODS) + "---|",
    ]
    for key in keys:
        means = {m: float(np.mean(f1[key][m])) for m in METHODS}
        wins = sum(f > c for f, c in zip(f1[key]["ours fused"], f1[key]["cleanlab"], strict=True))
        lines.append(
            f"| {key} | " + " | ".join(f"{means[m]:.3f}" for m in METHODS)
            + f" | {wins} of {len(seeds)} seeds |"
        )
    return {**runs[0], "seeds": list(seeds), "f1_at_k_by_seed": f1, "summary_markdown": "\n".join(lines)}


def main() -> None:
    started = time.perf_counter()
    result = run_seeds()
    print(result["summary_markdown"])
    print()
    print(f"seed {result['seed']} in detail:")
    print(result["markdown"])
    print()
    for name, numbers in result["datasets"].items():
        print(
            f"{name}: {numbers['n_noisy']} noisy of {numbers['n_items']}; "
            f"cleanlab flagged {numbers['k_cleanlab']}; {numbers['n_voted_items']} items voted on "
            f"({numbers['n_noisy_voted']} of them noisy); "
            f"out-of-sample probabilities {numbers['seconds']['out_of_sample_probabilities']:.2f} s"
        )
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
