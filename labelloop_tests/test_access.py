"""Access: every reviewer action is checked against the contributor directory (contributors.yaml,
reviewers.yaml), signed by the reviewer's key, and audited, whatever its outcome.

Already proven elsewhere: `review decide` by an unknown identity, a wrong role and a reviewer
(test_governance); `review discard` by an unknown identity and a reviewer, `review release` by a
reviewer and a domain expert (test_bursts); `model rollback` by an unknown identity and a reviewer
(test_model_gate). Here: `reject` and `defer`, decisions landed as files by hand, a burst
acknowledged by a wrong role, a rollback by a wrong role, and that a refusal is final.
"""

from __future__ import annotations

import pytest

from labelloop_assets import cli
from labelloop_assets.core import store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.settings import pseudonymization_key
from labelloop_tests.conftest import correction, give_keys, land_items, make_items, set_yaml, signed, write_jsonl
from labelloop_tests.test_bursts import _bursts, _held_scenario, _ingest

REVIEWERS = (
    "reviewers:\n  - {id: reviewer-0, role: reviewer}\n  - {id: expert-0, role: domain_expert}\n"
    "  - {id: ann-1, role: annotator}\n"
)


def _rows(home, sql, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _as(user_id: str) -> str:
    return pseudonym(pseudonymization_key(), user_id)


def _ties(home, items=("item-030", "item-031")) -> None:
    """Two end users for `one`, two for `two` on each item (both hold `zero` or `one`): tie escalations."""
    # Fresh end-user ids count fully here (newcomers' weight is test_trust's subject): 2 v 2 is a tie.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    votes = [
        correction(f"{item}-{k}", item, label, user=f"{item}-user{k}", role="end_user")
        for item in items for k, label in enumerate(["one", "one", "two", "two"])
    ]
    write_jsonl(home.landing_dir("corrections"), "ties.jsonl", votes)


def _two_open_ties(home, defs, instance, monkeypatch) -> None:
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text(REVIEWERS)
    give_keys(home, "reviewer-0", "expert-0", "ann-1")
    land_items(home, make_items()[0])
    _ties(home)
    _ingest(defs, instance)
    assert _rows(home, "SELECT escalation_id, reason FROM escalations ORDER BY 1").rows() == [
        ("esc-item-030-1", "tie"), ("esc-item-031-1", "tie")]


@pytest.mark.slow
def test_reject_and_defer_are_checked_and_audited_from_the_cli_and_from_files(
    home, defs, instance, monkeypatch, capsys
):
    _two_open_ties(home, defs, instance, monkeypatch)
    refusals = {
        ("reject", "esc-item-030-1", "mallory"): "'mallory' is not a reviewer",
        ("reject", "esc-item-030-1", "ann-1"): "role annotator may not decide a tie escalation",
        ("defer", "esc-item-031-1", "mallory"): "'mallory' is not a reviewer",
        ("defer", "esc-item-031-1", "ann-1"): "role annotator may not decide a tie escalation",
    }
    for (action, escalation, who), message in refusals.items():
        assert cli.main(["review", action, escalation, "--rationale", "x", "--as", who]) == 3
        err = capsys.readouterr().err
        assert message in err and "recorded for the audit log" in err
    # Producers may land signed decisions without the CLI: the same rules apply at ingest. A
    # decision written by hand for a listed reviewer, unsigned, decides nothing (it would have
    # closed esc-item-030-1 first: it is the earliest).
    write_jsonl(home.landing_dir("reviews"), "by-hand.jsonl", [
        signed({"decision_id": "hand-1", "escalation_id": "esc-item-030-1", "decision": "reject",
                "reviewer_id": "ann-1", "rationale": "mine", "decided_at": "2026-03-02T12:00:00+00:00"}),
        {"decision_id": "hand-2", "escalation_id": "esc-item-031-1", "decision": "defer",
         "reviewer_id": "nobody", "rationale": "mine", "decided_at": "2026-03-02T12:00:00+00:00"},
        {"decision_id": "hand-3", "escalation_id": "esc-item-030-1", "decision": "accept", "label": "two",
         "reviewer_id": "reviewer-0", "rationale": "forged", "decided_at": "2026-03-02T11:00:00+00:00"},
    ])
    assert cli.main(["review", "reject", "esc-item-030-1", "--rationale", "the vendor label holds",
                     "--as", "expert-0"]) == 0
    assert cli.main(["review", "defer", "esc-item-031-1", "--rationale", "ask the scanner team",
                     "--as", "reviewer-0"]) == 0
    capsys.readouterr()
    _ingest(defs, instance)

    audit = _rows(home, "SELECT action, outcome, reason, actor, actor_role, target FROM audit_log "
                        "WHERE action LIKE 'review.%' ORDER BY outcome, reason, action")
    refused = audit.filter(outcome="refused")
    assert refused.select("reason").to_series().to_list() == \
        ["role_not_allowed"] * 3 + ["unknown_reviewer"] * 3 + ["unsigned"]
    assert set(refused["actor"]) == {"unverified"} and refused["target"].str.starts_with("reviews/").all()
    assert audit.filter(outcome="accepted").select("action", "actor", "actor_role", "target").rows() == [
        ("review.defer", _as("reviewer-0"), "reviewer", "esc-item-031-1"),
        ("review.reject", _as("expert-0"), "domain_expert", "esc-item-030-1"),
    ]
    assert sorted(_rows(home, "SELECT reason FROM quarantine WHERE kind = 'reviews'")["reason"]) == \
        ["role_not_allowed"] * 3 + ["unknown_reviewer"] * 3 + ["unsigned"]
    decisions = _rows(home, "SELECT decision FROM review_decisions ORDER BY 1")["decision"].to_list()
    assert decisions == ["defer", "reject"]
    # reject keeps the label, now reviewer-confirmed, and closes the escalation; defer leaves it open.
    corpus = _rows(home, "SELECT item_id, label, reviewer_confirmed FROM production_corpus "
                         "WHERE item_id IN ('item-030', 'item-031') ORDER BY 1")
    assert corpus.rows() == [("item-030", "zero", True), ("item-031", "one", False)]
    last = _rows(home, "SELECT change_kind, approved_by FROM label_history WHERE item_id = 'item-030' "
                       "ORDER BY corpus_version DESC, change_order DESC LIMIT 1")
    assert last.row(0) == ("review", f"reviewer:{_as('expert-0')}")
    assert _rows(home, "SELECT escalation_id, deferrals FROM escalations").rows() == [("esc-item-031-1", 1)]


@pytest.mark.slow
def test_a_burst_acknowledged_by_a_role_governance_does_not_allow_is_refused_and_audited(
    home, defs, instance, monkeypatch, capsys
):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text("reviewers:\n  - {id: ann-1, role: annotator}\n")
    give_keys(home, "ann-1")  # her attempts are signed: refused for her role, not for a missing signature
    _, bursts = _held_scenario(home, defs, instance, one_batch=True)
    contributor_burst, segment_burst = bursts["burst_id"].to_list()

    for action, burst in (("release", contributor_burst), ("discard", segment_burst)):
        assert cli.main(["review", action, burst, "--rationale", "fine by me", "--as", "ann-1"]) == 3
        assert "role annotator may not acknowledge a correction burst (allowed: reviewer, domain_expert)" in \
            capsys.readouterr().err
    assert cli.main(["review", "release", contributor_burst, "--rationale", "fine", "--as", "mallory"]) == 3
    assert "'mallory' is not a reviewer" in capsys.readouterr().err
    _ingest(defs, instance)

    assert _bursts(home)["status"].to_list() == ["held", "held"]
    assert _rows(home, "SELECT count(*) AS n FROM review_decisions")["n"][0] == 0
    audit = _rows(home, "SELECT outcome, reason FROM audit_log WHERE action LIKE 'review.%' ORDER BY reason")
    assert audit.rows() == [("refused", "role_not_allowed")] * 2 + [("refused", "unknown_reviewer")]


def test_a_rollback_by_a_role_that_may_not_roll_back_is_refused_and_audited(home, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text(REVIEWERS)
    with store.connect(home.database):
        pass  # an empty registry: the identity is checked before anything else
    assert cli.main(["model", "rollback", "m0001", "--rationale", "try it", "--as", "ann-1"]) == 3
    assert "refused: role annotator may not roll back a model (allowed: reviewer, domain_expert)" in \
        capsys.readouterr().err
    assert cli.main(["model", "rollback", "m0001", "--rationale", "   ", "--as", "expert-0"]) == 3
    assert "a rationale is required" in capsys.readouterr().err
    audit = _rows(home, "SELECT actor, actor_role, target, outcome, reason FROM audit_log "
                        "WHERE action = 'model.rollback' ORDER BY logged_at")
    assert audit.rows() == [
        (_as("ann-1"), "annotator", "m0001", "refused",
         "role annotator may not roll back a model (allowed: reviewer, domain_expert)"),
        (_as("expert-0"), "domain_expert", "m0001", "refused", "a rationale is required (--rationale)"),
    ]
    assert not (home.models / "CURRENT").exists()


@pytest.mark.slow
def test_what_the_cli_refused_never_takes_effect_and_what_it_accepts_ingest_accepts(
    home, defs, instance, monkeypatch, capsys
):
    _two_open_ties(home, defs, instance, monkeypatch)
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "two", "--rationale", "it is a two",
                     "--as", "mallory"]) == 3
    capsys.readouterr()
    # Before the next run, an administrator makes mallory a reviewer: her refused attempt stays refused.
    home.reviewers_file.write_text(REVIEWERS + "  - {id: mallory, role: reviewer}\n")
    # Identities and labels are read as ingest reads them (surrounding blanks do not count).
    assert cli.main(["review", "decide", "esc-item-031-1", "--label", " two\t", "--rationale", " clearly two ",
                     "--as", "  expert-0 "]) == 0
    assert "recorded accept of esc-item-031-1" in capsys.readouterr().out
    _ingest(defs, instance)

    labels = dict(_rows(home, "SELECT item_id, label FROM production_corpus "
                              "WHERE item_id IN ('item-030', 'item-031')").rows())
    assert labels == {"item-030": "zero", "item-031": "two"}
    # Nothing signed it either (the CLI signs only for a listed reviewer): unsigned is the first refusal.
    refused = _rows(home, "SELECT outcome, reason FROM audit_log WHERE action = 'review.decide'")
    assert refused.rows() == [("refused", "unsigned")]
    assert _rows(home, "SELECT escalation_id FROM escalations")["escalation_id"].to_list() == ["esc-item-030-1"]
