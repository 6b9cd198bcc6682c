"""Concurrency: runs started together, analysts reading while the loop writes, and a DuckDB file
held by another process.

Runs that Dagster's daemon launches share an instance, and `dagster.yaml` admits one step of the
pool `duckdb` at a time across all of them (except two claims in the same millisecond, which
Dagster's SQLite storage can both grant; the file lock then serializes them). Runs executed in
process on instances of their own (tests, `dagster asset materialize` without DAGSTER_HOME)
share only the file: DuckDB lets one process hold it, and labelloop waits for it, for
LABELLOOP_DB_WAIT_SECONDS at most.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from labelloop_assets import cli
from labelloop_assets.core import publish, store
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import INGEST_JOB, RETRAIN_JOB
from labelloop_assets.resources import LabelloopHome
from labelloop_assets.sensors import landing_sensor
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, set_yaml, write_jsonl

# Pairs of runs in processes of their own, and a module-wide pair on the shipped instance (~20 s).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

# A run in a process of its own, as the daemon's run worker or a manual `dagster` command runs it.
RUNNER = textwrap.dedent(
    """
    import json, os, sys, time, traceback
    from pathlib import Path

    import dagster as dg

    from labelloop_assets.core import store, train
    from labelloop_assets.core.settings import Home, RetrainPolicy
    from labelloop_assets.definitions import build_definitions

    root, jobs, instance_kind, tags, gate = sys.argv[1:]
    QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


    def meet(folder, timeout):
        # Wait (bounded) until both runs have reached this point.
        os.makedirs(folder, exist_ok=True)
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + timeout
        while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)


    phase = 0
    first_open = os.environ.get("MEET_AT_FIRST_OPEN")
    if first_open:
        connect, opened = store.connect, set()

        def connect_when_the_other_run_is_here_too(*args, **kwargs):
            if phase not in opened:
                opened.add(phase)
                meet(Path(first_open, str(phase)), 60)
            return connect(*args, **kwargs)

        store.connect = connect_when_the_other_run_is_here_too

    def pool():
        return instance.event_log_storage.get_concurrency_info("duckdb")


    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up after 60 s waiting for {what}")
            time.sleep(0.005)


    # The daemon launches queued runs one after another: the second run is submitted while the
    # first holds the pool's slot, and the first keeps its first step open until the second has
    # queued for the slot. (Dagster's slot claim on SQLite storage is a check, then an insert:
    # two claims in the same millisecond could both be granted. The file lock still serializes
    # them; the manual pair tests that.) From then on each run queues while the other runs.
    staggered = os.environ.get("START_WHEN_POOL_TAKEN")
    if staggered and os.environ.get("RUN_INDEX") == "0":
        connect, queued = store.connect, []

        def connect_once_the_other_run_is_queued(*args, **kwargs):
            if not queued and pool().claimed_slots:
                wait_for(lambda: pool().pending_step_count > 0, "the other run to queue for the slot")
                queued.append(True)
            return connect(*args, **kwargs)

        store.connect = connect_once_the_other_run_is_queued

    fit_gate = os.environ.get("FIT_GATE")
    if fit_gate:
        fit = train.fit

        def fit_after_the_other_run_read_the_registry(*args, **kwargs):
            if any(frame.name == "retrained_model" for frame in traceback.extract_stack()):
                meet(fit_gate, 60)
            return fit(*args, **kwargs)

        train.fit = fit_after_the_other_run_read_the_registry

    defs = build_definitions(Home(Path(root)), RetrainPolicy(2, 0))
    instance = dg.DagsterInstance.get() if instance_kind == "shared" else dg.DagsterInstance.ephemeral()
    for phase, job in enumerate(jobs.split(",")):
        # The parent looks at the state between phases, then lets both runs go on together.
        while phase and not Path(gate, f"go-{phase}").exists():
            time.sleep(0.01)
        meet(Path(gate, f"start-{phase}"), 120)
        if staggered and os.environ.get("RUN_INDEX") == "1":
            wait_for(lambda: pool().claimed_slots, "the other run to hold the slot")
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance, tags=json.loads(tags), run_config=QUIET, raise_on_error=False
        )
        steps, failures = {}, []
        for record in instance.all_logs(result.run_id):
            event = record.dagster_event
            if event is None or event.event_type_value not in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE"):
                continue
            steps.setdefault(event.step_key, []).append(record.timestamp)
            if event.event_type_value == "STEP_FAILURE":
                data = event.step_failure_data
                failures.append(
                    data.user_failure_data.description if data.user_failure_data else data.error.to_string()
                )
        print(json.dumps({"success": result.success, "steps": steps, "failures": failures}), flush=True)
    """
)
HOLDER = textwrap.dedent(
    """
    import sys, time
    import duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
    """
)
# Counted per table: equal to a single uninterrupted run means nothing was lost or doubled.
COMPARED = {
    "items": "item_id",
    "predictions": "prediction_id",
    "raw_corrections": "event_id, source_file, line_no",
    "quarantine": "source_file, line_no, reason",
    "ingested_files": "path, records_in, accepted, quarantined",
    "validated_labels": "event_id",
    "label_history": "item_id, corpus_version, change_order, label, change_kind",
    "corpus_versions": "corpus_version, n_items, label_changes_total",
    "production_corpus": "item_id, label, updated_version",
    "audit_log": "action, target, outcome",
    "models": "model_version, corpus_version, status",
    "model_evaluations": "challenger, decision",
    "release_notes": "challenger, decision",
}


def _new_home(root: Path, items: list[dict] | None = None) -> Home:
    home = Home(root.resolve()).ensure()
    # The test worlds have 15 gold items; the shipped plan wants 30 before it promotes a model.
    set_yaml(home.validation_file, {"min_eval_items": 10})
    land_items(home, items or make_items()[0])
    return home


def _land_traffic(home: Home, tag: str = "c") -> None:
    write_jsonl(home.landing_dir("predictions"), f"{tag}-p.jsonl", [
        {"prediction_id": f"{tag}-p-{i}", "item_id": f"item-{i:03d}", "model_version": "m0001",
         "predicted_label": "zero", "confidence": 0.55, "served_at": "2026-03-02T09:00:00Z"}
        for i in range(30, 40)
    ])
    write_jsonl(home.landing_dir("corrections"), f"{tag}-1.jsonl", [
        correction(f"{tag}-1", "item-030", "one", prediction_id=f"{tag}-p-30"),
        correction(f"{tag}-2", "item-031", "zero", user="rita"),
        correction(f"{tag}-3", "item-036", "two", user="carol", role="annotator", consent=False),
        "{not json",
    ])
    write_jsonl(home.landing_dir("corrections"), f"{tag}-2.jsonl", [
        correction(f"{tag}-2", "item-031", "zero", user="rita"),
        correction(f"{tag}-4", "item-040", "two", user="rita"),
    ])


def _run(home: Home, job: str, **kwargs) -> dg.ExecuteInProcessResult:
    return build_definitions(home, RETRAIN).resolve_job_def(job).execute_in_process(
        instance=kwargs.pop("instance", None) or dg.DagsterInstance.ephemeral(),
        run_config=QUIET, raise_on_error=False, **kwargs,
    )


def _snapshot(home: Home) -> dict[str, list[tuple]]:
    with store.connect(home.database, read_only=True) as con:
        return {
            table: store.frame(con, f"SELECT {columns} FROM {table} ORDER BY ALL").rows()
            for table, columns in COMPARED.items()
        }


def _copy(home: Home, root: Path) -> Home:
    copy = Home(root.resolve())
    shutil.copytree(home.root, copy.root)
    return copy


def _alone(home: Home, job: str) -> dict[str, list[tuple]]:
    """The job run once, alone (on a copy of the state the pair started from)."""
    assert _run(home, job).success
    return _snapshot(home)


class Pair:
    """Two runs of each of `jobs` in two processes of their own, released together job by job."""

    def __init__(self, home: Home, jobs: tuple[str, ...], root: Path, shared_instance: Path | None = None,
                 tags: tuple[dict, dict] = ({}, {}), env: dict | None = None,
                 start_second_when_pool_taken: bool = False):
        root.mkdir(parents=True)
        script, self.gate = root / "runner.py", root / "gate"
        script.write_text(RUNNER)
        self.gate.mkdir()
        environment = {**os.environ, **(env or {}), "LABELLOOP_HOME": str(home.root)}
        if start_second_when_pool_taken:
            environment["START_WHEN_POOL_TAKEN"] = "1"
        if shared_instance is None:
            environment["DAGSTER_HOME"] = str(root)
        else:
            environment.update(DAGSTER_HOME=str(shared_instance),
                               LABELLOOP_DAGSTER_STORAGE=str(shared_instance / "storage"))
        kind = "ephemeral" if shared_instance is None else "shared"
        self.logs = [root / f"run-{n}.log" for n in range(2)]
        self.children = [
            subprocess.Popen(
                [sys.executable, str(script), str(home.root), ",".join(jobs), kind, json.dumps(run_tags),
                 str(self.gate)],
                env={**environment, "RUN_INDEX": str(index)}, stdout=subprocess.PIPE, stderr=log.open("w"),
                text=True,
            )
            for index, (run_tags, log) in enumerate(zip(tags, self.logs, strict=True))
        ]
        self.phases: list[list[dict]] = []

    def results(self, phase: int = 0) -> list[dict]:
        """Both runs' outcomes of the job at `phase`, letting the runs start it first."""
        while len(self.phases) <= phase:
            if self.phases:
                (self.gate / f"go-{len(self.phases)}").touch()
            lines = [child.stdout.readline() for child in self.children]
            assert all(lines), "\n".join(log.read_text()[-3000:] for log in self.logs)
            self.phases.append([json.loads(line) for line in lines])
        return self.phases[phase]

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()


@pytest.fixture(scope="module", autouse=True)
def pool_pair(tmp_path_factory):
    """A sensor-requested ingest run and a manual one on an instance configured by the shipped
    dagster.yaml, the manual one submitted while the sensor's run holds the slot. Started before
    this module's other tests: the pool hands its slot over by polling about once a second, so
    the pair takes ~20 s of mostly waiting."""
    root = tmp_path_factory.mktemp("pool")
    home = _new_home(root / "home")
    _land_traffic(home)
    instance_dir = root / "dagster"
    instance_dir.mkdir()
    shutil.copy(REPO / "dagster.yaml", instance_dir / "dagster.yaml")
    # The instance's storage exists before runs start (the daemon creates it), and its sensor
    # requests the first run.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LABELLOOP_DAGSTER_STORAGE", str(instance_dir / "storage"))
        with dg.DagsterInstance.from_config(str(instance_dir)) as instance, dg.build_sensor_context(
            instance=instance, resources={"labelloop": LabelloopHome(root=str(home.root))}
        ) as context:
            [request] = landing_sensor(context).run_requests
    sensor_tags = {**request.tags, "dagster/sensor_name": "landing_sensor", "dagster/run_key": request.run_key}
    alone = _copy(home, root / "alone")
    with Pair(home, (INGEST_JOB,), root / "runs", shared_instance=instance_dir, tags=(sensor_tags, {}),
              start_second_when_pool_taken=True) as pair:
        yield home, pair, _alone(alone, INGEST_JOB)


def _intervals(result: dict) -> list[tuple[float, float, str]]:
    return [(min(times), max(times), step) for step, times in result["steps"].items()]


def _in_flight_together(results: list[dict]) -> bool:
    spans = [(min(s for s, _, _ in _intervals(r)), max(e for _, e, _ in _intervals(r))) for r in results]
    return max(start for start, _ in spans) < min(end for _, end in spans)


@pytest.fixture(scope="module")
def manual_pair(tmp_path_factory):
    """Two manual runs in process, each on an instance of its own: an ingest, then a training.
    Both runs of a job meet at their first opening of the file, so they contend for it; the
    trainings meet again at the fit, after both read the registry, as two slower fits would."""
    root = tmp_path_factory.mktemp("manual")
    home = _new_home(root / "home")
    _land_traffic(home)
    alone = _copy(home, root / "alone")
    gates = {"MEET_AT_FIRST_OPEN": str(root / "first-open"), "FIT_GATE": str(root / "fit")}
    with Pair(home, (INGEST_JOB, RETRAIN_JOB), root / "runs", env=gates) as pair:
        yield home, pair, _alone(alone, INGEST_JOB)


def test_runs_in_process_without_a_shared_instance_take_turns_on_the_file(manual_pair):
    home, pair, reference = manual_pair

    results = pair.results(0)

    assert [r["success"] for r in results] == [True, True], [r["failures"] for r in results]
    assert _in_flight_together(results), [r["steps"] for r in results]
    assert _snapshot(home) == reference


def test_two_trainings_in_process_register_one_model(manual_pair):
    home, pair, _ = manual_pair

    results = pair.results(1)

    # The race was run: both trained, each after the other had read the registry.
    assert len(list((home.root.parent / "fit").iterdir())) == 2
    with store.connect(home.database, read_only=True) as con:
        models = store.frame(con, "SELECT model_version, status FROM models").rows()
        evaluations = store.scalar(con, "SELECT count(*) FROM model_evaluations")
    assert models == [("m0001", "champion")] and evaluations == 1
    assert [r["success"] for r in results] == [True, True], [r["failures"] for r in results]


def _reads(progress: Path) -> int:
    """How many whole reads the analyst process has reported so far."""
    try:
        return int(progress.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _answer(con: duckdb.DuckDBPyConnection, view: str) -> tuple:
    return con.execute(f"SELECT count(*), bit_xor(hash(t)) FROM {view} AS t").fetchone()


READER = textwrap.dedent(
    """
    import json, os, sys, time
    import duckdb

    folder, stop, views, progress = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    con = duckdb.connect()
    answers, errors, reads = set(), [], 0
    deadline = time.monotonic() + 60
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            con.execute(open(os.path.join(folder, "views.sql")).read())
            answers.add(tuple(
                tuple(con.execute(f"SELECT count(*), bit_xor(hash(t)) FROM {view} AS t").fetchone())
                for view in views
            ))
            reads += 1
            with open(progress + ".tmp", "w") as file:
                file.write(str(reads))
            os.replace(progress + ".tmp", progress)
        except Exception as error:
            errors.append(str(error))
        if reads + len(errors) == 1:
            print("reading", flush=True)
    print(json.dumps({"answers": sorted(answers), "errors": errors[:5], "reads": reads}))
    """
)


def test_analysts_reading_the_published_views_see_whole_snapshots_and_never_hold_up_the_writer(
    tmp_path, monkeypatch
):
    records, _ = make_items(n=3000, n_gold=15)
    old = _new_home(tmp_path / "old", records[:1500])
    assert _run(old, INGEST_JOB).success
    new = _copy(old, tmp_path / "new")
    land_items(new, records[1500:], "more.jsonl")
    _land_traffic(new)
    assert _run(new, INGEST_JOB).success
    views = ("production_corpus", "corpus_versions", "label_decisions")
    folder, stop, progress = tmp_path / "published", tmp_path / "stop", tmp_path / "reads"
    with store.connect(old.database, read_only=True) as old_con, \
            store.connect(new.database, read_only=True) as new_con:
        snapshots = {tuple(_answer(con, view) for view in views) for con in (old_con, new_con)}
        assert len(snapshots) == 2
        publish.publish(old_con, folder, views)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(folder), str(stop), ",".join(views), str(progress)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert reader.stdout.readline().strip() == "reading"
            # The loop publishes two corpus versions in turn while the analyst reads, until the
            # analyst has read 20 times (however slowly a busy machine lets it read).
            turn, until = 0, time.monotonic() + 60
            while turn < 40 or (_reads(progress) < 20 and time.monotonic() < until):
                publish.publish(new_con if turn % 2 == 0 else old_con, folder, views)
                turn += 1
            publish.publish(new_con, folder, views)
        finally:
            stop.touch()
        out, err = reader.communicate(timeout=60)
        last = tuple(_answer(new_con, view) for view in views)
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert seen["errors"] == [] and seen["reads"] >= 20, seen
    # Every read saw all three views from one published snapshot, and both snapshots were seen.
    assert {tuple(tuple(part) for part in answer) for answer in seen["answers"]} == snapshots
    # The writer finished every turn; an analyst opening the views now sees its last snapshot.
    with duckdb.connect() as con:
        con.execute((folder / "views.sql").read_text())
        assert tuple(_answer(con, view) for view in views) == last
        assert _answer(con, f"read_parquet('{folder / 'production_corpus.parquet'}')") == last[0]
    # Replaced snapshots are kept a while for sessions still reading them, then removed.
    kept = tmp_path / ".published"
    assert len(list(kept.glob("production_corpus.*.parquet"))) > 20
    monkeypatch.setattr(publish, "RETAIN_SECONDS", 0)
    with store.connect(new.database, read_only=True) as new_con:
        publish.publish(new_con, folder, views)
    assert sorted(p.name.split(".")[0] for p in kept.iterdir()) == sorted(views)
    with duckdb.connect() as con:
        con.execute((folder / "views.sql").read_text())
        assert tuple(_answer(con, view) for view in views) == last


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Home:
    home = _new_home(tmp_path_factory.mktemp("held") / "home")
    assert _run(home, INGEST_JOB).success
    return home


@pytest.fixture
def held(ingested, tmp_path):
    """A copy of an ingested home, and a way to hold its DuckDB file from another process."""
    home = _copy(ingested, tmp_path / "home")
    holders = []

    def hold(seconds: float) -> subprocess.Popen:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(home.database), str(seconds)],
            stdout=subprocess.PIPE, text=True,
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "holding"
        return holder

    yield home, hold
    for holder in holders:
        holder.kill()
        holder.wait()


def test_the_cli_waits_for_a_held_file_and_then_reads_it(held, monkeypatch, capsys):
    home, hold = held
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    monkeypatch.setenv(store.WAIT_ENV, "20")
    holder = hold(120)
    started = time.monotonic()
    # Let go 3 s from now: the CLI cannot have read before then, however busy the machine is.
    releaser = threading.Timer(3, holder.kill)
    releaser.start()

    assert cli.main(["status", "--json"]) == 0

    waited = time.monotonic() - started
    releaser.join()
    out, err = capsys.readouterr()
    assert 3 <= waited < 15
    assert f"{home.database} is held by another process (PID {holder.pid}" in err
    assert "waiting up to 20 s" in err
    assert {"table_name": "items", "rows": 60} in json.loads(out)["tables"]


def _release_once_logged(instance: dg.DagsterInstance, holder: subprocess.Popen, text: str) -> threading.Thread:
    """Let the holder go once a run on `instance` has logged `text` (at most after 50 s)."""
    def logged() -> bool:
        try:
            return any(
                text in record.user_message
                for run in instance.get_runs() for record in instance.all_logs(run.run_id)
            )
        except Exception:  # the in-memory instance's SQLite is busy with the run's own writes: look again
            return False

    def watch() -> None:
        deadline = time.monotonic() + 50
        try:
            while time.monotonic() < deadline and not logged():
                time.sleep(0.05)
        finally:
            holder.kill()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_a_run_waits_for_a_held_file_and_says_so(held):
    home, hold = held
    write_jsonl(home.landing_dir("corrections"), "late.jsonl", [correction("late-1", "item-030", "one")])
    instance = dg.DagsterInstance.ephemeral()
    # Held until the run says it waits, however long the run takes to get there.
    holder = hold(120)
    watcher = _release_once_logged(instance, holder, f"is held by another process (PID {holder.pid}")

    result = _run(home, INGEST_JOB, instance=instance)
    watcher.join()

    assert result.success
    messages = [record.user_message for record in instance.all_logs(result.run_id)]
    assert any(f"is held by another process (PID {holder.pid}" in m for m in messages)
    with store.connect(home.database, read_only=True) as con:
        assert store.scalar(con, "SELECT count(*) FROM raw_corrections WHERE event_id = 'late-1'") == 1


def test_a_file_held_too_long_gives_a_clear_error_and_stays_whole(held, monkeypatch):
    home, hold = held
    with store.connect(home.database, read_only=True) as con:
        before = store.frame(con, "SELECT count(*) AS n FROM items").rows()
    write_jsonl(home.landing_dir("corrections"), "late.jsonl", [correction("late-1", "item-030", "one")])
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    monkeypatch.setenv(store.WAIT_ENV, "0.5")
    holder = hold(120)
    busy = f"{home.database} is held by another process (PID {holder.pid}"

    with pytest.raises(SystemExit) as refused:
        cli.main(["status"])
    message = str(refused.value.code)
    assert message.startswith("labelloop: cannot open") and busy in message
    assert "retried for 0.5 s" in message and "Traceback" not in message

    result = _run(home, INGEST_JOB)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("labelloop cannot open its database") and busy in description
    assert "retried for 0.5 s" in description

    holder.kill()
    holder.wait()
    with store.connect(home.database, read_only=True) as con:
        assert store.frame(con, "SELECT count(*) AS n FROM items").rows() == before
    assert _run(home, INGEST_JOB).success
    with store.connect(home.database, read_only=True) as con:
        assert store.scalar(con, "SELECT count(*) FROM raw_corrections WHERE event_id = 'late-1'") == 1


def test_a_sensor_run_and_a_manual_run_on_the_pool_take_turns_and_both_finish(pool_pair):
    home, pair, reference = pool_pair

    sensor_run, manual_run = pair.results()

    assert sensor_run["success"] and manual_run["success"], [sensor_run["failures"], manual_run["failures"]]
    assert set(sensor_run["steps"]) == set(manual_run["steps"]) and len(sensor_run["steps"]) >= 10
    assert _in_flight_together([sensor_run, manual_run]), [sensor_run["steps"], manual_run["steps"]]
    # One step at a time across both runs: no step of one overlaps a step of the other.
    steps = sorted(_intervals(sensor_run) + _intervals(manual_run))
    for (_, ended, step), (began, _, following) in zip(steps, steps[1:], strict=False):
        assert ended <= began, f"{step} and {following} ran at the same time"
    assert _snapshot(home) == reference
