"""Trust: authority comes from the deployment, not from a landing file or a run's config.

Each test replays an attack reproduced on a demo home and shows it failing, with the refusal
audited or quarantined with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets.core import store, train
from labelloop_assets.core.settings import ALLOW_DEV_SECRET_ENV, Home
from labelloop_assets.jobs import INGEST_JOB, RETRAIN_JOB
from labelloop_tests.conftest import correction, make_items, write_jsonl

# Nobody is granted anything and no producer is trusted: what a fresh deployment ships.
STRICT = "contributors: []\nproducers: []\n"


def _rows(home: Home, sql: str, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _run(defs, instance, job: str, **kwargs) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _failure(defs, instance, job: str, **kwargs) -> str:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
    assert not result.success
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            failure = event.step_failure_data
            texts.append(failure.user_failure_data.description if failure.user_failure_data else failure.error.message)
    return " ".join(t or "" for t in texts)


@pytest.fixture
def strict_home(home: Home) -> Home:
    home.contributors_file.write_text(STRICT)
    write_jsonl(home.landing_dir("items"), "items.jsonl", make_items(n=60, n_gold=0)[0])
    return home


def _labels(home: Home, items: list[str]) -> dict[str, tuple[str, bool]]:
    rows = _rows(
        home, "SELECT item_id, label, reviewer_confirmed FROM production_corpus WHERE list_contains($ids, item_id)",
        {"ids": items},
    )
    return {r["item_id"]: (r["label"], r["reviewer_confirmed"]) for r in rows.iter_rows(named=True)}


# ----------------------------------------------------------------------------- claimed roles


def test_forged_reviewer_claims_count_as_end_users_and_are_audited(strict_home, defs, instance):
    """12 ungranted accounts each claim `reviewer` and flip one item: none goes through, none locks."""
    home = strict_home
    targets = [f"item-{i:03d}" for i in range(15, 27)]
    truth = dict(zip(make_items(n=60, n_gold=0)[1].keys(), make_items(n=60, n_gold=0)[1].values(), strict=True))
    forged = [
        correction(f"forge-{k}", item, next(lbl for lbl in ("zero", "one", "two") if lbl != truth[item]),
                   user=f"mallory-{k}", role="reviewer")
        for k, item in enumerate(targets)
    ]
    write_jsonl(home.landing_dir("corrections"), "forged.jsonl", forged)
    _run(defs, instance, INGEST_JOB)

    labels = _labels(home, targets)
    assert all(labels[item] == (truth[item], False) for item in targets), labels
    stored = _rows(home, "SELECT DISTINCT claimed_role, user_role FROM raw_corrections")
    assert stored.rows() == [("reviewer", "end_user")]
    audit = _rows(home, "SELECT * FROM audit_log WHERE reason = 'role_not_granted'")
    assert audit.height == 12 and set(audit["outcome"]) == {"downgraded"}
    assert set(audit["action"]) == {"correction.role_claim"}
    assert all("claimed reviewer; counted as end_user" in d for d in audit["detail"])
    # The raw user id is never in the audit log: the actor is the pseudonym.
    assert not any(a.startswith("mallory") for a in audit["actor"])


def test_granted_roles_count_and_grants_can_be_limited_to_a_producer(strict_home, defs, instance):
    home = strict_home
    home.contributors_file.write_text(
        "contributors:\n"
        "  - {id: rita, role: reviewer}\n"
        "  - {id: vera, role: reviewer, via: [review-tool]}\n"
        "producers:\n"
        "  - {folder: annotation-tool, may_claim: annotator}\n"
    )
    write_jsonl(home.landing_dir("corrections"), "root.jsonl", [
        correction("r-1", "item-015", "two", user="rita", role="reviewer"),  # granted anywhere
        correction("v-1", "item-016", "two", user="vera", role="reviewer"),  # grant not valid here
    ])
    write_jsonl(home.landing_dir("corrections") / "review-tool", "tool.jsonl", [
        correction("v-2", "item-017", "two", user="vera", role="reviewer"),
    ])
    write_jsonl(home.landing_dir("corrections") / "annotation-tool", "tool.jsonl", [
        correction("a-1", "item-018", "zero", user="ann", role="reviewer"),  # the producer vouches up to annotator
    ])
    _run(defs, instance, INGEST_JOB)

    roles = dict(_rows(home, "SELECT event_id, user_role FROM raw_corrections").rows())
    assert roles == {"r-1": "reviewer", "v-1": "end_user", "review-tool/v-2": "reviewer",
                     "annotation-tool/a-1": "annotator"}
    labels = _labels(home, ["item-015", "item-016", "item-017"])
    assert labels["item-015"] == ("two", True) and labels["item-017"] == ("two", True)
    assert labels["item-016"][0] != "two"
    downgraded = _rows(home, "SELECT target, detail FROM audit_log WHERE reason = 'role_not_granted' ORDER BY target")
    assert downgraded["target"].to_list() == ["corrections/annotation-tool/tool.jsonl", "corrections/root.jsonl"]


def test_a_broken_directory_fails_the_run_with_its_reason(strict_home, defs, instance):
    home = strict_home
    home.contributors_file.write_text("contributors:\n  - {id: rita, role: boss}\n")
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [correction("c-1", "item-015", "two")])
    message = _failure(defs, instance, INGEST_JOB)
    assert "role 'boss' of 'rita' is not one of" in message


# ----------------------------------------------------------------------------- run config


def _lax_home(tmp_path: Path) -> Path:
    """An attacker's folder with a validation plan that promotes anything."""
    evil = Home(tmp_path / "evil").ensure()
    evil.validation_file.write_text("tolerance: 0.99\nmin_eval_items: 1\n")
    return evil.root


@pytest.mark.slow
def test_a_run_cannot_move_the_home_or_the_store(strict_home, defs, instance, tmp_path):
    home = strict_home
    _run(defs, instance, INGEST_JOB)
    _run(defs, instance, RETRAIN_JOB)
    champion_before = train.current_version(home.models)
    models_before = _rows(home, "SELECT model_version, status FROM models ORDER BY ALL").rows()
    evil = _lax_home(tmp_path)

    moved_home = {"resources": {"labelloop": {"config": {"root": str(evil)}}}}
    message = _failure(defs, instance, RETRAIN_JOB, run_config=moved_home)
    assert "refused: this run's config points labelloop at" in message
    assert "fixed by the deployment" in message

    moved_store = {"resources": {"database": {"config": {"database": str(evil / "labelloop.duckdb")}}}}
    message = _failure(defs, instance, INGEST_JOB, run_config=moved_store)
    assert "refused: this run's config sets the database resource" in message

    reconfigured = {"resources": {"database": {"config": {
        "database": str(home.database_file), "connection_config": {"access_mode": "READ_WRITE"}}}}}
    message = _failure(defs, instance, INGEST_JOB, run_config=reconfigured)
    assert "with connection_config" in message

    assert train.current_version(home.models) == champion_before
    assert _rows(home, "SELECT model_version, status FROM models ORDER BY ALL").rows() == models_before
    assert not (evil / "labelloop.duckdb").exists()
    assert not (evil / "models").exists() or not any((evil / "models").iterdir())


def test_each_deciding_step_records_the_policy_it_read(strict_home, defs, instance):
    home = strict_home
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [correction("c-1", "item-015", "two")])
    result = _run(defs, instance, INGEST_JOB)
    used = _rows(home, "SELECT step, file, sha256 FROM policy_uses WHERE run_id = ?", [result.run_id])
    import hashlib

    expected = hashlib.sha256(home.contributors_file.read_bytes()).hexdigest()
    assert ("raw_corrections", "contributors.yaml", expected) in used.rows()


# ----------------------------------------------------------------------------- ids and lineage


def test_one_producer_cannot_take_another_producers_event_ids(strict_home, defs, instance):
    """An attacker lands a file that sorts first with the producer's next ids."""
    home = strict_home
    _run(defs, instance, INGEST_JOB)
    genuine = [correction(f"evt-{n}", f"item-{15 + n:03d}", "two", user=f"user-{n}") for n in range(5)]
    hijack = [correction(f"evt-{n}", f"item-{15 + n:03d}", "zero", user="mallory") for n in range(5)]
    write_jsonl(home.landing_dir("corrections") / "web-app", "day-2.jsonl", genuine)
    write_jsonl(home.landing_dir("corrections") / "a-partner", "0000.jsonl", hijack)
    # A root-level file cannot spell a producer's scoped id either.
    write_jsonl(home.landing_dir("corrections"), "0000.jsonl", [correction("web-app/evt-9", "item-030", "zero")])
    result = _run(defs, instance, INGEST_JOB)

    stored = _rows(home, "SELECT event_id, corrected_label, producer FROM raw_corrections ORDER BY event_id")
    assert stored.filter(stored["producer"] == "web-app")["event_id"].to_list() == [
        f"web-app/evt-{n}" for n in range(5)
    ]
    assert set(stored.filter(stored["producer"] == "web-app")["corrected_label"]) == {"two"}
    assert stored.filter(stored["producer"] == "a-partner").height == 5
    refused = _rows(home, "SELECT reason, detail, record_id FROM quarantine WHERE run_id = ?", [result.run_id])
    assert refused.rows() == [("invalid_value",
                               "event_id: '/' is reserved (stored ids are scoped as producer/event_id)",
                               "web-app/evt-9")]
    lineage = _rows(home, "SELECT DISTINCT event_id FROM validated_labels WHERE event_id LIKE 'web-app/%'")
    assert lineage.height == 5


@pytest.mark.slow
def test_a_made_up_model_version_is_quarantined_not_shown_in_lineage(strict_home, defs, instance):
    home = strict_home
    _run(defs, instance, INGEST_JOB)
    _run(defs, instance, RETRAIN_JOB)
    # Registered by training (promoted or not: this world has no gold items to judge it on).
    champion = _rows(home, "SELECT model_version FROM models")["model_version"][0]
    write_jsonl(home.landing_dir("predictions"), "p.jsonl", [
        {"prediction_id": "p-1", "item_id": "item-020", "model_version": "m9999-not-a-model",
         "predicted_label": "zero", "confidence": 0.9, "served_at": "2026-03-02T09:00:00Z"},
        {"prediction_id": "p-2", "item_id": "item-021", "model_version": champion,
         "predicted_label": "zero", "confidence": 0.9, "served_at": "2026-03-02T09:00:00Z"},
    ])
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [
        correction("c-1", "item-022", "two", model_version="m9999-not-a-model"),
        correction("c-2", "item-023", "two", model_version=champion),
    ])
    _run(defs, instance, INGEST_JOB)
    assert _rows(home, "SELECT prediction_id FROM predictions").rows() == [("p-2",)]
    refused = _rows(home, "SELECT kind, record_id FROM quarantine WHERE reason = 'unknown_model_version' ORDER BY kind")
    assert refused.rows() == [("corrections", "c-1"), ("predictions", "p-1")]
    versions = _rows(home, "SELECT DISTINCT model_version FROM validated_labels WHERE model_version IS NOT NULL")
    assert versions.rows() == [(champion,)]

    # A version the deployment declares (a model served before labelloop) is accepted.
    with home.training_file.open("a") as config:
        config.write("external_model_versions: [baseline-2026]\n")
    write_jsonl(home.landing_dir("predictions"), "p2.jsonl", [
        {"prediction_id": "p-3", "item_id": "item-020", "model_version": "baseline-2026",
         "predicted_label": "zero", "confidence": 0.9, "served_at": "2026-03-02T09:00:00Z"},
    ])
    _run(defs, instance, INGEST_JOB)
    assert ("p-3",) in _rows(home, "SELECT prediction_id FROM predictions").rows()


def test_landing_subfolders_are_producers_and_every_file_deeper_is_quarantined(strict_home, defs, instance):
    home = strict_home
    nested = home.landing_dir("corrections") / "web-app" / "2026"
    write_jsonl(nested, "c.jsonl", [correction("n-1", "item-015", "two")])
    write_jsonl(home.landing_dir("corrections") / ".in-progress", "c.jsonl", [correction("t-1", "item-015", "two")])
    result = _run(defs, instance, INGEST_JOB)
    refused = _rows(home, "SELECT source_file, reason, detail FROM quarantine WHERE run_id = ?", [result.run_id])
    assert refused.rows() == [(
        "corrections/web-app/2026/c.jsonl", "unreadable_file",
        "corrections/web-app/2026/c.jsonl: inside a folder within a producer's folder; landing files go in "
        "landing/<kind>/ or landing/<kind>/<producer>/ (move it there to have it read)",
    )]
    from labelloop_assets.sensors import landed_files

    assert "corrections/web-app/2026/c.jsonl" in landed_files(home)
    assert not any(".in-progress" in name for name in landed_files(home))

    # A second file in the same nested folder is not lost either: it is quarantined in turn.
    write_jsonl(nested / "deeper", "d.jsonl", [correction("n-2", "item-016", "two")])
    result = _run(defs, instance, INGEST_JOB)
    refused = _rows(home, "SELECT source_file FROM quarantine WHERE run_id = ?", [result.run_id])
    assert refused.rows() == [("corrections/web-app/2026/deeper/d.jsonl",)]


def test_a_producer_may_assert_roles_only_for_users_the_directory_does_not_list(strict_home, defs, instance):
    home = strict_home
    home.contributors_file.write_text(
        "contributors:\n"
        "  - {id: ned, role: end_user}\n"
        "producers:\n"
        "  - {folder: annotation-tool, may_claim: annotator}\n"
    )
    write_jsonl(home.landing_dir("corrections") / "annotation-tool", "a.jsonl", [
        correction("a-1", "item-015", "two", user="ned", role="annotator"),  # listed: his grant holds
        correction("a-2", "item-016", "two", user="amy", role="annotator"),  # not listed: the tool vouches
    ])
    _run(defs, instance, INGEST_JOB)
    roles = dict(_rows(home, "SELECT event_id, user_role FROM raw_corrections").rows())
    assert roles == {"annotation-tool/a-1": "end_user", "annotation-tool/a-2": "annotator"}


# ----------------------------------------------------------------------------- fail closed


def test_without_a_secret_runs_and_commands_fail_closed(strict_home, defs, instance, monkeypatch):
    home = strict_home
    monkeypatch.delenv(ALLOW_DEV_SECRET_ENV, raising=False)
    monkeypatch.delenv("LABELLOOP_SECRET", raising=False)
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [correction("c-1", "item-015", "two")])
    message = _failure(defs, instance, INGEST_JOB)
    assert "LABELLOOP_SECRET is not set" in message
    assert _rows(home, "SELECT count(*) AS n FROM raw_corrections")["n"][0] == 0

    # The command line, in a process of its own with the same environment.
    env = {k: v for k, v in os.environ.items() if k not in (ALLOW_DEV_SECRET_ENV, "LABELLOOP_SECRET")}
    env["LABELLOOP_HOME"] = str(home.root)
    done = subprocess.run(
        [sys.executable, "-m", "labelloop_assets.cli", "model", "rollback", "m0001", "--rationale", "x",
         "--as", "rita"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "LABELLOOP_SECRET is not set" in done.stderr and "Traceback" not in done.stderr

    # With a secret it runs.
    monkeypatch.setenv("LABELLOOP_SECRET", "Mh4q8vT2xLr9NcW5kPz7bYd3JfG6sQe1uAo0iXnV-Rw")
    _run(defs, instance, INGEST_JOB)



def test_a_version_3_store_is_upgraded_in_place(tmp_path):
    """A store written before the trust columns existed gets them, and keeps its rows."""
    path = tmp_path / "old.duckdb"
    with store.connect(path) as con:
        con.execute("INSERT INTO items (seq, item_id, features, payload_hash) VALUES (1, 'i1', [1.0], 'h')")
        for table, column in (
            ("raw_corrections", "producer"), ("raw_corrections", "claimed_role"), ("raw_corrections", "arrived_at"),
            ("validated_labels", "arrived_at"), ("validated_labels", "burst_day"), ("review_decisions", "key_id"),
            ("review_decisions", "signature"), ("model_evaluations", "evaluation_set"), ("raw_corrections", "task_id"),
            *(("ingested_files", c) for c in ("version", "sha256", "ctime_ns", "line_count", "first_line")),
        ):
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        for table in ("evaluation_sets", "gold_copies", "policy_uses", "review_tasks", "item_shapes"):
            con.execute(f"DROP TABLE {table}")
        # Before version 6 items carried features only.
        con.execute("ALTER TABLE items DROP COLUMN text")
        con.execute("ALTER TABLE items DROP COLUMN uri")
        con.execute("ALTER TABLE items ALTER COLUMN features SET NOT NULL")
        con.execute("UPDATE schema_info SET value = '3' WHERE key = 'schema_version'")
    with store.connect(path) as con:
        assert store.schema_version(con) == store.SCHEMA_VERSION == 8
        con.execute("INSERT INTO items (seq, item_id, text, payload_hash) VALUES (2, 'i2', 'a text item', 'h')")
        assert con.execute("SELECT item_id, text, features FROM items ORDER BY 1").fetchall() == [
            ("i1", None, [1.0]), ("i2", "a text item", None)]
        columns = {(t, c) for t, c in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE table_name IN "
            "('raw_corrections', 'review_decisions', 'policy_uses', 'ingested_files', 'review_tasks')").fetchall()}
        assert {("raw_corrections", "claimed_role"), ("raw_corrections", "task_id"), ("review_tasks", "policy"),
                ("review_decisions", "signature"),
                ("policy_uses", "sha256"), ("ingested_files", "version"), ("ingested_files", "sha256")} <= columns
