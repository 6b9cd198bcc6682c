"""Correction bursts: robust daily scoring, holding a severe burst, and a reviewer's release or discard.

Unit tests drive core/bursts.py on hand-built volumes; the integration tests land files in a real
LABELLOOP_HOME, run the ingest job on a real Dagster instance, and use the `labelloop` CLI.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone

import dagster as dg
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import review
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.bursts import (
    CONTRIBUTOR,
    COUNTED_VOTES_SQL,
    SEGMENT,
    SEVERE,
    WARN,
    BurstPolicy,
    daily_volume,
    score_bursts,
)
from labelloop_assets.core.settings import LabelloopConfigError, pseudonymization_key
from labelloop_assets.sensors import _latest_metadata, retrain_decision
from labelloop_tests.conftest import (
    RETRAIN,
    correction,
    give_keys,
    key_of,
    land_items,
    make_items,
    set_yaml,
    signed,
    write_jsonl,
)
from labelloop_tests.test_loop import _materialize, _metadata, _rows

POLICY = BurstPolicy()
DAY0 = date(2026, 3, 1)


# ---------------------------------------------------------------------------------------------
# Unit: daily_volume and score_bursts
# ---------------------------------------------------------------------------------------------

# Each ordinary contributor always corrects through one source towards one label, so segment
# shares move exactly with contributor shares.
ROUTINE = {"ann": ("feedback_button", "one"), "bob": ("review_prompt", "two"),
           "cy": ("feedback_button", "zero"), "dee": ("audit_sample", "three")}


def _events(day: date, counts: dict[str, int], routes: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    routes = {**ROUTINE, **(routes or {})}
    rows = []
    for user, n in counts.items():
        source, label = routes[user]
        for k in range(n):
            at = datetime(day.year, day.month, day.day, 8, tzinfo=UTC) + timedelta(minutes=k)
            rows.append({"created_at": at, "user_pseudonym": user, "source": source, "corrected_label": label})
    return rows


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"created_at": pl.Datetime("us", "UTC"), "user_pseudonym": pl.String,
                "source": pl.String, "corrected_label": pl.String},
    )


def _score(days: list[dict[str, int]], routes=None, policy: BurstPolicy = POLICY) -> pl.DataFrame:
    """Score the last of `days` (consecutive days from DAY0) against the ones before it."""
    rows = [r for i, counts in enumerate(days) for r in _events(DAY0 + timedelta(days=i), counts, routes)]
    last = DAY0 + timedelta(days=len(days) - 1)
    return score_bursts(daily_volume(_frame(rows)), [last], policy)


ORDINARY = {"ann": 12, "bob": 10, "cy": 14, "dee": 11}


def test_daily_volume_counts_per_contributor_and_segment_on_the_utc_day():
    rows = _events(DAY0, {"ann": 3, "bob": 2})
    # 23:30 at UTC-5 is already the next day in UTC.
    rows.append({"created_at": datetime(2026, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
                 "user_pseudonym": "ann", "source": "feedback_button", "corrected_label": "one"})
    volume = daily_volume(_frame(rows))
    got = {(d, s, k): n for d, s, k, n in volume.iter_rows()}
    assert got == {
        (DAY0, CONTRIBUTOR, "ann"): 3, (DAY0, CONTRIBUTOR, "bob"): 2,
        (DAY0, SEGMENT, "feedback_button/one"): 3, (DAY0, SEGMENT, "review_prompt/two"): 2,
        (date(2026, 3, 2), CONTRIBUTOR, "ann"): 1, (date(2026, 3, 2), SEGMENT, "feedback_button/one"): 1,
    }


def test_a_new_contributor_mass_correcting_one_day_is_severe():
    scored = _score([ORDINARY] * 5 + [{**ORDINARY, "mallory": 60}],
                    routes={"mallory": ("annotation", "one")})
    mallory = scored.filter((pl.col("scope") == CONTRIBUTOR) & (pl.col("key") == "mallory")).row(0, named=True)
    assert mallory["severity"] == SEVERE
    assert mallory["n_events"] == 60 and mallory["baseline_days"] == 5
    assert mallory["expected"] == pytest.approx(0.0) and mallory["score"] >= POLICY.severe_score
    assert mallory["note"] is None
    segment = scored.filter((pl.col("scope") == SEGMENT) & (pl.col("key") == "annotation/one"))
    assert segment["severity"].to_list() == [SEVERE]
    # Nobody else is flagged: their shares only shrank.
    others = scored.filter(~pl.col("key").is_in(["mallory", "annotation/one"]))
    assert others.height == 8 and others["severity"].is_null().all()


def test_an_ordinary_busy_day_raises_no_alarm():
    busy = {user: 2 * n for user, n in ORDINARY.items()}
    scored = _score([ORDINARY] * 5 + [busy])
    assert scored.height == 8  # four contributors and four segments, all scored
    assert scored["note"].is_null().all()
    assert scored["severity"].is_null().all()
    # Volumes doubled, shares did not: every score is about zero.
    assert scored["score"].abs().max() < 1.0
    assert scored["n_events"].min() >= POLICY.min_events  # large enough to be flagged if it were unusual


def test_a_moderately_growing_contributor_gets_at_most_a_warning():
    # ann usually sends a quarter of the corrections; today 45 of 75. Baseline share 0.25, MAD 0:
    # expected 18.75, scale sqrt(18.75) = 4.33, score 6.06: between warn (5) and severe (10).
    flat = {"ann": 10, "bob": 10, "cy": 10, "dee": 10}
    scored = _score([flat] * 5 + [{**flat, "ann": 45}])
    ann = scored.filter((pl.col("scope") == CONTRIBUTOR) & (pl.col("key") == "ann")).row(0, named=True)
    assert ann["expected"] == pytest.approx(18.75)
    assert POLICY.warn_score <= ann["score"] < POLICY.severe_score
    assert ann["score"] == pytest.approx((45 - 18.75) / 18.75 ** 0.5)
    assert ann["severity"] == WARN
    assert scored.filter(pl.col("severity") == SEVERE).height == 0


def test_the_robust_scale_absorbs_a_contributor_whose_share_always_varies():
    # ann's share swings between days: a high day is within her usual spread, not a burst.
    days = [{"ann": n, "bob": 20, "cy": 20, "dee": 20} for n in (5, 40, 8, 45, 6, 42)]
    days.append({"ann": 70, "bob": 20, "cy": 20, "dee": 20})
    ann = _score(days).filter((pl.col("scope") == CONTRIBUTOR) & (pl.col("key") == "ann")).row(0, named=True)
    assert ann["baseline_mad_share"] > 0.1
    assert ann["severity"] is None and ann["score"] < 2
    # The Poisson floor alone would have raised a warning: the MAD term is what absorbs it.
    assert (70 - ann["expected"]) / ann["expected"] ** 0.5 >= POLICY.warn_score


def test_too_short_a_baseline_gives_no_score_and_a_note_never_severe():
    scored = _score([ORDINARY] * 2 + [{**ORDINARY, "mallory": 200}], routes={"mallory": ("annotation", "one")})
    mallory = scored.filter((pl.col("scope") == CONTRIBUTOR) & (pl.col("key") == "mallory")).row(0, named=True)
    assert mallory["score"] is None and mallory["expected"] is None
    assert mallory["severity"] is None
    assert "2 earlier day(s)" in mallory["note"] and "3 needed" in mallory["note"]
    assert scored["severity"].is_null().all()


def test_the_very_first_day_is_not_scored_either():
    scored = _score([{**ORDINARY, "mallory": 200}], routes={"mallory": ("annotation", "one")})
    assert scored.height == 10 and scored["severity"].is_null().all()
    assert scored["baseline_days"].to_list() == [0] * 10
    assert scored["note"].str.contains("0 earlier day").all()


def test_no_corrections_give_an_empty_result():
    empty = daily_volume(_frame([]))
    assert empty.height == 0 and empty.columns == ["day", "scope", "key", "n"]
    assert score_bursts(empty, [DAY0], POLICY).height == 0
    volume = daily_volume(_frame(_events(DAY0, ORDINARY)))
    assert score_bursts(volume, [], POLICY).height == 0
    # A scored day with no corrections at all: nothing to score, no crash.
    assert score_bursts(volume, [DAY0 + timedelta(days=3)], POLICY).height == 0


def test_only_the_days_with_corrections_form_the_baseline():
    # Four ordinary days spread over three weeks: quiet days between them are not baseline days.
    rows = [r for offset in (0, 6, 11, 17) for r in _events(DAY0 + timedelta(days=offset), ORDINARY)]
    burst_day = DAY0 + timedelta(days=20)
    rows += _events(burst_day, {**ORDINARY, "mallory": 60}, routes={"mallory": ("annotation", "one")})
    scored = score_bursts(daily_volume(_frame(rows)), [burst_day], BurstPolicy(baseline_days=3))
    mallory = scored.filter(pl.col("key") == "mallory").row(0, named=True)
    assert mallory["baseline_days"] == 3 and mallory["severity"] == SEVERE


def test_burst_policy_from_mapping_accepts_the_shipped_settings():
    policy = BurstPolicy.from_mapping({"baseline_days": 10, "warn_score": 4, "may_acknowledge": ["domain_expert"]})
    assert policy.baseline_days == 10 and policy.warn_score == 4.0
    assert policy.may_acknowledge == ("domain_expert",)
    assert BurstPolicy.from_mapping(None) == BurstPolicy()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"baseline": 7}, "unknown keys ['baseline']"),
        ({"warn_score": "high"}, "bursts"),
        ({"baseline_days": None}, "bursts"),
        ({"severe_score": float("nan")}, "bursts.severe_score must be a finite number"),
        ({"severe_score": float("inf")}, "bursts.severe_score must be a finite number"),
        ({"baseline_days": 2.7}, "bursts.baseline_days must be a whole number"),
        ({"baseline_days": "10"}, "bursts.baseline_days must be a whole number"),
        ({"min_events": True}, "bursts.min_events must be a whole number"),
        ({"baseline_days": 0}, "at least 1"),
        ({"min_baseline_days": 20, "baseline_days": 14}, "cannot exceed"),
        ({"warn_score": 12, "severe_score": 10}, "warn_score <= severe_score"),
        ({"min_events": 40, "severe_min_events": 30}, "min_events <= severe_min_events"),
        ({"may_acknowledge": ["janitor"]}, "may_acknowledge must list roles"),
        ({"may_acknowledge": []}, "may_acknowledge must list roles"),
        ("bursts: yes", "must be a mapping"),
    ],
)
def test_burst_policy_from_mapping_rejects_bad_settings(raw, message):
    with pytest.raises(LabelloopConfigError) as error:
        BurstPolicy.from_mapping(raw)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------
# Integration: a planted burst through Dagster, the review CLI and the retrain gate
# ---------------------------------------------------------------------------------------------

BASELINE_DAYS = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
BURST_DAY = "2026-03-05"
ITEMS, _ = make_items(150)
NON_GOLD = [r for r in ITEMS if "initial_label" in r]
ZEROS = [r["item_id"] for r in NON_GOLD if r["initial_label"] == "zero"]  # 45 items
OTHERS = [r["item_id"] for r in NON_GOLD if r["initial_label"] != "zero"]  # 90 items
TARGETS = ZEROS[:40]  # what mallory relabels "one"
BYSTANDER = ZEROS[44]  # a reviewer's ordinary correction on the burst day: "zero" -> "two"
TIED = OTHERS[-1]  # four end users split 2-2: an open escalation
CROWD = ["eve", "fay", "gus", "hal"]


def _at(day: str, k: int) -> str:
    return f"{day}T{8 + k // 60:02d}:{k % 60:02d}:00+00:00"


def _ordinary_day(day_index: int, day: str) -> list[dict]:
    """Four end users, four feedback-button corrections each, on items nobody else touches."""
    events = []
    for u, user in enumerate(CROWD):
        for k in range(4):
            item = OTHERS[day_index * 16 + u * 4 + k]
            events.append(correction(f"{day}-{user}-{k}", item, "two" if k % 2 else "one", user=user,
                                     role="end_user", source="feedback_button", created_at=_at(day, u * 4 + k)))
    return events


def _burst_events(targets=TARGETS, prefix="m", start=0) -> list[dict]:
    return [
        correction(f"{prefix}-{start + k}", item, "one", user="mallory", role="annotator", source="annotation",
                   created_at=_at(BURST_DAY, start + k), rationale="bulk fix: these are all ones")
        for k, item in enumerate(targets)
    ]


def _trust_lone_annotators(home) -> None:
    """A lone annotator may flip a label here, even a new one, so only the hold keeps mallory's
    labels out. The days are a replay of March: lateness runs on the events' clock."""
    set_yaml(home.governance_file, {
        "solo_flip": {"min_accuracy": 0.5, "min_votes": 0},
        "newcomers": {"min_history": 0},
        "escalation": {"clock": "events"},
    })


def _land_history(home) -> None:
    _trust_lone_annotators(home)
    give_keys(home, "reviewer-0", "reviewer-1", "expert-0")  # they sign their acknowledgements
    land_items(home, ITEMS)
    events = [e for i, day in enumerate(BASELINE_DAYS) for e in _ordinary_day(i, day)]
    events += [correction(f"tie-{k}", TIED, label, user=f"tier{k}", role="end_user", source="review_prompt",
                          created_at=_at(BASELINE_DAYS[1], 50 + k))
               for k, label in enumerate(["one", "one", "two", "two"])]
    write_jsonl(home.landing_dir("corrections"), "history.jsonl", events)


def _land_burst_day(home) -> None:
    events = _ordinary_day(4, BURST_DAY) + _burst_events()
    events.append(correction("rev-ok", BYSTANDER, "two", user="rita", role="reviewer", source="audit_sample",
                             created_at=_at(BURST_DAY, 59)))
    write_jsonl(home.landing_dir("corrections"), "burst-day.jsonl", events)


def _ingest(defs, instance) -> dg.ExecuteInProcessResult:
    """The ingest and curation groups (what ingest_job runs, without the metrics and snapshots)."""
    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=list(dg.AssetSelection.groups("ingest", "curation").resolve(graph)),
    )
    assert result.success
    return result


def _labels(home, items) -> dict[str, str]:
    rows = _rows(home, "SELECT item_id, label FROM production_corpus WHERE list_contains($ids, item_id)",
                 {"ids": list(items)})
    return dict(rows.iter_rows())


def _bursts(home) -> pl.DataFrame:
    return _rows(home, "SELECT burst_id, scope, key, day, n_events, severity, status, acknowledged_by, "
                       "acknowledged_role, acknowledgement FROM correction_bursts ORDER BY scope")


def _check(result: dg.ExecuteInProcessResult, name: str):
    return next(e.asset_check_evaluation_data for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                and e.asset_check_evaluation_data.check_name == name)


def _held_scenario(home, defs, instance, one_batch: bool = False):
    """History, then the burst day (or both in one batch); returns the run that held the burst."""
    _land_history(home)
    if not one_batch:
        _ingest(defs, instance)
        assert _rows(home, "SELECT count(*) AS n FROM correction_bursts")["n"][0] == 0
    _land_burst_day(home)
    result = _ingest(defs, instance)
    bursts = _bursts(home)
    mallory = pseudonym(pseudonymization_key(), "mallory")
    assert bursts.select("scope", "key", "n_events", "severity", "status").rows() == [
        ("contributor", mallory, 40, "severe", "held"),
        ("segment", "annotation/one", 40, "severe", "held"),
    ]
    assert bursts["day"].to_list() == [date(2026, 3, 5)] * 2
    return result, bursts


def _refusals(home) -> list[tuple]:
    return _rows(home, "SELECT reason FROM quarantine WHERE kind = 'reviews' ORDER BY reason")["reason"].to_list()


@pytest.mark.slow
def test_a_severe_burst_is_held_until_a_reviewer_discards_it(home, defs, instance, resources, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    result, bursts = _held_scenario(home, defs, instance, one_batch=False)
    contributor_burst, segment_burst = bursts["burst_id"].to_list()

    # The hold is visible in the run: metadata, a warning check, the audit log.
    meta = _metadata(result, "correction_bursts")
    assert (meta["held_bursts"], meta["flagged_bursts"]) == (2, 0)
    assert meta["days_scored"] == BURST_DAY
    check = _check(result, "no_held_bursts")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert contributor_burst in check.metadata["held_bursts"].value
    audit = _rows(home, "SELECT target, outcome FROM audit_log WHERE action = 'burst.hold' ORDER BY target")
    assert audit.rows() == sorted([(contributor_burst, "held"), (segment_burst, "held")])
    assert _metadata(result, "validated_labels")["held_by_bursts"] == 40

    # The held corrections are staged, fall in both bursts (by day and key), and change nothing...
    staged = _rows(home, "SELECT event_id FROM validated_labels WHERE event_id LIKE 'm-%'")
    assert staged.height == 40
    counted = _rows(home, f"SELECT event_id FROM ({COUNTED_VOTES_SQL}) WHERE event_id LIKE 'm-%'")
    assert counted.height == 0
    labels = _labels(home, [*TARGETS, BYSTANDER])
    assert {labels[i] for i in TARGETS} == {"zero"}
    assert _rows(home, "SELECT count(*) AS n FROM label_decisions WHERE list_has_any(event_ids, $ids)",
                 {"ids": staged["event_id"].to_list()})["n"][0] == 0
    # ...while a reviewer's ordinary correction the same day, outside the burst, is promoted.
    assert labels[BYSTANDER] == "two"
    assert _rows(home, f"SELECT count(*) AS n FROM ({COUNTED_VOTES_SQL}) WHERE event_id = 'rev-ok'")["n"][0] == 1

    # Retraining is held: by the sensor's cadence and by the asset itself.
    corpus = _latest_metadata(instance, "production_corpus")
    burst_meta = _latest_metadata(instance, "correction_bursts")
    run_key, reason = retrain_decision(corpus, None, RETRAIN, 0.0, burst_meta)
    assert run_key is None
    assert "held" in reason and "2 correction burst(s)" in reason and "--queue bursts" in reason
    assert retrain_decision(corpus, None, RETRAIN, 0.0, None)[0] is not None  # only the burst holds it
    failed = _materialize(defs, instance, ["retrained_model"], raise_on_error=False)
    assert not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data
    message = failure.user_failure_data.description if failure.user_failure_data else failure.error.message
    assert "training is held" in message and contributor_burst in message and segment_burst in message
    assert not (home.models / "CURRENT").exists()

    # The review queue shows the bursts, one line each with its id whole; `show` lists the
    # corrections behind one.
    assert cli.main(["review", "list", "--queue", "bursts"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("2 correction bursts awaiting a reviewer")
    rows = [line.split()[:3] for line in listed.splitlines() if line.startswith("burst-")]
    assert sorted(rows) == sorted([[contributor_burst, "held", "severe"], [segment_burst, "held", "severe"]])
    assert cli.main(["review", "list", "--queue", "bursts", "--json"]) == 0
    queue = json.loads(capsys.readouterr().out)
    assert {(b["burst_id"], b["status"], b["severity"]) for b in queue} == {
        (contributor_burst, "held", "severe"), (segment_burst, "held", "severe")}
    assert cli.main(["review", "show", contributor_burst, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["burst"]["n_events"] == 40 and "40 of the 57 corrections" in shown["burst"]["reason"]
    assert len(shown["events"]) == 20  # the first 20 of its 40
    assert {e["event_id"] for e in shown["events"]} <= {f"m-{k}" for k in range(40)}
    assert {(e["corrected_label"], e["source"]) for e in shown["events"]} == {("one", "annotation")}
    evidence = json.loads(shown["burst"]["evidence"])
    assert evidence["sources"] == {"annotation": 40}
    assert cli.main(["review", "show", contributor_burst]) == 0
    text = capsys.readouterr().out
    assert "first 20 of its 40 corrections" in text and "m-0" in text
    assert cli.main(["review", "show", "burst-2026-01-01-contributor-0000000000"]) == 1
    assert "no correction burst" in capsys.readouterr().err

    # Refused attempts: a non-reviewer, an escalation word for a burst, a burst word for an escalation.
    assert cli.main(["review", "discard", contributor_burst, "--rationale", "looks fake", "--as", "intern"]) == 3
    err = capsys.readouterr().err
    assert "'intern' is not a reviewer" in err and "recorded for the audit log" in err
    assert cli.main(["review", "decide", contributor_burst, "--label", "one", "--rationale", "fine",
                     "--as", "reviewer-0"]) == 3
    escalation = f"esc-{TIED}-1"
    assert _rows(home, "SELECT escalation_id FROM escalations")["escalation_id"].to_list() == [escalation]
    assert cli.main(["review", "release", escalation, "--rationale", "fine", "--as", "reviewer-0"]) == 3
    capsys.readouterr()
    _ingest(defs, instance)
    assert _refusals(home) == ["decision_not_applicable", "decision_not_applicable", "unknown_reviewer"]
    refused = _rows(home, "SELECT actor, outcome, reason, detail FROM audit_log WHERE action = 'review.decide' "
                          "ORDER BY reason")
    assert refused["outcome"].to_list() == ["refused"] * 3 and refused["actor"].to_list() == ["unverified"] * 3
    assert refused["reason"].to_list() == ["decision_not_applicable", "decision_not_applicable", "unknown_reviewer"]
    assert any("correction burst takes release or discard" in d for d in refused["detail"])
    assert any("escalation takes accept, reject, defer" in d for d in refused["detail"])
    assert _bursts(home)["status"].to_list() == ["held", "held"]
    assert _rows(home, "SELECT escalation_id FROM escalations")["escalation_id"].to_list() == [escalation]
    assert _rows(home, "SELECT count(*) AS n FROM review_decisions")["n"][0] == 0

    # A reviewer discards both bursts (one account's burst is also its segment's).
    for burst in (contributor_burst, segment_burst):
        assert cli.main(["review", "discard", burst, "--rationale", "compromised account, mail sec@corp.example",
                         "--as", "reviewer-0"]) == 0
        assert f"recorded discard of {burst}" in capsys.readouterr().out
    assert len(list(home.landing_dir("reviews").glob("rev-*.jsonl"))) == 5
    after = _ingest(defs, instance)

    bursts = _bursts(home)
    reviewer = pseudonym(pseudonymization_key(), "reviewer-0")
    assert bursts["status"].to_list() == ["discarded", "discarded"]
    assert bursts["acknowledged_by"].to_list() == [reviewer, reviewer]
    assert all(b.startswith("u_") and "reviewer-0" not in b for b in bursts["acknowledged_by"])
    assert bursts["acknowledged_role"].to_list() == ["reviewer", "reviewer"]
    assert all("sec@corp.example" not in a for a in bursts["acknowledgement"])
    assert (
        _metadata(after, "correction_bursts")["held_bursts"],
        _metadata(after, "correction_bursts")["discarded_bursts"],
    ) == (0, 2)
    assert _check(after, "no_held_bursts").passed
    accepted = _rows(home, "SELECT actor, action, target FROM audit_log WHERE outcome = 'accepted' ORDER BY target")
    assert accepted.rows() == sorted([(reviewer, "review.discard", contributor_burst),
                                      (reviewer, "review.discard", segment_burst)])
    assert {v for v in _labels(home, TARGETS).values()} == {"zero"}
    assert cli.main(["review", "list", "--queue", "bursts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # A second word on a decided burst is refused.
    assert cli.main(["review", "release", contributor_burst, "--rationale", "oops", "--as", "reviewer-1"]) == 3
    assert "already discarded" in capsys.readouterr().err

    # Retraining is no longer held, and the model never saw the discarded labels.
    run_key, reason = retrain_decision(_latest_metadata(instance, "production_corpus"), None, RETRAIN, 0.0,
                                       _latest_metadata(instance, "correction_bursts"))
    assert run_key is not None, reason
    trained = _materialize(defs, instance, ["retrained_model"])
    assert trained.success and _metadata(trained, "retrained_model")["model_version"] == "m0001"

    # A later vote on a relabelled item is decided without the discarded one: a lone end user
    # agreeing with mallory stays pending (with mallory's weight it would have been promoted).
    write_jsonl(home.landing_dir("corrections"), "later.jsonl", [
        correction("late-1", TARGETS[0], "one", user="eve", role="end_user", source="feedback_button",
                   created_at="2026-03-06T09:00:00+00:00"),
    ])
    _ingest(defs, instance)
    decision = _rows(home, "SELECT status, support, event_ids FROM label_decisions WHERE item_id = $item "
                           "ORDER BY decision_id DESC LIMIT 1", {"item": TARGETS[0]}).row(0, named=True)
    assert decision["status"] == "pending" and decision["event_ids"] == ["late-1"]
    assert decision["support"] == pytest.approx(1.0)
    assert {v for v in _labels(home, TARGETS).values()} == {"zero"}
    assert "escalation_closed" in _refusals(home)  # the refused second word, audited
    assert _bursts(home)["status"].to_list() == ["discarded", "discarded"]


@pytest.mark.slow
def test_a_released_burst_counts_on_the_next_run(home, defs, instance, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    # History and burst day land together (a replay): every day is scored in the same run.
    result, bursts = _held_scenario(home, defs, instance, one_batch=True)
    assert _metadata(result, "correction_bursts")["days_scored"] == ", ".join([*BASELINE_DAYS, BURST_DAY])
    contributor_burst, segment_burst = bursts["burst_id"].to_list()
    assert {v for v in _labels(home, TARGETS).values()} == {"zero"}
    assert _labels(home, [BYSTANDER])[BYSTANDER] == "two"

    # Releasing one of the two bursts that cover the same corrections is not enough.
    assert cli.main(["review", "release", contributor_burst, "--rationale", "vendor batch, checked",
                     "--as", "expert-0"]) == 0
    result = _ingest(defs, instance)
    assert _bursts(home)["status"].to_list() == ["released", "held"]
    assert _metadata(result, "correction_bursts")["held_bursts"] == 1
    assert {v for v in _labels(home, TARGETS).values()} == {"zero"}

    assert cli.main(["review", "release", segment_burst, "--rationale", "vendor batch, checked",
                     "--as", "reviewer-1"]) == 0
    capsys.readouterr()
    result = _ingest(defs, instance)
    bursts = _bursts(home)
    assert bursts["status"].to_list() == ["released", "released"]
    assert bursts["acknowledged_role"].to_list() == ["domain_expert", "reviewer"]
    # The held votes are decided now, as if they had never been held: mallory may flip alone here.
    decided = _rows(home, "SELECT item_id, status, proposed_label, event_ids FROM label_decisions "
                          "WHERE list_contains($ids, item_id) AND run_id = $run",
                    {"ids": TARGETS, "run": result.run_id})
    assert decided.height == 40 and set(decided["status"]) == {"promote"}
    assert all(len(ids) == 1 and ids[0].startswith("m-") for ids in decided["event_ids"])
    assert {v for v in _labels(home, TARGETS).values()} == {"one"}
    assert _metadata(result, "production_corpus")["label_changes_this_run"] == 40
    # Nothing holds retraining any more.
    assert retrain_decision(_latest_metadata(instance, "production_corpus"), None, RETRAIN, 0.0,
                            _latest_metadata(instance, "correction_bursts"))[0] is not None


@pytest.mark.slow
def test_a_burst_that_trickles_in_is_held_whole_and_its_early_changes_reverted(home, defs, instance):
    """A landing sensor ingests every 30 s, so one account's burst may arrive in several batches.

    The corrections staged before the day's volume crossed the threshold already changed labels;
    once the burst is held they no longer count, and the labels only they had set go back.
    """
    _land_history(home)
    # The first 15 corrections of the day are below min_events: no burst yet, and they count.
    write_jsonl(home.landing_dir("corrections"), "burst-1.jsonl", _burst_events(TARGETS[:15]))
    _ingest(defs, instance)
    assert _rows(home, "SELECT count(*) AS n FROM correction_bursts")["n"][0] == 0
    assert set(_labels(home, TARGETS[:15]).values()) == {"one"}
    # 25 more the same day: the day's 40 are now a severe burst, scored across both batches.
    write_jsonl(home.landing_dir("corrections"), "burst-2.jsonl", _burst_events(TARGETS[15:], start=15))
    result = _ingest(defs, instance)
    bursts = _bursts(home)
    assert bursts.select("n_events", "severity", "status").rows() == [(40, "severe", "held")] * 2
    assert _metadata(result, "correction_bursts")["days_scored"] == BURST_DAY
    evidence = json.loads(_rows(home, "SELECT evidence FROM correction_bursts WHERE scope = 'contributor'")[0, 0])
    assert evidence["changes"] == {"? -> one": 40}
    assert evidence["sample_event_ids"] == [f"m-{k}" for k in range(5)]
    counted = _rows(home, f"SELECT event_id FROM ({COUNTED_VOTES_SQL}) WHERE event_id LIKE 'm-%'")
    assert counted.height == 0
    assert _metadata(result, "validated_labels")["revert"] == 15
    reverted = _rows(home, "SELECT item_id, label, previous_label, approved_by FROM label_history "
                           "WHERE change_kind = 'revert' ORDER BY item_id")
    assert reverted["item_id"].to_list() == sorted(TARGETS[:15])
    assert set(reverted["label"]) == {"zero"} and set(reverted["previous_label"]) == {"one"}
    assert set(reverted["approved_by"]) == {"governance:correction_bursts"}
    labels = _labels(home, TARGETS)
    assert {labels[i] for i in TARGETS} == {"zero"}


def test_a_part_time_contributor_with_a_small_share_is_not_held():
    """A weekly auditor has a baseline share of 0 on most days; 40 of a busy day's ~1,000
    corrections (4%) is ordinary work, not an attack: no hold, not even a warning."""
    crowd = {f"a{k}": 48 for k in range(20)}
    routes = {f"a{k}": ("review_prompt", "one") for k in range(20)} | {"auditor": ("audit_sample", "two")}
    days = [crowd] * 14 + [{**crowd, "auditor": 40}]
    auditor = _score(days, routes).filter(pl.col("key") == "auditor").row(0, named=True)
    assert auditor["expected"] == pytest.approx(0.0) and auditor["score"] >= POLICY.severe_score
    assert auditor["severity"] is None  # 40 / 1,000 is under min_share (5%)


def test_a_new_account_taking_a_fifth_of_the_day_is_held_but_a_smaller_share_only_warned():
    base = {"ann": 30, "bob": 30, "cy": 30, "dee": 30}
    routes = {"mallory": ("annotation", "one")}
    assert _score([base] * 5 + [{**base, "mallory": 40}], routes).filter(
        pl.col("key") == "mallory")["severity"].to_list() == [SEVERE]  # 40 of 160 = 25%
    assert _score([base] * 5 + [{**base, "mallory": 20}], routes).filter(
        pl.col("key") == "mallory")["severity"].to_list() == [WARN]  # 20 of 140 = 14%


@pytest.mark.slow
def test_two_acknowledgements_of_one_burst_in_one_batch_only_the_first_counts(home, defs, instance):
    _held_scenario(home, defs, instance)
    contributor_burst = _bursts(home)["burst_id"][0]
    write_jsonl(home.landing_dir("reviews"), "acks.jsonl", [
        signed({"decision_id": "ack-1", "escalation_id": contributor_burst, "decision": "discard",
                "reviewer_id": "reviewer-0", "rationale": "mass relabel", "decided_at": "2026-03-05T18:00:00+00:00"}),
        signed({"decision_id": "ack-2", "escalation_id": contributor_burst, "decision": "release",
                "reviewer_id": "expert-0", "rationale": "looks fine", "decided_at": "2026-03-05T18:05:00+00:00"}),
    ])
    _ingest(defs, instance)
    assert _bursts(home)["status"][0] == "discarded"
    audit = _rows(home, "SELECT action, outcome, reason FROM audit_log WHERE action LIKE 'review.%' "
                        "ORDER BY logged_at, outcome")
    assert audit.rows() == [("review.discard", "accepted", None),
                            ("review.decide", "refused", "escalation_closed")]


@pytest.mark.slow
def test_a_released_burst_that_keeps_growing_is_held_again(home, defs, instance):
    _held_scenario(home, defs, instance)
    for burst_id in _bursts(home)["burst_id"]:
        review.write_decision(home, burst_id, "release", "reviewer-0", "checked: a vendor batch",
                              signer=key_of("reviewer-0"))
    _ingest(defs, instance)
    assert _bursts(home)["status"].to_list() == ["released", "released"]
    # The same account sends 30 more that day: 70 > 1.5 x the 40 the reviewer saw.
    more = [correction(f"m2-{k}", item, "two", user="mallory", role="annotator", source="annotation",
                       created_at=_at(BURST_DAY, 100 + k)) for k, item in enumerate(OTHERS[-30:])]
    write_jsonl(home.landing_dir("corrections"), "more.jsonl", more)
    _ingest(defs, instance)
    contributor = _bursts(home).row(0, named=True)
    assert (contributor["status"], contributor["n_events"]) == ("held", 70)
    holds = _rows(home, "SELECT count(*) AS n FROM audit_log WHERE action = 'burst.hold' AND target = $id",
                  {"id": contributor["burst_id"]})
    assert holds["n"][0] == 2
