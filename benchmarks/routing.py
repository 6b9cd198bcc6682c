"""Routing efficacy: wrong labels fixed per 100 human answers when the demo's annotators answer one
routing policy's tasks all week, on each demo world.

    python -m benchmarks.routing                 # prints the table; run(world, arm) returns one run's numbers

Each run is the whole demo (`labelloop demo`: the same people, traffic, burst and engineer) with
review_tasks.yaml's annotator budget given to one arm: `loop` (expected benefit), `least_confidence`
or `random`. Reviewers' blind audits, end users' feedback and escalations are the same in every run.
Only the simulator knows the truth: a fix is a label change from a wrong label to the true one that
an answer to a task was behind; a break is the reverse. The routing weights and the second-opinion
rule were set while watching the digits world; the text world was not looked at before this
benchmark ran, so it is the held-out one.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ARMS = ("loop", "least_confidence", "random")
WORLDS = ("digits", "text")


def run(world: str, arm: str, seed: int = 7) -> dict:
    """One demo week with every annotator task routed by `arm`."""
    import dataclasses

    import dagster as dg

    from labelloop_assets.demo import simulator
    from labelloop_assets.demo.run import prepare_home, run_demo

    with tempfile.TemporaryDirectory() as folder:
        home = prepare_home(Path(folder) / "home", world)
        config = dataclasses.replace(simulator.WORLDS[world].config, seed=seed)
        started = time.perf_counter()
        with dg.instance_for_test() as instance:
            rows = run_demo(home, instance, config=config, world_name=world, echo=lambda _: None,
                            arms={name: float(name == arm) for name in ARMS})
        seconds = time.perf_counter() - started
    last, first = rows[-1], rows[0]
    return {
        "world": world, "arm": arm, "seed": seed, **last["routing_efficacy"][arm],
        "corpus_accuracy": [first["corpus_label_accuracy"], last["corpus_label_accuracy"]],
        "gold_accuracy": [first["model_gold_accuracy"], last["model_gold_accuracy"]],
        "clean_label_ceiling": last["clean_label_ceiling"], "seconds": round(seconds, 1),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| world | routing | annotator answers | wrong labels fixed | right labels broken | fixed per 100 answers "
        "| net per 100 | corpus accuracy | model on gold (clean-label ceiling) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['world']} | {r['arm']} | {r['answers']:,} | {r['fixed']} | {r['broken']} | "
            f"{r['fixed_per_100_answers']} | {r['net_per_100_answers']} | "
            f"{r['corpus_accuracy'][0]:.3f} → {r['corpus_accuracy'][1]:.3f} | "
            f"{r['gold_accuracy'][0]:.3f} → {r['gold_accuracy'][1]:.3f} ({r['clean_label_ceiling']:.3f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    found = [run(world, arm) for world in WORLDS for arm in ARMS]
    print(markdown(found))
    sys.exit(0)
