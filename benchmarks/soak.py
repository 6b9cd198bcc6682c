"""Soak: landing files with mixed bad rows keep arriving while the sensors run the loop.

A writer thread lands correction files for a bounded time: each with about 5% bad rows of six
kinds (see `generate.BAD_SHARE`), written slowly under a temp name and then renamed, and every
fifth one a replay of an earlier file's lines under a new name. The main thread does what the
daemon does: it ticks `landing_sensor` (keeping its cursor) and `retrain_sensor`, launches each
requested run_key once, and executes the runs through Dagster on a real instance (the demo's
`SensorLoop`). When the time
is up it drains the landing zone and reconciles every count.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.generate import Workload, correction_events, event_lines, write_items

REPLAY_EVERY = 5


@dataclass
class _Writer:
    """Lands correction files until stopped; remembers what it wrote and when."""

    home: object
    workload: Workload
    events_per_file: int
    interval: float
    landed: dict[str, float] = field(default_factory=dict)  # name -> time it became visible
    lines: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            folder = self.home.landing_dir("corrections")
            folder.mkdir(parents=True, exist_ok=True)
            previous: list[list[str]] = []
            k = 0
            while not self.stop.is_set():
                if k % REPLAY_EVERY == REPLAY_EVERY - 1 and previous:
                    lines = previous[len(previous) // 2]
                    name = f"soak-{k:06d}-replay.jsonl"
                else:
                    events = correction_events(self.workload, self.events_per_file, k * self.events_per_file, seed=k)
                    lines = event_lines(events).to_list()
                    name = f"soak-{k:06d}.jsonl"
                    previous.append(lines)
                self._land_slowly(folder, name, lines)
                k += 1
                self.stop.wait(self.interval)
        except BaseException as error:  # surfaced by the main thread, never swallowed
            self.error = error

    def _land_slowly(self, folder: Path, name: str, lines: list[str]) -> None:
        # A file still being written sits under a temp name the sensor ignores.
        temp = folder / f".{name}.part"
        half = len(lines) // 2
        with temp.open("w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines[:half]))
            handle.flush()
            time.sleep(0.05)
            handle.write("".join(line + "\n" for line in lines[half:]))
        temp.replace(folder / name)
        self.landed[name] = time.time()
        self.lines[name] = len(lines)


def soak(home_dir: Path, seconds: float, n_items: int = 5_000, events_per_file: int = 500,
         interval: float = 0.5, retrain_every: int = 2_000) -> dict:
    """Run the loop under a steady stream of landing files for `seconds`, then reconcile."""
    import dagster as dg

    from labelloop_assets.core import store, train
    from labelloop_assets.core.settings import Home, RetrainPolicy
    from labelloop_assets.definitions import build_definitions
    from labelloop_assets.demo.run import SensorLoop
    from labelloop_assets.resources import build_resources

    home = Home(Path(home_dir)).ensure()
    workload = Workload(n_items=n_items, n_users=2_000)
    write_items(home, workload)
    policy = RetrainPolicy(min_label_changes=retrain_every, min_interval_seconds=0)
    defs, resources = build_definitions(home, policy), build_resources(home, policy)
    writer = _Writer(home, workload, events_per_file, interval)
    latencies: list[float] = []
    seen: set[str] = set()
    with dg.instance_for_test() as instance:
        loop = SensorLoop(defs, resources, instance)
        runs = loop.run_sensor("landing_sensor")  # the items file: corpus v1
        thread = threading.Thread(target=writer.run, daemon=True)
        started = time.time()
        thread.start()

        def cycle() -> bool:
            ingested = loop.run_sensor("landing_sensor")
            runs.extend(ingested + loop.run_sensor("retrain_sensor"))
            with store.connect(home.database, read_only=True) as con:
                names = {p.rsplit("/", 1)[-1] for p in store.frame(con, "SELECT path FROM ingested_files")["path"]}
            now = time.time()
            for name in names - seen:
                if name in writer.landed:
                    latencies.append(now - writer.landed[name])
            seen.update(names)
            return bool(ingested)

        while time.time() - started < seconds:
            if not cycle():
                time.sleep(0.2)
        writer.stop.set()
        thread.join()
        elapsed = time.time() - started
        while cycle():  # drain: what landed before the writer stopped is ingested too
            pass
        if writer.error is not None:
            raise RuntimeError(f"the landing writer failed: {writer.error!r}")
        instance_stats = {run.run_id: instance.get_run_stats(run.run_id) for run in runs}
        with store.connect(home.database, read_only=True) as con:
            files = store.frame(
                con, "SELECT path, records_in, accepted, quarantined FROM ingested_files WHERE kind = 'corrections'"
            )
            raw = store.scalar(con, "SELECT count(*) FROM raw_corrections")
            quarantined = store.scalar(con, "SELECT count(*) FROM quarantined_corrections")
            reasons = dict(store.frame(
                con, "SELECT reason, count(*) AS n FROM quarantined_corrections GROUP BY reason ORDER BY n DESC"
            ).iter_rows())
            versions = store.frame(con, "SELECT corpus_version, n_label_changes, label_changes_total "
                                        "FROM corpus_versions ORDER BY corpus_version")
            history_versions = set(
                store.frame(con, "SELECT DISTINCT corpus_version FROM label_history")["corpus_version"]
            )
            champions = store.frame(con, "SELECT model_version FROM models WHERE status = 'champion'")["model_version"]
            n_models = store.scalar(con, "SELECT count(*) FROM models")
    landed = sum(writer.lines.values())
    names = {p.rsplit("/", 1)[-1] for p in files["path"]}
    checks = {
        "every landed file ingested once": names == set(writer.landed) and files.height == len(writer.landed),
        "lines in = ingested records": landed == int(files["records_in"].sum()),
        "records = accepted + quarantined": int(files["records_in"].sum())
        == int(files["accepted"].sum()) + int(files["quarantined"].sum()),
        "accepted rows stored": int(files["accepted"].sum()) == raw,
        "quarantined rows stored with a reason": int(files["quarantined"].sum()) == quarantined,
        "replays quarantined": reasons.get("duplicate_event", 0) > 0,
        "corpus versions contiguous and in history": versions["corpus_version"].to_list()
        == list(range(1, versions.height + 1)) and set(versions["corpus_version"]) <= history_versions,
        "label change totals add up": versions.height == 0 or int(versions["n_label_changes"].sum())
        == int(versions["label_changes_total"][-1]),
        # A first model under the plan's floors is rejected, so "no champion yet" is consistent too.
        "at most one champion, and CURRENT names it": len(champions) <= 1
        and train.current_version(home.models) == (champions[0] if len(champions) else None),
        "every run succeeded": all(run.success for run in runs),
    }
    by_job: dict[str, list[float]] = {}
    for run in runs:
        stats = instance_stats[run.run_id]
        by_job.setdefault(run.dagster_run.job_name, []).append(stats.end_time - stats.start_time)
    return {
        "seconds": round(elapsed, 1),
        "files": len(writer.landed),
        "replay_files": sum(name.endswith("-replay.jsonl") for name in writer.landed),
        "lines": landed,
        "accepted": raw,
        "quarantined": quarantined,
        "reasons": reasons,
        "runs": {job: {"count": len(times), "median_s": round(statistics.median(times), 2),
                       "max_s": round(max(times), 2)} for job, times in by_job.items()},
        "failed_runs": sum(not run.success for run in runs),
        "corpus_versions": versions.height,
        "models": n_models,
        "ingest_latency_s": {
            "median": round(statistics.median(latencies), 2) if latencies else None,
            "max": round(max(latencies), 2) if latencies else None,
        },
        "checks": checks,
        "reconciled": all(checks.values()),
    }


def markdown(result: dict) -> str:
    runs = ", ".join(f"{job} {r['count']} (median {r['median_s']} s, max {r['max_s']} s)"
                     for job, r in result["runs"].items())
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in result["reasons"].items())
    lines = [
        "| soak | value |", "|---|---|",
        f"| duration | {result['seconds']} s of landing, then drained |",
        f"| files landed | {result['files']:,} ({result['replay_files']} replays of earlier files) |",
        f"| lines | {result['lines']:,} = {result['accepted']:,} accepted + {result['quarantined']:,} quarantined |",
        f"| quarantine reasons | {reasons} |",
        f"| runs | {runs}; failed: {result['failed_runs']} |",
        f"| corpus versions / models | {result['corpus_versions']} / {result['models']} |",
        f"| landing → ingested | median {result['ingest_latency_s']['median']} s, "
        f"max {result['ingest_latency_s']['max']} s |",
        f"| reconciled | {'yes' if result['reconciled'] else 'NO'}: "
        + "; ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in result["checks"].items()) + " |",
    ]
    return "\n".join(lines)
