"""State changes of the corpus and the model registry: publishing a corpus version, promoting or
rejecting a challenger, rolling back to an earlier champion.

Each change runs in one transaction with its audit row: a failure anywhere inside leaves the
corpus, the registry and the audit log as they were. Deciding *what* to change (resolution,
scoring, who may roll back) is the callers'; this module only makes the change happen whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from labelloop_assets.core import corpus, gold, lake, store
from labelloop_assets.core.audit import SYSTEM_ACTOR, record_audit
from labelloop_assets.core.evaluation import PROMOTE
from labelloop_assets.core.settings import quoted

# The policy files a corpus version's own decisions (renames, dropped terms) follow.
CORPUS_POLICIES = ("ontology.yaml",)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class CorpusVersion:
    """A corpus version to publish: its history rows (`changes`), the corpus rows they leave
    (`rows`), and the label changes it adds to the running total."""

    version: int
    changes: pl.DataFrame
    rows: pl.DataFrame
    n_label_changes: int
    label_changes_before: int
    run_id: str


def publish_corpus_version(
    con: Any, published: CorpusVersion, applied_marks: dict[str, int] | None = None
) -> None:
    """Publish a version (history, corpus rows, corpus_versions row, audit row) and move the
    watermarks of what it applied, in one transaction. A version without changes publishes
    nothing; its watermarks still move, since what they mark is applied (it changed nothing)."""
    changes, version, run_id = published.changes, published.version, published.run_id
    with store.transaction(con):
        if changes.height:
            lake.name_commit(con, lake.CORPUS_COMMIT.format(version=version))
            store.record_policies(con, run_id, "production_corpus", CORPUS_POLICIES)
            store.append(con, "label_history", changes.with_columns(run_id=pl.lit(run_id)))
            _merge_corpus(con, published.rows)
            con.execute(
                "INSERT INTO corpus_versions (corpus_version, n_new_items, n_label_changes, "
                "n_confirmations, n_items, label_changes_total, run_id) "
                "SELECT ?, ?, ?, ?, (SELECT count(*) FROM production_corpus), ?, ?",
                [
                    version,
                    changes.filter(pl.col("change_kind") == corpus.INITIAL).height,
                    published.n_label_changes,
                    changes.filter(pl.col("change_kind") == corpus.CONFIRMATION).height,
                    published.label_changes_before + published.n_label_changes,
                    run_id,
                ],
            )
            kinds = dict(changes.group_by("change_kind").len().iter_rows())
            record_audit(con, SYSTEM_ACTOR, "corpus.publish", f"v{version}", "published",
                         detail=json.dumps(kinds, sort_keys=True), run_id=run_id)
        for name, mark in (applied_marks or {}).items():
            store.set_state(con, name, mark)


def _merge_corpus(con: Any, rows: pl.DataFrame) -> None:
    """Upsert the touched items only: O(changes), whatever the corpus size."""
    con.register("corpus_rows", rows)
    try:
        con.execute(
            """
            MERGE INTO production_corpus t USING corpus_rows s ON t.item_id = s.item_id
            WHEN MATCHED THEN UPDATE SET
                label = s.label, label_source = s.label_source,
                human_confirmed = s.human_confirmed, reviewer_confirmed = s.reviewer_confirmed,
                since_version = s.since_version, updated_version = s.updated_version,
                updated_at = now()
            WHEN NOT MATCHED THEN INSERT (item_id, label, label_source, human_confirmed,
                reviewer_confirmed, since_version, updated_version)
            VALUES (s.item_id, s.label, s.label_source, s.human_confirmed, s.reviewer_confirmed,
                    s.since_version, s.updated_version)
            """
        )
    finally:
        con.unregister("corpus_rows")


# --------------------------------------------------------------------------- the model registry


class EvaluationSetChanged(Exception):
    """gold.jsonl declared a new evaluation set while the models were being scored on the old one."""


@dataclass(frozen=True)
class Evaluation:
    """A challenger judged against the champion (None when there is none), both scored on
    `evaluation_set`: `scores` holds "challenger" and, with a champion, "champion". `policies`
    are the policy files the judgement read, recorded with it."""

    challenger: str
    champion: str | None
    decision: str
    reasons: list[str]
    plan: dict
    scores: dict[str, dict]
    slice_scores: dict | None
    confirm_below: float | None
    evaluation_set: int | None
    run_id: str
    policies: tuple[str, ...]


def record_evaluation(con: Any, judged: Evaluation) -> bool:
    """Record the judgement and act on it (promote or reject), with its audit row, in one
    transaction; False, recording nothing, when another run judged this challenger or promoted
    another meanwhile. Raises EvaluationSetChanged, recording nothing, when the evaluation set
    is no longer the one both models were scored on."""
    version = judged.challenger
    with store.transaction(con):
        # The store was not held while scoring: another run may have judged this challenger, or
        # promoted another, meanwhile. The decision is recorded only against what is still true.
        still = store.frame(
            con, "SELECT (SELECT status FROM models WHERE model_version = ?) AS status, "
            "(SELECT model_version FROM models WHERE status = 'champion') AS champion",
            [version],
        ).row(0, named=True)
        if still["status"] != "challenger" or still["champion"] != judged.champion:
            return False
        if gold.current_evaluation_set(con) != judged.evaluation_set:
            raise EvaluationSetChanged(version)
        scores = judged.scores
        con.execute(
            "INSERT INTO model_evaluations (evaluation_id, challenger, champion, decision, reasons, plan, "
            "challenger_scores, champion_scores, slice_scores, confirm_below, n_eval, run_id, evaluation_set) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [store.next_number(con, "model_evaluations"), version, judged.champion, judged.decision,
             judged.reasons, json.dumps(judged.plan), json.dumps(scores["challenger"]),
             json.dumps(scores.get("champion")),
             json.dumps(judged.slice_scores) if judged.slice_scores else None, judged.confirm_below,
             scores["challenger"]["n"], judged.run_id, judged.evaluation_set],
        )
        store.record_policies(con, judged.run_id, "model_evaluation", judged.policies)
        # A model's stored gold metrics follow it to the newest evaluation set it was scored on
        # (gold only grows, so another n_gold is another set): the dashboards then show the
        # champion's score on today's yardstick, not on the one it was trained under.
        for who, model_version in (("challenger", version), ("champion", judged.champion)):
            if model_version is not None and who in scores:
                con.execute(
                    "UPDATE models SET gold_accuracy = ?, gold_macro_f1 = ?, n_gold = ? "
                    "WHERE model_version = ? AND n_gold <> ?",
                    [scores[who]["accuracy"], scores[who]["macro_f1"], scores[who]["n"],
                     model_version, scores[who]["n"]],
                )
        promoted = judged.decision == PROMOTE
        if promoted:
            _make_champion(con, version, confirm_below=judged.confirm_below)
        else:
            con.execute("UPDATE models SET status = 'rejected' WHERE model_version = ?", [version])
        record_audit(
            con, SYSTEM_ACTOR, f"model.{judged.decision}", version, "promoted" if promoted else "rejected",
            "; ".join(judged.reasons)[:500],
            json.dumps({"champion": judged.champion, "evaluation_set": judged.evaluation_set}),
            judged.run_id,
        )
    return True


ROLLBACK_ACTION = "model.rollback"
ROLLED_BACK, REFUSED = "rolled_back", "refused"


@dataclass(frozen=True)
class Rollback:
    """A request to make `version` the champion again. `actor` is the requester's pseudonym and
    `author` their raw id (scrubbed out of the rationale, never stored); `refusal` is a reason the
    caller already refuses it for (identity, role, signature), audited as any other; `detail`
    goes into the audit row with the champion it replaces."""

    version: str
    actor: str
    role: str | None
    author: str
    rationale: str
    detail: dict
    refusal: str | None = None


@dataclass(frozen=True)
class RollbackOutcome:
    """Why the rollback was refused (None when it happened), the model row it asked for (None
    when there is none) and the champion before it."""

    problem: str | None
    target: dict | None
    previous_champion: str | None


def rollback(con: Any, request: Rollback, has_files: Callable[[dict], bool]) -> RollbackOutcome:
    """Restore a retired champion, or refuse with the reason; the attempt is audited either way,
    in the same transaction as the change. `has_files(model_row)` says whether the model's files
    are where the registry row says."""
    from labelloop_assets.core.anonymize import register_scrubber, scrub_sql

    version = request.version
    with store.transaction(con):
        found = store.frame(con, "SELECT * FROM models WHERE model_version = ?", [version]).to_dicts()
        target = found[0] if found else None
        current = store.scalar(con, "SELECT model_version FROM models WHERE status = 'champion'")
        problem = request.refusal or restore_problem(version, target)
        if problem is None and not has_files(target):
            problem = f"the files of {version} are missing"
        reason = problem
        if reason is None:
            # The rationale is free text: scrubbed like a review's, the author's own id included.
            register_scrubber(con)
            reason = store.scalar(con, f"SELECT {scrub_sql('$rationale', '$author')}",
                                  {"rationale": request.rationale[:2000], "author": request.author})
        # The audit log keeps a refusal without the raw identity (actor is its pseudonym).
        record_audit(
            con, request.actor, ROLLBACK_ACTION, version[:256], REFUSED if problem else ROLLED_BACK, reason,
            json.dumps({"from": current, **request.detail}), role=request.role,
        )
        if problem is None:
            _make_champion(con, version)
    return RollbackOutcome(problem, target, current)


def restore_problem(version: str, target: dict | None) -> str | None:
    """Why the registry cannot make `version` the champion again (None when it can): only a
    retired champion can be restored."""
    if target is None:
        return f"no model {quoted(version)} (labelloop model list)"
    if target["status"] == "champion":
        return f"{version} is already the champion"
    if target["status"] != "retired":
        return f"{version} is {target['status']}: only a retired champion can be restored"
    return None


_KEEP = object()


def _make_champion(con: Any, version: str, confirm_below: Any = _KEEP) -> None:
    """The one promotion: the champion retires and `version` takes its place. A promotion sets
    the confirm threshold measured with it; a rollback keeps the one the model had."""
    con.execute("UPDATE models SET status = 'retired' WHERE status = 'champion'")
    con.execute(
        "UPDATE models SET status = 'champion', "
        "confirm_below = CASE WHEN $keep THEN confirm_below ELSE $confirm_below END "
        "WHERE model_version = $version",
        {"keep": confirm_below is _KEEP, "confirm_below": None if confirm_below is _KEEP else confirm_below,
         "version": version},
    )
