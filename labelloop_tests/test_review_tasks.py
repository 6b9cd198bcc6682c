"""Review tasks: the loop's work list in the outbox, answers that come back with a task_id, lineage
from task to answer to label change, expiry and re-issue, and efficacy by routing policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import store, tasks
from labelloop_assets.core.settings import Home, LabelloopConfigError
from labelloop_tests.conftest import correction, land_items, make_items, set_yaml, write_jsonl
from labelloop_tests.test_loop import ALL, _materialize

PLANTED = [f"item-{i:03d}" for i in range(20, 90, 7)]  # 10 initial labels set wrong on purpose
WRONG = {"zero": "one", "one": "two", "two": "zero"}


def issue_tasks(home: Home, defs, instance, annotator_budget: int, reviewer_budget: int) -> dict[str, str]:
    """A corpus of 75 items with 10 labels planted wrong, a champion, and one issue of tasks under
    these budgets; returns the true labels."""
    records, truth = make_items(90, 15)
    for record in records:
        if record["item_id"] in PLANTED:
            record["initial_label"] = WRONG[record["initial_label"]]
    land_items(home, records)
    set_yaml(home.review_tasks_file, {"annotator_budget": annotator_budget, "reviewer_budget": reviewer_budget})
    assert _materialize(defs, instance, [*ALL, "label_issue_candidates", "review_tasks"]).success
    return truth


@pytest.fixture
def issued(home: Home, defs, instance, monkeypatch):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    return issue_tasks(home, defs, instance, annotator_budget=10, reviewer_budget=4)


def _outbox(home: Home) -> list[dict]:
    path = tasks.latest_outbox(home.root)
    assert path is not None, "the review_tasks asset wrote no outbox file"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_work_list_is_in_the_outbox_under_budget_with_the_planted_labels_first(home, issued):
    lines = _outbox(home)
    assert len(lines) == 14
    annotator = [t for t in lines if t["role"] == "annotator"]
    audits = [t for t in lines if t["role"] == "reviewer"]
    assert len(annotator) == 10 and len(audits) == 4
    # 80/10/10 of 10 annotator tasks; every item at most once.
    assert sorted(t["policy"] for t in annotator) == ["least_confidence"] + ["loop"] * 8 + ["random"]
    assert len({t["item_id"] for t in lines}) == 14
    assert [t["rank"] for t in lines] == list(range(1, 15))
    # The loop's own tasks are the planted wrong labels, and say why.
    loop = [t for t in annotator if t["policy"] == "loop"]
    assert sum(t["item_id"] in PLANTED for t in loop) >= 7, loop
    found = next(t for t in loop if t["item_id"] in PLANTED)
    assert "looks wrong" in found["why"] and found["suggested_label"] != found["current_label"]
    assert found["prediction"]["model_version"] == "m0001" and 0 < found["prediction"]["probability"] <= 1
    assert found["features"] and found["answer_source"] == "review_prompt" and found["answers_wanted"] == 1
    assert found["issued_at"].endswith("Z") and found["expires_at"] > found["issued_at"]
    # Blind audits show neither the label nor the model's guess.
    assert all(t["current_label"] is None and t["prediction"] is None and t["answer_source"] == "audit_sample"
               for t in audits)
    # Issued again at once: items with open tasks get no second task.
    with store.connect(home.database, read_only=True) as con:
        now = datetime.now(UTC)
        status = tasks.task_status(con, now)
        again = tasks.plan(tasks.signals(con, False), tasks.model_view(None, None, pl.DataFrame(), pl.DataFrame(
            schema={"item_id": pl.String, "model_version": pl.String, "predicted_label": pl.String,
                    "predicted_probability": pl.Float64})), {}, status, tasks.TaskSettings.load(home.review_tasks_file),
            now)
    assert set(status["status"]) == {"open"} and status.height == 14
    assert again.height >= 10 and not set(again["item_id"]) & {t["item_id"] for t in lines}


def test_answers_come_back_with_a_task_id_and_lineage_shows_task_answer_change(
    home, issued, defs, instance, capsys
):
    truth = issued
    lines = _outbox(home)
    loop = [t for t in lines if t["policy"] == "loop" and t["item_id"] in PLANTED]
    answers = [
        correction(f"ans-{k}", t["item_id"], truth[t["item_id"]], user="expert-1", role="domain_expert",
                   source=t["answer_source"], task_id=t["task_id"])
        for k, t in enumerate(loop)
    ]
    other = next(t for t in lines if t["item_id"] != loop[0]["item_id"])
    refused = [
        correction("ans-x1", loop[0]["item_id"], "one", role="annotator", task_id="tsk-20260101-000000000000"),
        correction("ans-x2", loop[0]["item_id"], "one", role="annotator", task_id=other["task_id"]),
    ]
    write_jsonl(home.landing_dir("corrections"), "answers.jsonl", answers + refused)
    # A domain expert answers alone here, so each answer settles its item.
    assert _materialize(defs, instance, ALL).success

    with store.connect(home.database, read_only=True) as con:
        reasons = store.frame(con, "SELECT record_id, detail FROM quarantine WHERE kind = 'corrections' "
                                   "ORDER BY record_id").rows()
        status = tasks.task_status(con, datetime.now(UTC))
        efficacy = {r["policy"]: r for r in tasks.efficacy(con).filter(pl.col("role") == "annotator").to_dicts()}
    assert reasons == [("ans-x1", "task_id: no review task with this id was issued"),
                       ("ans-x2", "task_id: the review task was issued for another item")]
    answered = status.filter(pl.col("status") == "answered")
    assert sorted(answered["task_id"]) == sorted(t["task_id"] for t in loop)
    assert efficacy["loop"]["answers"] == len(loop)
    assert efficacy["loop"]["answers_changing_a_label"] == len(loop)
    assert efficacy["loop"]["label_changes_per_100_answers"] == 100.0

    item = loop[0]["item_id"]
    assert cli.main(["lineage", item, "--json"]) == 0
    trail = json.loads(capsys.readouterr().out)
    task = trail["tasks"][0]
    assert task["task_id"] == loop[0]["task_id"] and task["status"] == "answered"
    assert task["answers"] == [f"ans-0 -> {truth[item]}"]
    assert task["label_changes"] == [f"v2: {WRONG[truth[item]]} -> {truth[item]}"]
    assert trail["corrections"][0]["task_id"] == loop[0]["task_id"]
    # ...and in the metrics, one series per arm.
    metrics = _materialize(defs, instance, ["label_quality_metrics"])
    shown = next(e for e in metrics.get_asset_materialization_events()).materialization.metadata
    assert shown["label_changes_per_100_answers_loop"].value == 100.0
    assert cli.main(["tasks", "efficacy"]) == 0
    assert "Label changes per 100 answers" in capsys.readouterr().out
    assert cli.main(["tasks", "list", "--status", "answered"]) == 0
    assert f"{len(loop)} answered review tasks" in capsys.readouterr().out


def test_expired_tasks_are_reissued_in_their_arm_until_the_attempts_run_out(home, issued):
    settings = tasks.TaskSettings.load(home.review_tasks_file)
    with store.connect(home.database) as con:
        signals = tasks.signals(con, event_clock=False)
        view = tasks.model_view(None, None, pl.DataFrame(), store.frame(con, tasks.SERVED_SQL))
        first = tasks.task_status(con, datetime.now(UTC))
        later = datetime.now(UTC) + timedelta(hours=settings.expire_hours + 1)
        expired = tasks.task_status(con, later)
        assert set(expired["status"]) == {"expired"}
        again = tasks.plan(signals, view, {}, expired, settings, later)
        store.append(con, "review_tasks", again)
        # Annotator tasks come back as attempt 2 in their own arm; audits are drawn afresh.
        reissued = again.filter(pl.col("reissue_of").is_not_null())
        before = first.filter(pl.col("role") == "annotator").select("task_id", "policy")
        assert reissued.height == 10
        assert (reissued.join(before, left_on="reissue_of", right_on="task_id")
                .filter(pl.col("policy") != pl.col("policy_right")).height) == 0
        assert set(reissued["attempt"]) == {2} and all("overdue" in r for r in reissued["reasons"])
        for step in (2, 3, 4):
            moment = later + timedelta(hours=step * (settings.expire_hours + 1))
            plan = tasks.plan(signals, view, {}, tasks.task_status(con, moment), settings, moment)
            store.append(con, "review_tasks", plan)
        attempts = store.frame(con, "SELECT item_id, max(attempt) AS most FROM review_tasks "
                                    "WHERE role = 'annotator' GROUP BY item_id")
        # The third attempt expired too: those items rest for the cooldown, never attempt 1 again.
        restarted = store.frame(con, "SELECT count(*) AS n FROM review_tasks WHERE attempt = 1 AND item_id IN "
                                     "(SELECT item_id FROM review_tasks WHERE attempt = 3) AND issued_at > "
                                     "(SELECT min(issued_at) FROM review_tasks WHERE attempt = 3)")["n"].item()
    assert restarted == 0
    # Never past max_attempts (3), and the first 10 items reached it.
    assert attempts["most"].max() == settings.max_attempts
    assert attempts.filter(pl.col("item_id").is_in(before.join(first, on="task_id")["item_id"].implode())
                           )["most"].min() == settings.max_attempts


@pytest.mark.parametrize(("changes", "message"), [
    ({"budget": 10}, "unknown settings ['budget']"),
    ({"arms": {"loop": 0.5, "random": 0.1}}, "arms must add up to 1"),
    ({"arms": {"loop": 0.9, "bandit": 0.1}}, "unknown names ['bandit']"),
    ({"weights": {"label_issue": -1}}, "label_issue must be finite numbers of 0 or more"),
    ({"expire_hours": 0}, "expire_hours must be positive"),
    ({"annotator_budget": "many"}, "annotator_budget"),
    ({"seed": -1}, "seed must be 0 or more"),
])
def test_a_wrong_review_tasks_file_is_refused_with_its_reason(tmp_path, changes, message):
    path = tmp_path / "review_tasks.yaml"
    path.write_text(json.dumps(changes))
    with pytest.raises(LabelloopConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tasks.TaskSettings.load(path)


def test_a_run_with_a_broken_review_tasks_file_fails_with_the_reason(home, defs, instance):
    land_items(home, make_items(30, 10)[0])
    home.review_tasks_file.write_text("arms: {loop: 2}\n")
    result = _materialize(defs, instance, ["items", "review_tasks"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "arms must add up to 1" in failure.event_specific_data.error.message


def test_an_outbox_line_stays_one_line_whatever_the_item_text_holds():
    now = datetime(2026, 3, 2, 8, tzinfo=UTC)
    task = pl.DataFrame([{
        "task_id": "tsk-20260302-000000000001", "item_id": "t1", "role": "annotator", "policy": "loop", "rank": 1,
        "score": 0.9, "reasons": ["label_issue"], "why": "w", "current_label": "zero", "suggested_label": "one",
        "model_version": "m0001", "predicted_label": "one", "predicted_probability": 0.8,
        **dict.fromkeys(tasks.COMPONENTS, 0.0), "answers_wanted": 1, "attempt": 1, "reissue_of": None,
        "issued_at": now, "expires_at": now + timedelta(hours=24),
    }], schema=tasks.TASK_SCHEMA)
    text = "line one\u2028line two\u0085three\r\nfour \U0001F600"
    items = pl.DataFrame({"item_id": ["t1"], "text": [text], "features": [None], "uri": [None]},
                         schema={"item_id": pl.String, "text": pl.String, "features": pl.List(pl.Float64),
                                 "uri": pl.String})
    [line] = tasks.outbox_lines(task, items)
    assert line.isascii() and len(line.splitlines()) == 1
    assert json.loads(line)["text"] == text


def test_a_task_closes_only_with_enough_different_people_of_its_role(home, issued, defs, instance):
    """One person sending two lines is one opinion; an end user cannot close an annotator's task,
    nor an annotator a reviewer's blind audit (their corrections still count as votes)."""
    lines = _outbox(home)
    loop = [t for t in lines if t["policy"] == "loop"]
    audit = next(t for t in lines if t["role"] == "reviewer")
    home.review_tasks_file.write_text("answers_wanted: 2\n")
    with store.connect(home.database) as con:  # the first task wants two people
        con.execute("UPDATE review_tasks SET answers_wanted = 2 WHERE task_id = ?", [loop[0]["task_id"]])
    write_jsonl(home.landing_dir("corrections"), "answers.jsonl", [
        correction("same-1", loop[0]["item_id"], "one", user="ann", role="annotator", task_id=loop[0]["task_id"]),
        correction("same-2", loop[0]["item_id"], "two", user="ann", role="annotator", task_id=loop[0]["task_id"]),
        correction("user-1", loop[1]["item_id"], "one", user="pat", role="end_user", task_id=loop[1]["task_id"]),
        correction("ann-1", audit["item_id"], "one", user="ann", role="annotator", source="audit_sample",
                   task_id=audit["task_id"]),
    ])
    assert _materialize(defs, instance, ["raw_corrections"]).success
    with store.connect(home.database, read_only=True) as con:
        status = {r["task_id"]: r for r in tasks.task_status(con, datetime.now(UTC)).to_dicts()}
        accepted = store.scalar(con, "SELECT count(*) FROM raw_corrections")
        audited = tasks.signals(con, False).filter(pl.col("item_id") == audit["item_id"])["audited"].item()
    assert accepted == 4  # every answer is a correction all the same
    assert (status[loop[0]["task_id"]]["answerers"], status[loop[0]["task_id"]]["status"]) == (1, "open")
    assert (status[loop[1]["task_id"]]["answers"], status[loop[1]["task_id"]]["status"]) == (0, "open")
    assert (status[audit["task_id"]]["answers"], status[audit["task_id"]]["status"]) == (0, "open")
    assert not audited  # an annotator's audit_sample line is no blind verdict: the item stays in the pool


def test_reissues_of_an_arm_switched_off_go_to_the_other_arms(home, issued):
    settings = tasks.TaskSettings.load(home.review_tasks_file)
    # The controls switched off, with room for more than the loop's own re-issues: the controls'
    # re-issues compete on their score, their overdue component included.
    loop_only = tasks.TaskSettings(**{**settings.__dict__, "annotator_budget": 40,
                                      "arms": {"loop": 1.0, "least_confidence": 0.0, "random": 0.0}})
    with store.connect(home.database, read_only=True) as con:
        later = datetime.now(UTC) + timedelta(hours=settings.expire_hours + 1)
        status = tasks.task_status(con, later)
        controls = status.filter(pl.col("policy").is_in(["least_confidence", "random"])
                                 & (pl.col("role") == "annotator"))
        plan = tasks.plan(tasks.signals(con, False), tasks.model_view(None, None, pl.DataFrame(), store.frame(
            con, tasks.SERVED_SQL)), {}, status, loop_only, later)
    again = plan.filter(pl.col("item_id").is_in(controls["item_id"].implode()))
    assert again.height == controls.height == 2
    assert set(again["policy"]) == {"loop"} and set(again["attempt"]) == {2}


def test_the_answer_query_ranks_roles_in_the_contract_order():
    from labelloop_assets.core.contracts import USER_ROLES

    assert f"[{', '.join(repr(r) for r in USER_ROLES)}]" in tasks.COUNTED_ANSWERS_SQL


def test_the_work_list_is_issued_each_morning_by_a_running_schedule(defs):
    schedule = defs.resolve_schedule_def("review_tasks_job_schedule")
    assert (schedule.job_name, schedule.cron_schedule) == ("review_tasks_job", "0 6 * * *")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
