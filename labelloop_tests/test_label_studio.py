"""Label Studio as the reviewers' front end, against a real Label Studio server on loopback.

The server comes from `.venv-label-studio` (`make label-studio`: label-studio 1.23.2 in a virtual
environment of its own), started once for this module with a throwaway data folder. The test
exports our review tasks, creates a project with our labeling config through the REST API, imports
the tasks, answers them as two Label Studio users (one the directory maps to an annotator, one it
does not list), exports through the REST API, runs `labelloop label-studio import` and ingests what
it landed. Without the virtual environment the test is skipped locally and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import label_studio, store, tasks
from labelloop_assets.core.directory import Directory
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.settings import Home, LabelloopConfigError
from labelloop_tests.pg import free_port, in_ci
from labelloop_tests.test_loop import _materialize
from labelloop_tests.test_review_tasks import issue_tasks

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO_VENV = ROOT / ".venv-label-studio"
# `make label-studio` makes Label Studio's tables once: a copy starts in about 5 s, where a fresh
# data folder runs its migrations first (35-50 s on the test machine).
MIGRATED_DATA = LABEL_STUDIO_VENV / "migrated-data"
STARTUP_TIMEOUT_S = 180
ADMIN, ADMIN_TOKEN = "alice@example.org", "labelloop-test-token-0123456789abcdef"
STRANGER = "bob@example.org"


# --------------------------------------------------------------------------- the server


def _require_label_studio() -> Path:
    binary = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if (LABEL_STUDIO_VENV / ".installed").exists() and binary.exists():
        return binary
    reason = f"Label Studio is not installed in {LABEL_STUDIO_VENV.name}/: run `make label-studio`"
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


class Server:
    """A running Label Studio: its address, and REST calls with the admin's token."""

    def __init__(self, url: str, startup_s: float):
        self.url, self.startup_s = url, startup_s

    def call(self, method: str, path: str, body=None, token: str = ADMIN_TOKEN):
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:600]!r}") from None
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    binary = _require_label_studio()
    folder = tmp_path_factory.mktemp("label-studio")
    if (MIGRATED_DATA / ".made").exists():
        shutil.copytree(MIGRATED_DATA, folder / "data")
    port = free_port()
    # The admin (and its API token) from Label Studio's own variables (label_studio/server.py
    # _create_user); nothing reaches out: no version check, no analytics, no error reporting.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO"))}
    env.update(
        HOME=str(folder),
        LABEL_STUDIO_USERNAME=ADMIN,
        LABEL_STUDIO_PASSWORD="alice-password-0123",
        LABEL_STUDIO_USER_TOKEN=ADMIN_TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
    )
    log = (folder / "server.log").open("wb")
    command = [
        str(binary),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(folder / "data"),
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env=env,
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"Label Studio exited ({process.returncode}) before it was up:\n"
                    f"{(folder / 'server.log').read_text(errors='replace')[-3000:]}",
                    pytrace=False,
                )
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(
                    f"Label Studio was not healthy within {STARTUP_TIMEOUT_S} s:\n"
                    f"{(folder / 'server.log').read_text(errors='replace')[-3000:]}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield Server(url, time.monotonic() - started)
    finally:
        # Its own session: the server and the workers it started end together.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# --------------------------------------------------------------------------- the home and its outbox


@pytest.fixture
def issued(home: Home, defs, instance, monkeypatch) -> dict[str, str]:
    """A champion and one issue of review tasks in the outbox (the review_tasks asset), on 75 items
    with 10 labels planted wrong; the directory maps Label Studio's admin to an annotator."""
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    truth = issue_tasks(home, defs, instance, annotator_budget=6, reviewer_budget=2)
    # Addresses match in any case; the Label Studio folder is a producer that may claim nothing.
    home.contributors_file.write_text(
        f"contributors:\n  - {{id: ann-alice, role: annotator, label_studio: {ADMIN.upper()}}}\nproducers: []\n"
    )
    return truth


def outbox_task(n: int, item_id: str, text: str | None, current: str, predicted: str | None, **extra) -> dict:
    """One outbox line as core/tasks.py writes them (for the tests without a server)."""
    task = {
        "task_id": f"tsk-20260305-{n:012x}", "item_id": item_id, "role": "annotator", "policy": "loop",
        "answer_source": "review_prompt", "rank": n, "score": 0.5, "reasons": ["label_issue"],
        "why": f"the label {current} looks wrong", "current_label": current, "suggested_label": predicted,
        "prediction": {"model_version": "m0001", "label": predicted, "probability": 0.91} if predicted else None,
        "text": text, "features": None, "uri": None,
        "issued_at": "2026-03-05T08:00:00Z", "expires_at": "2026-03-06T08:00:00Z",
        "attempt": 1, "reissue_of": None, "answers_wanted": 1,
    }  # fmt: skip
    return {**task, **extra}


def _choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


# --------------------------------------------------------------------------- end to end


@pytest.mark.label_studio
@pytest.mark.slow
def test_answers_in_label_studio_come_back_as_corrections_with_the_granted_role(
    server, issued, home, defs, instance, tmp_path, capsys
):
    begun = time.monotonic()
    truth = issued
    outbox = [json.loads(line) for line in tasks.latest_outbox(home.root).read_text().splitlines()]
    asked = [t for t in outbox if t["role"] == "annotator"]
    audits = [t for t in outbox if t["role"] == "reviewer"]
    assert len(asked) == 6 and len(audits) == 2

    # Our labeling config and the outbox as Label Studio tasks.
    assert cli.main(["label-studio", "config"]) == 0
    config = capsys.readouterr().out
    labels = Ontology.load(home.ontology_file).labels
    assert [e.get("value") for e in ET.fromstring(config).iter("Choice")] == list(labels) and "two" in labels
    tasks_file = tmp_path / "tasks.json"
    assert cli.main(["label-studio", "export", "--out", str(tasks_file)]) == 0
    predicted = sum(t["prediction"] is not None for t in outbox)
    assert "8 tasks from review-tasks-" in capsys.readouterr().out
    exported = json.loads(tasks_file.read_text())
    assert sum("predictions" in t for t in exported) == predicted == 6
    audit_data = next(t["data"] for t in exported if t["data"]["task_id"] == audits[0]["task_id"])
    assert audit_data["current_label"] is None and "current label" not in audit_data["prompt"]
    # Every task claims a role for whoever answers it: authority never comes from Label Studio.
    for task in exported:
        task["data"]["user_role"] = "domain_expert"

    # The project, the tasks, a second user, the answers: all through Label Studio's REST API.
    project = server.call("POST", "/api/projects", {"title": "labelloop review", "label_config": config})["id"]
    imported = server.call("POST", f"/api/projects/{project}/import", exported)
    assert (imported["task_count"], imported["prediction_count"]) == (8, 6)
    listed = server.call("GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    ids = {t["data"]["task_id"]: t["id"] for t in listed}
    assert sum(t["total_predictions"] for t in listed) == 6
    stranger = server.call("POST", "/api/users/", {"email": STRANGER, "username": "bob"})["id"]
    a, b, c, d = asked[:4]
    answers = [
        (a, {"result": _choice(truth[a["item_id"]])}),  # alice: the true label
        (b, {"result": _choice(b["current_label"])}),  # alice: the label stands
        (audits[0], {"result": _choice(truth[audits[0]["item_id"]])}),  # alice: a blind audit
        (a, {"result": _choice(a["current_label"]), "completed_by": stranger}),  # bob: not in the directory
        (c, {"result": [], "was_cancelled": True}),  # alice skips
        (d, {"result": _choice("neutral")}),  # Label Studio accepts a choice outside the config
    ]
    for task, body in answers:
        server.call("POST", f"/api/tasks/{ids[task['task_id']]}/annotations/", body)

    # The export with the annotators' details, as a snapshot through the API.
    snapshot = server.call(
        "POST",
        f"/api/projects/{project}/exports/",
        {"title": "answers", "serialization_options": {"annotations__completed_by": {"only_id": False}}},
    )
    for _ in range(100):
        if server.call("GET", f"/api/projects/{project}/exports/{snapshot['id']}")["status"] == "completed":
            break
        time.sleep(0.2)
    export_file = tmp_path / "export.json"
    export_file.write_bytes(
        _download(server, f"/api/projects/{project}/exports/{snapshot['id']}/download?exportType=JSON")
    )

    assert cli.main(["label-studio", "import", str(export_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["project"], report["annotations"], report["written"], report["refused"]) == (project, 6, 3, 3)
    assert report["written"] + report["refused"] == len(answers)
    assert report["reasons"] == {"unknown_annotator": 1, "skipped": 1, "label_not_in_ontology": 1}
    unknown = next(r for r in report["refused_annotations"] if r["reason"] == "unknown_annotator")
    assert STRANGER in unknown["detail"] and unknown["task"] == ids[a["task_id"]]
    landed = Path(report["file"])
    assert landed.parent == home.landing_dir("corrections") / "label-studio" and not report["already_landed"]
    lines = {line["task_id"]: line for line in map(json.loads, landed.read_text().splitlines())}
    assert set(lines) == {a["task_id"], b["task_id"], audits[0]["task_id"]}
    first = lines[a["task_id"]]
    # The role the directory grants (annotator), not the domain_expert the task claimed.
    assert (first["user_id"], first["user_role"], first["source"], first["consent"]) == (
        "ann-alice", "annotator", "review_prompt", True)  # fmt: skip
    assert (first["item_id"], first["corrected_label"], first["original_label"], first["model_version"]) == (
        a["item_id"], truth[a["item_id"]], a["current_label"], "m0001")  # fmt: skip
    assert first["event_id"].startswith(f"ls-{project}-") and first["created_at"].endswith("Z")
    audit = lines[audits[0]["task_id"]]
    assert audit["source"] == "audit_sample" and "original_label" not in audit and "model_version" not in audit

    # The same export again lands nothing new; the plain export (annotators by number only) needs
    # Label Studio's users list, and then gives the same corrections.
    assert cli.main(["label-studio", "import", str(export_file)]) == 0
    out = capsys.readouterr().out
    assert "6 annotations in, 3 written, 0 already ingested, 3 refused" in out and "already landed as" in out
    plain = tmp_path / "plain.json"
    plain.write_bytes(_download(server, f"/api/projects/{project}/export?exportType=JSON"))
    assert cli.main(["label-studio", "import", str(plain), "--json"]) == 0
    by_number = json.loads(capsys.readouterr().out)
    assert (by_number["written"], by_number["reasons"]) == (0, {"annotator_unnamed": 5, "skipped": 1})
    users = tmp_path / "users.json"
    users.write_text(json.dumps(server.call("GET", "/api/users/")))
    assert cli.main(["label-studio", "import", str(plain), "--users", str(users), "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["written"], resolved["file"], resolved["already_landed"]) == (3, str(landed), True)
    assert len(list(landed.parent.iterdir())) == 1

    # Ingest accepts the answers with their task ids, counted at the granted role, from the
    # label-studio producer; nothing of that file is set aside.
    assert _materialize(defs, instance, ["raw_corrections", "validated_labels"]).success
    with store.connect(home.database, read_only=True) as con:
        rows = store.frame(
            con,
            "SELECT event_id, task_id, item_id, source, user_role, claimed_role, producer FROM raw_corrections "
            "WHERE producer = 'label-studio' ORDER BY task_id",
        )
        set_aside = store.frame(
            con,
            "SELECT reason, detail FROM quarantine WHERE kind = 'corrections' AND source_file LIKE '%label-studio%'",
        )
    assert set_aside.height == 0, set_aside
    assert rows["task_id"].to_list() == sorted(lines)
    assert rows["event_id"].to_list() == [f"label-studio/{lines[t]['event_id']}" for t in sorted(lines)]
    assert set(rows["user_role"]) == {"annotator"} and set(rows["claimed_role"]) == {"annotator"}
    assert rows.filter(pl.col("task_id") == audits[0]["task_id"])["source"].item() == "audit_sample"
    # A later export of the whole project holds these answers again: they are not landed twice.
    assert cli.main(["label-studio", "import", str(export_file), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["written"], again["already_ingested"], again["refused"], again["file"]) == (0, 3, 3, None)
    took = time.monotonic() - begun
    print(f"\nLabel Studio start-up {server.startup_s:.1f} s; the test after it {took:.1f} s")


def _download(server: Server, path: str) -> bytes:
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Token {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


# --------------------------------------------------------------------------- without a server


def test_the_config_offers_every_label_and_escapes_it():
    config = label_studio.labeling_config(Ontology(labels=("a&b", '"quoted"', "<tag>")))
    root = ET.fromstring(config)
    assert [e.get("value") for e in root.iter("Choice")] == ["a&b", '"quoted"', "<tag>"]
    assert root.find("Choices").get("toName") == root.find("Text").get("name")


def test_items_without_text_show_their_features_or_uri(tmp_path):
    ontology = Ontology(labels=("1", "2"))
    lines = [
        (1, outbox_task(1, "i1", None, "1", "2", features=[0.0, 1.5, 16], uri="https://cdn.example/scan.PNG")),
        (2, outbox_task(2, "i2", None, "1", None, uri='https://example.org/x?a="><script>')),
        (3, {"item_id": "no task id"}),
        (4, json.JSONDecodeError("Expecting value", "x", 0)),
    ]
    export = label_studio.import_tasks(lines, ontology)
    first, second = (t["data"] for t in export.tasks)
    assert first["text"] == "features: 0, 1.5, 16" and first["media"].startswith('<img src="https://cdn.example/')
    assert second["text"].startswith("uri: ") and "<script>" not in second["media"]
    assert [r["detail"] for r in export.refused] == ["no task_id", "not JSON: Expecting value"]


def test_the_directory_maps_one_label_studio_address_to_one_person(tmp_path):
    path = tmp_path / "contributors.yaml"
    path.write_text(
        "contributors:\n  - {id: a, role: annotator, label_studio: x@example.org}\n"
        "  - {id: b, role: reviewer, label_studio: X@example.org}\n"
    )
    with pytest.raises(LabelloopConfigError, match="same label_studio address"):
        Directory.load(path)
    path.write_text("contributors:\n  - {id: a, role: annotator, label_studio: not an address}\n")
    with pytest.raises(LabelloopConfigError, match="e-mail address they sign in with"):
        Directory.load(path)


def test_every_annotation_is_written_or_refused_with_its_reason(tmp_path):
    path = tmp_path / "contributors.yaml"
    path.write_text("contributors:\n  - {id: ann, role: annotator, label_studio: ann@example.org}\n")
    directory, ontology = Directory.load(path), Ontology(labels=("zero", "one"), renames={"nought": "zero"})
    ann = {"id": 1, "email": "ann@example.org"}

    def annotation(n: int, result, **extra) -> dict:
        return {"id": n, "completed_by": ann, "result": result, "created_at": "2026-03-05T09:00:00.5Z",
                "updated_at": "2026-03-05T09:00:00.5Z", "project": 7, **extra}  # fmt: skip

    export = [
        {"id": 1, "data": {"item_id": "i1", "task_id": "t1", "current_label": "one"}, "annotations": [
            annotation(1, _choice("nought")),  # an old term: ingest harmonizes it
            annotation(2, []),
            annotation(3, _choice("zero") + _choice("one")),
            annotation(4, _choice("zero"), created_at="yesterday"),
            annotation(5, _choice("zero"), completed_by=9),
            {"result": _choice("zero")},
            # Hostile shapes: refused with a reason, never a traceback.
            annotation(7, [{"from_name": "label", "type": "choices", "value": {"choices": 5}}]),
            annotation(8, _choice("zero"), created_at="0001-01-01T00:00:00+14:00", updated_at=None),
        ]},
        {"id": 2, "data": {"text": "a task of someone else's"}, "annotations": [annotation(6, _choice("zero"))]},
    ]  # fmt: skip
    result = label_studio.corrections(export, directory, ontology)
    assert result.project == 7 and result.annotations == 9 and len(result.lines) == 1
    assert [r["reason"] for r in result.refused] == [
        "no_choice",
        "no_choice",
        "bad_annotation",
        "annotator_unnamed",
        "bad_annotation",
        "no_choice",
        "bad_annotation",
        "not_a_labelloop_task",
    ]
    # A project that is not a number is not a project: the export then names none.
    odd = [{"id": 3, "data": {"item_id": "i1"}, "annotations": [annotation(9, _choice("zero"), project=[1])]}]
    with pytest.raises(label_studio.LabelStudioError, match="does not say its project"):
        label_studio.corrections(odd, directory, ontology)
    line = result.lines[0]
    assert (line["corrected_label"], line["source"], line["created_at"]) == (
        "nought", "annotation", "2026-03-05T09:00:00.500000Z")  # fmt: skip
    # The user number resolves through Label Studio's users list.
    again = label_studio.corrections(export, directory, ontology, users={9: "ANN@example.org"})
    assert len(again.lines) == 2 and [e["event_id"] for e in again.lines][0] == line["event_id"]
    with pytest.raises(label_studio.LabelStudioError, match="the export is of project 7, not 8"):
        label_studio.corrections(export, directory, ontology, project=8)
    bad = tmp_path / "bad.json"
    for text in ('{"not": "a list"}', '[{"annotations": "none"}]', "[1]", "not json"):
        bad.write_text(text)
        with pytest.raises(label_studio.LabelStudioError, match="Label Studio JSON export"):
            label_studio.load_export(bad)


def test_an_import_into_a_linked_landing_folder_is_refused(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.contributors_file.write_text("contributors:\n  - {id: ann, role: annotator, label_studio: ann@example.org}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home.landing_dir("corrections") / "label-studio").symlink_to(elsewhere)
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"item_id": "i1", "task_id": "t1"}, "annotations": [
        {"id": 1, "completed_by": {"email": "ann@example.org"}, "result": _choice("zero"), "project": 3,
         "created_at": "2026-03-05T09:00:00Z"}]}]))
    assert cli.main(["label-studio", "import", str(export)]) == 1
    err = capsys.readouterr().err
    assert "is a symbolic link" in err and "nothing was written" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []
