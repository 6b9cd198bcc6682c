"""Source reliability under selection: reviews routed to doubted items against a random audit.

The accuracy of an initial label source (the labels items arrive with) used to be the share of
reviewer-confirmed items on which the source agreed with the reviewer. Reviews are routed to the
items someone doubts, and those are mostly the wrong ones, so a source that is right 85% of the
time came out near 0.05. These tests simulate sources of known accuracy, reproduce that bias with
the same selection, and show that the estimate from a random audit sample is close to the truth
(the error is stated in each test), first on the pure functions, then through the pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import label_issues, reliability, store
from labelloop_assets.core.contracts import CORRECTION_SOURCES
from labelloop_assets.core.reliability import (
    AUDIT_SAMPLE_SCHEMA,
    SOURCE_SCHEMA,
    ReliabilityPrior,
    draw_audit_sample,
    source_reliability,
)
from labelloop_tests.conftest import LABELS, correction, land_items, make_items, write_jsonl
from labelloop_tests.test_loop import _materialize, _metadata

N_CLASSES = 10


def simulate_sources(seed: int, accuracies: dict[str, float], items_per_source: int) -> pl.DataFrame:
    """Items of each source with a true and an initial label; exactly round((1 - accuracy) * n)
    of a source's labels are wrong (a uniformly random other class), so its accuracy is known.
    `doubt` is what a model's out-of-sample doubt about the initial label looks like: much higher
    on the wrong labels (the label-issue ranking finds most of them first), with noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for name, accuracy in accuracies.items():
        n = items_per_source
        truth = rng.integers(0, N_CLASSES, n)
        wrong = np.zeros(n, dtype=bool)
        wrong[rng.choice(n, int(round((1 - accuracy) * n)), replace=False)] = True
        initial = np.where(wrong, (truth + rng.integers(1, N_CLASSES, n)) % N_CLASSES, truth)
        frames.append(pl.DataFrame({
            "item_id": [f"{name}-{k:05d}" for k in range(n)],
            "label_source": name,
            "initial_label": [f"c{c}" for c in initial],
            "truth": [f"c{c}" for c in truth],
            "doubt": 3.0 * wrong + rng.normal(size=n),
        }))
    return pl.concat(frames)


def verdicts(items: pl.DataFrame, chosen: pl.Series) -> pl.DataFrame:
    """A reviewer's (true) label of each chosen item."""
    return items.filter(pl.col("item_id").is_in(chosen.implode())).select("item_id", label="truth")


def most_doubted(items: pl.DataFrame, n: int) -> pl.Series:
    return items.sort("doubt", descending=True).head(n)["item_id"]


def estimate(items: pl.DataFrame, audits: pl.DataFrame, source: str) -> dict:
    found = source_reliability(items, audits).filter(pl.col("label_source") == source)
    assert found.height == 1, found
    return found.row(0, named=True)


# ---------------------------------------------------------------------------------------------
# The bias, reproduced, and the audit estimate's error
# ---------------------------------------------------------------------------------------------


def test_reviews_of_doubted_items_rate_an_85_percent_source_near_zero():
    """The finding: judged on the items the model doubts, a source right 85% of the time is
    estimated at 0.10 here (0.05 in the finding); 250 items drawn at random give 0.87."""
    items = simulate_sources(0, {"vendor": 0.85}, 2000)
    reviewed = verdicts(items, most_doubted(items, 250))
    biased = estimate(items, reviewed, "vendor")
    assert biased["n_audited"] == 250
    assert biased["accuracy"] < 0.15  # 0.85 in truth
    # The same items drawn at random instead: close to the truth.
    audited = verdicts(items, draw_audit_sample(items["item_id"], 250, seed=1)["item_id"])
    assert abs(estimate(items, audited, "vendor")["accuracy"] - 0.85) < 0.05


def test_audit_estimate_is_within_0_07_of_the_truth_at_200_audited_items_per_source():
    """Three sources of known accuracy, 2,000 items each, 600 items audited at random (160 to
    231 per source), 20 seeds: every estimate within 0.07 of the truth (largest 0.067, the 0.6
    source's standard error at n = 200 is 0.035), mean absolute error 0.017."""
    accuracies = {"heuristic": 0.6, "vendor": 0.85, "expert": 0.95}
    errors = []
    for seed in range(20):
        items = simulate_sources(seed, accuracies, 2000)
        audited = verdicts(items, draw_audit_sample(items["item_id"], 600, seed=seed)["item_id"])
        estimates = source_reliability(items, audited)
        assert estimates["label_source"].to_list() == sorted(accuracies)
        for row in estimates.iter_rows(named=True):
            assert 150 <= row["n_audited"] <= 250
            errors.append(abs(row["accuracy"] - accuracies[row["label_source"]]))
    assert max(errors) < 0.07, max(errors)
    assert float(np.mean(errors)) < 0.025, float(np.mean(errors))


def test_the_stated_standard_error_covers_the_truth_about_95_percent_of_the_time():
    """± 1.96 standard errors holds the truth in 98% of 200 draws (the prior makes it a little wide)."""
    hits = 0
    for seed in range(200):
        items = simulate_sources(seed, {"vendor": 0.85}, 1000)
        audited = verdicts(items, draw_audit_sample(items["item_id"], 100, seed=seed)["item_id"])
        row = estimate(items, audited, "vendor")
        hits += abs(row["accuracy"] - 0.85) <= 1.96 * row["standard_error"]
    assert 0.9 <= hits / 200 <= 0.99, hits


def test_the_standard_error_is_that_of_the_agreement_share_with_the_prior_votes():
    """300 audited items of a source right 85% of the time: within 0.05, and the standard error
    is sqrt(p (1 - p) / (n + strength))."""
    items = simulate_sources(3, {"vendor": 0.85}, 3000)
    audited = verdicts(items, draw_audit_sample(items["item_id"], 300, seed=3)["item_id"])
    alone = estimate(items, audited, "vendor")
    assert abs(alone["accuracy"] - 0.85) < 0.05
    assert alone["standard_error"] == pytest.approx((alone["accuracy"] * (1 - alone["accuracy"]) / 304) ** 0.5)


def lone_voters(seed: int, n_items: int, n_doubted: int, n_audited: int):
    """Four contributors, one blind vote per item (as annotators answering review prompts alone);
    a quarter of the items are hard (accuracy 0.6 there, 0.92 elsewhere: about 0.84 overall).
    A reviewer reviews the items the model doubts most (mostly hard ones) and audits a random
    sample. Returns votes, anchors with `audited`, and each contributor's true accuracy on their
    own votes."""
    rng = np.random.default_rng(seed)
    labels = tuple(f"c{k}" for k in range(N_CLASSES))
    truth = rng.integers(0, N_CLASSES, n_items)
    hard = rng.random(n_items) < 0.25
    voter = rng.integers(0, 4, n_items)
    right = rng.random(n_items) < np.where(hard, 0.6, 0.92)
    vote = np.where(right, truth, (truth + rng.integers(1, N_CLASSES, n_items)) % N_CLASSES)
    items = np.array([f"i{k:05d}" for k in range(n_items)])
    users = np.array([f"u_{k}" for k in range(4)])
    votes = pl.DataFrame({"item_id": items, "user_pseudonym": users[voter],
                          "corrected_label": np.array(labels)[vote]})
    doubt = 2.0 * hard + rng.normal(size=n_items)
    doubted = np.argsort(-doubt)[:n_doubted]
    audited = rng.choice(n_items, n_audited, replace=False)
    chosen = np.union1d(doubted, audited)
    anchors = pl.DataFrame({"item_id": items[chosen], "label": np.array(labels)[truth[chosen]],
                            "audited": np.isin(chosen, audited)})
    true_accuracy = {users[u]: float(right[voter == u].mean()) for u in range(4)}
    return votes, anchors, labels, true_accuracy


def test_doubt_routed_reviews_bias_contributors_who_vote_alone_and_random_anchors_do_not():
    """The contributor fit's known limit (module docstring, "Selection, for contributors"): 6,000
    lone votes, 3 seeds. Anchored on the 600 items the model doubts most, each contributor comes
    out about 0.2 low (0.23 on average); anchored on 900 items drawn at random, every estimate is
    within 0.05 of the truth, mean absolute error below 0.02."""
    doubted_only, errors = [], []
    for seed in range(3):
        votes, anchors, labels, truth = lone_voters(seed, 6000, 600, 900)
        doubted = reliability.estimate_reliability(votes, anchors.filter(~pl.col("audited")).drop("audited"), labels)
        doubted_only += [r["accuracy"] - truth[r["user_pseudonym"]] for r in doubted.iter_rows(named=True)]
        audited = reliability.estimate_reliability(votes, anchors.filter(pl.col("audited")).drop("audited"), labels)
        for row in audited.iter_rows(named=True):
            assert 150 <= row["n_votes"] == row["n_anchored"] <= 300
            errors.append(abs(row["accuracy"] - truth[row["user_pseudonym"]]))
    assert float(np.mean(doubted_only)) < -0.18, float(np.mean(doubted_only))
    assert max(errors) < 0.05 and float(np.mean(errors)) < 0.02, errors


# ---------------------------------------------------------------------------------------------
# source_reliability and draw_audit_sample: inputs, edges, errors
# ---------------------------------------------------------------------------------------------


def test_source_reliability_counts_agreements_with_the_prior():
    initial = pl.DataFrame({
        "item_id": ["a", "b", "c", "d", "e", "f"],
        "label_source": ["v", "v", "v", "h", None, "h"],
        "initial_label": ["x", "y", "x", "x", "x", None],
    })
    audits = pl.DataFrame({
        "item_id": ["a", "b", "b", "c", "d", "e", "f", "zz"],
        "label": ["x", "x", "y", "y", "x", "x", "x", "x"],  # b: the last verdict counts
    })
    out = source_reliability(initial, audits, ReliabilityPrior(0.7, 4.0))
    assert out.schema == pl.Schema(SOURCE_SCHEMA)
    # e has no source, f no initial label, zz is not an item: none counts.
    assert out.select("label_source", "n_audited", "n_audit_agreements").rows() == [("h", 1, 1), ("v", 3, 2)]
    assert out["accuracy"].to_list() == pytest.approx([(1 + 2.8) / 5, (2 + 2.8) / 7])


def test_source_reliability_without_audits_is_empty():
    initial = pl.DataFrame({"item_id": ["a"], "label_source": ["v"], "initial_label": ["x"]})
    empty = pl.DataFrame(schema={"item_id": pl.String, "label": pl.String})
    assert source_reliability(initial, empty).schema == pl.Schema(SOURCE_SCHEMA)
    assert source_reliability(initial, empty).height == 0


def test_audit_sample_is_seeded_distinct_and_independent_of_input_order():
    ids = [f"i{k:04d}" for k in range(500)]
    first = draw_audit_sample(ids, 50, seed=11)
    assert first.schema == pl.Schema(AUDIT_SAMPLE_SCHEMA)
    assert first["draw"].to_list() == list(range(1, 51))
    assert first["item_id"].n_unique() == 50 and set(first["item_id"]) <= set(ids)
    assert first.equals(draw_audit_sample(list(reversed(ids)) + ids[:10], 50, seed=11))
    assert not first.equals(draw_audit_sample(ids, 50, seed=12))
    # Items audited before are not drawn again; fewer remain than asked: all of them.
    again = draw_audit_sample(ids, 1000, seed=11, exclude=first["item_id"])
    assert again.height == 450 and not set(again["item_id"]) & set(first["item_id"])


def test_every_item_is_equally_likely_to_be_drawn():
    """Inclusion frequencies over 400 seeds: 20 of 100 items drawn each time, so each item is
    drawn 80 times in expectation (binomial sd 8); none is far off."""
    ids = [f"i{k:03d}" for k in range(100)]
    counts = pl.concat([draw_audit_sample(ids, 20, seed=s) for s in range(400)])["item_id"].value_counts()
    assert counts.height == 100
    assert counts["count"].min() > 80 - 4 * 8 and counts["count"].max() < 80 + 4 * 8


@pytest.mark.parametrize("size, seed", [(0, 1), (-3, 1), (2.5, 1), (True, 1), (5, -1), (5, 1.5)])
def test_audit_sample_rejects_bad_arguments(size, seed):
    with pytest.raises(ValueError, match="audit sample"):
        draw_audit_sample(["a", "b"], size, seed)


def test_audit_source_is_a_correction_source_of_the_contract():
    assert reliability.AUDIT_SOURCE in CORRECTION_SOURCES


# ---------------------------------------------------------------------------------------------
# Through the pipeline: the ranking's source reliability comes from the audit
# ---------------------------------------------------------------------------------------------

CURATE = ["items", "raw_corrections", "validated_labels", "production_corpus", "contributor_reliability"]


def test_label_issue_source_reliability_comes_from_the_audit_not_from_doubted_reviews(
    home, defs, instance, monkeypatch, capsys
):
    """600 vendor items, exactly 90 initial labels wrong (accuracy 0.85). A reviewer corrects
    the 60 items the model doubts most (source `review_prompt`) and another audits 150 items drawn
    at random (`audit_sample`). The label-issue ranking's reliability of the vendor's labels used
    to be the agreement on every reviewer-confirmed item, 0.65 here (0.06 on the doubted items
    alone); now it is the audit's, 0.83, within 0.05 of 0.85 (standard error 0.03)."""
    records, truth = make_items(615, n_gold=15)
    rng = np.random.default_rng(5)
    vendor = [r for r in records if "initial_label" in r]
    wrong_ids = {vendor[k]["item_id"] for k in rng.choice(len(vendor), 90, replace=False)}
    for record in vendor:
        if record["item_id"] in wrong_ids:
            record["initial_label"] = LABELS[(LABELS.index(truth[record["item_id"]]) + 1) % len(LABELS)]
    land_items(home, records)
    doubt = {r["item_id"]: 3.0 * (r["item_id"] in wrong_ids) + rng.normal() for r in vendor}
    doubted = sorted(doubt, key=doubt.get, reverse=True)[:60]
    audited = draw_audit_sample([r["item_id"] for r in vendor], 150, seed=5)["item_id"].to_list()
    events = [correction(f"doubt-{i}", item, truth[item], user="rita", source="review_prompt")
              for i, item in enumerate(doubted)]
    events += [correction(f"audit-{i}", item, truth[item], user="alan", source="audit_sample")
               for i, item in enumerate(audited)]
    write_jsonl(home.landing_dir("corrections"), "reviews.jsonl", events)
    result = _materialize(defs, instance, CURATE)
    assert result.success

    initial_label = {r["item_id"]: r["initial_label"] for r in vendor}
    agreements = sum(truth[i] == initial_label[i] for i in audited)
    expected = (agreements + 0.7 * 4) / (150 + 4)
    with store.connect(home.database, read_only=True) as con:
        active = label_issues.active_signals(con, 0.7, 4.0)
        confirmed = store.frame(
            con, "SELECT i.item_id, i.label_source, i.initial_label, c.label FROM items i "
            "JOIN production_corpus c USING (item_id) WHERE c.reviewer_confirmed"
        )
    # Every item no one reviewed still has the vendor's label, scored by the vendor's reliability.
    untouched = active.filter(~pl.col("item_id").is_in(doubted + audited))
    assert untouched.height == 600 - len(set(doubted + audited))
    assert untouched["source_reliability"].n_unique() == 1
    reliability_now = untouched["source_reliability"][0]
    assert reliability_now == pytest.approx(expected)
    assert abs(reliability_now - 0.85) < 0.05

    # The old estimate from the same store: agreement on every reviewer-confirmed item.
    old = source_reliability(confirmed.drop("label"), confirmed.select("item_id", "label"))
    assert old["accuracy"][0] < 0.7  # 0.65
    # On the doubted reviews alone it is the finding's ~0.05.
    only_doubted = confirmed.filter(pl.col("item_id").is_in(doubted) & ~pl.col("item_id").is_in(audited))
    assert source_reliability(only_doubted.drop("label"), only_doubted.select("item_id", "label"))[
        "accuracy"][0] < 0.15  # 0.06: 0 of 44 agree

    meta = _metadata(result, "contributor_reliability")
    assert meta["audited_items"] == 150
    assert f"| vendor | 150 | {agreements} | {round(expected, 3)} |" in meta["initial_label_sources"]

    # The next audit sample: corpus items, none audited before, the same for the same seed.
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    assert cli.main(["review", "audit-sample", "--size", "40", "--seed", "9", "--json"]) == 0
    drawn = [row["item_id"] for row in json.loads(capsys.readouterr().out)]
    assert len(set(drawn)) == 40 and not set(drawn) & set(audited)
    assert set(drawn) <= {r["item_id"] for r in vendor}
    assert cli.main(["review", "audit-sample", "--size", "40", "--seed", "9", "--json"]) == 0
    assert [row["item_id"] for row in json.loads(capsys.readouterr().out)] == drawn
    assert cli.main(["review", "audit-sample", "--size", "1000"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("450 items drawn at random for audit (seed 0; 150 items audited before")
    assert "only 450 left to draw" in text and "'audit_sample'" in text


def test_without_an_audit_an_initial_label_has_no_source_reliability(home, defs, instance):
    """Doubted items reviewed, none audited: no estimate (it would be the biased one)."""
    records, truth = make_items(120)
    land_items(home, records)
    vendor = [r for r in records if "initial_label" in r]
    events = [correction(f"r-{k}", r["item_id"], LABELS[(LABELS.index(truth[r["item_id"]]) + 1) % 3],
                         user="rita", source="review_prompt") for k, r in enumerate(vendor[:20])]
    # A claimed audit by an annotator is no audit verdict either.
    events += [correction(f"a-{k}", r["item_id"], truth[r["item_id"]], user="ann", role="annotator",
                          source="audit_sample") for k, r in enumerate(vendor[20:50])]
    write_jsonl(home.landing_dir("corrections"), "reviews.jsonl", events)
    assert _materialize(defs, instance, CURATE).success
    with store.connect(home.database, read_only=True) as con:
        active = label_issues.active_signals(con, 0.7, 4.0, min_anchors=10)
        labels = store.frame(con, "SELECT item_id, label_source FROM production_corpus")
    initial = active.join(labels, on="item_id").filter(pl.col("label_source") == "vendor")
    assert initial.height > 0 and initial["source_reliability"].is_null().all()

