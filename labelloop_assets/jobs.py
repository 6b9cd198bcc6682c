"""Jobs the sensors launch."""

import dagster as dg

INGEST_JOB = "ingest_job"
RETRAIN_JOB = "retrain_job"

ingest_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.groups("ingest", "curation")
    | dg.AssetSelection.assets("label_quality_metrics", "published_views"),
    description="Ingest new landing files, stage and resolve corrections, publish a corpus version, refresh metrics.",
)

retrain_job = dg.define_asset_job(
    RETRAIN_JOB,
    selection=dg.AssetSelection.assets(
        "contributor_reliability", "retrained_model", "model_evaluation", "release_notes", "label_issue_candidates",
        "guideline_report",
        "label_quality_metrics", "label_quality_signals",
        "published_views",
    ),
    description="Re-estimate contributor reliability, train a challenger on the current corpus version, "
    "evaluate it against the champion on the validation plan, rank label-issue candidates, write the guideline report, "
    "refresh metrics, agreement and drift.",
)

MAINTENANCE_JOB = "maintenance_job"

maintenance_job = dg.define_asset_job(
    MAINTENANCE_JOB,
    selection=dg.AssetSelection.assets("store_maintenance"),
    description="Compact the lake's small files, expire snapshots no corpus version needs, verify every key is unique.",
)

# Nightly, when the loop is quiet; the run takes the store's writer lock like any other writer.
maintenance_schedule = dg.ScheduleDefinition(
    job=maintenance_job, cron_schedule="17 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)

SCHEDULED_CHECKS_JOB = "scheduled_checks_job"

# Checks whose verdict changes with the clock alone: they also run with their assets in ingest_job.
scheduled_checks_job = dg.define_asset_job(
    SCHEDULED_CHECKS_JOB,
    selection=dg.AssetSelection.checks(
        dg.AssetCheckKey(dg.AssetKey("escalations"), "escalations_within_sla"),
        dg.AssetCheckKey(dg.AssetKey("correction_bursts"), "no_held_bursts"),
    ),
    description="Re-evaluate the escalation SLA and the held-burst checks against the store as it is now, "
    "so that a breach shows while no files land.",
)

# Hourly: an SLA counts in hours; the checks only read the store, briefly.
scheduled_checks_schedule = dg.ScheduleDefinition(
    job=scheduled_checks_job, cron_schedule="7 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)

REVIEW_TASKS_JOB = "review_tasks_job"
review_tasks_job = dg.define_asset_job(
    REVIEW_TASKS_JOB,
    selection=dg.AssetSelection.assets("label_issue_candidates", "review_tasks"),
    description="Rank label-issue candidates on today's corpus and issue the day's review tasks to the outbox.",
)
# Each morning: the day's work list (budgets, arms and expiry in review_tasks.yaml).
review_tasks_schedule = dg.ScheduleDefinition(
    job=review_tasks_job, cron_schedule="0 6 * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)
