"""Sensors that run the loop: new landing files -> ingest; accumulated label changes -> retrain.

Neither sensor opens the DuckDB file: one lists file names and sizes and reads what the last
ingest steps recorded, the other reads materialization metadata, both from Dagster's event log,
so they never race a running job.
"""

import hashlib
import json
import time
from collections.abc import Sequence

import dagster as dg

from labelloop_assets.assets.common import GOLD_SIGNATURE, INGEST_ASSET_OF_KIND, LANDING_DIGEST
from labelloop_assets.checks.schema_checks import (
    blocking_checks_hold,
    failing_blocking_checks,
)
from labelloop_assets.core.landing_state import gold_signature, landed_files, listing_digest
from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.jobs import ingest_job, retrain_job
from labelloop_assets.resources import LabelloopHome, RetrainCadence, home_root

INGESTED_KINDS = tuple(INGEST_ASSET_OF_KIND)
# Kept importable from here: the tests and the benchmarks list the landing zone the sensor's way.
__all__ = ["landed_files", "landing_sensor", "retrain_decision", "retrain_sensor"]


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests an ingest run when files appear or change under "
    "landing/{items,predictions,corrections,reviews} "
    "or gold.jsonl changes, unless an ingest run already read them (however it was launched).",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, labelloop: LabelloopHome
) -> dg.SensorResult | dg.SkipReason:
    home = Home(home_root(labelloop.root))
    cursor = json.loads(context.cursor) if context.cursor else {}
    current = landed_files(home)
    if "seen" in cursor:  # a cursor of file names from before the digests: judged by its names once
        return _from_named_cursor(cursor, current, home)
    # The cursor holds one digest per kind and gold.jsonl's signature: its size never grows with
    # the files landed. A kind is seen when its listing matches the cursor (a run was requested
    # for it) or what the latest ingest step of that kind recorded (a run read it, however started).
    # An empty folder holds nothing to read, whatever was recorded before.
    recorded = {kind: _latest_metadata(context.instance, asset) for kind, asset in INGEST_ASSET_OF_KIND.items()}
    listings = _listings(current)
    changed = [
        kind for kind, digest in listings.items()
        if _has_files(current, kind)
        and digest != cursor.get("listings", {}).get(kind) and digest != _recorded(recorded[kind], LANDING_DIGEST)
    ]
    # An edited gold.jsonl is ingested too: the items step declares its new evaluation set.
    gold = gold_signature(home)
    gold_changed = gold is not None and gold not in (cursor.get("gold"), _recorded(recorded["items"], GOLD_SIGNATURE))
    if not changed and not gold_changed:
        return dg.SkipReason(f"no new or changed landing files ({len(current)} already seen)")
    return _request(
        [f"{kind}:{listings[kind]}" for kind in changed] + ([gold] if gold_changed else []),
        {"labelloop/changed_kinds": ",".join(changed)} if changed else {},
        gold_changed,
        {"listings": listings, **({"gold": gold} if gold else {})},
    )


def _listings(current: dict[str, str]) -> dict[str, str]:
    """Each kind's digest, as the ingest step of that kind computes it (core/landing_state.py)."""
    by_kind: dict[str, dict[str, str]] = {kind: {} for kind in INGESTED_KINDS}
    for name, signature in current.items():  # one pass: a tick may list tens of thousands of files
        files = by_kind.get(name.split("/", 1)[0])
        if files is not None:
            files[name] = signature
    return {kind: listing_digest(files) for kind, files in by_kind.items()}


def _has_files(current: dict[str, str], kind: str) -> bool:
    return any(name.startswith(f"{kind}/") for name in current)


def _recorded(latest: tuple[dict, float] | None, key: str) -> str | None:
    return None if latest is None else latest[0].get(key)


def _request(trigger: list[str], tags: dict, gold_changed: bool, cursor: dict) -> dg.SensorResult:
    # The run ingests whatever the ledger has not read; the run_key makes a repeated tick harmless.
    run_key = "landing-" + hashlib.sha256("\n".join(trigger).encode()).hexdigest()[:16]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run_key,
                tags={"labelloop/trigger": "landing_sensor", **tags,
                      **({"labelloop/gold_changed": "true"} if gold_changed else {})},
            )
        ],
        cursor=json.dumps(cursor),
    )


def _from_named_cursor(cursor: dict, current: dict[str, str], home: Home) -> dg.SensorResult | dg.SkipReason:
    """A cursor that named every file seen (with its size and change time, or a bare list of
    names from before sizes were kept, taken as seen today): new and changed files are found by
    name once, and the cursor is replaced by digests."""
    seen = cursor["seen"]
    if isinstance(seen, list):
        seen = dict.fromkeys(seen)
    new = [name for name in current if name not in seen]
    changed = [name for name, signature in current.items()
               if seen.get(name) is not None and seen[name] != signature]
    gold = gold_signature(home)
    gold_changed = gold is not None and gold != cursor.get("gold")
    if not new and not changed and not gold_changed:
        return dg.SkipReason(f"no new or changed landing files ({len(current)} already seen)")
    listings = _listings(current)
    kinds = sorted({name.split("/", 1)[0] for name in new + changed})
    return _request(
        [f"{name}@{current[name]}" for name in new + changed] + ([gold] if gold_changed else []),
        {"labelloop/changed_kinds": ",".join(kinds)} if kinds else {},
        gold_changed,
        {"listings": listings, **({"gold": gold} if gold else {})},
    )


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


# A sensor, not declarative automation: see the note above retrained_model (assets/training.py).
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
