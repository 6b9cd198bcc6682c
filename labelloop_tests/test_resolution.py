"""core/resolve.py (stage, resolve, ResolutionPolicy), core/corpus.py and core/ontology.py."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from labelloop_assets.core import anonymize, corpus, ingest, store
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import ResolutionPolicy, resolve, stage
from labelloop_assets.core.settings import DEFAULTS_DIR, Home, LabelloopConfigError
from labelloop_tests.conftest import TRUSTING_DIRECTORY, set_yaml

POLICY = ResolutionPolicy.load(DEFAULTS_DIR / "governance.yaml")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

CORRECTION_SCHEMA = {
    "seq": pl.Int64, "event_id": pl.String, "item_id": pl.String, "corrected_label": pl.String,
    "original_label": pl.String, "user_pseudonym": pl.String, "user_role": pl.String,
    "source": pl.String, "created_at": pl.Datetime("us", "UTC"), "model_version": pl.String,
    "prediction_id": pl.String, "rationale": pl.String,
}
PREDICTION_SCHEMA = {
    "prediction_id": pl.String, "item_id": pl.String, "predicted_label": pl.String,
    "confidence": pl.Float64, "model_version": pl.String,
}


def corrections(*votes: tuple) -> pl.DataFrame:
    """votes: (item_id, label, user, role[, minutes after T0[, extra dict]]); seq in given order."""
    rows = []
    for n, vote in enumerate(votes, start=1):
        item_id, label, user, role = vote[:4]
        minutes = vote[4] if len(vote) > 4 else n
        extra = vote[5] if len(vote) > 5 else {}
        row = {
            "seq": n, "event_id": f"e{n:02d}", "item_id": item_id, "corrected_label": label,
            "original_label": None, "user_pseudonym": f"u_{user}", "user_role": role,
            "source": "annotation", "created_at": T0 + timedelta(minutes=minutes),
            "model_version": None, "prediction_id": None, "rationale": None,
        }
        row.update(extra)
        rows.append(row)
    return pl.DataFrame(rows, schema=CORRECTION_SCHEMA)


def current(**labels: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"item_id": list(labels), "label": list(labels.values())},
        schema={"item_id": pl.String, "label": pl.String},
    )


NO_PREDICTIONS = pl.DataFrame(schema=PREDICTION_SCHEMA)
# Most tests here weigh established contributors (active on many earlier days); the newcomer
# tests below give the history explicitly.
ESTABLISHED = 30


def established(staged: pl.DataFrame, days: int = ESTABLISHED) -> pl.DataFrame:
    return staged.with_columns(history=pl.lit(days, pl.Int64))


def decide(votes: pl.DataFrame, now: pl.DataFrame, policy: ResolutionPolicy = POLICY,
           history: int = ESTABLISHED) -> list[dict]:
    staged = established(stage(votes, NO_PREDICTIONS, now, policy), history)
    return resolve(staged, now, policy).to_dicts()


def one(votes, now, policy=POLICY, history: int = ESTABLISHED) -> dict:
    decisions = decide(votes, now, policy, history)
    assert len(decisions) == 1
    return decisions[0]


# --------------------------------------------------------------------------- policy


def test_default_policy_file():
    assert POLICY.role_weights == {"end_user": 1.0, "annotator": 2.0, "reviewer": 4.0, "domain_expert": 4.0}
    assert (POLICY.min_support, POLICY.min_share) == (2.0, 0.6)


def test_policy_load_custom_file(tmp_path):
    path = tmp_path / "governance.yaml"
    path.write_text(
        "role_weights: {end_user: 0.5, annotator: 3, reviewer: 5, domain_expert: 10}\n"
        "min_support: 3\nmin_share: 0.75\n"
    )
    policy = ResolutionPolicy.load(path)
    assert policy.role_weights["domain_expert"] == 10.0 and policy.role_weights["end_user"] == 0.5
    assert (policy.min_support, policy.min_share) == (3.0, 0.75)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("role_weights: {end_user: 1, annotator: 2, reviewer: 4}\n", "role_weights lacks ['domain_expert']"),
        ("", "role_weights lacks"),
        ("role_weights: {end_user: -1, annotator: 2, reviewer: 4, domain_expert: 4}\n", "must not be negative"),
        ("role_weights: {end_user: 1, annotator: 2, reviewer: 4, domain_expert: 4}\nmin_share: 0.4\n",
         "min_share must be in [0.5, 1]"),
        ("role_weights: {end_user: 1, annotator: 2, reviewer: 4, domain_expert: 4}\nmin_support: 0\n",
         "min_support must be positive"),
        ("role_weights: {end_user: lots, annotator: 2, reviewer: 4, domain_expert: 4}\n", "governance.yaml"),
        ("- just\n- a list\n", "governance.yaml"),
        ("role_weights: [unclosed\n", "is not valid YAML"),
    ],
)
def test_policy_config_errors(tmp_path, text, message):
    path = tmp_path / "governance.yaml"
    path.write_text(text)
    with pytest.raises(LabelloopConfigError) as info:
        ResolutionPolicy.load(path)
    assert message in str(info.value)


def test_policy_file_not_found(tmp_path):
    with pytest.raises(LabelloopConfigError, match="governance file not found"):
        ResolutionPolicy.load(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- stage


def test_stage_joins_predictions_of_the_same_item_and_weighs_roles():
    votes = corrections(
        ("a", "two", "ann", "annotator", 1, {"prediction_id": "p1"}),
        ("a", "two", "eu", "end_user", 2, {"prediction_id": "p-other-item", "model_version": "m-client"}),
        ("b", "two", "rev", "reviewer", 3, {"prediction_id": "p-missing", "model_version": "m-client"}),
        ("b", "two", "ghost", "robot", 4),
    )
    predictions = pl.DataFrame(
        [("p1", "a", "one", 0.9, "m-1"), ("p-other-item", "z", "six", 0.8, "m-2")],
        schema=PREDICTION_SCHEMA, orient="row",
    )
    staged = stage(votes, predictions, current(a="one"), POLICY).sort("event_id")
    assert staged.height == 4
    assert staged.select(
        "event_id", "label_before", "predicted_label", "prediction_confidence", "model_version",
        "prediction_found", "vote_weight",
    ).rows() == [
        ("e01", "one", "one", 0.9, "m-1", True, 2.0),
        # a prediction of another item is not evidence about this one
        ("e02", "one", None, None, "m-client", False, 1.0),
        ("e03", None, None, None, "m-client", False, 4.0),
        # a role outside the policy has no weight
        ("e04", None, None, None, None, False, 0.0),
    ]


# --------------------------------------------------------------------------- resolve


def test_single_end_user_cannot_flip_a_label():
    d = one(corrections(("a", "two", "eu1", "end_user")), current(a="one"))
    assert (d["status"], d["proposed_label"], d["current_label"], d["support"], d["n_contributors"]) == (
        "pending", "two", "one", 1.0, 1
    )


def test_two_end_users_agreeing_promote():
    d = one(corrections(("a", "two", "eu1", "end_user"), ("a", "two", "eu2", "end_user")), current(a="one"))
    assert (d["status"], d["proposed_label"], d["support"], d["total_weight"], d["share"]) == (
        "promote", "two", 2.0, 2.0, 1.0
    )
    assert d["event_ids"] == ["e01", "e02"] and d["n_contributors"] == 2


def test_a_new_annotator_cannot_flip_a_label_alone_but_a_proven_one_can():
    vote = established(stage(corrections(("a", "two", "ann", "annotator")), NO_PREDICTIONS, current(a="one"), POLICY))
    d = one(corrections(("a", "two", "ann", "annotator")), current(a="one"))
    assert (d["status"], d["support"]) == ("pending", 2.0)
    proven = pl.DataFrame({"user_pseudonym": ["u_ann"], "accuracy": [0.95], "n_votes": [40]})
    d = resolve(vote, current(a="one"), POLICY, proven).to_dicts()[0]
    # weight 2.0 x 0.95 / 0.7 (the prior mean): a reliable annotator counts for more
    assert d["status"] == "promote" and d["support"] == pytest.approx(2.0 * 0.95 / 0.7)
    unreliable = proven.with_columns(accuracy=pl.lit(0.5))
    assert resolve(vote, current(a="one"), POLICY, unreliable)["status"][0] == "pending"


def test_newcomers_count_at_the_newcomer_weight_and_never_alone():
    pair = corrections(("a", "two", "eu1", "end_user"), ("a", "two", "eu2", "end_user"))
    d = one(pair, current(a="one"), history=POLICY.newcomer_min_history - 1)
    assert (d["status"], d["support"]) == ("pending", 2 * 1.0 * POLICY.newcomer_weight)
    # Eight fresh end users agreeing reach min_support (8 x 0.25 = 2.0).
    crowd = corrections(*[("a", "two", f"eu{k}", "end_user") for k in range(8)])
    assert one(crowd, current(a="one"), history=0)["status"] == "promote"
    # A newcomer is never trusted alone, whatever their estimated accuracy.
    proven = pl.DataFrame({"user_pseudonym": ["u_ann"], "accuracy": [0.99], "n_votes": [100]})
    vote = stage(corrections(("a", "two", "ann", "annotator")), NO_PREDICTIONS, current(a="one"), POLICY)
    assert resolve(established(vote, 0), current(a="one"), POLICY, proven)["status"][0] == "pending"
    assert resolve(established(vote), current(a="one"), POLICY, proven)["status"][0] == "promote"
    # Without a history column every vote is a newcomer's (resolution fails closed).
    assert resolve(vote, current(a="one"), POLICY, proven)["support"][0] == pytest.approx(
        2.0 * 0.99 / 0.7 * POLICY.newcomer_weight)


def test_reviewers_and_domain_experts_are_exempt_from_newcomer_weights():
    for role in ("reviewer", "domain_expert"):
        d = one(corrections(("a", "two", "new", role)), current(a="one"), history=0)
        assert (d["status"], d["support"]) == ("promote", 4.0)


def test_newcomer_settings_are_read_from_the_governance_file(tmp_path):
    path = tmp_path / "governance.yaml"
    shutil.copyfile(DEFAULTS_DIR / "governance.yaml", path)
    set_yaml(path, {"newcomers": {"min_history": 5, "weight": 0.5,
                                  "exempt_roles": ["annotator", "reviewer", "domain_expert"]}})
    policy = ResolutionPolicy.load(path)
    assert (policy.newcomer_min_history, policy.newcomer_weight) == (5, 0.5)
    d = one(corrections(("a", "two", "ann", "annotator")), current(a="one"), policy, history=0)
    assert d["support"] == 2.0  # exempt here: full weight (still not trusted alone: no record)
    pair = corrections(("a", "two", "eu1", "end_user"), ("a", "two", "eu2", "end_user"))
    assert one(pair, current(a="one"), policy, history=4)["support"] == 1.0


def test_a_reviewer_alone_may_flip_a_label():
    d = one(corrections(("a", "two", "rev", "reviewer")), current(a="one"))
    assert (d["status"], d["support"]) == ("promote", 4.0)


def test_only_a_reviewer_or_domain_expert_changes_a_reviewer_confirmed_label():
    protected = current(a="one").with_columns(reviewer_confirmed=pl.lit(True))
    crowd = established(stage(corrections(*[("a", "two", f"eu{k}", "end_user") for k in range(5)]),
                              NO_PREDICTIONS, protected, POLICY))
    d = resolve(crowd, protected, POLICY).to_dicts()[0]
    assert (d["status"], d["escalation_reason"]) == ("escalate", "contradicts_confirmed")
    expert = stage(corrections(("a", "two", "exp", "domain_expert")), NO_PREDICTIONS, protected, POLICY)
    assert resolve(expert, protected, POLICY)["status"][0] == "promote"


def test_a_contributors_latest_vote_counts_once():
    repeated = corrections(*[("a", "two", "eu1", "end_user")] * 3)
    d = one(repeated, current(a="one"))
    assert (d["status"], d["support"], d["n_contributors"], d["event_ids"]) == ("pending", 1.0, 1, ["e03"])

    changed_mind = corrections(("a", "two", "rev", "reviewer"), ("a", "three", "rev", "reviewer"))
    d = one(changed_mind, current(a="one"))
    assert (d["status"], d["proposed_label"], d["support"], d["total_weight"], d["event_ids"]) == (
        "promote", "three", 4.0, 4.0, ["e02"]
    )


def test_latest_means_created_last_not_arrived_last():
    # e02 arrives later (higher seq) but was made earlier: e01 stays the annotator's vote.
    votes = corrections(("a", "three", "ann", "annotator", 10), ("a", "two", "ann", "annotator", 5))
    d = one(votes, current(a="one"))
    assert (d["proposed_label"], d["event_ids"]) == ("three", ["e01"])


def test_enough_support_but_low_share_is_a_conflict():
    votes = corrections(
        ("a", "two", "rev", "reviewer"), ("a", "three", "ann1", "annotator"), ("a", "four", "ann2", "annotator")
    )
    d = one(votes, current(a="one"))
    assert (d["status"], d["proposed_label"], d["support"], d["total_weight"], d["share"]) == (
        "escalate", "two", 4.0, 8.0, 0.5
    )


def test_enough_share_without_enough_support_is_pending_not_conflict():
    d = one(corrections(("a", "two", "eu", "end_user")), current(a="one"),
            ResolutionPolicy(role_weights=POLICY.role_weights, min_support=2.0, min_share=0.5))
    assert d["status"] == "pending"


@pytest.mark.parametrize(
    "votes",
    [
        [("a", "one", "ann", "annotator")],
        [("a", "one", "eu1", "end_user"), ("a", "one", "eu2", "end_user")],
        [("a", "one", "rev", "reviewer"), ("a", "two", "eu", "end_user")],  # 4 of 5
    ],
)
def test_votes_for_the_current_label_confirm_it(votes):
    d = one(corrections(*votes), current(a="one"))
    assert (d["status"], d["proposed_label"], d["current_label"]) == ("confirmed", "one", "one")


def test_a_single_end_user_agreeing_with_the_current_label_is_not_enough():
    assert one(corrections(("a", "one", "eu", "end_user")), current(a="one"))["status"] == "pending"


@pytest.mark.parametrize("min_share", [0.5, 0.6])
@pytest.mark.parametrize(
    "votes",
    [
        [("a", "two", "ann1", "annotator"), ("a", "three", "ann2", "annotator")],
        [("a", "three", "ann1", "annotator"), ("a", "two", "ann2", "annotator")],
        [("a", "two", "r1", "reviewer"), ("a", "three", "r2", "domain_expert"), ("a", "four", "a1", "annotator")],
    ],
)
def test_ties_are_never_promoted(votes, min_share):
    policy = ResolutionPolicy(role_weights=POLICY.role_weights, min_support=2.0, min_share=min_share)
    d = one(corrections(*votes), current(a="one"), policy)
    assert d["status"] == "escalate"
    assert d["proposed_label"] in {"two", "three"}


def test_tie_with_the_current_label_does_not_depend_on_label_names():
    votes = corrections(
        ("a", "one", "ann1", "annotator"), ("a", "two", "ann2", "annotator"),
        ("b", "one", "ann1", "annotator"), ("b", "two", "ann2", "annotator"),
    )
    decisions = decide(votes, current(a="one", b="two"))
    assert [d["status"] for d in decisions] == ["escalate", "escalate"]


def test_item_outside_the_corpus_is_promoted_with_no_current_label():
    d = one(corrections(("new", "four", "rev", "reviewer")), current())
    assert (d["status"], d["current_label"], d["proposed_label"]) == ("promote", None, "four")


def test_one_decision_per_item_sorted_with_rationales():
    votes = corrections(
        ("b", "two", "ann", "annotator", 1, {"rationale": "curly tail"}),
        ("a", "six", "eu1", "end_user", 2, {"rationale": "closed loop"}),
        ("a", "six", "eu2", "end_user", 3, {"rationale": "x" * 300}),
        ("c", "two", "eu1", "end_user", 4),
    )
    decisions = decide(votes, current(a="zero", b="two", c="two"))
    assert [(d["item_id"], d["status"]) for d in decisions] == [
        ("a", "promote"), ("b", "confirmed"), ("c", "pending")
    ]
    assert sorted(decisions[0]["rationale"].split(" | ")) == ["closed loop", "x" * 200]
    assert decisions[1]["rationale"] == "curly tail"
    assert decisions[2]["rationale"] is None


def test_rationale_of_a_decision_is_reproducible():
    votes = corrections(
        ("a", "six", "eu1", "end_user", 1, {"rationale": "closed loop"}),
        ("a", "six", "eu2", "end_user", 2, {"rationale": "no tail"}),
    )
    seen = {decide(votes, current(a="zero"))[0]["rationale"] for _ in range(40)}
    assert len(seen) == 1


def test_zero_weight_votes_never_promote():
    d = one(corrections(*[("a", "two", f"bot{n}", "robot") for n in range(5)]), current(a="one"))
    assert (d["status"], d["support"], d["share"], d["n_contributors"]) == ("pending", 0.0, 0.0, 5)


# --------------------------------------------------------------------------- corpus

DECISION_SCHEMA = {
    "decision_id": pl.Int64, "item_id": pl.String, "proposed_label": pl.String, "status": pl.String,
    "event_ids": pl.List(pl.String), "rationale": pl.String, "support": pl.Float64,
    "share": pl.Float64, "n_contributors": pl.Int32,
}
CURRENT_SCHEMA = {
    "item_id": pl.String, "label": pl.String, "human_confirmed": pl.Boolean,
    "label_source": pl.String, "since_version": pl.Int32,
}
NEW_ITEM_SCHEMA = {"item_id": pl.String, "initial_label": pl.String, "label_source": pl.String}


def decisions(*rows: tuple) -> pl.DataFrame:
    """rows: (decision_id, item_id, proposed_label, status)."""
    return pl.DataFrame(
        [
            {"decision_id": d, "item_id": i, "proposed_label": label, "status": status,
             "event_ids": [f"ev-{d}"], "rationale": f"why {d}", "support": 2.0, "share": 1.0,
             "n_contributors": 2}
            for d, i, label, status in rows
        ],
        schema=DECISION_SCHEMA,
    )


def corpus_now(*rows: tuple) -> pl.DataFrame:
    """rows: (item_id, label, human_confirmed, label_source, since_version)."""
    return pl.DataFrame(list(rows), schema=CURRENT_SCHEMA, orient="row")


def new_items(*rows: tuple) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=NEW_ITEM_SCHEMA, orient="row")


def history(changes: pl.DataFrame) -> list[tuple]:
    """History rows, ordered by item (plan_changes does not promise an order across items)."""
    return changes.sort("item_id", maintain_order=True).select(
        "item_id", "change_kind", "previous_label", "label", "label_source", "approved_by", "corpus_version"
    ).rows()


def test_new_items_get_initial_rows():
    changes = corpus.plan_changes(
        new_items(("n1", "three", "vendor"), ("n2", "five", None), ("n3", None, "vendor")),
        decisions(), corpus_now(), 1,
    )
    assert history(changes) == [
        ("n1", "initial", None, "three", "vendor", "import:vendor", 1),
        ("n2", "initial", None, "five", "unknown", "import:unknown", 1),
    ]
    rows = corpus.corpus_rows(changes, corpus_now(), 1)
    assert rows.drop("reviewer_confirmed").rows() == [
        ("n1", "three", "vendor", False, 1, 1), ("n2", "five", "unknown", False, 1, 1)
    ]


def test_decisions_become_corrections_and_confirmations():
    now = corpus_now(
        ("a", "one", False, "vendor", 1),  # promote to two -> correction
        ("b", "two", False, "vendor", 1),  # confirmed -> confirmation
        ("c", "three", False, "vendor", 2),  # promote of the same label -> confirmation
        ("d", "four", True, "correction", 3),  # already human-confirmed -> nothing
        ("e", "five", False, "vendor", 1),  # pending -> nothing
        ("f", "six", False, "vendor", 1),  # conflict -> nothing
    )
    plan = decisions(
        (1, "a", "two", "promote"), (2, "b", "two", "confirmed"), (3, "c", "three", "promote"),
        (4, "d", "four", "confirmed"), (5, "e", "zero", "pending"), (6, "f", "zero", "escalate"),
        (7, "g", "seven", "promote"),  # not in the corpus yet, no initial label -> enters corrected
    )
    changes = corpus.plan_changes(new_items(), plan, now, 4)
    assert history(changes) == [
        ("a", "correction", "one", "two", "correction", corpus.RULE_APPROVER, 4),
        ("b", "confirmation", "two", "two", "correction", corpus.RULE_APPROVER, 4),
        ("c", "confirmation", "three", "three", "correction", corpus.RULE_APPROVER, 4),
        ("g", "correction", None, "seven", "correction", corpus.RULE_APPROVER, 4),
    ]
    first = changes.filter(pl.col("item_id") == "a").row(0, named=True)
    assert (first["decision_id"], first["event_ids"], first["rationale"], first["support"]) == (
        1, ["ev-1"], "why 1", 2.0
    )
    rows = {r["item_id"]: r for r in corpus.corpus_rows(changes, now, 4).to_dicts()}
    assert set(rows) == {"a", "b", "c", "g"}
    # a changed label restarts since_version; a confirmation keeps it and the label's source
    assert rows["a"] == {"item_id": "a", "label": "two", "label_source": "correction",
                        "human_confirmed": True, "reviewer_confirmed": False,
                        "since_version": 4, "updated_version": 4}
    assert (rows["b"]["since_version"], rows["b"]["label_source"], rows["b"]["human_confirmed"]) == (1, "vendor", True)
    assert (rows["c"]["since_version"], rows["c"]["label_source"]) == (2, "vendor")
    assert (rows["g"]["since_version"], rows["g"]["label"]) == (4, "seven")
    assert {r["updated_version"] for r in rows.values()} == {4}


def test_latest_decision_per_item_wins():
    now = corpus_now(("a", "one", False, "vendor", 1), ("b", "one", False, "vendor", 1))
    plan = decisions(
        (3, "a", "nine", "pending"), (1, "a", "two", "promote"),
        (2, "b", "two", "pending"), (4, "b", "three", "promote"),
    )
    changes = corpus.plan_changes(new_items(), plan, now, 2)
    assert history(changes) == [("b", "correction", "one", "three", "correction", corpus.RULE_APPROVER, 2)]


def test_item_arriving_and_corrected_in_the_same_batch_gets_both_rows():
    changes = corpus.plan_changes(
        new_items(("n1", "three", "vendor")), decisions((1, "n1", "eight", "promote")), corpus_now(), 5
    )
    assert [(r[1], r[2], r[3]) for r in history(changes)] == [
        ("initial", None, "three"), ("correction", "three", "eight")
    ]
    assert corpus.corpus_rows(changes, corpus_now(), 5).drop("reviewer_confirmed").rows() == [
        ("n1", "eight", "correction", True, 5, 5)
    ]


def test_no_decisions_and_no_items_plan_nothing():
    assert corpus.plan_changes(new_items(), decisions(), corpus_now(), 1).height == 0


def test_corpus_rows_keeps_since_version_when_the_label_is_unchanged():
    now = corpus_now(("a", "one", False, "model", 2), ("b", "one", False, "model", 2))
    plan = decisions((1, "a", "one", "confirmed"), (2, "b", "two", "promote"))
    changes = corpus.plan_changes(new_items(), plan, now, 7)
    rows = corpus.corpus_rows(changes, now, 7)
    assert rows.sort("item_id").drop("reviewer_confirmed").rows() == [
        ("a", "one", "model", True, 2, 7),
        ("b", "two", "correction", True, 7, 7),
    ]
    assert rows.schema["since_version"] == pl.Int32 and rows.schema["updated_version"] == pl.Int32


def test_same_batch_confirmation_keeps_the_import_label_source():
    changes = corpus.plan_changes(
        new_items(("n1", "three", "vendor")), decisions((1, "n1", "three", "promote")), corpus_now(), 1
    )
    assert [r[1] for r in history(changes)] == ["initial", "confirmation"]
    assert corpus.corpus_rows(changes, corpus_now(), 1).drop("reviewer_confirmed").rows() == [
        ("n1", "three", "vendor", True, 1, 1)
    ]


# --------------------------------------------------------------------------- through DuckDB


def test_ingested_corrections_resolve_into_a_corpus_version(tmp_path: Path):
    """Core modules chained over a real DuckDB file: ingest -> stage -> resolve -> plan."""
    home = Home(tmp_path / "home").ensure()
    # Files landed directly in landing/corrections/ may assert the roles below (carol, annotator).
    home.contributors_file.write_text(TRUSTING_DIRECTORY)
    ontology = Ontology.load(home.ontology_file)
    key = b"k"
    (home.landing_dir("items") / "i.jsonl").write_text("".join(
        json.dumps({"item_id": f"i{n}", "features": [1, 2], "initial_label": "one", "label_source": "vendor"}) + "\n"
        for n in range(3)
    ))
    events = [
        ("e1", "i0", "2", "alice", "end_user"), ("e2", "i0", "two", "bob", "end_user"),
        ("e3", "i1", "two", "alice", "end_user"), ("e4", "i2", "1", "carol", "annotator"),
    ]
    (home.landing_dir("corrections") / "c.jsonl").write_text("".join(
        json.dumps({"event_id": e, "item_id": i, "corrected_label": label, "user_id": u, "user_role": r,
                    "source": "feedback_button", "consent": True,
                    "created_at": f"2024-05-01T12:0{n}:00Z"}) + "\n"
        for n, (e, i, label, u, r) in enumerate(events)
    ))
    with store.connect(home.database) as con:
        ingest.ingest_items(con, home, ontology, "r")
        ingest.ingest_corrections(con, home, ontology, key, "r")
        items = store.frame(con, "SELECT item_id, initial_label, label_source FROM items ORDER BY seq")
        raw = store.frame(con, "SELECT * FROM raw_corrections ORDER BY seq")
    empty_corpus = corpus_now()
    changes0 = corpus.plan_changes(items, decisions(), empty_corpus, 1)
    corpus_v1 = corpus.corpus_rows(changes0, empty_corpus, 1)
    now = corpus_v1.select("item_id", "label")
    staged = stage(raw, NO_PREDICTIONS, now, POLICY)
    assert staged.sort("seq")["user_pseudonym"].to_list()[:2] == [
        anonymize.pseudonym(key, "alice"), anonymize.pseudonym(key, "bob")
    ]
    result = resolve(established(staged), now, POLICY)
    assert result.select("item_id", "proposed_label", "status").rows() == [
        ("i0", "two", "promote"), ("i1", "two", "pending"), ("i2", "one", "confirmed")
    ]
    plan = result.with_row_index("decision_id", offset=1).with_columns(pl.col("decision_id").cast(pl.Int64))
    changes = corpus.plan_changes(items.clear(), plan, corpus_v1, 2)
    rows = corpus.corpus_rows(changes, corpus_v1, 2).sort("item_id")
    assert rows.drop("reviewer_confirmed").rows() == [
        ("i0", "two", "correction", True, 2, 2), ("i2", "one", "vendor", True, 1, 2)
    ]


# --------------------------------------------------------------------------- ontology


def harmonized(ontology: Ontology, values: list) -> list:
    return pl.DataFrame({"x": values}, schema={"x": pl.String}).select(ontology.harmonize("x"))["x"].to_list()


def test_default_ontology_renames():
    ontology = Ontology.load(DEFAULTS_DIR / "ontology.yaml")
    assert ontology.labels == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert harmonized(ontology, ["nought", "naught", "3", " 7 ", "zero", "Zero", "seventeen", None, ""]) == [
        "zero", "zero", "three", "seven", "zero", None, None, None, None
    ]


def test_chained_renames_resolve_to_the_end():
    ontology = Ontology(labels=("cat", "dog"), renames={"kitty": "kitten", "kitten": "cat", "pup": "dog"})
    assert ontology.resolve_term("kitty") == "cat"
    assert ontology.resolve_term("cat") == "cat"
    assert ontology.rename_map == {"kitty": "cat", "kitten": "cat", "pup": "dog"}
    assert harmonized(ontology, ["kitty", "kitten", "pup", "cat", "bird"]) == ["cat", "cat", "dog", "cat", None]


@pytest.mark.parametrize(
    ("labels", "renames", "message"),
    [
        (("a", "b"), {"x": "y", "y": "x"}, "renames form a cycle through"),
        (("a",), {"x": "x"}, "renames form a cycle through 'x'"),
        (("a", "b"), {"x": "nowhere"}, "rename 'x' -> 'nowhere' does not end at a current label"),
        (("a", "b"), {"x": "y", "y": "z"}, "rename 'x' -> 'y' does not end at a current label"),
        (("a", "b", "a"), {}, "`labels` contains duplicates"),
        ((), {}, "must list at least one label"),
        (("a", "b"), {"a": "b"}, "rename source 'a' is still a current label"),
    ],
)
def test_ontology_config_errors(labels, renames, message):
    with pytest.raises(LabelloopConfigError) as info:
        Ontology(labels=labels, renames=renames)
    assert message in str(info.value)
    assert str(info.value).startswith("ontology:")


def test_ontology_load_from_yaml_stringifies_numbers(tmp_path):
    path = tmp_path / "ontology.yaml"
    path.write_text("labels: [0, 1]\nrenames:\n  zero: 0\n  '01': zero\n")
    ontology = Ontology.load(path)
    assert ontology.labels == ("0", "1")
    assert ontology.rename_map == {"zero": "0", "01": "0"}
    # YAML's yes/null are not label names: refused instead of becoming "True" or "None".
    path.write_text("labels: [0, yes, null]\n")
    with pytest.raises(LabelloopConfigError, match="non-empty name"):
        Ontology.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("labels: [a, b\n", "is not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("labels: a\n", "`labels` must be a list and `renames` a mapping"),
        ("labels: [a]\nrenames: [x, a]\n", "`labels` must be a list and `renames` a mapping"),
        ("", "must list at least one label"),
        ("labels: [a, a]\n", "contains duplicates"),
    ],
)
def test_ontology_load_errors(tmp_path, text, message):
    path = tmp_path / "ontology.yaml"
    path.write_text(text)
    with pytest.raises(LabelloopConfigError) as info:
        Ontology.load(path)
    assert message in str(info.value)


def test_ontology_file_not_found(tmp_path):
    with pytest.raises(LabelloopConfigError, match="ontology file not found"):
        Ontology.load(tmp_path / "nope.yaml")
