"""Sensors that run the loop: new landing files -> ingest; accumulated label changes -> retrain.

Neither sensor opens the DuckDB file: one lists file names and sizes, the other reads
materialization metadata from Dagster's event log, so they never race a running job.
"""

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from labelloop_assets.checks.schema_checks import (
    blocking_checks_hold,
    failing_blocking_checks,
)
from labelloop_assets.core.files import landing_names
from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.jobs import ingest_job, retrain_job
from labelloop_assets.resources import LabelloopHome, RetrainCadence

INGESTED_KINDS = ("items", "predictions", "corrections", "reviews")


def landed_files(home: Home) -> dict[str, str]:
    """Every complete landing file, as `kind/name` or `kind/producer/name`, with its size and
    change time (ctime): a file rewritten or appended to under a name already seen changes them."""
    found = {}
    for kind in INGESTED_KINDS:
        folder = home.landing_dir(kind)
        for name in landing_names(folder):
            try:
                st = os.lstat(os.path.join(folder, name))
                found[f"{kind}/{name}"] = f"{st.st_size}:{st.st_ctime_ns}"
            except OSError:  # removed since it was listed, or a folder that cannot be listed
                found[f"{kind}/{name}"] = "-"
    return found


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests an ingest run when files appear or change under landing/{items,predictions,corrections,reviews} "
    "or gold.jsonl changes.",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, labelloop: LabelloopHome
) -> dg.SensorResult | dg.SkipReason:
    home = Home(Path(labelloop.root).resolve())
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen = cursor.get("seen", {})
    if isinstance(seen, list):  # a cursor from before sizes were kept: take today's as seen
        seen = dict.fromkeys(seen)
    current = landed_files(home)
    new = [name for name in current if name not in seen]
    # A file rewritten or appended to under a name already seen: the ingest run reads its new version.
    changed = [name for name, signature in current.items()
               if seen.get(name) is not None and seen[name] != signature]
    # An edited gold.jsonl is ingested too: the items step declares its new evaluation set.
    gold = gold_file_signature(home)
    gold_changed = gold is not None and gold != cursor.get("gold")
    if not new and not changed and not gold_changed:
        return dg.SkipReason(f"no new or changed landing files ({len(current)} already seen)")
    # The run ingests whatever the ledger has not read; the run_key makes a repeated tick harmless.
    trigger = [f"{name}@{current[name]}" for name in new + changed] + ([gold] if gold_changed else [])
    run_key = "landing-" + hashlib.sha256("\n".join(trigger).encode()).hexdigest()[:16]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run_key,
                tags={"labelloop/new_files": str(len(new)), "labelloop/trigger": "landing_sensor",
                      **({"labelloop/changed_files": str(len(changed))} if changed else {}),
                      **({"labelloop/gold_changed": "true"} if gold_changed else {})},
            )
        ],
        # Only the files there now: a cursor that kept every name ever seen would grow without end.
        cursor=json.dumps({"seen": current, **({"gold": gold} if gold else {})}),
    )


def gold_file_signature(home: Home) -> str | None:
    """gold.jsonl's size and modification time (cheap to read each tick); None without one."""
    try:
        found = home.gold_file.lstat()
    except OSError:
        return None
    return f"gold.jsonl@{found.st_size}-{found.st_mtime_ns}"


def _latest_metadata(instance: dg.DagsterInstance, asset: str) -> tuple[dict, float] | None:
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    if not records:
        return None
    materialization = records[0].asset_materialization
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    return metadata, records[0].timestamp


def retrain_decision(
    corpus: tuple[dict, float] | None,
    model: tuple[dict, float] | None,
    policy: RetrainPolicy,
    now: float,
    bursts: tuple[dict, float] | None = None,
    failing_checks: Sequence[str] = (),
) -> tuple[str | None, str]:
    """(run_key or None, reason): the retraining cadence in one place."""
    if failing_checks:
        return None, f"retraining is held: {blocking_checks_hold(list(failing_checks))}"
    if corpus is None or not corpus[0].get("corpus_version"):
        return None, "no corpus version published yet"
    held = int(bursts[0].get("held_bursts", 0)) if bursts else 0
    if held:
        return None, (
            f"retraining is held: {held} correction burst(s) await a reviewer "
            "(labelloop review list --queue bursts)"
        )
    version = int(corpus[0]["corpus_version"])
    total = int(corpus[0].get("label_changes_total", 0))
    run_key = f"retrain-corpus-v{version}"
    if model is None:
        return run_key, f"no model yet: training the first one on corpus v{version}"
    trained_on = int(model[0].get("corpus_version", 0))
    if trained_on >= version:
        return None, f"the latest model is already trained on corpus v{version}"
    since = total - int(model[0].get("label_changes_total", 0))
    if since < policy.min_label_changes:
        return None, (
            f"{since} label changes since the last training, fewer than the threshold of "
            f"{policy.min_label_changes}"
        )
    waited = now - model[1]
    if waited < policy.min_interval_seconds:
        return None, (
            f"{since} label changes are waiting, but only {waited:.0f}s passed since the last "
            f"training (minimum {policy.min_interval_seconds:.0f}s)"
        )
    return run_key, f"{since} label changes since the model trained on corpus v{trained_on}"


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests retraining when promoted label changes reach a threshold and a minimum interval has passed, "
    "unless a blocking check failed or a correction burst is held.",
)
def retrain_sensor(
    context: dg.SensorEvaluationContext, retrain_cadence: RetrainCadence
) -> dg.RunRequest | dg.SkipReason:
    corpus = _latest_metadata(context.instance, "production_corpus")
    model = _latest_metadata(context.instance, "retrained_model")
    bursts = _latest_metadata(context.instance, "correction_bursts")
    run_key, reason = retrain_decision(
        corpus, model, retrain_cadence.policy(), time.time(), bursts,
        failing_blocking_checks(context.instance),
    )
    if run_key is None:
        return dg.SkipReason(reason)
    return dg.RunRequest(run_key=run_key, tags={"labelloop/reason": reason[:200]})
