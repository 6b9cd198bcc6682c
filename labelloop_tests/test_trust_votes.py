"""Votes that cannot be cheaply manufactured: backdating, fresh pseudonyms, farmed reliability.

Each attack runs through the real pipeline (real DuckDB file, real Dagster instance, the shipped
governance.yaml with at most the one setting the test names), first where practical on the old
path (the setting that restores the old behaviour) to show that it worked, then as shipped.
Farmed reliability (the third attack) is in test_trust_reliability.py, which uses this module's
days and helpers: a file of its own, so that the two halves run side by side under `make test`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from labelloop_assets.core import resolve, store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.bursts import BurstPolicy
from labelloop_assets.core.resolve import ResolutionPolicy
from labelloop_assets.core.settings import DEFAULTS_DIR, LabelloopConfigError, file_sha256, pseudonymization_key
from labelloop_tests.conftest import correction, land_items, make_items, write_jsonl
from labelloop_tests.test_loop import _metadata, _rows

ITEMS, _ = make_items(300)
NON_GOLD = [r for r in ITEMS if "initial_label" in r]
ZEROS = [r["item_id"] for r in NON_GOLD if r["initial_label"] == "zero"]  # 95 items
OTHERS = [r["item_id"] for r in NON_GOLD if r["initial_label"] != "zero"]  # 190 items
# The replayed days: March 2026, one ingest batch per day.
DAYS = [date(2026, 3, 1) + timedelta(days=k) for k in range(8)]
CROWD = ["eve", "fay", "gus", "hal"]


def _at(day: date, minute: int) -> str:
    return (datetime(day.year, day.month, day.day, 8, tzinfo=UTC) + timedelta(minutes=minute)).isoformat()


# Settings that restore the old behaviour, to show an attack working before it is shown failing.
LATENESS_OFF = {"late_after_hours: 24": "late_after_hours: 100000"}
NEWCOMERS_OFF = {"min_history: 2": "min_history: 0"}


def _governance(home, replace: dict[str, str]) -> None:
    """Edit the shipped governance.yaml; every setting replaced must be there as shipped."""
    text = home.governance_file.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    home.governance_file.write_text(text)


def _replay(home, *replace: dict[str, str]) -> None:
    """Days replayed from March 2026: lateness and SLAs run on the events' clock (as `make demo`)."""
    _governance(home, {"clock: wall": "clock: events"})
    for settings in replace:
        _governance(home, settings)


def _ingest(defs, instance) -> dg.ExecuteInProcessResult:
    """What ingest_job runs for corrections: the ingest and curation groups."""
    graph = defs.resolve_asset_graph()
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=list(dg.AssetSelection.groups("ingest", "curation").resolve(graph)),
    )
    assert result.success
    return result


def _ordinary_day(k: int, day: date) -> list[dict]:
    """Four end users, four review-prompt corrections each, on items nobody else touches."""
    return [
        correction(f"{day}-{user}-{j}", OTHERS[k * 16 + u * 4 + j], "two" if j % 2 else "one", user=user,
                   role="end_user", source="review_prompt", created_at=_at(day, u * 4 + j))
        for u, user in enumerate(CROWD) for j in range(4)
    ]


def _land_days(home, defs, instance, days: list[date]) -> None:
    for k, day in enumerate(days):
        write_jsonl(home.landing_dir("corrections"), f"day-{day}.jsonl", _ordinary_day(k, day))
        _ingest(defs, instance)


def _backdated_pairs(targets: list[str], before: date, label: str = "two") -> list[dict]:
    """Two fresh end-user ids per item, dated over the 30 days before `before`."""
    return [
        correction(f"bd-{n}-{j}", item, label, user=f"fresh-{n}-{j}", role="end_user", source="feedback_button",
                   created_at=_at(before - timedelta(days=1 + n % 30), j))
        for n, item in enumerate(targets) for j in range(2)
    ]


def _labels(home, items: list[str]) -> dict[str, str]:
    rows = _rows(home, "SELECT item_id, label FROM production_corpus WHERE list_contains($ids, item_id)",
                 {"ids": items})
    return dict(rows.iter_rows())


def _statuses(home, items: list[str]) -> dict[str, str]:
    rows = _rows(home, "SELECT item_id, status FROM latest_label_decisions WHERE list_contains($ids, item_id)",
                 {"ids": items})
    return dict(rows.iter_rows())


def _me(user: str) -> str:
    return pseudonym(pseudonymization_key(), user)


# ---------------------------------------------------------------------------------------------
# 1. Backdating no longer dodges burst detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_backdated_fresh_ids_used_to_flip_a_class_unseen(home, defs, instance):
    """The attack on the old path: with lateness off (a correction always counts on the day its
    sender wrote), the flips spread thin over 30 old days that have no baseline, nothing is
    scored and every targeted item flips. Newcomer weights are off too, to isolate the burst."""
    _replay(home, LATENESS_OFF, NEWCOMERS_OFF)
    land_items(home, ITEMS)
    _land_days(home, defs, instance, DAYS[:5])
    targets = ZEROS[:60]
    write_jsonl(home.landing_dir("corrections"), "backdated.jsonl", _backdated_pairs(targets, DAYS[0]))
    _ingest(defs, instance)
    assert _rows(home, "SELECT count(*) AS n FROM correction_bursts")["n"][0] == 0
    assert set(_labels(home, targets).values()) == {"two"}


@pytest.mark.slow
def test_backdated_fresh_ids_are_held_as_a_burst_on_the_day_they_arrive(home, defs, instance):
    """As shipped (lateness on), the same file counts on the day it arrived (the event clock's
    day, the last ordinary day): it is that day's burst and is held; nothing flips, even with
    newcomer weights off, and a later run does not let it through."""
    _replay(home, NEWCOMERS_OFF)
    land_items(home, ITEMS)
    _land_days(home, defs, instance, DAYS[:5])
    targets = ZEROS[:60]
    write_jsonl(home.landing_dir("corrections"), "backdated.jsonl", _backdated_pairs(targets, DAYS[0]))
    result = _ingest(defs, instance)

    bursts = _rows(home, "SELECT scope, key, day, n_events, day_total, severity, status FROM correction_bursts")
    assert bursts.rows() == [("segment", "feedback_button/two", DAYS[4], 120, 136, "severe", "held")]
    staged = _rows(
        home, "SELECT count(*) AS n, min(burst_day) AS first, max(burst_day) AS last, "
              "max(created_at) AS newest FROM validated_labels WHERE event_id LIKE 'bd-%'",
    ).row(0, named=True)
    assert (staged["n"], staged["first"], staged["last"]) == (120, DAYS[4], DAYS[4])
    assert staged["newest"].date() < DAYS[0]  # every one of them dated before the first ordinary day
    assert _metadata(result, "validated_labels")["late_corrections"] == 120
    assert _metadata(result, "correction_bursts")["late_corrections"] == 120
    assert set(_labels(home, targets).values()) == {"zero"}
    # Held votes are out of resolution altogether: no decision about these items at all.
    assert _statuses(home, targets) == {}
    # The ordinary days' corrections were on time: none of them moved.
    assert _rows(home, "SELECT count(*) AS n FROM validated_labels WHERE event_id NOT LIKE 'bd-%' "
                       "AND burst_day <> CAST(timezone('UTC', created_at) AS DATE)")["n"][0] == 0
    _ingest(defs, instance)
    assert set(_labels(home, targets).values()) == {"zero"}


def test_on_the_wall_clock_a_batch_dated_over_old_days_all_counts_today(home, defs, instance):
    """The shipped clock (wall): whatever days a file claims, what arrived more than a day after
    its created_at counts on the day it arrived; its volume lands on today, not on old days."""
    land_items(home, ITEMS)
    targets = ZEROS[:30]
    write_jsonl(home.landing_dir("corrections"), "backdated.jsonl", _backdated_pairs(targets, DAYS[0]))
    _ingest(defs, instance)
    today = datetime.now(UTC).date()
    volume = _rows(home, "SELECT DISTINCT day FROM correction_volume")
    assert volume["day"].to_list() == [today]
    staged = _rows(home, "SELECT DISTINCT burst_day FROM validated_labels")
    assert staged["burst_day"].to_list() == [today]
    arrived = _rows(home, "SELECT min(arrived_at) AS a FROM validated_labels")["a"][0]
    assert abs((datetime.now(UTC) - arrived).total_seconds()) < 600
    # Two fresh ids per item: newcomers, so nothing flips either.
    assert set(_statuses(home, targets).values()) == {"pending"}


def test_a_correction_on_time_keeps_its_own_day_and_a_future_one_counts_on_arrival(home, defs, instance):
    land_items(home, ITEMS)
    now = datetime.now(UTC)
    events = [
        correction(event_id, item, "two", user="eve", role="end_user",
                   created_at=(now + timedelta(hours=hours)).isoformat())
        for event_id, item, hours in (("on-time", OTHERS[0], -20), ("late", OTHERS[1], -30), ("ahead", OTHERS[2], 20))
    ]
    write_jsonl(home.landing_dir("corrections"), "mixed.jsonl", events)
    _ingest(defs, instance)
    days = dict(_rows(home, "SELECT event_id, burst_day FROM validated_labels").iter_rows())
    assert days == {
        "on-time": (now - timedelta(hours=20)).date(),
        "late": now.date(),
        "ahead": now.date(),  # dated after it arrived: no later than its arrival
    }


# ---------------------------------------------------------------------------------------------
# 2. Fresh pseudonyms carry little weight
# ---------------------------------------------------------------------------------------------


def test_two_fresh_end_user_ids_used_to_flip_a_label(home, defs, instance):
    """The old path (min_history 0) first: two fresh ids agreeing flip the label."""
    _governance(home, NEWCOMERS_OFF)
    land_items(home, ITEMS)
    write_jsonl(home.landing_dir("corrections"), "pair.jsonl", [
        correction(f"p-{j}", ZEROS[0], "two", user=f"sock-{j}", role="end_user", source="feedback_button",
                   created_at=datetime.now(UTC).isoformat()) for j in range(2)
    ])
    _ingest(defs, instance)
    assert _labels(home, [ZEROS[0]]) == {ZEROS[0]: "two"}


def test_two_fresh_end_user_ids_stay_pending_and_four_open_no_tie(home, defs, instance):
    land_items(home, ITEMS)
    now = datetime.now(UTC).isoformat()
    pair = [correction(f"p-{j}", ZEROS[0], "two", user=f"sock-{j}", role="end_user", created_at=now) for j in range(2)]
    split = [correction(f"s-{j}", ZEROS[1], ("one", "two")[j % 2], user=f"sock-s{j}", role="end_user", created_at=now)
             for j in range(4)]
    write_jsonl(home.landing_dir("corrections"), "socks.jsonl", pair + split)
    result = _ingest(defs, instance)
    assert _labels(home, ZEROS[:2]) == {ZEROS[0]: "zero", ZEROS[1]: "zero"}
    decisions = _rows(home, "SELECT item_id, status, support, escalation_reason FROM latest_label_decisions "
                            "ORDER BY item_id")
    # 2 x 1.0 x 0.25: far from min_support 2.0; a 2-2 split of newcomers is no tie for a reviewer.
    assert decisions.rows() == [(ZEROS[0], "pending", 0.5, None), (ZEROS[1], "pending", 0.5, None)]
    assert _rows(home, "SELECT count(*) AS n FROM escalations")["n"][0] == 0
    assert _metadata(result, "validated_labels")["newcomer_votes"] == 6


@pytest.mark.slow
def test_contributors_with_a_history_still_flip_and_fresh_ones_do_not(home, defs, instance):
    """eve and fay corrected on three earlier days; two fresh ids did not. The same two agreeing
    votes flip an item for the first pair and leave the other pending."""
    _replay(home)
    land_items(home, ITEMS)
    _land_days(home, defs, instance, DAYS[:3])
    day = DAYS[3]
    write_jsonl(home.landing_dir("corrections"), "day4.jsonl", [
        correction("known-0", ZEROS[0], "two", user="eve", role="end_user", created_at=_at(day, 1)),
        correction("known-1", ZEROS[0], "two", user="fay", role="end_user", created_at=_at(day, 2)),
        correction("fresh-0", ZEROS[1], "two", user="sock-0", role="end_user", created_at=_at(day, 3)),
        correction("fresh-1", ZEROS[1], "two", user="sock-1", role="end_user", created_at=_at(day, 4)),
    ])
    _ingest(defs, instance)
    assert _labels(home, ZEROS[:2]) == {ZEROS[0]: "two", ZEROS[1]: "zero"}
    assert _statuses(home, ZEROS[:2]) == {ZEROS[0]: "promote", ZEROS[1]: "pending"}


@pytest.mark.slow
def test_history_is_days_the_store_already_had_not_one_batch_dated_over_days(home, defs, instance):
    """A fresh id cannot give itself a history in one file: votes of its own batch never count,
    whatever days they claim; nor does a day that only a held burst filled."""
    _replay(home)
    land_items(home, ITEMS)
    _land_days(home, defs, instance, DAYS[:4])
    day = DAYS[4]
    warmup = [correction(f"w-{u}-{k}", OTHERS[100 + 10 * u + k], "one", user=f"sock-{u}", role="end_user",
                         created_at=_at(day - timedelta(days=k % 3), 30 + k)) for u in range(2) for k in range(6)]
    flips = [correction(f"f-{u}", ZEROS[0], "two", user=f"sock-{u}", role="end_user", created_at=_at(day, 50 + u))
             for u in range(2)]
    write_jsonl(home.landing_dir("corrections"), "warmup-and-flip.jsonl", warmup + flips)
    _ingest(defs, instance)
    assert _statuses(home, [ZEROS[0]]) == {ZEROS[0]: "pending"}
    # Re-decided on a later run (the batch is in the store by then), the flips still weigh as
    # what they were when they arrived.
    write_jsonl(home.landing_dir("corrections"), "nudge.jsonl", [
        correction("nudge", ZEROS[0], "two", user="sock-9", role="end_user", created_at=_at(DAYS[5], 1))])
    _ingest(defs, instance)
    assert _labels(home, [ZEROS[0]]) == {ZEROS[0]: "zero"}
    assert _statuses(home, [ZEROS[0]]) == {ZEROS[0]: "pending"}


# ---------------------------------------------------------------------------------------------
# 3. The resolution step records the policies it followed
# ---------------------------------------------------------------------------------------------


def test_the_resolution_run_records_the_hash_of_its_governance_file(home, defs, instance):
    land_items(home, ITEMS)
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [
        correction("r-1", OTHERS[0], "two", user="rita", role="reviewer",
                   created_at=datetime.now(UTC).isoformat())])
    result = _ingest(defs, instance)
    run_id = result.run_id
    uses = dict(_rows(home, "SELECT file, sha256 FROM policy_uses WHERE run_id = $r AND step = 'validated_labels'",
                      {"r": run_id}).iter_rows())
    assert uses["governance.yaml"] == file_sha256(home.governance_file.read_bytes())
    assert "contributors.yaml" not in uses  # read and recorded by raw_corrections, which capped the roles
    assert uses["ontology.yaml"] == file_sha256(home.ontology_file.read_bytes())
    corpus = dict(_rows(home, "SELECT file, sha256 FROM policy_uses WHERE run_id = $r AND step = 'production_corpus'",
                        {"r": run_id}).iter_rows())
    assert corpus == {"ontology.yaml": uses["ontology.yaml"]}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_the_shipped_settings():
    policy = ResolutionPolicy.load(DEFAULTS_DIR / "governance.yaml")
    assert (policy.newcomer_min_history, policy.newcomer_weight) == (2, 0.25)
    assert policy.newcomer_exempt_roles == ("reviewer", "domain_expert")
    # Two fresh end users cannot reach min_support; it takes eight.
    assert 2 * policy.role_weights["end_user"] * policy.newcomer_weight < policy.min_support
    from labelloop_assets.core.settings import load_yaml_mapping

    bursts = BurstPolicy.from_governance(load_yaml_mapping(DEFAULTS_DIR / "governance.yaml", "governance"))
    assert (bursts.late_after_hours, bursts.clock) == (24.0, "wall")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("newcomers: {min_history: -1}", "newcomers.min_history must not be negative"),
        ("newcomers: {min_history: 1.5}", "newcomers.min_history must be a whole number"),
        ("newcomers: {weight: 2}", "newcomers.weight must be in [0, 1]"),
        ("newcomers: {weight: high}", "newcomers.weight must be a finite number"),
        ("newcomers: {exempt_roles: [janitor]}", "unknown roles ['janitor']"),
        ("newcomers: {exempt_roles: reviewer}", "exempt_roles must be a list"),
        ("newcomers: {days: 3}", "unknown keys ['days']"),
        ("newcomers: 3", "`newcomers` must be a mapping"),
    ],
)
def test_bad_newcomer_settings_are_refused_clearly(tmp_path, section, message):
    path = tmp_path / "governance.yaml"
    text = (DEFAULTS_DIR / "governance.yaml").read_text()
    start = text.index("newcomers:")
    end = text.index("\n\n", start)
    path.write_text(text[:start] + section + text[end:])
    with pytest.raises(LabelloopConfigError) as error:
        ResolutionPolicy.load(path)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [({"late_after_hours": 0}, "late_after_hours must be positive"),
     ({"late_after_hours": "soon"}, "bursts.late_after_hours must be a finite number"),
     ({"clock": "events"}, "unknown keys ['clock']")],
)
def test_bad_lateness_settings_are_refused_clearly(raw, message):
    with pytest.raises(LabelloopConfigError) as error:
        BurstPolicy.from_mapping(raw)
    assert message in str(error.value)


def test_history_needs_whole_days_on_the_store_clock_not_two_dates_either_side_of_midnight(tmp_path):
    """Votes at 23:50 (dated 23 h 50 back, so the day before), 23:55 and 00:05 fall on three days
    but arrive within a quarter of an hour: that is no history, and the 00:05 vote is a newcomer's.
    Two days later on the store's clock the same contributor has one."""
    def at(day: int, hour: int, minute: int) -> datetime:
        return datetime(2026, 3, day, hour, minute, tzinfo=UTC)

    earlier = pl.DataFrame({
        "seq": [1, 2], "event_id": ["w-1", "w-2"], "item_id": ["i1", "i2"], "corrected_label": ["one", "one"],
        "prediction_found": [False, False], "user_pseudonym": ["u_sock"] * 2, "user_role": ["end_user"] * 2,
        "source": ["feedback_button"] * 2, "vote_weight": [1.0, 1.0],
        "created_at": [at(9, 0, 0), at(10, 23, 55)], "arrived_at": [at(10, 23, 50), at(10, 23, 55)],
        "burst_day": [date(2026, 3, 9), date(2026, 3, 10)],
    })
    with store.connect(tmp_path / "s.duckdb") as con:
        store.append(con, "validated_labels", earlier)

        def history(arrived: datetime) -> int:
            vote = pl.DataFrame({
                "event_id": ["flip"], "user_pseudonym": ["u_sock"], "created_at": [arrived],
                "arrived_at": [arrived], "burst_day": [arrived.date()],
            })
            return resolve.with_history(con, vote)["history"][0]

        assert history(at(11, 0, 5)) == 0  # three dates, fifteen minutes
        assert history(at(12, 23, 55)) == 2  # two whole days since the first vote arrived
