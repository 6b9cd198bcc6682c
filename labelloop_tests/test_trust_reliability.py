"""Votes that cannot be cheaply manufactured (continued from test_trust_votes.py): reliability is
earned on blind items only. An account that copies published labels earns nothing and cannot flip
alone; an annotator whose blind corrections reviewers bear out still earns accuracy above the prior.

Same real pipeline and helpers as test_trust_votes.py (real DuckDB file, real Dagster instance, the
shipped governance.yaml); a file of its own so that the two halves run side by side under `make test`.
"""

from __future__ import annotations

import polars as pl
import pytest

from labelloop_assets.core import reliability
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_tests.conftest import correction, land_items, write_jsonl
from labelloop_tests.test_loop import _materialize, _rows
from labelloop_tests.test_trust_votes import DAYS, ITEMS, OTHERS, ZEROS, _at, _ingest, _labels, _me, _replay, _statuses

# ---------------------------------------------------------------------------------------------
# Reliability is earned on blind items only
# ---------------------------------------------------------------------------------------------

CONFIRMED = OTHERS[:30]
FLIPPED = ZEROS[:40]


def _farm(home, defs, instance) -> None:
    """A reviewer confirms 30 labels (day 1); an annotator account copies them from the
    published corpus, 10 a day on days 2-4 (so it is no newcomer by day 5)."""
    _replay(home)
    land_items(home, ITEMS)
    _ingest(defs, instance)
    current = _labels(home, CONFIRMED)
    write_jsonl(home.landing_dir("corrections"), "review.jsonl", [
        correction(f"rv-{k}", item, current[item], user="rita", role="reviewer", created_at=_at(DAYS[0], k))
        for k, item in enumerate(CONFIRMED)
    ])
    _ingest(defs, instance)
    published = _rows(home, "SELECT item_id, label FROM production_corpus WHERE reviewer_confirmed ORDER BY item_id")
    assert published["item_id"].to_list() == sorted(CONFIRMED)
    for d in range(3):
        write_jsonl(home.landing_dir("corrections"), f"copies-{d}.jsonl", [
            correction(f"cp-{d}-{k}", item, label, user="farmer", role="annotator", created_at=_at(DAYS[1 + d], k))
            for k, (item, label) in enumerate(published.rows()[10 * d: 10 * d + 10])
        ])
        _ingest(defs, instance)


def _farmer_votes(home) -> pl.DataFrame:
    return _rows(home, "SELECT item_id, user_pseudonym, corrected_label, label_before FROM validated_labels "
                       "WHERE user_pseudonym = $me", {"me": _me("farmer")})


def _accuracy(home, user: str) -> tuple[float | None, int]:
    rows = _rows(home, "SELECT accuracy, n_votes FROM contributor_reliability WHERE user_pseudonym = $me",
                 {"me": _me(user)})
    return (rows["accuracy"][0], rows["n_votes"][0]) if rows.height else (None, 0)


@pytest.mark.slow
def test_copying_published_labels_earns_no_reliability_and_no_solo_flips(home, defs, instance):
    _farm(home, defs, instance)
    votes = _farmer_votes(home)
    assert votes.height == 30 and (votes["corrected_label"] == votes["label_before"]).all()
    anchors = _rows(home, "SELECT item_id, label FROM production_corpus WHERE reviewer_confirmed")
    policy = ResolutionPolicy.load(home.governance_file)
    prior = reliability.ReliabilityPrior(policy.reliability_prior_mean, policy.reliability_prior_strength)
    labels = ("zero", "one", "two")
    # The attack on the old path: counted as evidence, 30 copies of anchors earn 0.94 on 30 votes,
    # past solo_flip (0.85 on 20).
    farmed = reliability.estimate_reliability(votes.drop("label_before"), anchors, labels, prior).row(0, named=True)
    assert farmed["accuracy"] >= policy.solo_min_accuracy and farmed["n_votes"] >= policy.solo_min_votes

    _materialize(defs, instance, ["contributor_reliability"])
    # As shipped the copies are no evidence: the account stays at the prior mean, on no votes.
    assert _accuracy(home, "farmer") == (policy.reliability_prior_mean, 0)

    write_jsonl(home.landing_dir("corrections"), "flips.jsonl", [
        correction(f"fl-{k}", item, "two", user="farmer", role="annotator", created_at=_at(DAYS[4], k))
        for k, item in enumerate(FLIPPED)
    ])
    _ingest(defs, instance)
    assert set(_labels(home, FLIPPED).values()) == {"zero"}
    assert set(_statuses(home, FLIPPED).values()) == {"pending"}
    # Its own 40 flips, alone on their items, do not make it reliable either (EM would read them
    # as agreeing with themselves): pending items are decided again after the next estimate,
    # and stay pending.
    _materialize(defs, instance, ["contributor_reliability"])
    assert _accuracy(home, "farmer") == (policy.reliability_prior_mean, 0)
    _ingest(defs, instance)
    assert set(_labels(home, FLIPPED).values()) == {"zero"}
    assert set(_statuses(home, FLIPPED).values()) == {"pending"}


@pytest.mark.slow
def test_blind_corrections_that_reviewers_bear_out_still_earn_reliability(home, defs, instance):
    """The honest path: an annotator who corrects labels before anyone confirmed them, and is
    later borne out by a reviewer, earns accuracy above the prior (and the right to flip alone)."""
    _replay(home)
    land_items(home, ITEMS)
    _ingest(defs, instance)
    for d in range(3):
        write_jsonl(home.landing_dir("corrections"), f"ann-{d}.jsonl", [
            correction(f"an-{d}-{k}", item, "one", user="ann", role="annotator", created_at=_at(DAYS[d], k))
            for k, item in enumerate(ZEROS[10 * d: 10 * d + 10])
        ])
        _ingest(defs, instance)
    # The reviewer gets to them over three days (30 in one day would be a burst of its own).
    for d in range(3):
        write_jsonl(home.landing_dir("corrections"), f"review-{d}.jsonl", [
            correction(f"rv-{d}-{k}", item, "one", user="rita", role="reviewer", created_at=_at(DAYS[3 + d], k))
            for k, item in enumerate(ZEROS[10 * d: 10 * d + 10])
        ])
        _ingest(defs, instance)
    assert _rows(home, "SELECT count(*) AS n FROM correction_bursts")["n"][0] == 0
    _materialize(defs, instance, ["contributor_reliability"])
    accuracy, n_votes = _accuracy(home, "ann")
    assert n_votes == 30 and accuracy >= 0.85
