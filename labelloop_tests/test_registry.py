"""State changes of the corpus and the model registry (core/registry.py): publishing a corpus
version, promoting or rejecting a challenger, rolling back to a retired champion.

Each leaves the registry and the audit log exactly as the assets and the CLI always have, and
happens whole or not at all: a change that fails midway (here: another writer holds a row the
change must update, so DuckDB refuses the update after the first writes of the transaction)
leaves no trace, not even its audit row.
"""

from __future__ import annotations

import json

import duckdb
import polars as pl
import pytest

from labelloop_assets.core import corpus, registry, store
from labelloop_assets.core.audit import record_audit, record_audit_rows

AUDIT_SQL = "SELECT actor, actor_role, action, target, outcome, reason, detail, run_id FROM audit_log"
MODEL = {
    "corpus_version": 1, "n_train_rows": 40, "n_classes": 2, "algorithm": "softmax", "params": "{}",
    "train_data_hash": "h", "gold_accuracy": 0.5, "gold_macro_f1": 0.5, "n_gold": 10,
    "label_changes_total": 0,
}
SCORES = {
    "challenger": {"accuracy": 0.9, "macro_f1": 0.85, "n": 12},
    "champion": {"accuracy": 0.6, "macro_f1": 0.55, "n": 12},
}


@pytest.fixture
def con(home):
    with store.connect(home.database) as con:
        yield con


def _register(con, **statuses: str) -> None:
    """Models by version and status; the champion's confirm threshold is 0.3, others have none."""
    store.append(con, "models", pl.DataFrame([
        {**MODEL, "model_version": version, "path": f"models/{version}", "status": status,
         "confirm_below": 0.3 if status == "champion" else None}
        for version, status in statuses.items()
    ], schema_overrides={"confirm_below": pl.Float64}))


def _registry(con) -> dict:
    return {version: (status, confirm_below, n_gold) for version, status, confirm_below, n_gold in store.frame(
        con, "SELECT model_version, status, confirm_below, n_gold FROM models ORDER BY model_version").rows()}


def _audit(con) -> list[tuple]:
    return store.frame(con, AUDIT_SQL + " ORDER BY logged_at, action").rows()


def _judged(decision: str, champion: str | None = "m0001", **changes) -> registry.Evaluation:
    return registry.Evaluation(**{
        "challenger": "m0002", "champion": champion, "decision": decision,
        "reasons": ["macro F1 0.85 against 0.55", "no class worse"], "plan": {"min_eval_items": 10},
        "scores": SCORES if champion else {"challenger": SCORES["challenger"]}, "slice_scores": None,
        "confirm_below": 0.42 if decision == "promote" else None, "evaluation_set": None, "run_id": "run-7",
        "policies": (), **changes,
    })


def _holding(con, sql: str):
    """Another writer's open transaction, with `sql` done and not committed."""
    other = con.cursor()
    other.execute("BEGIN TRANSACTION")
    other.execute(sql)
    return other


# --------------------------------------------------------------------------- promotion and rejection


def test_a_promotion_crowns_the_challenger_records_the_evaluation_and_audits_it(con):
    _register(con, m0001="champion", m0002="challenger")
    assert registry.record_evaluation(con, _judged("promote")) is True
    # The champion retires with its threshold; the challenger serves with the one measured now;
    # both carry their scores on today's evaluation set.
    assert _registry(con) == {"m0001": ("retired", 0.3, 12), "m0002": ("champion", 0.42, 12)}
    evaluation = store.frame(con, "SELECT evaluation_id, challenger, champion, decision, reasons, n_eval, "
                                  "confirm_below, challenger_scores, run_id FROM model_evaluations").rows()
    assert evaluation == [(1, "m0002", "m0001", "promote", ["macro F1 0.85 against 0.55", "no class worse"],
                           12, 0.42, json.dumps(SCORES["challenger"]), "run-7")]
    assert _audit(con) == [(
        "labelloop", None, "model.promote", "m0002", "promoted", "macro F1 0.85 against 0.55; no class worse",
        json.dumps({"champion": "m0001", "evaluation_set": None}), "run-7",
    )]


def test_a_first_model_is_promoted_without_a_champion(con):
    _register(con, m0002="challenger")
    assert registry.record_evaluation(con, _judged("promote", champion=None)) is True
    assert _registry(con) == {"m0002": ("champion", 0.42, 12)}
    assert [row[2:5] for row in _audit(con)] == [("model.promote", "m0002", "promoted")]


def test_a_rejection_leaves_the_champion_serving(con):
    _register(con, m0001="champion", m0002="challenger")
    assert registry.record_evaluation(con, _judged("reject")) is True
    assert _registry(con) == {"m0001": ("champion", 0.3, 12), "m0002": ("rejected", None, 12)}
    assert store.scalar(con, "SELECT decision FROM model_evaluations") == "reject"
    assert [row[2:5] for row in _audit(con)] == [("model.reject", "m0002", "rejected")]


def test_a_judgement_overtaken_by_another_run_records_nothing(con):
    # Judged against no champion, but meanwhile m0001 became one.
    _register(con, m0001="champion", m0002="challenger")
    assert registry.record_evaluation(con, _judged("promote", champion=None)) is False
    assert _registry(con) == {"m0001": ("champion", 0.3, 10), "m0002": ("challenger", None, 10)}
    assert store.scalar(con, "SELECT count(*) FROM model_evaluations") == 0 and _audit(con) == []


def test_a_judgement_on_a_superseded_evaluation_set_records_nothing(con):
    _register(con, m0001="champion", m0002="challenger")
    store.append(con, "evaluation_sets", pl.DataFrame([{"evaluation_set": 1, "sha256": "s", "n_items": 12,
                                                        "n_added": 12}]))
    with pytest.raises(registry.EvaluationSetChanged):
        registry.record_evaluation(con, _judged("promote"))
    assert _registry(con) == {"m0001": ("champion", 0.3, 10), "m0002": ("challenger", None, 10)}
    assert store.scalar(con, "SELECT count(*) FROM model_evaluations") == 0 and _audit(con) == []


def test_a_promotion_that_fails_midway_leaves_nothing_half_done(con):
    _register(con, m0001="champion", m0002="challenger")
    # The evaluation row, the policies and the rescoring are written; retiring the champion then fails.
    other = _holding(con, "UPDATE models SET status = 'on hold' WHERE model_version = 'm0001'")
    try:
        with pytest.raises(duckdb.TransactionException):
            registry.record_evaluation(con, _judged("promote"))
    finally:
        other.execute("ROLLBACK")
    assert _registry(con) == {"m0001": ("champion", 0.3, 10), "m0002": ("challenger", None, 10)}
    assert store.scalar(con, "SELECT count(*) FROM model_evaluations") == 0 and _audit(con) == []
    # The same judgement goes through once the other writer is gone.
    assert registry.record_evaluation(con, _judged("promote")) is True
    assert _registry(con)["m0002"] == ("champion", 0.42, 12)


# --------------------------------------------------------------------------- rollback


def _rollback(version: str, refusal: str | None = None) -> registry.Rollback:
    return registry.Rollback(
        version=version, actor="pseudonym-of-reviewer", role="reviewer", author="reviewer-0",
        rationale="m0002 confuses ones; ask reviewer-0 at reviewer0@example.org",
        detail={"rollback_id": "rb-1", "decided_at": "2026-01-02T03:04:05+00:00", "key_id": "k", "signature": "s"},
        refusal=refusal,
    )


def test_a_rollback_restores_a_retired_champion_with_its_own_threshold_and_audits_it(con):
    _register(con, m0001="retired", m0002="champion")
    con.execute("UPDATE models SET confirm_below = 0.25 WHERE model_version = 'm0001'")
    seen = []

    def has_files(model: dict) -> bool:
        seen.append(model["path"])
        return True

    outcome = registry.rollback(con, _rollback("m0001"), has_files)
    assert (outcome.problem, outcome.previous_champion, outcome.target["model_version"]) == (None, "m0002", "m0001")
    assert seen == ["models/m0001"]
    assert _registry(con) == {"m0001": ("champion", 0.25, 10), "m0002": ("retired", 0.3, 10)}
    [row] = _audit(con)
    assert row[:5] == ("pseudonym-of-reviewer", "reviewer", "model.rollback", "m0001", "rolled_back")
    # The rationale is kept scrubbed: neither the author's id nor an address reaches the log.
    assert row[5].startswith("m0002 confuses ones; ask ") and "reviewer-0" not in row[5]
    assert "reviewer0@example.org" not in row[5]
    assert json.loads(row[6]) == {"from": "m0002", "rollback_id": "rb-1", "decided_at": "2026-01-02T03:04:05+00:00",
                                  "key_id": "k", "signature": "s"}
    assert row[7] is None


@pytest.mark.parametrize("version, refusal, has_files, problem", [
    ("m0042", None, True, "no model 'm0042' (labelloop model list)"),
    ("m0002", None, True, "m0002 is already the champion"),
    ("m0003", None, True, "m0003 is rejected: only a retired champion can be restored"),
    ("m0001", None, False, "the files of m0001 are missing"),
    # What the caller refused before reading the registry is audited as it says.
    ("m0001", "a rationale is required (--rationale)", True, "a rationale is required (--rationale)"),
])
def test_a_refused_rollback_changes_nothing_and_is_audited_with_its_reason(con, version, refusal, has_files, problem):
    _register(con, m0001="retired", m0002="champion", m0003="rejected")
    before = _registry(con)
    outcome = registry.rollback(con, _rollback(version, refusal), lambda model: has_files)
    assert outcome.problem == problem
    assert _registry(con) == before
    assert _audit(con) == [("pseudonym-of-reviewer", "reviewer", "model.rollback", version, "refused", problem,
                            json.dumps({"from": "m0002", **_rollback(version).detail}), None)]


def test_a_rollback_that_fails_midway_leaves_no_audit_row_and_no_change(con):
    _register(con, m0001="retired", m0002="champion")
    # The audit row is written; retiring the champion then fails.
    other = _holding(con, "UPDATE models SET status = 'on hold' WHERE model_version = 'm0002'")
    try:
        with pytest.raises(duckdb.TransactionException):
            registry.rollback(con, _rollback("m0001"), lambda model: True)
    finally:
        other.execute("ROLLBACK")
    assert _registry(con) == {"m0001": ("retired", None, 10), "m0002": ("champion", 0.3, 10)}
    assert _audit(con) == []


# --------------------------------------------------------------------------- the corpus


def _version_one(con) -> registry.CorpusVersion:
    new_items = pl.DataFrame({"seq": [1, 2, 3], "item_id": ["a", "b", "c"],
                              "initial_label": ["cat", "dog", "cat"], "label_source": ["import"] * 3})
    current = store.lookup(con, "production_corpus", "item_id", new_items.select("item_id"),
                           "t.label, t.human_confirmed, t.reviewer_confirmed, t.label_source, t.since_version")
    decisions = store.frame(con, "SELECT * FROM label_decisions WHERE false")
    changes = corpus.plan_changes(new_items, decisions, current, 1)
    return registry.CorpusVersion(1, changes, corpus.corpus_rows(changes, current, 1), 0, 0, "run-3")


def _corpus(con) -> dict:
    return {
        "corpus": store.frame(
            con, "SELECT item_id, label, since_version FROM production_corpus ORDER BY item_id"
        ).rows(),
        "history": store.scalar(con, "SELECT count(*) FROM label_history"),
        "versions": store.frame(con, "SELECT corpus_version, n_new_items, n_label_changes, n_confirmations, "
                                     "n_items, label_changes_total, run_id FROM corpus_versions").rows(),
        "mark": store.get_state(con, "production_corpus.items_seq"),
    }


def test_publishing_a_version_writes_history_corpus_version_row_audit_and_watermark(con):
    registry.publish_corpus_version(con, _version_one(con), {"production_corpus.items_seq": 3})
    assert _corpus(con) == {
        "corpus": [("a", "cat", 1), ("b", "dog", 1), ("c", "cat", 1)],
        "history": 3,
        "versions": [(1, 3, 0, 0, 3, 0, "run-3")],
        "mark": 3,
    }
    assert _audit(con) == [("labelloop", None, "corpus.publish", "v1", "published", None, '{"initial": 3}', "run-3")]


def test_a_version_without_changes_publishes_nothing_but_moves_the_watermarks(con):
    empty = _version_one(con)
    empty = registry.CorpusVersion(1, empty.changes.clear(), empty.rows.clear(), 0, 0, "run-3")
    registry.publish_corpus_version(con, empty, {"production_corpus.items_seq": 3})
    assert _corpus(con) == {"corpus": [], "history": 0, "versions": [], "mark": 3}
    assert _audit(con) == []


def test_a_publication_that_fails_midway_leaves_nothing_half_done(con):
    store.set_state(con, "production_corpus.items_seq", 0)
    # History, corpus rows, the version row and the audit row are written; the watermark then fails.
    other = _holding(con, "UPDATE pipeline_state SET value = 1 WHERE name = 'production_corpus.items_seq'")
    try:
        with pytest.raises(duckdb.TransactionException):
            registry.publish_corpus_version(con, _version_one(con), {"production_corpus.items_seq": 3})
    finally:
        other.execute("ROLLBACK")
    assert _corpus(con) == {"corpus": [], "history": 0, "versions": [], "mark": 0}
    assert _audit(con) == []


# --------------------------------------------------------------------------- the audit helpers


def test_the_audit_helpers_write_every_column_they_are_given_and_refuse_others(con):
    record_audit(con, "p-1", "model.rollback", "m0001", "refused", "why", "{}", "run-1", role="reviewer")
    record_audit_rows(con, pl.DataFrame({"actor": ["labelloop"], "action": ["burst.hold"], "target": ["b-1"],
                                         "outcome": ["held"]}))
    assert sorted(_audit(con), key=str) == sorted([
        ("p-1", "reviewer", "model.rollback", "m0001", "refused", "why", "{}", "run-1"),
        ("labelloop", None, "burst.hold", "b-1", "held", None, None, None),
    ], key=str)
    with pytest.raises(ValueError, match="not audit_log columns: who"):
        record_audit_rows(con, pl.DataFrame({"who": ["x"], "action": ["a"], "outcome": ["o"]}))
    assert len(_audit(con)) == 2
