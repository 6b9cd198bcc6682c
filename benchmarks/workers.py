"""Workers that share nothing local, on one lake: the deployment's proof (a test) and its scaling (`make bench`).

Each worker is a process of its own with its own working folder, temp folder and Dagster home
(a real SQLite instance); the workers share only the PostgreSQL catalog and LABELLOOP_HOME (the
landing zone, configuration and models, which a deployment puts on shared storage) with the
lake's data folder. An analyst process reads while they write and checks, in every snapshot it
sees, that the store is whole.

    python -m benchmarks.workers worker JOB ROUNDS        # one worker (its environment says where)
    python -m benchmarks.workers analyst OUT_JSON STOP_FILE
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECRET = "Tq3VnP8wHc1ZrJ6xYb0LmF5sKd7GaE2uNi4oWy9RhXg"

# One statement, so one snapshot: what an analyst sees must always be whole.
SNAPSHOT_SQL = """
SELECT
    (SELECT coalesce(list(corpus_version ORDER BY corpus_version), []) FROM corpus_versions) AS versions,
    (SELECT n_items FROM corpus_versions ORDER BY corpus_version DESC LIMIT 1) AS head_items,
    (SELECT count(*) FROM production_corpus) AS corpus_items,
    (SELECT label_changes_total FROM corpus_versions ORDER BY corpus_version DESC LIMIT 1) AS head_changes,
    (SELECT coalesce(sum(n_label_changes), 0) FROM corpus_versions) AS changes_sum,
    (SELECT count(*) FROM raw_corrections) AS raw,
    (SELECT coalesce(sum(accepted), 0) FROM ingested_files WHERE kind = 'corrections') AS ledger_accepted,
    (SELECT count(*) FROM quarantine WHERE kind = 'corrections') AS quarantined,
    (SELECT coalesce(sum(quarantined), 0) FROM ingested_files WHERE kind = 'corrections') AS ledger_quarantined
"""


def _violations(row: dict) -> list[str]:
    found = []
    if row["versions"] != list(range(1, len(row["versions"]) + 1)):
        found.append(f"corpus versions not contiguous: {row['versions']}")
    if row["versions"] and row["head_items"] != row["corpus_items"]:
        found.append(f"corpus has {row['corpus_items']} items, its head version says {row['head_items']}")
    if row["versions"] and row["head_changes"] != row["changes_sum"]:
        found.append(f"label changes {row['changes_sum']} != head total {row['head_changes']}")
    if row["raw"] != row["ledger_accepted"]:
        found.append(f"{row['raw']} corrections stored, the ledger says {row['ledger_accepted']}")
    if row["quarantined"] != row["ledger_quarantined"]:
        found.append(f"{row['quarantined']} quarantined, the ledger says {row['ledger_quarantined']}")
    return found


# ---- the child processes ----------------------------------------------------------------------


def worker(job: str, rounds: int) -> None:
    """Run `job` `rounds` times on this process's own Dagster instance; one JSON line per run."""
    import dagster as dg

    from labelloop_assets.definitions import build_definitions

    defs = build_definitions()
    with dg.DagsterInstance.get() as instance:
        for _ in range(rounds):
            started = time.time()
            result = defs.get_job_def(job).execute_in_process(
                instance=instance, raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            )
            print(json.dumps({"job": job, "success": result.success, "seconds": round(time.time() - started, 2),
                              "pid": os.getpid()}), flush=True)


def analyst(out: str, stop_file: str) -> None:
    """Read the store in a loop until `stop_file` exists; write what was seen to `out`."""
    import duckdb

    from labelloop_assets.core import store
    from labelloop_assets.core.settings import Home

    home = Home.from_env()
    observations, violations, versions_seen, errors = 0, [], set(), []
    con = store.connect(home.database, read_only=True)
    try:
        while not Path(stop_file).exists():
            try:
                row = store.frame(con, SNAPSHOT_SQL).row(0, named=True)
            except duckdb.Error as error:  # counted, and the proof fails on any
                errors.append(str(error)[:300])
                time.sleep(0.1)
                continue
            observations += 1
            versions_seen.update(row["versions"])
            violations += [f"observation {observations}: {v}" for v in _violations(row)]
            time.sleep(0.05)
    finally:
        con.close()
    Path(out).write_text(json.dumps({
        "observations": observations, "violations": violations[:20], "n_violations": len(violations),
        "versions_seen": len(versions_seen), "errors": errors[:5], "n_errors": len(errors),
    }))


# ---- the harness ------------------------------------------------------------------------------


def _environment(home: Path, catalog: str, own: Path) -> dict:
    """A worker's environment: the shared home and catalog, everything else of its own."""
    for folder in ("dagster", "tmp"):
        (own / folder).mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LABELLOOP_", "DAGSTER_"))}
    env.update({
        "LABELLOOP_HOME": str(home),
        "LABELLOOP_CATALOG": catalog,
        "LABELLOOP_SECRET": SECRET,
        "LABELLOOP_RETRAIN_MIN_CHANGES": "1000000000",
        "LABELLOOP_DB_WAIT_SECONDS": "600",
        "DAGSTER_HOME": str(own / "dagster"),
        "TMPDIR": str(own / "tmp"),
        "PYTHONPATH": str(REPO),
    })
    return env


def _start(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.workers", *args], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )


def _holds_writer_lock(catalog: str, pid: int) -> bool:
    import psycopg2

    with psycopg2.connect(catalog) as pg, pg.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE %s",
            [f"labelloop writer (PID {pid} %"],
        )
        return cursor.fetchone()[0] > 0


def _finish(process: subprocess.Popen, timeout: float) -> list[dict]:
    out, _ = process.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def prove(base: Path, catalog: str, n_files: int = 6, events_per_file: int = 400, n_workers: int = 2,
          kill: bool = True, n_items: int = 2_000, timeout: float = 900) -> dict:
    """2 x `n_files` landing files ingested by `n_workers` workers at once while an analyst reads.

    With `kill`, the second half lands once they have published a corpus version; then the first
    worker is SIGKILLed as soon as it holds the lake, and run again. Then the store is
    reconciled against what landed."""
    from benchmarks.generate import Workload, write_corrections, write_items
    from labelloop_assets.core import store, train
    from labelloop_assets.core.lake import Lake
    from labelloop_assets.core.settings import Home

    home = Home(base / "shared" / "home").ensure()
    # Enough gold items for the validation plan (30), so the first model can become the champion.
    workload = Workload(n_items=n_items, n_classes=min(30, max(3, n_items // 60)), n_users=max(50, n_items // 4),
                        gold_share=max(0.02, 60 / n_items))
    write_items(home, workload)
    landed = write_corrections(home, workload, n_files * events_per_file, n_files, prefix="first")

    def land_second_half() -> None:
        landed.extend(write_corrections(home, workload, n_files * events_per_file, n_files,
                                        first_event=n_files * events_per_file, prefix="second"))
    target = Lake(catalog, new_data_path=str(home.root / "lake"))
    store.connect(target).close()  # the schema, so the analyst has tables to read from the start

    envs = [_environment(home.root, catalog, base / f"worker-{n}") for n in range(n_workers)]
    stop = base / "analyst.stop"
    watcher = _start(["analyst", str(base / "analyst.json"), str(stop)],
                     _environment(home.root, catalog, base / "analyst"), base / "analyst", base / "analyst.log")
    started = time.time()
    workers = [_start(["worker", "ingest_job", "2"], env, base / f"worker-{n}", base / f"worker-{n}.log")
               for n, env in enumerate(envs)]
    runs: list[dict] = []
    killed = None
    if kill:
        victim = workers[0]
        deadline = time.time() + timeout
        # The second half lands once a corpus version exists, so the analyst sees the store grow.
        with store.connect(target, read_only=True) as reader:
            while not store.scalar(reader, "SELECT count(*) FROM corpus_versions"):
                if time.time() > deadline or all(w.poll() is not None for w in workers):
                    raise RuntimeError("no corpus version was published by the workers")
                time.sleep(0.2)
        land_second_half()
        while not _holds_writer_lock(catalog, victim.pid):
            if victim.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"worker 0 ended before it held the lake: {(base / 'worker-0.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        time.sleep(0.2)  # well inside its write
        os.kill(victim.pid, signal.SIGKILL)
        runs += _finish(victim, timeout)
        killed = {"after_s": round(time.time() - started, 2), "returncode": victim.returncode}
        # The killed worker's work is run again, as a retried run would be, on the same worker.
        workers[0] = _start(["worker", "ingest_job", "1"], envs[0], base / "worker-0", base / "worker-0-again.log")
    else:
        land_second_half()  # at once: the workers start on all 2 x n_files files
    for process in workers:
        runs += _finish(process, timeout)
    ingest_seconds = time.time() - started
    trainer = _start(["worker", "retrain_job", "1"], envs[-1], base / f"worker-{n_workers - 1}", base / "retrain.log")
    runs += _finish(trainer, timeout)
    stop.touch()
    watcher.wait(timeout)
    seen = json.loads((base / "analyst.json").read_text())

    lines = {f"corrections/{p.name}": sum(1 for line in p.read_text().splitlines() if line.strip()) for p in landed}
    with store.connect(target, read_only=True) as con:
        files = store.frame(con, "SELECT path, records_in, accepted, quarantined FROM ingested_files "
                                 "WHERE kind = 'corrections'")
        raw = store.scalar(con, "SELECT count(*) FROM raw_corrections")
        quarantined = store.scalar(con, "SELECT count(*) FROM quarantined_corrections")
        versions = store.frame(con, "SELECT corpus_version FROM corpus_versions ORDER BY 1")["corpus_version"].to_list()
        champions = store.frame(
            con, "SELECT model_version FROM models WHERE status = 'champion'"
        )["model_version"].to_list()
        duplicates = store.duplicate_keys(con)
    recorded = dict(zip(files["path"], files["records_in"], strict=True))
    checks = {
        "every landed file ingested exactly once": sorted(files["path"]) == sorted(lines),
        "every line accepted or quarantined": recorded == lines,
        "records = accepted + quarantined": int(files["records_in"].sum())
        == int(files["accepted"].sum()) + int(files["quarantined"].sum()),
        "accepted rows stored once": raw == int(files["accepted"].sum()),
        "quarantined rows stored once": quarantined == int(files["quarantined"].sum()),
        "no key twice in any table": duplicates == {},
        "corpus versions contiguous": versions == list(range(1, len(versions) + 1)),
        "exactly one champion, and CURRENT names it": len(champions) == 1
        and train.current_version(home.models) == champions[0],
        "the analyst never saw a half-written version": seen["n_violations"] == 0 and seen["n_errors"] == 0,
        # With `kill`, the second half lands after the first version: the analyst must see both.
        "the analyst saw the store grow": seen["observations"] > 0 and seen["versions_seen"] >= (2 if kill else 1),
        "every run but the killed one succeeded": all(r["success"] for r in runs),
    }
    return {
        "workers": n_workers,
        "files": len(lines),
        "lines": sum(lines.values()),
        "accepted": raw,
        "quarantined": quarantined,
        "corpus_versions": len(versions),
        "ingest_seconds": round(ingest_seconds, 2),
        "runs": runs,
        "killed": killed,
        "analyst": seen,
        "duplicates": duplicates,
        "checks": checks,
        "reconciled": all(checks.values()),
    }


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "analyst":
        analyst(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
