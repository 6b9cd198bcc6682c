"""`make bench`: the loop's cost measured through Dagster, beside baselines on the same files.

Every measurement runs in a child process of its own, so its peak memory (VmHWM) is its own.
Results go to benchmarks/results/*.json and, as markdown tables, into docs/performance.md.

    python -m benchmarks.run                 # the full suite (100k / 300k / 1M events)
    python -m benchmarks.run --scales 3000   # a smoke run (what `make test` does)
    python -m benchmarks.run --soak-only --soak-seconds 60   # only the soak run
    python -m benchmarks.run --throughput-only   # only the loop against its baselines (about 7 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import soak

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAGE = "docs/performance.md"  # where the tables go, between <!-- name:start --> and <!-- name:end -->
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
EVENTS_PER_FILE = 10_000
INCREMENT = 10_000
SENSOR_FILES = 10_000
SOAK_SECONDS = 120.0
SOAK_ITEMS = 20_000
COMPONENT_ROWS = 100_000
COMPONENT_VOTES = 100_000
# The workers' comparison: 2 x 10 files of 10,000 events (200k) over 20,000 items.
WORKER_FILES, WORKER_EVENTS_PER_FILE, WORKER_ITEMS = 10, 10_000, 20_000


def _peak_mb() -> float:
    """This process's own peak resident memory: VmHWM (ru_maxrss can carry the forking parent's
    over exec), or ru_maxrss where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """This process's CPU time so far (user and system, every thread): unlike the wall clock, it
    barely moves when other work shares the machine's cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _home(path: str):
    from labelloop_assets.core.settings import Home

    return Home(Path(path))


def _definitions(home):
    from labelloop_assets.core.settings import RetrainPolicy
    from labelloop_assets.definitions import build_definitions

    return build_definitions(home, RetrainPolicy(min_label_changes=10**12, min_interval_seconds=0))


def _step_seconds(result) -> dict[str, float]:
    return {
        e.step_key: round(e.event_specific_data.duration_ms / 1000, 3)
        for e in result.all_events
        if e.event_type_value == "STEP_SUCCESS"
    }


# ---- child workloads: each prints one JSON object -------------------------------------------


def child_setup(home_dir: str, events: int, n_items: int) -> dict:
    """Items landed and ingested (corpus v1), then `events` correction events landed."""
    import dagster as dg

    from benchmarks.generate import Workload, write_corrections, write_items

    home = _home(home_dir)
    workload = Workload(n_items=n_items)
    write_items(home, workload)
    defs = _definitions(home)
    with dg.instance_for_test() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        keys = [dg.AssetKey("items"), dg.AssetKey("production_corpus")]
        assert job.execute_in_process(instance=instance, asset_selection=keys, run_config=QUIET).success
    files = write_corrections(home, workload, events, max(1, events // EVENTS_PER_FILE))
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def child_loop(home_dir: str) -> dict:
    """ingest -> validate -> resolve -> promote -> metrics: the ingest job, run by Dagster."""
    import dagster as dg

    home = _home(home_dir)
    defs = _definitions(home)
    with dg.instance_for_test() as instance:
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, run_config=QUIET)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        assert result.success
        raw = [
            {k: v.value for k, v in e.step_materialization_data.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()
            if e.asset_key == dg.AssetKey("raw_corrections")
        ][0]
    steps = _step_seconds(result)
    return {"seconds": seconds, "cpu_seconds": cpu, "steps": steps, "work_seconds": sum(steps.values()),
            "records_in": raw["records_in"], "accepted": raw["accepted"], "quarantined": raw["quarantined"],
            "peak_mb": _peak_mb()}


def _noop_step(specs: list, checks: list):
    """A step body that reports each asset and check as ours do (a little metadata), and no more."""
    import dagster as dg

    def body(context):
        for spec in specs:
            metadata = {"rows": 1, "table": dg.MetadataValue.md("|a|\n|-|\n|1|")}
            yield dg.MaterializeResult(asset_key=spec.key, metadata=metadata)
        for check in checks:
            yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name, passed=True)

    return body


def child_dagster_floor(home_dir: str, runs: int = 3) -> dict:
    """What Dagster alone costs a run of `ingest_job`: the job's own shape (the same assets,
    checks, dependencies and executor, on the same kind of instance) with steps that do nothing
    but report a little metadata, as ours do. The least of `runs` runs."""
    import dagster as dg

    job = _definitions(_home(home_dir)).resolve_job_def("ingest_job")
    graph = job.asset_layer.asset_graph
    nodes = {node.name for node in job.graph.node_defs}
    noops = []
    for definition in graph.assets_defs:
        if not definition.is_executable or definition.node_def.name not in nodes:
            continue
        specs, checks = list(definition.specs), list(definition.check_specs)
        body = _noop_step(specs, checks)
        if specs:
            noops.append(dg.multi_asset(name=definition.node_def.name, specs=specs, check_specs=checks)(body))
        else:
            noops.append(dg.multi_asset_check(name=definition.node_def.name, specs=checks)(body))
    selection = dg.AssetSelection.assets(*graph.executable_asset_keys) | dg.AssetSelection.checks(
        *graph.asset_check_keys)
    job = dg.define_asset_job("ingest_job", selection=selection, executor_def=dg.in_process_executor)
    defs = dg.Definitions(assets=[d for d in noops if d.specs], asset_checks=[d for d in noops if not d.specs],
                          jobs=[job])
    seconds = []
    for _ in range(runs):
        with dg.instance_for_test() as instance:
            started = time.perf_counter()
            result = defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, run_config=QUIET)
            seconds.append(time.perf_counter() - started)
            assert result.success
            steps = len(_step_seconds(result))
    return {"seconds": min(seconds), "runs": seconds, "steps": steps, "real_steps": len(nodes)}


def child_profile(home_dir: str) -> dict:
    """The loop again under pyinstrument (a sampling profiler): where its time goes, as the tree
    of calls that took at least 2% of it."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.005)
    profiler.start()
    loop = child_loop(home_dir)
    profiler.stop()
    text = profiler.output_text(unicode=True, color=False, processor_options={"filter_threshold": 0.02})
    start = text.find("child_loop")
    return {"seconds": loop["seconds"], "text": text[text.rfind("\n", 0, start) + 1:] if start >= 0 else text}


def child_import(runs: int = 5) -> dict:
    """Loading the code location in a fresh interpreter, as `dagster` and the CLI do: the median of
    `runs`."""
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import labelloop_assets.definitions"], cwd=REPO, check=True)
        seconds.append(time.perf_counter() - started)
    return {"median_seconds": statistics.median(seconds), "runs": seconds}


def child_increment(home_dir: str, increment: int) -> dict:
    """`increment` new events on top of what the home already processed."""
    from benchmarks.generate import Workload, write_corrections

    home = _home(home_dir)
    with (home.root / "bench.json").open() as f:
        spec = json.load(f)
    write_corrections(home, Workload(n_items=spec["n_items"]), increment, 1,
                      first_event=spec["events"], prefix="increment")
    return child_loop(home_dir)


def child_sensor(work_dir: str, n_files: int) -> dict:
    """A landing_sensor tick with `n_files` files already seen and 10 new ones."""
    import dagster as dg

    from labelloop_assets.core.landing_state import kind_digest
    from labelloop_assets.core.settings import RetrainPolicy
    from labelloop_assets.resources import build_resources
    from labelloop_assets.sensors import INGESTED_KINDS, landing_sensor

    home = _home(work_dir)
    folder = home.landing_dir("corrections")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"old-{i:06d}.jsonl").write_text("{}\n")
    # The cursor as the sensor leaves it: one digest of each kind's listing.
    cursor = json.dumps({"listings": {kind: kind_digest(home, kind) for kind in INGESTED_KINDS}})
    for i in range(10):
        (folder / f"new-{i:02d}.jsonl").write_text("{}\n")
    resources = build_resources(home, RetrainPolicy(10**12, 0))
    timings = []
    with dg.instance_for_test() as instance:
        for _ in range(21):
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
                started = time.perf_counter()
                result = landing_sensor(ctx)
                timings.append(time.perf_counter() - started)
            assert len(result.run_requests) == 1
    return {"median_ms": statistics.median(timings) * 1000, "max_ms": max(timings) * 1000,
            "files_seen": n_files, "new_files": 10}


def child_train(home_dir: str) -> dict:
    """retrained_model on the corpus of the prepared home."""
    import dagster as dg

    home = _home(home_dir)
    defs = _definitions(home)
    with dg.instance_for_test() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        started = time.perf_counter()
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("retrained_model")], run_config=QUIET
        )
        seconds = time.perf_counter() - started
        meta = {
            k: v.value
            for e in result.get_asset_materialization_events()
            for k, v in e.step_materialization_data.materialization.metadata.items()
        }
    return {"seconds": seconds, "n_train_rows": meta["n_train_rows"],
            "gold_accuracy": meta["gold_accuracy"], "peak_mb": _peak_mb()}


def child_components(rows: int, votes: int) -> dict:
    """The two pure computations whose cost grows with history, on synthetic data: feature drift
    (rows x 16 features per window) and contributor reliability (votes by 200 contributors)."""
    import numpy as np
    import polars as pl

    from labelloop_assets.core.drift import feature_drift
    from labelloop_assets.core.reliability import estimate_reliability

    rng = np.random.default_rng(16)
    baseline, current = rng.normal(size=(rows, 16)), rng.normal(0.1, 1.0, size=(rows, 16))
    # Best of two: the first call also pays for fresh memory pages.
    drift_seconds = min(_seconds(lambda: feature_drift(baseline, current)) for _ in range(2))

    labels = tuple(f"class_{k}" for k in range(10))
    n_users, per_item = 200, 4
    n_items = max(1, votes // per_item)
    truth = rng.integers(0, 10, size=n_items)
    voters = np.argsort(rng.random((n_items, n_users)), axis=1)[:, :per_item].ravel()
    item = np.repeat(np.arange(n_items), per_item)
    accuracy = np.linspace(0.5, 0.95, n_users)
    right = rng.random(item.size) < accuracy[voters]
    voted = np.where(right, truth[item], (truth[item] + rng.integers(1, 10, size=item.size)) % 10)
    vote_rows = pl.DataFrame({
        "item_id": [f"item-{i:06d}" for i in item],
        "user_pseudonym": [f"u_{u:04x}" for u in voters],
        "corrected_label": [labels[v] for v in voted],
    })
    anchored = np.flatnonzero(rng.random(n_items) < 0.1)
    anchors = pl.DataFrame({"item_id": [f"item-{i:06d}" for i in anchored],
                            "label": [labels[truth[i]] for i in anchored]})
    estimates: list = []
    reliability_seconds = _seconds(lambda: estimates.append(estimate_reliability(vote_rows, anchors, labels)))
    return {"drift_rows": rows, "drift_seconds": drift_seconds, "votes": vote_rows.height,
            "contributors": estimates[0].height, "reliability_seconds": reliability_seconds,
            "peak_mb": _peak_mb()}


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def child_raw_floor(home_dir: str) -> dict:
    """The fastest plain read of the same files + one group-by + one DuckDB insert."""
    import duckdb

    home = _home(home_dir)
    files = sorted(str(p) for p in home.landing_dir("corrections").glob("*.jsonl"))
    database = home.root / "raw_floor.duckdb"
    database.unlink(missing_ok=True)
    started, cpu = time.perf_counter(), _cpu_seconds()
    with duckdb.connect(str(database)) as con:
        con.execute(
            "CREATE TABLE raw AS SELECT * FROM read_ndjson(?, ignore_errors = true, "
            "format = 'newline_delimited')", [files],
        )
        con.execute(
            "CREATE TABLE per_item AS SELECT item_id, corrected_label, count(*) AS n "
            "FROM raw GROUP BY ALL"
        )
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    polars_note = "Polars' read_ndjson fails the whole file on a malformed line, so DuckDB's reader is the floor"
    return {"seconds": seconds, "cpu_seconds": cpu, "engine": "duckdb read_ndjson(ignore_errors)", "note": polars_note,
            "peak_mb": _peak_mb()}


def child_pandas(home_dir: str) -> dict:
    from benchmarks import pandas_baseline as pb

    home = _home(home_dir)
    files = sorted(home.landing_dir("corrections").glob("*.jsonl"))
    items = pb.load_items(home.landing_dir("items") / "items-000.jsonl")
    labels = pb.read_labels(home.ontology_file)
    database = home.root / "pandas.duckdb"
    database.unlink(missing_ok=True)
    started, cpu = time.perf_counter(), _cpu_seconds()
    counts = pb.run(files, database, labels, items, b"bench-key")
    return {"seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu, **counts,
            "peak_mb": _peak_mb()}


def child_label_issues() -> dict:
    from benchmarks.label_issues import run

    started = time.perf_counter()
    result = run()
    return {**result, "seconds": round(time.perf_counter() - started, 2)}


def child_soak(home_dir: str, seconds: float, n_items: int) -> dict:
    """Landing files with mixed bad rows under the sensors for a bounded time, then reconciled."""
    shutil.rmtree(home_dir, ignore_errors=True)  # reconciliation counts from an empty home
    result = soak.soak(Path(home_dir), seconds, n_items=n_items)
    return {**result, "peak_mb": _peak_mb()}


# Hostile files, each ingested alone beside one genuine file, in a child of its own: what a file
# can cost is the child's peak memory minus that of the same run with the genuine file only.
BOMBS = {
    "none": "the genuine file alone (the baseline)",
    "newlines-128mib": "128 MiB of newlines",
    "newlines-512mib": "512 MiB of newlines (the largest file the contract reads)",
    "parquet-zstd": "15 KB of zstd Parquet: 20,000 rows of one 60,000-character string (1.2 GB as text)",
    "parquet-list": "20 KB of Parquet: 20,000 rows of a list of ten 60,000-character strings (12 GB as text)",
    "long-line": "one line of 100 MiB",
    "garbage-lines": "990,000 lines that are not JSON (2 MB; each quarantined with its reason)",
    "too-many-lines": "9,900,000 lines that are not JSON (20 MB)",
}


def _write_bomb(folder: Path, bomb: str) -> None:
    import duckdb

    if bomb.startswith("newlines"):
        size = (512 if bomb.endswith("512mib") else 128) * 1024 * 1024
        with (folder / f"{bomb}.jsonl").open("wb") as handle:
            for _ in range(size // (16 * 1024 * 1024)):
                handle.write(b"\n" * (16 * 1024 * 1024))
    elif bomb == "parquet-zstd":
        with duckdb.connect() as con:
            con.execute(
                "COPY (SELECT 'z' || i AS event_id, repeat('x', 60000) AS rationale FROM range(20000) t(i)) "
                "TO ? (FORMAT parquet, COMPRESSION zstd)", [str(folder / "bomb.parquet")]
            )
    elif bomb == "parquet-list":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, copies = 20_000, 10
        text = pa.DictionaryArray.from_arrays(pa.array([0] * rows * copies, pa.int32()), pa.array(["x" * 60_000]))
        lists = pa.ListArray.from_arrays(pa.array(range(0, rows * copies + 1, copies), pa.int32()), text)
        pq.write_table(pa.table({"event_id": [f"l{n}" for n in range(rows)], "context": lists}),
                       folder / "list-bomb.parquet", compression="zstd")
    elif bomb == "long-line":
        with (folder / "long-line.jsonl").open("wb") as handle:
            handle.write(b'{"event_id": "huge", "rationale": "' + b"y" * (100 * 1024 * 1024) + b'"}\n')
    elif bomb in ("garbage-lines", "too-many-lines"):
        with (folder / "garbage.jsonl").open("wb") as handle:
            for _ in range(99 if bomb == "too-many-lines" else 9):
                handle.write(b"x\n" * 110_000 if bomb == "garbage-lines" else b"x\n" * 100_000)


def child_bomb(work_dir: str, bomb: str) -> dict:
    """One hostile file and one genuine file of 1,000 corrections through the corrections ingest."""
    import polars as pl

    from labelloop_assets.core import ingest, store
    from labelloop_assets.core.ontology import Ontology

    shutil.rmtree(work_dir, ignore_errors=True)
    home = _home(work_dir).ensure()
    folder = home.landing_dir("corrections")
    _write_bomb(folder, bomb)
    written = sum(f.stat().st_size for f in folder.iterdir())  # the hostile file alone
    with store.connect(home.database) as con:
        ontology = Ontology.load(home.ontology_file)
        store.append(con, "items", pl.DataFrame({
            "item_id": [f"it{n}" for n in range(100)], "features": [[0.5, 1.0]] * 100,
            "payload_hash": [f"h{n}" for n in range(100)],
        }))
        genuine = [
            {"event_id": f"g{n}", "item_id": f"it{n % 100}",
             "corrected_label": ontology.labels[n % len(ontology.labels)],
             "user_id": f"user{n % 7}", "user_role": "annotator", "source": "annotation",
             "consent": True, "created_at": "2026-01-01T00:00:00Z", "rationale": "looks like a b"}
            for n in range(1000)
        ]
        pl.DataFrame(genuine).write_ndjson(folder / "genuine.jsonl")
        started = time.perf_counter()
        report = ingest.ingest_corrections(con, home, ontology, os.environ["LABELLOOP_SECRET"].encode(), "bench")
        seconds = time.perf_counter() - started
        whole = dict(con.execute("SELECT source_file, reason FROM quarantine WHERE line_no IS NULL").fetchall())
    return {
        "bomb": bomb, "bytes_on_disk": written,
        "seconds": seconds, "peak_mb": _peak_mb(), "accepted": report.accepted,
        "quarantined": report.quarantined, "reconciles": report.reconciles,
        "reasons": report.reasons, "whole_file": whole,
    }


def bombs(work: Path, log=print) -> dict:
    measured = {}
    for bomb in BOMBS:
        log(f"hostile file: {BOMBS[bomb]} ...")
        measured[bomb] = _child("bomb", work / "bomb", bomb)
    shutil.rmtree(work / "bomb", ignore_errors=True)
    return measured


def bombs_markdown(measured: dict) -> str:
    base = measured["none"]["peak_mb"]
    lines = [
        "Each hostile file landed beside a genuine file of 1,000 corrections and ingested in a process of "
        f"its own; the genuine file alone peaks at {base:,.0f} MB (the interpreter, DuckDB and Polars).",
        "",
        "| hostile file | on disk | outcome | genuine lines accepted | seconds | peak MB | over the baseline |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for bomb, m in measured.items():
        if bomb == "none":
            continue
        outcome = ", ".join(sorted(set(m["whole_file"].values()))) or ", ".join(
            f"{reason} x{n:,}" for reason, n in sorted(m["reasons"].items()))
        lines.append(
            f"| {BOMBS[bomb]} | {m['bytes_on_disk'] / 1024**2:,.2f} MiB | {outcome} | "
            f"{min(m['accepted'], 1000):,} of 1,000 | {m['seconds']:.2f} | {m['peak_mb']:,.0f} | "
            f"{m['peak_mb'] - base:+,.0f} |"
        )
    return "\n".join(lines)


def child_routing(world: str, arm: str) -> dict:
    from benchmarks.routing import run

    return run(world, arm)


CHILDREN = {
    "label_issues": child_label_issues, "soak": child_soak, "routing": child_routing,
    "setup": child_setup, "loop": child_loop, "profile": child_profile, "import": child_import,
    "increment": child_increment, "sensor": child_sensor, "train": child_train,
    "raw_floor": child_raw_floor, "pandas": child_pandas, "components": child_components,
    "bomb": child_bomb, "dagster_floor": child_dagster_floor,
}


def _child(name: str, *args, env: dict | None = None) -> dict:
    env = {**os.environ, "LABELLOOP_SECRET": "mUoB6BqDhzS7xC8mQ0yVfRkTz3NwE4pGaJ1sLd9eK5c", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--child", name, *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the suite ------------------------------------------------------------------------------


def suite(
    scales: list[int], work: Path, n_items: int, log=print,
    increment: int = INCREMENT, sensor_files: int = SENSOR_FILES,
    component_rows: int = COMPONENT_ROWS, component_votes: int = COMPONENT_VOTES,
    workers: tuple[int, int, int] | None = (WORKER_FILES, WORKER_EVENTS_PER_FILE, WORKER_ITEMS),
    import_runs: int = 5,
) -> dict:
    """Every measurement; `workers=None` leaves out the workers' comparison (the smoke test does:
    `test_lake_workers.py` runs the same harness)."""
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": _machine(), "n_items": n_items, "scales": {}}
    for events in scales:
        base = work / f"home-{events}"
        shutil.rmtree(base, ignore_errors=True)
        log(f"[{events:>9,} events] generating landing files ...")
        setup = _child("setup", base, events, n_items)
        (base / "bench.json").write_text(json.dumps({"events": events, "n_items": n_items}))
        copies = {name: work / f"home-{events}-{name}" for name in ("floor", "pandas")}
        if events == max(scales):
            copies["profile"] = work / f"home-{events}-profile"
        for copy in copies.values():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
        log(f"[{events:>9,} events] loop through Dagster ...")
        loop = _child("loop", base)
        log(f"[{events:>9,} events] raw floor, pandas baseline ...")
        floor = _child("raw_floor", copies["floor"])
        pandas = _child("pandas", copies["pandas"])
        entry = {
            "setup": setup, "loop": loop, "raw_floor": floor, "pandas": pandas,
            "events_per_second": events / loop["seconds"],
            "vs_raw_floor": loop["seconds"] / floor["seconds"],
            "pandas_vs_loop": pandas["seconds"] / loop["seconds"],
            # Dagster's orchestration outside its steps: the run minus the steps' own durations
            # (which include Dagster's work inside a step: events, checks, metadata).
            "dagster_overhead_seconds": loop["seconds"] - loop["work_seconds"],
        }
        if events == max(scales):
            log(f"[{events:>9,} events] incremental batch of {increment:,} ...")
            entry["increment"] = _child("increment", base, increment)
            entry["increment_share_of_full"] = entry["increment"]["seconds"] / loop["seconds"]
            entry["increment_work_share"] = entry["increment"]["work_seconds"] / loop["work_seconds"]
            log(f"[{events:>9,} events] Dagster alone: the job's shape with steps that do nothing ...")
            entry["dagster_floor"] = _child("dagster_floor", base)
            log(f"[{events:>9,} events] the loop again under a profiler ...")
            entry["profile"] = _child("profile", copies["profile"])
        results["scales"][str(events)] = entry
        for copy in copies.values():
            shutil.rmtree(copy, ignore_errors=True)
    top = max(scales)
    log(f"[{top:>9,} events] the same loop on the lake (DuckLake on PostgreSQL) ...")
    results["lake"] = _lake(work, top, n_items, results["scales"][str(top)]["loop"])
    if workers is not None:
        log("one worker, then two, on one lake ...")
        results["workers"] = _workers(work, *workers)
    log("sensor tick ...")
    sensor_dir = work / "sensor"
    shutil.rmtree(sensor_dir, ignore_errors=True)
    results["sensor"] = _child("sensor", sensor_dir, sensor_files)
    log("retrained_model ...")
    results["train"] = _child("train", work / f"home-{min(scales)}")
    log("feature drift and contributor reliability ...")
    results["components"] = _child("components", component_rows, component_votes)
    log("loading the code location ...")
    results["import"] = _child("import", import_runs)
    results["targets"] = _targets(results, scales)
    return results


def _catalog(name: str) -> str:
    """A fresh catalog database on LABELLOOP_TEST_PG, or on a private server from Debian's binaries."""
    from labelloop_tests import pg

    return pg.fresh_database(name)


def _lake(work: Path, events: int, n_items: int, embedded: dict) -> dict:
    """The largest scale's setup and ingest loop again, with the lake as the store."""
    base = work / f"lake-{events}"
    shutil.rmtree(base, ignore_errors=True)
    env = {"LABELLOOP_CATALOG": _catalog("bench_lake")}
    _child("setup", base, events, n_items, env=env)
    loop = _child("loop", base, env=env)
    shutil.rmtree(base, ignore_errors=True)
    return {"events": events, "loop": loop, "embedded_seconds": embedded["seconds"],
            "lake_vs_embedded": loop["seconds"] / embedded["seconds"]}


def _workers(work: Path, n_files: int, events_per_file: int, n_items: int) -> dict:
    """The same 2 x n_files files ingested by one worker, then by two, each on a fresh lake."""
    from benchmarks.workers import prove

    measured = {}
    for n in (1, 2):
        base = work / f"workers-{n}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        result = prove(base, _catalog(f"bench_workers_{n}"), n_files=n_files,
                       events_per_file=events_per_file, n_workers=n, kill=False, n_items=n_items)
        if not result["reconciled"]:
            raise RuntimeError(f"{n} worker(s): the lake did not reconcile: {result['checks']}")
        measured[str(n)] = {k: result[k] for k in ("files", "lines", "accepted", "quarantined",
                                                   "corpus_versions", "ingest_seconds")}
        measured[str(n)]["analyst_observations"] = result["analyst"]["observations"]
        shutil.rmtree(base, ignore_errors=True)
    measured["two_vs_one"] = measured["1"]["ingest_seconds"] / measured["2"]["ingest_seconds"]
    return measured


def _targets(results: dict, scales: list[int]) -> dict:
    top = results["scales"][str(max(scales))]
    loop_seconds = [results["scales"][str(s)]["loop"]["seconds"] for s in scales]
    return {
        "loop_within_3x_raw_floor": {"ratio": top["vs_raw_floor"], "met": top["vs_raw_floor"] <= 3},
        "at_least_3x_faster_than_pandas": {"ratio": top["pandas_vs_loop"], "met": top["pandas_vs_loop"] >= 3},
        "increment_at_most_5pct_of_full": {
            "ratio": top.get("increment_share_of_full"),
            "met": top.get("increment_share_of_full", 1) <= 0.05,
        },
        "import_within_1_5s": {"seconds": results["import"]["median_seconds"],
                               "met": results["import"]["median_seconds"] <= 1.5},
        "sensor_tick_under_100ms": {"ms": results["sensor"]["median_ms"],
                                     "met": results["sensor"]["median_ms"] < 100},
        "peak_memory_within_1_5gib": {"mb": top["loop"]["peak_mb"], "met": top["loop"]["peak_mb"] <= 1536},
        "drift_under_1_5s": {"seconds": results["components"]["drift_seconds"],
                             "met": results["components"]["drift_seconds"] < 1.5},
        "reliability_under_10s": {"seconds": results["components"]["reliability_seconds"],
                                  "met": results["components"]["reliability_seconds"] < 10},
        "lake_within_1_5x_embedded": {"ratio": results["lake"]["lake_vs_embedded"],
                                      "met": results["lake"]["lake_vs_embedded"] <= 1.5},
        "linear_scaling": {
            "seconds_per_million": [
                round(s / e * 1e6, 2) for s, e in zip(loop_seconds, scales, strict=True)
            ],
        },
    }


def _machine() -> dict:
    return {
        "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured on {m['cpus']} CPUs, {m['memory_gb']} GiB, Python {m['python']}, {m['platform']}; "
        f"{results['n_items']:,} items.",
        "",
        "| events | loop (Dagster) | events/s | peak MB | in the steps | raw floor | loop / floor | "
        "pandas | pandas / loop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for events, e in results["scales"].items():
        lines.append(
            f"| {int(events):,} | {e['loop']['seconds']:.2f} s | {e['events_per_second']:,.0f} | "
            f"{e['loop']['peak_mb']:,.0f} | {e['loop']['work_seconds']:.2f} s | "
            f"{e['raw_floor']['seconds']:.2f} s | {e['vs_raw_floor']:.1f}x | "
            f"{e['pandas']['seconds']:.2f} s | {e['pandas_vs_loop']:.2f}x |"
        )
    top = list(results["scales"].values())[-1]
    t, c = results["targets"], results["components"]
    lines += _cpu_line(max(results["scales"], key=int), top)
    lines += [
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        f"| end to end within 3x the raw floor | {t['loop_within_3x_raw_floor']['ratio']:.1f}x | "
        f"{_yes(t['loop_within_3x_raw_floor'])} |",
        f"| at least 3x faster than pandas + pandera | {t['at_least_3x_faster_than_pandas']['ratio']:.2f}x | "
        f"{_yes(t['at_least_3x_faster_than_pandas'])} |",
    ]
    if "increment" in top:
        lines.append(
            f"| {top['increment']['records_in']:,} new events cost ≤ 5% of the full run | "
            f"{top['increment']['seconds']:.2f} s = {100 * top['increment_share_of_full']:.1f}% "
            f"(in the steps: {top['increment']['work_seconds']:.2f} s = {100 * top['increment_work_share']:.1f}%) | "
            f"{_yes(t['increment_at_most_5pct_of_full'])} |"
        )
    if "dagster_floor" in top:
        floor = top["dagster_floor"]["seconds"]
        above = top["increment"]["seconds"] - floor
        lines.append(
            f"| (for scale) Dagster alone: `ingest_job`'s {top['dagster_floor']['steps']} steps doing nothing | "
            f"{floor:.2f} s = {100 * floor / top['loop']['seconds']:.1f}% of the full run; the increment above it: "
            f"{above:.2f} s = {100 * above / top['loop']['seconds']:.1f}% | |"
        )
    lines += [
        f"| peak memory ≤ 1.5 GiB at the largest scale | {t['peak_memory_within_1_5gib']['mb']:,.0f} MB | "
        f"{_yes(t['peak_memory_within_1_5gib'])} |",
        f"| `import labelloop_assets.definitions` ≤ 1.5 s (median of 5 fresh interpreters) | "
        f"{t['import_within_1_5s']['seconds']:.2f} s | {_yes(t['import_within_1_5s'])} |",
        f"| landing_sensor tick with {results['sensor']['files_seen']:,} files seen + 10 new < 100 ms | "
        f"{t['sensor_tick_under_100ms']['ms']:.1f} ms | {_yes(t['sensor_tick_under_100ms'])} |",
        f"| feature drift, {c['drift_rows']:,} rows x 16 features per window, < 1.5 s | "
        f"{c['drift_seconds']:.2f} s | {_yes(t['drift_under_1_5s'])} |",
        f"| reliability of {c['contributors']} contributors from {c['votes']:,} votes < 10 s | "
        f"{c['reliability_seconds']:.2f} s | {_yes(t['reliability_under_10s'])} |",
        f"| the lake (DuckLake on PostgreSQL) within 1.5x the embedded file, {results['lake']['events']:,} events | "
        f"{results['lake']['loop']['seconds']:.2f} s vs {results['lake']['embedded_seconds']:.2f} s = "
        f"{t['lake_within_1_5x_embedded']['ratio']:.2f}x | {_yes(t['lake_within_1_5x_embedded'])} |",
        f"| cost grows linearly (seconds per million events, by scale) | "
        f"{', '.join(map(str, t['linear_scaling']['seconds_per_million']))} | |",
        "",
        f"`retrained_model` on a {results['train']['n_train_rows']:,}-item corpus: "
        f"{results['train']['seconds']:.2f} s (gold accuracy {results['train']['gold_accuracy']:.3f}). "
        f"Dagster's orchestration outside its steps (the run minus the steps' durations) cost "
        + ", ".join(f"{e['dagster_overhead_seconds']:.2f} s at {int(k):,}" for k, e in results["scales"].items())
        + "." + _largest_steps(top["loop"]["steps"]),
    ]
    if "workers" in results:
        w = results["workers"]
        lines += [
            "",
            f"Workers on one lake ({w['1']['lines']:,} events in {w['1']['files']} files, landed at once; each "
            "worker a process with its own folders and Dagster home, an analyst reading throughout; every run "
            f"reconciled): one worker {w['1']['ingest_seconds']:.1f} s, two workers {w['2']['ingest_seconds']:.1f} s "
            f"({w['two_vs_one']:.2f}x). Writers of one table group take turns on its lock: two workers overlap "
            "one batch's curation with another's ingest, but not two ingests.",
        ]
    return "\n".join(lines)


def _cpu_line(events: str, entry: dict) -> list[str]:
    """The largest scale's CPU times: what each version costs when the machine is shared."""
    loop, floor, pandas = (entry[k].get("cpu_seconds") for k in ("loop", "raw_floor", "pandas"))
    if None in (loop, floor, pandas):
        return []
    return [
        "",
        f"CPU time (user and system, every thread) at {int(events):,} events, which other work on the "
        f"machine barely moves: loop {loop:.2f} s, raw floor {floor:.2f} s ({loop / floor:.1f}x), "
        f"pandas {pandas:.2f} s (pandas / loop {pandas / loop:.2f}x).",
    ]


def _largest_steps(steps: dict[str, float]) -> str:
    """' Steps at the largest scale: a 1.00 s, b 0.50 s.' for the steps of 0.1 s or more."""
    large = [f"{name} {seconds:.2f} s" for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1])
             if seconds >= 0.1]
    return f" Steps at the largest scale: {', '.join(large)}." if large else ""


def profile_markdown(results: dict) -> str:
    """The profile of the largest run, as pyinstrument prints it."""
    events, entry = max(results["scales"].items(), key=lambda kv: int(kv[0]))
    profile = entry["profile"]
    return "\n".join([
        f"`ingest_job` on {int(events):,} events under pyinstrument ({profile['seconds']:.1f} s with the "
        "profiler attached); calls that took at least 2% of the run, Dagster's own frames folded:",
        "",
        "```text",
        profile["text"].rstrip(),
        "```",
    ])


def _yes(target: dict) -> str:
    return "yes" if target["met"] else "**no**"


def label_issues_markdown(result: dict) -> str:
    """The cleanlab comparison: tuning split, held-out data sets and seeds, the time it took."""
    took = f"The whole comparison took {result['seconds']:.0f} s (tuning {result['tuning_seconds']:.0f} s)."
    return f"{result['markdown']}\n\n{took}"


def write_tables(table: str, marker: str, page: str) -> None:
    """Put `table` between the page's <!-- marker:start --> and <!-- marker:end --> lines."""
    path = REPO / page
    text = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--scales", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--label-issues-only", action="store_true",
                        help="only the label-issue comparison with cleanlab")
    parser.add_argument("--soak-only", action="store_true", help="only the soak run")
    parser.add_argument("--routing-only", action="store_true",
                        help="only the routing efficacy (the demo week once per world and routing policy)")
    parser.add_argument("--bombs-only", action="store_true",
                        help="only the hostile files' peak memory (after the soak run unless --no-soak)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the loop against its baselines (the tables under Results and the profile)")
    parser.add_argument("--no-soak", action="store_true", help="leave out the soak run")
    parser.add_argument("--soak-seconds", type=float, default=SOAK_SECONDS,
                        help="how long landing files keep arriving in the soak run")
    args = parser.parse_args(argv)
    if args.child:
        name, *rest = args.child
        casts = {"routing": (str, str), "setup": (str, int, int), "increment": (str, int), "sensor": (str, int),
                 "bomb": (str, str),
                 "soak": (str, float, int), "components": (int, int), "import": (int,)}
        values = [cast(v) for cast, v in zip(casts.get(name, (str,)), rest, strict=False)]
        print(json.dumps(CHILDREN[name](*values)))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.routing_only:
        return routing_bench(args)
    if args.throughput_only:
        return throughput_bench(args)
    if not args.label_issues_only and not args.no_soak:
        print(f"soak: landing files with bad rows under the sensors for {args.soak_seconds:.0f} s ...")
        soaked = _child("soak", args.work / "soak", args.soak_seconds, SOAK_ITEMS)
        (RESULTS / "soak.json").write_text(json.dumps(soaked, indent=2))
        soak_table = soak.markdown(soaked)
        print(soak_table)
        if not args.no_readme:
            write_tables(soak_table, "bench-soak", PAGE)
        if not soaked["reconciled"]:
            print("soak: the counts did NOT reconcile (see the table)", file=sys.stderr)
            return 1
    if args.soak_only:
        return 0
    if not args.label_issues_only:
        print("hostile files: peak memory of each ...")
        hostile = bombs(args.work)
        (RESULTS / "bombs.json").write_text(json.dumps(hostile, indent=2))
        bombs_table = bombs_markdown(hostile)
        print(bombs_table)
        if not args.no_readme:
            write_tables(bombs_table, "bench-bombs", "docs/hostile-input.md")
        if not all(m["reconciles"] and m["accepted"] >= 1000 for m in hostile.values()):
            print("hostile files: a genuine line was lost or the counts did not reconcile", file=sys.stderr)
            return 1
    if args.bombs_only:
        return 0
    if not args.label_issues_only:
        throughput_bench(args)
    print("label issues: ours vs cleanlab.filter.find_label_issues ...")
    issues = _child("label_issues")
    (RESULTS / "label_issues.json").write_text(json.dumps(issues, indent=2))
    issues_table = label_issues_markdown(issues)
    print(issues_table)
    if not args.no_readme:
        write_tables(issues_table, "bench-issues", PAGE)
    return 0 if args.label_issues_only else routing_bench(args)


def throughput_bench(args: argparse.Namespace) -> int:
    """The loop against its baselines at each scale, the lake, the components and the profile."""
    results = suite(sorted(args.scales), args.work, args.items)
    table = markdown(results)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(table)
    if not args.no_readme:
        write_tables(table, "bench", PAGE)
        write_tables(profile_markdown(results), "bench-profile", PAGE)
    return 0


def routing_bench(args: argparse.Namespace) -> int:
    """The demo week once per world and routing policy: wrong labels fixed per 100 answers."""
    from benchmarks import routing

    print("routing: the demo week per world and routing policy ...")
    found = [_child("routing", world, arm) for world in routing.WORLDS for arm in routing.ARMS]
    (RESULTS / "routing.json").write_text(json.dumps(found, indent=2))
    table = routing.markdown(found)
    print(table)
    if not args.no_readme:
        write_tables(table, "bench-routing", PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
