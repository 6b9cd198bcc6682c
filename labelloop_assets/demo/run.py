"""The demo: simulated days of traffic, with every run requested by the sensors and executed by Dagster."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from threadpoolctl import threadpool_limits

from labelloop_assets.core import bursts, store, train
from labelloop_assets.core.lake import CATALOG_ENV
from labelloop_assets.core.settings import (
    DEV_SECRET_WARNING,
    Home,
    RetrainPolicy,
    using_development_secret,
)
from labelloop_assets.definitions import build_definitions
from labelloop_assets.demo import simulator
from labelloop_assets.jobs import RETRAIN_JOB, REVIEW_TASKS_JOB
from labelloop_assets.resources import build_resources

DEMO_MARKER = ".labelloop-demo"
# The full event log goes to the instance (see `make dev`); the terminal shows the table.
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
# The simulated reviewers' private keys: beside the home, never in it (see demo_keys_dir).
DEMO_KEYS = "demo-keys"
# A simulated day passes in seconds, so the demo waits for label changes, not for the clock.
# 25 promoted label changes between trainings: with newcomers' votes weighing little for their
# first two days and reliability earned on blind votes only, the simulated week changes fewer
# labels early on than it did before those rules (measured: 40 trained no better model by day 6).
DEMO_RETRAIN = RetrainPolicy(min_label_changes=25, min_interval_seconds=0)


class DemoRefused(RuntimeError):
    """The demo would overwrite a LABELLOOP_HOME it did not create."""


class DemoStopped(RuntimeError):
    """A simulated day cannot go on: a run failed, or there is no champion to serve predictions."""


def prepare_home(root: Path, world: str = "digits") -> Home:
    """Start from an empty home for `world`; only a home the demo itself made is ever wiped."""
    kind = simulator.WORLDS[world]
    if os.environ.get(CATALOG_ENV, "").strip():
        # The demo wipes its home and starts over: never with a lake, whose catalog is shared.
        raise DemoRefused(
            f"the demo runs on the embedded store only; unset {CATALOG_ENV} to run it "
            "(it would reuse the lake's catalog and delete its data files in the home)"
        )
    if root.exists():
        if not (root / DEMO_MARKER).exists() and _holds_loop_data(Home(root)):
            raise DemoRefused(
                f"{root} holds data that the demo did not create; point LABELLOOP_HOME at an "
                "empty folder or remove it yourself"
            )
        shutil.rmtree(root)
    keys = demo_keys_dir(root, world)
    if keys.exists():
        if not (keys / DEMO_MARKER).exists() and any(keys.iterdir()):
            raise DemoRefused(f"{keys} holds files that the demo did not create; remove it yourself")
        shutil.rmtree(keys)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("created by `labelloop demo`; `make demo` may wipe this folder\n")
    home = Home(root.resolve()).ensure()
    # Simulated days pass in seconds: escalation SLAs run on the events' clock; reviewers
    # promise a decision within a day. The annotators are staff this deployment lists in its
    # contributors.yaml (nobody else can claim the role), so their votes count fully from day 1;
    # the public's fresh ids still weigh a quarter until they have two days of history.
    home.governance_file.write_text(
        home.governance_file.read_text()
        .replace("clock: wall", "clock: events")
        .replace("sla_hours: 48", "sla_hours: 24")
        .replace("exempt_roles: [reviewer, domain_expert]", "exempt_roles: [annotator, reviewer, domain_expert]")
    )
    if kind.ontology is not None:
        home.ontology_file.write_text(kind.ontology)
    return home


def set_task_budgets(home: Home, config: simulator.DemoConfig, arms: dict[str, float] | None) -> None:
    """review_tasks.yaml sized to the simulated people's day (and, for a comparison, one routing arm)."""
    import yaml

    settings = yaml.safe_load(home.review_tasks_file.read_text()) or {}
    settings.update(annotator_budget=config.annotator_answers_per_day, reviewer_budget=config.reviewer_items_per_day)
    if arms is not None:
        settings["arms"] = arms
    home.review_tasks_file.write_text(yaml.safe_dump(settings, sort_keys=False))


def demo_keys_dir(root: Path, world: str = "digits") -> Path:
    """Where the demo keeps its reviewers' private keys: a folder beside the home (data/demo-keys
    for data/home; data/demo-keys-text for the text world's), because a key inside the home is
    refused. Each world has its own, so that running one demo leaves the other's keys alone."""
    return root.resolve().parent / (DEMO_KEYS if world == "digits" else f"{DEMO_KEYS}-{world}")


def grant_and_key(home: Home, world: simulator.DemoWorld) -> dict:
    """The demo deployment's directory: annotators and reviewers granted their roles (claims alone
    count for nothing), each reviewer with a fresh key pair: the private key written outside the
    home as `labelloop keys new` writes it, read back from there, and its public key registered.
    Returns reviewer id -> private key, for the simulated reviewers to sign with."""
    import yaml

    from labelloop_assets.core import signing
    from labelloop_assets.core.settings import DEFAULTS_DIR

    folder = demo_keys_dir(home.root, world.kind.name)
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / DEMO_MARKER).write_text("created by `labelloop demo`; `make demo` may wipe this folder\n")
    signers, people = {}, []
    for person in world.contributors:
        if person.role == "end_user":
            continue
        entry = {"id": person.user_id, "role": person.role}
        if person.role in ("reviewer", "domain_expert"):
            path = folder / f"{person.user_id}.key"
            path.unlink(missing_ok=True)  # a key of an earlier run on this home: replaced
            signing.write_private_key(path, signing.generate())
            signers[person.user_id] = signing.load_private_key(path)
            entry["keys"] = [{"public_key": signing.public_key_text(signers[person.user_id])}]
        people.append(entry)
    header = "".join(
        line for line in (DEFAULTS_DIR / "contributors.yaml").read_text().splitlines(keepends=True)
        if line.startswith("#")
    )
    home.contributors_file.write_text(
        header + f"# The demo's people; the reviewers' private keys are in {folder.name}/ beside this home.\n"
        + yaml.safe_dump({"contributors": people, "producers": []}, sort_keys=False)
    )
    return signers


def _holds_loop_data(home: Home) -> bool:
    landed = home.landing.exists() and any(p.is_file() for p in home.landing.rglob("*"))
    return home.database_file.exists() or landed or (home.models.exists() and any(home.models.iterdir()))


@dataclass
class SensorLoop:
    """Sensor ticks and run launches as the Dagster daemon makes them, executed in process."""

    defs: dg.Definitions
    resources: dict
    instance: dg.DagsterInstance
    landing_cursor: str | None = None

    def tick(self, sensor_name: str) -> list[dg.RunRequest]:
        sensor = self.defs.resolve_sensor_def(sensor_name)
        cursor = self.landing_cursor if sensor_name == "landing_sensor" else None
        with dg.build_sensor_context(
            instance=self.instance, cursor=cursor, resources=self.resources, sensor_name=sensor_name
        ) as context:
            result = sensor(context)
        if isinstance(result, dg.SkipReason):
            return []
        if isinstance(result, dg.SensorResult):
            if sensor_name == "landing_sensor" and result.cursor is not None:
                self.landing_cursor = result.cursor
            return list(result.run_requests or [])
        return [result] if isinstance(result, dg.RunRequest) else []

    def execute(self, sensor_name: str, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        job_name = self.defs.resolve_sensor_def(sensor_name).job_name
        tags = {**request.tags, "dagster/sensor_name": sensor_name, "dagster/run_key": request.run_key}
        return self.defs.resolve_job_def(job_name).execute_in_process(
            instance=self.instance, tags=tags, run_config=QUIET, raise_on_error=False
        )

    def run_sensor(self, sensor_name: str) -> list[dg.ExecuteInProcessResult]:
        # As the daemon does: a run_key that already has a run on the instance is not launched again.
        return [
            self.execute(sensor_name, request)
            for request in self.tick(sensor_name)
            if not self.instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1)
        ]


def _metadata(results: list[dg.ExecuteInProcessResult], asset: str) -> list[dict]:
    found = []
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key == dg.AssetKey(asset):
                found.append({k: v.value for k, v in materialization.metadata.items()})
    return found


def _evaluations(runs: list[dg.ExecuteInProcessResult]) -> list[dict]:
    return [
        {"challenger": m["challenger"], "decision": m["decision"],
         "reasons": [line.removeprefix("- ") for line in m["reasons"].splitlines()]}
        for m in _metadata(runs, "model_evaluation") if "reasons" in m
    ]


def _echo_evaluations(echo: Callable[[str], None], day: int, evaluations: list[dict]) -> None:
    for judged in evaluations:
        verdict = "promoted" if judged["decision"] == "promote" else "rejected"
        echo(f"      day {day}: challenger {judged['challenger']} {verdict}: {judged['reasons'][0]}"
             + (f" (+{len(judged['reasons']) - 1} more)" if len(judged["reasons"]) > 1 else "")
             + f"; notes: reports/release-notes/{judged['challenger']}.md")


# One BLAS thread: the demo's trainings are small, and on a shared 2-core machine BLAS's threads
# wait for each other longer than they compute (measured: the text world's week took 406 s of CPU
# with two threads, 138 s with one, printing the same figures; the digits' 31 s either way).
@threadpool_limits.wrap(limits=1, user_api="blas")
def run_demo(
    home: Home,
    instance: dg.DagsterInstance,
    days: int = 6,
    config: simulator.DemoConfig | None = None,
    retrain: RetrainPolicy = DEMO_RETRAIN,
    echo: Callable[[str], None] = print,
    world_name: str = "digits",
    arms: dict[str, float] | None = None,
) -> list[dict]:
    """Day 0 lands the items; each later day the current model serves and users correct it.
    `config` None: the world's own traffic (simulator.WORLDS). `arms`: review_tasks.yaml's routing
    arms (None: as shipped, the loop with its two control arms)."""
    if using_development_secret():
        echo(f"note: {DEV_SECRET_WARNING}\n")
    world = simulator.build_world(config, simulator.WORLDS[world_name])
    config = world.config
    signers = grant_and_key(home, world)
    loop = SensorLoop(build_definitions(home, retrain), build_resources(home, retrain), instance)
    set_task_budgets(home, config, arms)
    rows: list[dict] = []
    shipped: str | None = None  # training.yaml as shipped, while the engineer's change awaits a training
    echo(_header())
    for day in range(days + 1):
        if day == 0:
            simulator.land_items(world, home)
            sent = {"corrections_sent": 0}
        else:
            version = train.current_version(home.models)
            if version is None:
                raise DemoStopped(
                    f"day {day}: no champion serves predictions (the validation plan rejected every model so "
                    "far; see reports/release-notes/ in the home)"
                )
            model, _ = train.load(home.models / version)
            served = simulator.serve_day(world, home, day, model, version)
            # The morning: the prediction log lands, and the day's work list is issued from it.
            morning = loop.run_sensor("landing_sensor")
            issued = loop.defs.resolve_job_def(REVIEW_TASKS_JOB).execute_in_process(
                instance=instance, raise_on_error=False, run_config=QUIET,
                tags={"dagster/schedule_name": "review_tasks_job_schedule"},  # as the daemon's morning run
            )
            if not issued.success or not all(r.success for r in morning):
                raise DemoStopped(f"day {day}: the morning's runs failed; see `make dev` for their logs")
            sent = simulator.respond_day(world, home, day, served)
        if day == config.weak_training_day:
            shipped = home.training_file.read_text()
            home.training_file.write_text(f"params:\n  C: {config.weak_training_c}\n")
            echo(f"      day {day}: an engineer sets training.yaml params.C to {config.weak_training_c} "
                 "for a smoother next model")
        ingest_runs = (morning if day else []) + loop.run_sensor("landing_sensor")
        retrain_runs = loop.run_sensor("retrain_sensor")
        failed = [r for r in ingest_runs + retrain_runs if not r.success]
        if failed:
            raise DemoStopped(f"day {day}: run {failed[0].run_id} failed; see `make dev` for its logs")
        corrections = _metadata(ingest_runs, "raw_corrections")
        corpus_meta = _metadata(ingest_runs, "production_corpus")
        reviews_meta = _metadata(ingest_runs, "review_decisions")
        with store.connect(home.database, read_only=True) as con:
            corpus = dict(store.frame(con, "SELECT item_id, label FROM production_corpus").iter_rows())
            model_row = store.frame(
                con, "SELECT model_version, gold_accuracy FROM models WHERE status = 'champion'"
            ).to_dicts()
            escalations = store.frame(con, "SELECT * FROM escalations ORDER BY opened_at, item_id")
            held = [
                (burst["burst_id"], bursts.burst_events(con, burst))
                for burst in store.frame(
                    con, "SELECT * FROM correction_bursts WHERE status = 'held' ORDER BY burst_id"
                ).iter_rows(named=True)
            ]
            burst_counts = dict(
                store.frame(con, "SELECT status, count(*) FROM correction_bursts GROUP BY status").iter_rows()
            )
        evaluations = _evaluations(retrain_runs)
        row = {
            "day": day,
            "corrections_received": sum(m["records_in"] for m in corrections),
            "corrections_quarantined": sum(m["quarantined"] for m in corrections),
            "labels_promoted": sum(m["label_changes_this_run"] for m in corpus_meta),
            "corpus_version": corpus_meta[-1]["corpus_version"] if corpus_meta else None,
            "corpus_label_accuracy": round(simulator.corpus_accuracy(world, corpus), 4),
            "model_version": model_row[0]["model_version"] if model_row else None,
            "model_gold_accuracy": round(model_row[0]["gold_accuracy"], 4) if model_row else None,
            "reviews_applied": sum(m["accepted"] for m in reviews_meta),
            "reviews_refused": sum(m["quarantined"] for m in reviews_meta),
            "open_escalations": escalations.height,
            "sla_breaches": int(escalations["sla_breached"].sum()) if escalations.height else 0,
            "bursts_held": len(held),
            "corrections_held": len({e for _, events in held for e in events["event_id"]}),
            "bursts_discarded": burst_counts.get("discarded", 0),
            "bursts_released": burst_counts.get("released", 0),
            "retrained": len(retrain_runs) > 0,
            "model_evaluations": evaluations,
            "ingest_runs": [r.run_id for r in ingest_runs],
            "retrain_runs": [r.run_id for r in retrain_runs],
        }
        assert row["corrections_received"] == sent["corrections_sent"], "every line sent is counted"
        rows.append(row)
        echo(_format(row))
        _echo_evaluations(echo, day, evaluations)
        if shipped is not None and evaluations:
            home.training_file.write_text(shipped)
            shipped = None
            echo(f"      day {day}: the engineer reads the release notes, restores training.yaml and trains again")
            again = loop.defs.resolve_job_def(RETRAIN_JOB).execute_in_process(
                instance=instance, raise_on_error=False, run_config=QUIET, tags={"labelloop/launched_by": "engineer"}
            )
            if not again.success:
                raise DemoStopped(f"day {day}: run {again.run_id} (training) failed; see `make dev` for its logs")
            row["retrain_runs"].append(again.run_id)
            row["model_evaluations"].extend(_evaluations([again]))
            _echo_evaluations(echo, day, _evaluations([again]))
        if day > 0:
            simulator.review_escalations(world, home, day, escalations, signers)
            for decision in simulator.review_bursts(world, home, day, held, signers):
                echo(f"      day {day}: {row['corrections_held']} corrections held by a burst; reviewer: {decision}")
    with store.connect(home.database, read_only=True) as con:
        efficacy = simulator.routing_efficacy(world, con)
    rows[-1]["routing_efficacy"] = efficacy
    rows[-1]["clean_label_ceiling"] = round(simulator.clean_label_ceiling(world, home), 4)
    echo("      routing efficacy, wrong labels fixed per 100 annotator answers (net of labels broken): " + "; ".join(
        f"{arm} {e['fixed_per_100_answers']} ({e['net_per_100_answers']}) of {e['answers']}"
        for arm, e in efficacy.items() if e["answers"]
    ))
    report = home.reports / "demo.json"
    report.write_text(json.dumps(rows, indent=2))
    return rows


COLUMNS = (
    ("day", 3), ("corrections_received", 8), ("corrections_quarantined", 11),
    ("labels_promoted", 8), ("reviews_applied", 7), ("open_escalations", 10),
    ("sla_breaches", 12), ("bursts_held", 11), ("corpus_label_accuracy", 15), ("model_gold_accuracy", 13),
    ("model_version", 5),
)
TITLES = {
    "day": "day", "corrections_received": "received", "corrections_quarantined": "quarantined",
    "labels_promoted": "promoted", "reviews_applied": "reviews", "open_escalations": "escalated",
    "sla_breaches": "SLA breaches", "bursts_held": "bursts held", "corpus_label_accuracy": "corpus accuracy",
    "model_gold_accuracy": "model on gold", "model_version": "model",
}


def _header() -> str:
    return "| " + " | ".join(TITLES[name].rjust(width) for name, width in COLUMNS) + " |\n" + \
        "|" + "|".join("-" * (width + 1) + ":" for _, width in COLUMNS) + "|"


def _format(row: dict) -> str:
    cells = []
    for name, width in COLUMNS:
        value = row[name]
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        cells.append(text.rjust(width))
    return "| " + " | ".join(cells) + " |"
