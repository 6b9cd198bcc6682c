"""Crash safety: a run killed with SIGKILL at a chosen point, then run again, loses and doubles nothing.

Each crash happens in a child process that wraps one of our functions at a boundary (a
transaction's COMMIT, the model save, the pointer move) with a SIGKILL, so the kill lands at a
known point without changing what the code does. The parent checks what the dead run left, runs
the same job again, and compares every table with a run of the same job that was not interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets.core import store, train
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, prepared_home, write_jsonl

# Every crash point is a child run killed there, all of them started by one module-wide fixture.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import os, signal, sys, traceback
    from contextlib import contextmanager
    from pathlib import Path

    import dagster as dg
    import skops.io

    from labelloop_assets.core import store, train
    from labelloop_assets.core.settings import Home, RetrainPolicy
    from labelloop_assets.definitions import build_definitions

    root, job, point = sys.argv[1:]
    QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    where, _, target = point.partition(":")


    def crash():
        os.kill(os.getpid(), signal.SIGKILL)


    def inside(asset):
        return any(frame.name == asset for frame in traceback.extract_stack())


    commit = store.transaction


    @contextmanager
    def transaction(con):
        with commit(con):
            yield con
            if where == "before_commit" and inside(target):
                crash()
        if where == "after_commit" and inside(target):
            crash()


    store.transaction = transaction
    save, dump = train.save, skops.io.dump
    if point == "save:model.skops":
        def written_then_crash(*args, **kwargs):
            dump(*args, **kwargs)
            crash()
        skops.io.dump = written_then_crash
    elif point == "save:exit":
        def saved_then_crash(*args, **kwargs):
            save(*args, **kwargs)
            crash()
        train.save = saved_then_crash
    elif point == "set_current:entry":
        train.set_current = lambda *args, **kwargs: crash()

    defs = build_definitions(Home(Path(root)), RetrainPolicy(2, 0))
    result = defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=QUIET, raise_on_error=False
    )
    print("the run ended without reaching", point, "- success:", result.success)
    sys.exit(3)
    """
)

# What must match an uninterrupted run, row for row (ids, clocks and run ids left out).
COMPARED = {
    "items": "item_id, payload_hash, source_file, line_no",
    "predictions": "prediction_id, item_id, payload_hash, source_file, line_no",
    "raw_corrections": "event_id, item_id, corrected_label, user_pseudonym, payload_hash, source_file, line_no",
    "quarantine": "kind, source_file, line_no, reason, detail, record_id",
    "ingested_files": "path, kind, records_in, accepted, quarantined, blank_lines",
    "validated_labels": "event_id, item_id, corrected_label, label_before, vote_weight",
    "label_decisions": "item_id, current_label, proposed_label, status",
    "correction_volume": "day, scope, key, n",
    "label_history": "item_id, corpus_version, change_order, label, previous_label, change_kind",
    "corpus_versions": "corpus_version, n_new_items, n_label_changes, n_confirmations, n_items, label_changes_total",
    "production_corpus": "item_id, label, label_source, human_confirmed, reviewer_confirmed, since_version, "
                         "updated_version",
    "escalations": "escalation_id, item_id, reason",
    "audit_log": "actor, action, target, outcome",
    "models": "model_version, corpus_version, status, n_train_rows, train_data_hash, params, gold_accuracy",
    "model_evaluations": "challenger, champion, decision, reasons",
    "release_notes": "challenger, champion, decision, n_label_changes",
}
LEDGER_TABLES = {"items": "items", "predictions": "predictions", "corrections": "raw_corrections"}
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@dataclass(frozen=True)
class Crash:
    job: str
    point: str
    # What the dead run left: (SQL, expected value), and paths under the home that exist or not.
    evidence: tuple[tuple[str, object], ...]
    files: tuple[tuple[str, bool], ...] = ()


INGEST, RETRAIN_JOB = "ingest_job", "retrain_job"
CRASHES = {
    # Items and predictions are in; the corrections' transaction dies before its COMMIT.
    "ingest_before_corrections_commit": Crash(INGEST, "before_commit:raw_corrections", (
        ("SELECT count(*) FROM items", 60),
        ("SELECT count(*) FROM ingested_files WHERE kind = 'predictions'", 1),
        ("SELECT count(*) FROM ingested_files WHERE kind = 'corrections'", 0),
        ("SELECT count(*) FROM raw_corrections", 0),
        ("SELECT count(*) FROM quarantine WHERE kind = 'corrections'", 0),
    )),
    # Corrections are staged and resolved; the first corpus version dies before its COMMIT.
    "corpus_before_commit": Crash(INGEST, "before_commit:production_corpus", (
        ("SELECT count(*) > 0 FROM validated_labels", True),
        ("SELECT count(*) FROM corpus_versions", 0),
        ("SELECT count(*) FROM label_history", 0),
        ("SELECT count(*) FROM production_corpus", 0),
    )),
    # The corpus version committed (to the write-ahead log only); escalations, metrics and
    # snapshots never ran.
    "corpus_after_commit": Crash(INGEST, "after_commit:production_corpus", (
        ("SELECT count(*) FROM corpus_versions", 1),
        ("SELECT count(*) FROM escalations", 0),
    ), (("labelloop.duckdb.wal", True), ("published/production_corpus.parquet", False))),
    # Half of the challenger's artifact is written, in its staging folder.
    "model_artifact_half_written": Crash(RETRAIN_JOB, "save:model.skops", (
        ("SELECT list(model_version ORDER BY model_version) FROM models", ["m0001"]),
    ), (("models/.m0002.tmp/model.skops", True), ("models/.m0002.tmp/metadata.json", False),
        ("models/m0002", False))),
    # The artifact is in place, the registry row never written.
    "model_saved_not_registered": Crash(RETRAIN_JOB, "save:exit", (
        ("SELECT list(model_version ORDER BY model_version) FROM models", ["m0001"]),
    ), (("models/m0002/model.skops", True), ("models/m0002/metadata.json", True))),
    # The registry committed the promotion; the process dies before models/CURRENT moves.
    "promotion_before_pointer_move": Crash(RETRAIN_JOB, "set_current:entry", (
        ("SELECT list(status ORDER BY model_version) FROM models", ["retired", "champion"]),
        ("SELECT count(*) FROM model_evaluations", 2),
    )),
}


def _new_home(root: Path) -> Home:
    return prepared_home(root)


def _land_traffic(home: Home) -> None:
    """Predictions and two correction files with accepted, quarantined, replayed and blank lines."""
    write_jsonl(home.landing_dir("predictions"), "p1.jsonl", [
        {"prediction_id": f"p-{i}", "item_id": f"item-{i:03d}", "model_version": "m0001",
         "predicted_label": "zero", "confidence": 0.55, "served_at": "2026-03-02T09:00:00Z"}
        for i in range(30, 40)
    ])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction("e-1", "item-030", "one", prediction_id="p-30"),
        correction("e-2", "item-031", "zero", user="rita"),
        correction("e-3", "item-033", "two", user="bob", role="end_user"),
        correction("e-4", "item-036", "two", user="carol", role="annotator", consent=False),
        correction("e-5", "item-037", "eleven"),
        "{not json",
        "",
    ])
    write_jsonl(home.landing_dir("corrections"), "c2.jsonl", [
        correction("e-2", "item-031", "zero", user="rita"),
        correction("e-6", "item-040", "two", user="rita"),
        correction("e-7", "item-003", "one"),
    ])


def _run(home: Home, job: str) -> dg.ExecuteInProcessResult:
    result = build_definitions(home, RETRAIN).resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=QUIET, raise_on_error=False
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _copy_home(source: Home, target: Path) -> Home:
    shutil.copytree(source.root, target)
    return Home(target.resolve())  # model rows record folders relative to the home


def _snapshot(home: Home) -> dict[str, list[tuple]]:
    with store.connect(home.database, read_only=True) as con:
        return {
            table: store.frame(con, f"SELECT {columns} FROM {table} ORDER BY ALL").rows()
            for table, columns in COMPARED.items()
        }


@dataclass
class Crashed:
    home: Home
    returncode: int
    output: str


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[dict[str, Crashed], dict[str, dict[str, list[tuple]]]]:
    """Every crash in a child process of its own, side by side, started from the state just before
    its job; meanwhile each job runs here from the same state without interruption."""
    root = tmp_path_factory.mktemp("crashes")
    script = root / "crash_child.py"
    script.write_text(CHILD)
    children = {}

    def spawn(job: str, world: Home) -> None:
        for name, crash in CRASHES.items():
            if crash.job != job:
                continue
            home = _copy_home(world, root / name / "home")
            # The child's instance is ephemeral; its own DAGSTER_HOME keeps it off any real one.
            dagster_home = root / name / "dagster"
            dagster_home.mkdir()
            # PYTHONPATH: the child imports this checkout's labelloop, as the parent does, whatever
            # copy is installed (the parent compares its tables with the child's).
            env = {**os.environ, "LABELLOOP_HOME": str(home.root), "DAGSTER_HOME": str(dagster_home),
                   "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
            children[name] = (home, subprocess.Popen(
                [sys.executable, str(script), str(home.root), job, crash.point],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))

    # A first ingest of items and traffic...
    ingest = _new_home(root / "worlds" / INGEST)
    land_items(ingest, make_items()[0])
    _land_traffic(ingest)
    spawn(INGEST, ingest)
    # ...and a second training.
    retrain = _new_home(root / "worlds" / RETRAIN_JOB)
    land_items(retrain, make_items()[0])
    _run(retrain, INGEST)
    _run(retrain, RETRAIN_JOB)
    # A reviewer confirms two labels: the same data in a new version, so the challenger is promoted.
    write_jsonl(retrain.landing_dir("corrections"), "v2.jsonl", [
        correction("v2-1", "item-020", "two", user="rita"),
        correction("v2-2", "item-021", "zero", user="rita"),
    ])
    _run(retrain, INGEST)
    spawn(RETRAIN_JOB, retrain)
    uninterrupted = {}
    for job, world in ((INGEST, ingest), (RETRAIN_JOB, retrain)):
        home = _copy_home(world, root / "uninterrupted" / job)
        _run(home, job)
        uninterrupted[job] = _snapshot(home)
    done = {}
    for name, (home, child) in children.items():
        output, _ = child.communicate(timeout=300)
        done[name] = Crashed(home, child.returncode, output)
    return done, uninterrupted


def _value(con, sql: str):
    return store.frame(con, sql).row(0)[0]


def assert_consistent(home: Home, settled: bool) -> None:
    """What must hold after any crash; `settled` after a successful run as well."""
    with store.connect(home.database, read_only=True) as con:
        # The ledger: each file's counts are exactly the rows that carry its name.
        for kind, table in LEDGER_TABLES.items():
            rows = store.frame(con, f"""
                SELECT f.path, f.records_in, f.accepted, f.quarantined,
                       (SELECT count(*) FROM {table} t WHERE t.source_file = f.path) AS stored,
                       (SELECT count(*) FROM quarantine q WHERE q.source_file = f.path) AS set_aside
                FROM ingested_files f WHERE f.kind = $kind""", {"kind": kind})
            for row in rows.iter_rows(named=True):
                assert row["records_in"] == row["accepted"] + row["quarantined"], row
                assert (row["stored"], row["set_aside"]) == (row["accepted"], row["quarantined"]), row
            # Gold items come from the deployment's gold.jsonl, not a landing file: evaluation_sets
            # is their ledger (checked below).
            orphans = store.frame(con, f"""
                SELECT count(*) AS n FROM (SELECT source_file FROM {table} WHERE source_file <> 'gold.jsonl'
                    UNION ALL SELECT source_file FROM quarantine WHERE kind = $kind)
                WHERE source_file NOT IN (SELECT path FROM ingested_files)""", {"kind": kind})["n"][0]
            assert orphans == 0, f"{kind}: rows without their ledger entry"
        # Every declared gold item belongs to a committed evaluation set, and each set counts them.
        assert _value(con, "SELECT count(*) FROM items WHERE source_file = 'gold.jsonl'") == _value(
            con, "SELECT coalesce(sum(n_added), 0) FROM evaluation_sets"
        )
        # The corpus: every version is there whole (history, counts, audit) or not at all.
        versions = store.frame(con, "SELECT * FROM corpus_versions ORDER BY corpus_version")
        numbers = versions["corpus_version"].to_list()
        assert numbers == list(range(1, len(numbers) + 1))
        assert sorted(store.frame(con, "SELECT DISTINCT corpus_version FROM label_history")
                      ["corpus_version"].to_list()) == numbers
        published = store.frame(con, "SELECT target FROM audit_log WHERE action = 'corpus.publish' ORDER BY ALL")
        assert published["target"].to_list() == sorted(f"v{n}" for n in numbers)
        if numbers:
            assert versions["label_changes_total"].to_list() == versions["n_label_changes"].cum_sum().to_list()
            assert versions["n_items"][-1] == _value(con, "SELECT count(*) FROM production_corpus")
            differing = _value(con, f"""
                SELECT count(*) FROM production_corpus c FULL JOIN corpus_as_of({numbers[-1]}) h USING (item_id)
                WHERE c.label IS DISTINCT FROM h.label""")
            assert differing == 0, "the corpus is not the sum of its versions"
        else:
            assert _value(con, "SELECT count(*) FROM production_corpus") == 0
        # The registry: a model is registered with its whole artifact, or not at all.
        models = store.frame(con, "SELECT model_version, status, path FROM models ORDER BY model_version")
        evaluations = store.frame(con, "SELECT challenger, decision FROM model_evaluations")
    for row in models.iter_rows(named=True):
        folder = home.models / row["model_version"]
        assert row["path"] == f"models/{row['model_version']}" and home.model_folder(row["path"]) == folder
        _, metadata = train.load(folder)
        assert metadata["model_version"] == row["model_version"]
    statuses = dict(models.select("model_version", "status").iter_rows())
    assert list(statuses.values()).count("champion") <= 1
    for challenger, decision in evaluations.iter_rows():
        assert statuses[challenger] in (("champion", "retired") if decision == "promote" else ("rejected",))
    current = train.current_version(home.models)
    if statuses:
        assert current in statuses, "models/CURRENT names no registered model"
        train.load(home.models / current)
    if settled:
        folders = {p.name for p in home.models.iterdir() if p.is_dir() and not p.name.startswith(".")}
        assert folders == set(statuses), "a model folder is not registered"
        champion = [version for version, status in statuses.items() if status == "champion"]
        assert current == (champion[0] if champion else None), "models/CURRENT is not the champion"


@pytest.mark.parametrize("name", list(CRASHES))
def test_a_killed_run_run_again_matches_an_uninterrupted_one(name, crashed):
    crash = CRASHES[name]
    children, uninterrupted = crashed
    child = children[name]
    assert child.returncode == -signal.SIGKILL, f"not killed at {crash.point}:\n{child.output[-3000:]}"
    home = child.home
    # What the dead run left opens, and the crash landed where it was aimed.
    with store.connect(home.database, read_only=True) as con:
        for sql, expected in crash.evidence:
            assert _value(con, sql) == expected, sql
    for path, exists in crash.files:
        assert (home.root / path).exists() == exists, path
    assert_consistent(home, settled=False)

    _run(home, crash.job)

    assert _snapshot(home) == uninterrupted[crash.job]
    # The file is healthy for a writer too.
    with store.connect(home.database) as con:
        con.execute("CHECKPOINT")
    assert_consistent(home, settled=True)

