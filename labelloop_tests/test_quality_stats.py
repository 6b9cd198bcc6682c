"""core/agreement.py and core/drift.py against published worked examples and reference code."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from sklearn.metrics import cohen_kappa_score

from labelloop_assets.core.agreement import (
    PAIR_SCHEMA,
    agreement_summary,
    cohen_kappa_pairs,
    fleiss_kappa,
    krippendorff_alpha_nominal,
)
from labelloop_assets.core.drift import (
    FEATURE_PSI_WARN,
    FEATURE_SCHEMA,
    PSI_ALERT,
    PSI_EPSILON,
    feature_drift,
    label_drift,
    summarize_feature_drift,
)
from labelloop_tests.conftest import require_module

RATINGS_SCHEMA = {"item_id": pl.String, "rater": pl.String, "label": pl.String}

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, values 1..5, "." missing. Nominal alpha = 0.743.
KRIPPENDORFF_2011 = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories, kappa 0.210.
WIKIPEDIA_FLEISS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def ratings(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=RATINGS_SCHEMA, orient="row")


def krippendorff_ratings() -> pl.DataFrame:
    return ratings(
        [
            (f"unit{unit + 1}", rater, value)
            for rater, values in KRIPPENDORFF_2011.items()
            for unit, value in enumerate(values.split())
            if value != "."
        ]
    )


def ratings_from_counts(counts: list[list[int]]) -> pl.DataFrame:
    rows = []
    for subject, per_category in enumerate(counts):
        labels = [str(c + 1) for c, k in enumerate(per_category) for _ in range(k)]
        rows += [(f"s{subject}", f"rater{r}", label) for r, label in enumerate(labels)]
    return ratings(rows)


def random_ratings(seed: int, n_items: int = 300) -> pl.DataFrame:
    """Six raters with different coverage, 70% accurate on three classes."""
    rng = np.random.default_rng(seed)
    coverage = {"r0": 0.9, "r1": 0.8, "r2": 0.6, "r3": 0.45, "r4": 0.2, "r5": 0.03}
    truth = rng.integers(0, 3, n_items)
    rows = []
    for rater, share in coverage.items():
        rated = rng.random(n_items) < share
        correct = rng.random(n_items) < 0.7
        label = np.where(correct, truth, rng.integers(0, 3, n_items))
        rows += [(f"i{i}", rater, f"c{label[i]}") for i in np.flatnonzero(rated)]
    return ratings(rows)


def dense_alpha(frame: pl.DataFrame) -> float:
    """Krippendorff's nominal alpha from the full coincidence matrix, as the paper defines it."""
    values = sorted(frame["label"].unique())
    o = np.zeros((len(values), len(values)))
    for _, unit in frame.group_by("item_id"):
        n_u = np.array([(unit["label"] == v).sum() for v in values], dtype=float)
        m_u = n_u.sum()
        if m_u < 2:
            continue
        o += (np.outer(n_u, n_u) - np.diag(n_u)) / (m_u - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    d_o = (n - np.trace(o)) / n
    d_e = (n * n - (n_c**2).sum()) / (n * (n - 1))
    return 1.0 - d_o / d_e


# --- Krippendorff's alpha -------------------------------------------------------------------


def test_krippendorff_alpha_matches_the_published_example():
    alpha = krippendorff_alpha_nominal(krippendorff_ratings())
    assert round(alpha.value, 3) == 0.743
    # Unit 12 has a single rating: not pairable, so it drops out.
    assert (alpha.n_items, alpha.n_ratings, alpha.note) == (11, 40, None)


def test_krippendorff_alpha_matches_the_full_coincidence_matrix_on_random_data():
    frame = random_ratings(seed=3)
    assert krippendorff_alpha_nominal(frame).value == pytest.approx(dense_alpha(frame), abs=1e-12)


def test_perfect_agreement_gives_alpha_and_kappa_one():
    frame = ratings(
        [(f"i{i}", rater, f"c{i % 3}") for i in range(9) for rater in ("ann", "bob", "cy")]
    )
    assert krippendorff_alpha_nominal(frame).value == pytest.approx(1.0)
    assert fleiss_kappa(frame).value == pytest.approx(1.0)


def test_a_repeated_rating_counts_once_with_its_last_row():
    frame = ratings(
        [
            ("i1", "ann", "x"),
            ("i1", "bob", "y"),
            ("i2", "ann", "x"),
            ("i2", "bob", "x"),
            ("i1", "ann", "y"),  # ann changed her mind on i1: now she agrees with bob
        ]
    )
    alpha = krippendorff_alpha_nominal(frame)
    assert alpha.value == pytest.approx(1.0)
    assert (alpha.n_items, alpha.n_ratings) == (2, 4)


# --- Fleiss' kappa --------------------------------------------------------------------------


def test_fleiss_kappa_matches_the_wikipedia_example():
    kappa = fleiss_kappa(ratings_from_counts(WIKIPEDIA_FLEISS))
    assert round(kappa.value, 3) == 0.210
    assert (kappa.n_items, kappa.n_ratings) == (10, 140)
    inter_rater = require_module("statsmodels.stats.inter_rater", "the reference Fleiss' kappa")
    assert kappa.value == pytest.approx(inter_rater.fleiss_kappa(np.array(WIKIPEDIA_FLEISS)), rel=1e-12)
    # Beyond the one worked example: tables of 7 raters over 4 categories, some categories unused.
    rng = np.random.default_rng(3)
    for _ in range(5):
        counts = rng.multinomial(7, rng.dirichlet([0.5, 1, 2, 0.2]), size=40)
        ours = fleiss_kappa(ratings_from_counts(counts.tolist())).value
        assert ours == pytest.approx(inter_rater.fleiss_kappa(counts), rel=1e-9)


def test_fleiss_kappa_with_varying_raters_per_item_follows_the_documented_formula():
    frame = krippendorff_ratings()  # 2 to 4 ratings per pairable unit
    table = (
        frame.filter(pl.len().over("item_id") >= 2)
        .pivot(on="label", index="item_id", values="rater", aggregate_function="len")
        .fill_null(0)
        .drop("item_id")
        .to_numpy()
        .astype(float)
    )
    n_i = table.sum(axis=1)
    p_i = ((table**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = table.sum(axis=0) / n_i.sum()
    p_e = (p_j**2).sum()
    assert fleiss_kappa(frame).value == pytest.approx((p_i.mean() - p_e) / (1 - p_e), abs=1e-12)


# --- Cohen's kappa per pair -----------------------------------------------------------------


def shared_labels(frame: pl.DataFrame, a: str, b: str) -> tuple[list[str], list[str]]:
    by_rater = {
        rater: dict(zip(part["item_id"], part["label"], strict=True))
        for (rater,), part in frame.group_by("rater")
    }
    items = sorted(by_rater[a].keys() & by_rater[b].keys())
    return [by_rater[a][i] for i in items], [by_rater[b][i] for i in items]


def test_cohen_kappa_pairs_picks_the_most_co_rated_pairs_and_matches_sklearn():
    frame = random_ratings(seed=7)
    raters = sorted(frame["rater"].unique())
    counts = {
        (a, b): len(shared_labels(frame, a, b)[0]) for a, b in itertools.combinations(raters, 2)
    }
    expected = sorted(counts, key=lambda pair: (-counts[pair], pair))[:5]

    pairs = cohen_kappa_pairs(frame, top=5, min_shared=10)

    assert pairs.schema == pl.Schema(PAIR_SCHEMA)
    assert list(zip(pairs["rater_a"], pairs["rater_b"], strict=True)) == expected
    assert pairs["n_shared"].to_list() == [counts[pair] for pair in expected]
    for row in pairs.iter_rows(named=True):
        reference = cohen_kappa_score(*shared_labels(frame, row["rater_a"], row["rater_b"]))
        assert row["kappa"] == pytest.approx(reference, abs=1e-12)
        assert row["note"] is None


def test_cohen_kappa_pairs_respects_min_shared():
    frame = random_ratings(seed=7)
    raters = sorted(frame["rater"].unique())
    counts = {
        (a, b): len(shared_labels(frame, a, b)[0]) for a, b in itertools.combinations(raters, 2)
    }
    threshold = sorted(counts.values())[len(counts) // 2]

    pairs = cohen_kappa_pairs(frame, top=100, min_shared=threshold)

    assert set(zip(pairs["rater_a"], pairs["rater_b"], strict=True)) == {
        pair for pair, n in counts.items() if n >= threshold
    }
    assert pairs["n_shared"].min() >= threshold
    none = cohen_kappa_pairs(frame, min_shared=max(counts.values()) + 1)
    assert none.is_empty() and none.schema == pl.Schema(PAIR_SCHEMA)


def test_cohen_kappa_is_undefined_when_both_raters_used_one_and_the_same_label():
    frame = ratings([(f"i{i}", rater, "spam") for i in range(12) for rater in ("ann", "bob")])
    row = cohen_kappa_pairs(frame).row(0, named=True)
    assert (row["rater_a"], row["rater_b"], row["n_shared"], row["kappa"]) == (
        "ann",
        "bob",
        12,
        None,
    )
    assert "only the label 'spam'" in row["note"] and "undefined" in row["note"]


# --- Degenerate inputs: None with a reason, never a silent 0 ---------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (pl.DataFrame(schema=RATINGS_SCHEMA), "no ratings"),
        (
            ratings([(f"i{i}", "ann", f"c{i % 3}") for i in range(20)]),
            "no item has two or more contributors",
        ),
        (
            ratings([(f"i{i}", r, "spam") for i in range(20) for r in ("ann", "bob", "cy")]),
            "only one label",
        ),
    ],
    ids=["empty", "one-contributor", "one-class"],
)
def test_degenerate_ratings_give_none_and_a_note(frame, reason):
    summary = agreement_summary(frame)
    for statistic in (
        summary["krippendorff_alpha"],
        summary["fleiss_kappa"],
        krippendorff_alpha_nominal(frame),
        fleiss_kappa(frame),
    ):
        assert statistic.value is None
        assert reason in statistic.note


def test_agreement_summary_counts_items_and_raters():
    summary = agreement_summary(krippendorff_ratings())
    assert summary["n_items_multi"] == 11
    assert summary["n_raters"] == 4
    assert round(summary["krippendorff_alpha"].value, 3) == 0.743


def test_missing_columns_are_rejected():
    with pytest.raises(ValueError, match="rater"):
        krippendorff_alpha_nominal(pl.DataFrame({"item_id": ["a"], "label": ["x"]}))


# --- Label drift ----------------------------------------------------------------------------


def labels_from(counts: dict[str, int]) -> pl.Series:
    return pl.Series([label for label, n in counts.items() for _ in range(n)], dtype=pl.String)


def test_js_distance_equals_scipy():
    baseline = labels_from({"a": 40, "b": 35, "c": 25})
    current = labels_from({"a": 10, "b": 50, "c": 30, "d": 10})
    drift = label_drift(baseline, current, labels=("a", "b", "c", "d"))
    expected = jensenshannon([0.40, 0.35, 0.25, 0.0], [0.10, 0.50, 0.30, 0.10], base=2)
    assert drift.js_distance == pytest.approx(expected, abs=1e-12)


def test_identical_distributions_have_no_drift():
    baseline = labels_from({"a": 50, "b": 30, "c": 20})
    drift = label_drift(baseline, baseline.shuffle(seed=1))
    assert drift.js_distance == pytest.approx(0.0, abs=1e-12)
    assert drift.psi == pytest.approx(0.0, abs=1e-12)
    assert drift.note is None


def test_psi_matches_the_hand_computed_value_with_smoothing():
    drift = label_drift(
        labels_from({"a": 50, "b": 30, "c": 20}), labels_from({"a": 20, "b": 30, "c": 50})
    )
    p = [(share + PSI_EPSILON) / (1 + 3 * PSI_EPSILON) for share in (0.5, 0.3, 0.2)]
    q = [(share + PSI_EPSILON) / (1 + 3 * PSI_EPSILON) for share in (0.2, 0.3, 0.5)]
    expected = sum((qk - pk) * math.log(qk / pk) for pk, qk in zip(p, q, strict=True))
    assert drift.psi == pytest.approx(expected, rel=1e-12)
    assert drift.psi == pytest.approx(0.6 * math.log(2.5), rel=1e-3)  # unsmoothed, for scale
    assert drift.per_label["psi_term"].sum() == pytest.approx(drift.psi)
    assert drift.per_label["baseline_share"].to_list() == pytest.approx([0.5, 0.3, 0.2])


def test_strong_shift_is_above_the_alert_threshold():
    drift = label_drift(labels_from({"ham": 90, "spam": 10}), labels_from({"ham": 30, "spam": 70}))
    assert drift.psi > PSI_ALERT


def test_a_label_absent_from_the_baseline_is_listed_and_noted():
    drift = label_drift(
        labels_from({"a": 60, "b": 40}),
        labels_from({"a": 30, "b": 30, "new": 40}),
        labels=("a", "b", "unused"),
    )
    assert drift.absent_from_baseline == ("new",)
    assert "new" in drift.note and "smooth" in drift.note
    assert math.isfinite(drift.psi) and drift.psi > PSI_ALERT
    assert drift.per_label["label"].to_list() == ["a", "b", "unused", "new"]
    unused = drift.per_label.filter(pl.col("label") == "unused").row(0, named=True)
    assert (unused["baseline_share"], unused["current_share"], unused["psi_term"]) == (0, 0, 0)


def test_empty_current_window_gives_none_and_a_note():
    for current in (pl.Series([], dtype=pl.String), pl.Series([None, None], dtype=pl.String)):
        drift = label_drift(labels_from({"a": 5, "b": 5}), current)
        assert (drift.js_distance, drift.psi, drift.n_current) == (None, None, 0)
        assert "no events in the current window" in drift.note


# --- Feature drift --------------------------------------------------------------------------


def test_same_distribution_shows_no_feature_drift():
    rng = np.random.default_rng(11)
    per_feature = feature_drift(rng.normal(size=(5000, 4)), rng.normal(size=(5000, 4)))
    assert per_feature.schema == pl.Schema(FEATURE_SCHEMA)
    assert per_feature["feature"].to_list() == ["f0", "f1", "f2", "f3"]
    assert (per_feature["psi"] < 0.1).all()
    summary = summarize_feature_drift(per_feature)
    assert (summary["n_features"], summary["n_drifted"], summary["drifted"]) == (4, 0, [])


def test_a_one_std_mean_shift_is_flagged_first():
    rng = np.random.default_rng(12)
    baseline = rng.normal(size=(5000, 4)) * [1.0, 5.0, 2.0, 0.5]
    current = rng.normal(size=(5000, 4)) * [1.0, 5.0, 2.0, 0.5]
    current[:, 2] += 2.0  # one standard deviation of that feature
    current[:, 0] += 0.1  # a tenth of one: not drift
    names = ["age", "income", "length", "score"]

    per_feature = feature_drift(baseline, current, names=names)
    summary = summarize_feature_drift(per_feature)

    psi = dict(zip(per_feature["feature"], per_feature["psi"], strict=True))
    assert psi["length"] > FEATURE_PSI_WARN
    assert all(psi[name] < FEATURE_PSI_WARN for name in ("age", "income", "score"))
    assert summary["drifted"] == ["length"] and summary["n_drifted"] == 1
    assert summary["max_psi"] == pytest.approx(psi["length"])
    assert summary["max_wasserstein_std"] == pytest.approx(1.0, abs=0.1)
    for j, name in enumerate(names):
        row = per_feature.row(j, named=True)
        assert row["feature"] == name
        assert row["wasserstein"] == pytest.approx(
            wasserstein_distance(baseline[:, j], current[:, j]), rel=1e-9
        )


def test_psi_uses_baseline_quantile_bins():
    # Baseline 0..99 cut in 4 quantile bins of 25; current 0..49 fills the first two only.
    per_feature = feature_drift(np.arange(100.0), np.arange(50.0), bins=4)
    p = (np.array([0.25, 0.25, 0.25, 0.25]) + PSI_EPSILON) / (1 + 4 * PSI_EPSILON)
    q = (np.array([0.5, 0.5, 0.0, 0.0]) + PSI_EPSILON) / (1 + 4 * PSI_EPSILON)
    assert per_feature["psi"].item() == pytest.approx(((q - p) * np.log(q / p)).sum(), rel=1e-12)


def test_non_finite_values_are_dropped_and_counted():
    rng = np.random.default_rng(13)
    baseline = rng.normal(size=(2000, 2))
    current = rng.normal(size=(2000, 2))
    baseline[:7, 0] = np.nan
    current[100:103, 0] = np.inf
    current[5, 1] = -np.inf

    per_feature = feature_drift(baseline, current)

    assert per_feature["n_nan_dropped"].to_list() == [10, 1]
    assert "10 NaN/Inf" in per_feature["note"][0]
    clean = feature_drift(baseline[7:, :1], np.delete(current[:, :1], [100, 101, 102], axis=0))
    assert per_feature["psi"][0] == pytest.approx(clean["psi"].item(), rel=1e-12)
    assert per_feature["wasserstein"][0] == pytest.approx(clean["wasserstein"].item(), rel=1e-12)
    assert per_feature["wasserstein"][0] == pytest.approx(
        wasserstein_distance(baseline[7:, 0], np.delete(current[:, 0], [100, 101, 102])), rel=1e-9
    )


def test_wasserstein_equals_scipy_on_unequal_samples_with_ties():
    rng = np.random.default_rng(17)
    baseline = rng.integers(0, 5, size=(301, 1)).astype(float)
    current = rng.exponential(size=(704, 1)).round(1)
    assert feature_drift(baseline, current)["wasserstein"].item() == pytest.approx(
        wasserstein_distance(baseline[:, 0], current[:, 0]), rel=1e-9
    )


def test_a_constant_baseline_feature_still_works():
    rng = np.random.default_rng(14)
    baseline = np.column_stack([np.full(1000, 2.0), rng.normal(size=1000)])
    same = np.column_stack([np.full(1000, 2.0), rng.normal(size=1000)])
    moved = np.column_stack([np.full(1000, 3.0), rng.normal(size=1000)])

    unchanged = feature_drift(baseline, same)
    shifted = feature_drift(baseline, moved)

    assert unchanged["psi"][0] == pytest.approx(0.0, abs=1e-12)
    assert "constant" in unchanged["note"][0] and unchanged["baseline_std"][0] == 0.0
    assert shifted["psi"][0] > PSI_ALERT
    assert shifted["wasserstein"][0] == pytest.approx(1.0)
    # A zero baseline std would make the ratio infinite: the summary skips it.
    summary = summarize_feature_drift(shifted)
    assert summary["drifted"] == ["f0"]
    assert summary["max_wasserstein_std"] == pytest.approx(
        shifted["wasserstein"][1] / shifted["baseline_std"][1]
    )


def test_an_empty_side_gives_null_and_a_note():
    rng = np.random.default_rng(15)
    per_feature = feature_drift(rng.normal(size=(100, 2)), np.empty((0, 2)))
    assert per_feature["psi"].null_count() == per_feature["wasserstein"].null_count() == 2
    assert all("no finite values in the current window" in note for note in per_feature["note"])
    summary = summarize_feature_drift(per_feature)
    assert (summary["max_psi"], summary["mean_psi"], summary["n_drifted"]) == (None, None, 0)
    assert "could be compared" in summary["note"]


def test_width_mismatch_is_rejected():
    with pytest.raises(ValueError, match="3 feature column.*current has 2"):
        feature_drift(np.zeros((10, 3)), np.zeros((10, 2)))
