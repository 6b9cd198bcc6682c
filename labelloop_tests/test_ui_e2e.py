"""End to end through the real Dagster UI: `dagster dev` on the demo's state, headless Chromium on
the asset graph, the asset pages (with production_corpus's columns, code version and freshness),
the jobs and the automations, and the GraphQL API for jobs, lineage and sensors.

One `dagster dev` serves the whole module (its process group is always killed at the end). The
browser test needs Debian's Chromium (`scripts/install-browser.sh`) and the `playwright` package:
without them it is skipped locally and fails under CI (CI=true), which installs both.

    LABELLOOP_UPDATE_SCREENSHOTS=1 pytest -m e2e    # also refresh docs/screenshots/*.png
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets.core import schemas
from labelloop_assets.demo.run import prepare_home, run_demo
from labelloop_tests.pg import in_ci
from labelloop_tests.ui_server import CODE_LOCATION, REPO_ROOT, DagsterDev

pytestmark = [
    pytest.mark.e2e,
    # dagster_graphql's client still calls gql with arguments gql deprecated.
    pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning"),
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REPOSITORY = "__repository__"  # a Definitions object is served as this repository
SENSORS = ("landing_sensor", "retrain_sensor")
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
ASSET_PAGES = (
    "raw_corrections", "validated_labels", "production_corpus", "label_quality_metrics",
    "label_quality_signals", "retrained_model",
)
# Checks the README promises; more may exist, and every check the API reports must render.
PROMISED_CHECKS = {
    "raw_corrections": {"raw_corrections_schema", "raw_corrections_counts_reconcile"},
    "validated_labels": {"validated_labels_schema"},
    "production_corpus": {"production_corpus_schema"},
    "label_quality_signals": {
        "label_drift_within_threshold", "feature_drift_within_threshold", "agreement_above_floor",
    },
}
# The landing zone: external assets (producers write them), where lineage starts.
LANDING_GROUP = "landing"
LANDING_ASSETS = ("item_files", "prediction_files", "correction_files", "review_files", "gold_file")
# The column schemas the UI shows before any run, declared from the same rules Pandera checks.
COLUMN_SCHEMAS = {
    "raw_corrections": schemas.RAW_CORRECTIONS_COLUMNS,
    "validated_labels": schemas.VALIDATED_LABELS_COLUMNS,
    "production_corpus": schemas.PRODUCTION_CORPUS_COLUMNS,
}
FRESH_ASSETS = ("production_corpus", "label_quality_metrics", "label_quality_signals")
SCHEDULED_CHECKS_JOB = "scheduled_checks_job"
SCHEDULED_CHECKS_SCHEDULE = "scheduled_checks_job_schedule"  # Dagster's default: the job's name
SCHEDULED_CHECKS = {"escalations_within_sla", "no_held_bursts"}
UI_TIMEOUT_MS = 30_000
# The daemon evaluates freshness policies every 30 s; the first pass follows the server's start.
FRESHNESS_TIMEOUT_S = 120
RUN_TIMEOUT_S = 150
SENSOR_TIMEOUT_S = 150  # the landing sensor ticks at most every 30 s, then the run starts


def require(condition: bool, what: str, fix: str) -> None:
    """Skip locally, fail under CI: CI installs the browser and its driver."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{what} (CI=true, so this fails instead of skipping): {fix}", pytrace=False)
    pytest.skip(f"{what}: {fix}")


# --- the server and its state -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-e2e")


@pytest.fixture(scope="module")
def demo_home(workdir: Path) -> Path:
    """One simulated day through Dagster on a persistent instance configured by dagster.yaml."""
    home = prepare_home(workdir / "home")
    storage = home.root / "dagster"
    storage.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABELLOOP_DAGSTER_STORAGE", str(storage))
        instance = dg.DagsterInstance.from_config(str(REPO_ROOT))
        try:
            rows = run_demo(home, instance, days=1, echo=lambda _: None)
        finally:
            instance.dispose()
    assert [row["day"] for row in rows] == [0, 1]
    return home.root


@pytest.fixture(scope="module")
def server(demo_home: Path, workdir: Path):
    dev = DagsterDev(home=demo_home, log_path=workdir / "dagster-dev.log", tmpdir=workdir / "tmp")
    try:
        dev.start(timeout=90)
        yield dev
    finally:
        dev.stop()


def graphql(server: DagsterDev, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        server.url + "/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert not answer.get("errors"), f"GraphQL errors: {answer['errors']}"
    return answer["data"]


ASSET_QUERY = """
query Asset($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
  ... on AssetNode {
    description
    assetChecksOrError { __typename ... on AssetChecks { checks {
      name description blocking
      executionForLatestMaterialization { status evaluation { success } }
    } } }
    assetMaterializations(limit: 1) {
      runId
      metadataEntries { __typename label
        ... on IntMetadataEntry { intValue }
        ... on TextMetadataEntry { text }
      }
    }
  }
} }
"""
RUNS_QUERY = """query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) {
  __typename ... on Runs { results { runId status tags { key value } } } } }"""
RUN_MATERIALIZATIONS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run {
  status assetMaterializations { assetKey { path } metadataEntries { __typename label
    ... on IntMetadataEntry { intValue } ... on MarkdownMetadataEntry { mdStr } } } } } }"""


def asset_facts(server: DagsterDev, asset: str) -> dict:
    node = graphql(server, ASSET_QUERY, {"key": {"path": [asset]}})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", f"{asset}: {node}"
    checks = node["assetChecksOrError"]
    assert checks["__typename"] == "AssetChecks", f"{asset}: {checks}"
    assert node["assetMaterializations"], f"{asset} was never materialized by the demo"
    return {
        "description": node["description"] or "",
        "checks": checks["checks"],
        "metadata": node["assetMaterializations"][0]["metadataEntries"],
    }


DEFINITIONS_QUERY = """{ assetNodes {
  assetKey { path } groupName opVersion isMaterializable
  metadataEntries { __typename label
    ... on TableSchemaMetadataEntry { schema { columns {
      name type description constraints { nullable unique other } } } }
  }
  internalFreshnessPolicy { __typename
    ... on TimeWindowFreshnessPolicy { failWindowSeconds warnWindowSeconds } }
} }"""
FRESHNESS_STATUS_QUERY = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
  __typename ... on AssetNode { freshnessStatusInfo { freshnessStatus } } } }"""


def asset_definitions(server: DagsterDev) -> dict[str, dict]:
    """Every asset's definition as the UI reads it, by the last part of its key."""
    nodes = graphql(server, DEFINITIONS_QUERY)["assetNodes"]
    return {node["assetKey"]["path"][-1]: node for node in nodes}


def declared_columns(definition: dict) -> list[dict] | None:
    """The `dagster/column_schema` of a definition (None without one)."""
    for entry in definition["metadataEntries"]:
        if entry["label"] == "dagster/column_schema":
            assert entry["__typename"] == "TableSchemaMetadataEntry", entry
            return entry["schema"]["columns"]
    return None


def wait_for_freshness_status(server: DagsterDev, asset: str) -> str:
    """The asset's freshness status once the daemon has evaluated its policy (UNKNOWN before)."""
    deadline = time.monotonic() + FRESHNESS_TIMEOUT_S
    while True:
        node = graphql(server, FRESHNESS_STATUS_QUERY, {"key": {"path": [asset]}})["assetNodeOrError"]
        assert node["__typename"] == "AssetNode", f"{asset}: {node}"
        info = node["freshnessStatusInfo"]
        assert info is not None, f"{asset} has no freshness policy the API knows of"
        if info["freshnessStatus"] != "UNKNOWN" or time.monotonic() > deadline:
            return info["freshnessStatus"]
        time.sleep(2)


def run_failure_detail(server: DagsterDev, run_id: str) -> str:
    """The first failed step's error, for assertion messages."""
    query = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
      __typename ... on ExecutionStepFailureEvent { stepKey error { message cause { message } } }
    } } } }"""
    events = graphql(server, query, {"id": run_id})["logsForRun"].get("events", [])
    for event in events:
        if event["__typename"] == "ExecutionStepFailureEvent":
            error = event["error"] or {}
            cause = (error.get("cause") or {}).get("message", "")
            return f"step {event['stepKey']} failed: {cause or error.get('message', '')}".strip()
    return "(no step failure recorded)"


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Checked before the server starts, so a skip costs nothing."""
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing", "run `sudo scripts/install-browser.sh`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require(False, "the playwright package is not installed",
                "install the dev extras: `.venv/bin/pip install -e '.[dev]'`")
    return CHROMIUM


@pytest.fixture
def browser(chromium: Path):
    """Headless Debian Chromium (never a downloaded build: `playwright install` is not used).

    Function-scoped and requested after `server`: Playwright's sync API keeps an event loop in
    this thread while it runs, which the demo's in-process Dagster runs must not see.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def _plain(markdown: str) -> str:
    """What the UI shows of a description: tags and code marks are not displayed as typed."""
    text = re.sub(r"<[^>]*>", "", markdown)
    text = re.sub(r"[`*]", "", text)
    return " ".join(text.split())


def _shot(page, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    return path


def _settle(page) -> None:
    """Until no loading placeholder (a grey shimmering bar) is left: sections load one by one."""
    from playwright.sync_api import expect

    expect(page.locator("[class*='Skeleton_']")).to_have_count(0)


def _publish(png: Path, name: str) -> None:
    """With LABELLOOP_UPDATE_SCREENSHOTS=1, a screenshot becomes docs/screenshots/NAME."""
    if os.environ.get("LABELLOOP_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, SCREENSHOTS / name)


def _shown_as(label: str, name: str) -> bool:
    """The graph shortens long names in the middle at low zoom: `label_qua…_metrics`."""
    if label == name:
        return True
    head, sep, tail = label.partition("…")
    return bool(sep) and len(head) + len(tail) >= 4 and name.startswith(head) and name.endswith(tail)


def _wait_for_nodes(page, names: list[str], timeout_s: float = UI_TIMEOUT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        labels = set(page.locator("svg foreignObject").evaluate_all(
            "nodes => nodes.flatMap(node => Array.from(node.querySelectorAll('*'))"
            "  .filter(e => e.children.length === 0).map(e => (e.textContent || '').trim()))"
        ))
        missing = [n for n in names if not any(_shown_as(label, n) for label in labels)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"asset graph does not show {missing}; it shows {sorted(labels)}")
        time.sleep(0.25)


@contextmanager
def _page(browser, width: int, height: int, failure_png: Path):
    """A fresh page (own context, so own local storage); a screenshot is kept if a step fails."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield page
    except BaseException:
        with suppress(Exception):
            _shot(page, failure_png)
        raise
    finally:
        page.close()


def test_asset_graph_and_asset_pages_render(chromium, server, browser, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    shots = tmp_path / "screenshots"
    facts = {asset: asset_facts(server, asset) for asset in ASSET_PAGES}
    nodes = graphql(server, "{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
    all_assets = sorted(n["assetKey"]["path"][-1] for n in nodes)
    groups = sorted({n["groupName"] for n in nodes})
    assert set(ASSET_PAGES) <= set(all_assets)
    landing = sorted(n["assetKey"]["path"][-1] for n in nodes if n["groupName"] == LANDING_GROUP)
    assert landing == sorted(LANDING_ASSETS), f"the {LANDING_GROUP} group holds {landing}"

    # The global asset graph with every group expanded.
    # Tall enough that the whole expanded graph fits at a zoom where node names show.
    with _page(browser, 1800, 2400, shots / "FAILED-asset-graph.png") as page:
        page.goto(server.url + "/asset-groups")
        for group in groups:
            expect(page.get_by_text(group, exact=True).first).to_be_visible()
        page.get_by_role("button", name="Hide navigation").click()
        # "Expand all groups" (Alt+E, also in the graph's settings menu). The UI remembers the
        # expanded groups; a reload then fits the whole expanded graph into the window.
        page.keyboard.press("Alt+e")
        expanded = page.locator("[aria-label='unfold_less']")  # an expanded group's toggle
        expect(expanded).to_have_count(len(groups))
        page.reload()
        expect(expanded).to_have_count(len(groups))
        _wait_for_nodes(page, list(LANDING_ASSETS))  # lineage starts at the landing zone
        _wait_for_nodes(page, all_assets)
        page.wait_for_timeout(1000)  # let the fit-to-window animation finish
        graph_png = _shot(page, shots / "asset-graph.png")

    # The pages then show each freshness policy's evaluated status, not "not evaluated yet".
    for asset in FRESH_ASSETS:
        wait_for_freshness_status(server, asset)
    pages: dict[str, Path] = {}
    with _page(browser, 1400, 900, shots / "FAILED-asset-page.png") as page:
        for asset, fact in facts.items():
            page.goto(f"{server.url}/assets/{asset}")
            expect(page.get_by_text(asset, exact=True).first).to_be_visible()
            expect(page.get_by_text("Description", exact=True).first).to_be_visible()
            description = _plain(fact["description"])
            assert description, f"{asset} has no description"
            expect(page.get_by_text(description[:60]).first).to_be_visible()
            if fact["checks"]:
                expect(page.get_by_text("Latest check results")).to_be_visible()

            # Every metadata entry of the latest materialization is listed, with its value.
            expect(page.get_by_text("Metadata", exact=True).first).to_be_visible()
            shown = [e for e in fact["metadata"] if not e["label"].startswith("dagster/")]
            assert shown, f"{asset} has no metadata"
            for entry in shown:
                key = page.get_by_text(entry["label"], exact=True).filter(visible=True)
                expect(key.first).to_be_visible()
                value = entry.get("intValue", entry.get("text"))
                if value is not None:
                    row = page.locator("tr", has=page.get_by_text(entry["label"], exact=True))
                    expect(row.first).to_contain_text(str(value))
            _settle(page)
            pages[asset] = _shot(page, shots / f"{asset}.png")
            if asset == "label_quality_signals":
                # The trend chart is a PNG inside markdown metadata: it must render as an image.
                row = page.locator("tr", has=page.get_by_text("trends", exact=True)).first
                row.scroll_into_view_if_needed()
                row.get_by_text("Show Markdown").click()
                chart = page.get_by_role("dialog").locator("img")
                expect(chart.first).to_be_visible()
                assert chart.first.evaluate("img => img.naturalWidth") > 100
                page.wait_for_timeout(800)  # the dialog fades in
                pages["trends"] = _shot(page, shots / "label_quality_signals-trends.png")
                page.keyboard.press("Escape")

            # The Checks tab: every check with its description and its latest result.
            names = {check["name"] for check in fact["checks"]}
            assert PROMISED_CHECKS.get(asset, set()) <= names, f"{asset} checks: {sorted(names)}"
            for check in fact["checks"]:
                execution = check["executionForLatestMaterialization"]
                where = f"{asset}/{check['name']}: {execution}"
                assert execution and execution["status"] == "SUCCEEDED", where
                assert execution["evaluation"]["success"], where
                page.goto(f"{server.url}/assets/{asset}?view=checks&checkDetail={check['name']}")
                expect(page.get_by_text(f"Checks ({len(fact['checks'])})")).to_be_visible()
                # (the check list also holds a hidden copy of each name, to measure it)
                title = page.get_by_text(check["name"], exact=True).filter(visible=True)
                expect(title.first).to_be_visible()
                about = _plain(check["description"] or "")[:60]
                assert about, f"{asset}/{check['name']} has no description"
                expect(page.get_by_text(about).first).to_be_visible()
                kind = "blocking" if check["blocking"] else "non-blocking"
                expect(page.get_by_text(kind, exact=True).first).to_be_visible()
                expect(page.get_by_text("Latest execution")).to_be_visible()
                expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
                expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(fact["checks"]))
            if fact["checks"]:
                _settle(page)
                _shot(page, shots / f"{asset}-checks.png")

    assert set(pages) == set(ASSET_PAGES) | {"trends"}
    _publish(graph_png, "asset-graph.png")
    _publish(pages["production_corpus"], "production_corpus.png")
    _publish(pages["trends"], "label_quality_signals-trends.png")


def test_definitions_show_columns_code_versions_and_freshness(chromium, server, browser, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    definitions = asset_definitions(server)

    # Every asset labelloop computes has a code version; the landing files are external.
    for name, definition in definitions.items():
        if definition["groupName"] == LANDING_GROUP:
            assert not definition["isMaterializable"], f"landing asset {name} is materializable"
        else:
            assert definition["isMaterializable"], f"{name} cannot be materialized"
            assert definition["opVersion"], f"{name} has no code version"

    # The gated tables declare the columns their Pandera schema checks: name, type, description,
    # nullability, uniqueness and the rule, as written in core/schemas.py.
    for asset, rules in COLUMN_SCHEMAS.items():
        columns = declared_columns(definitions[asset])
        assert columns is not None, f"{asset} declares no dagster/column_schema"
        assert [(c["name"], c["type"], c["description"]) for c in columns] == [
            (rule.name, rule.dtype, rule.description) for rule in rules
        ], f"{asset}: {columns}"
        for column, rule in zip(columns, rules, strict=True):
            constraints = column["constraints"]
            assert constraints == {
                "nullable": rule.nullable, "unique": rule.unique,
                "other": [rule.rule_text()] if rule.rule else [],
            }, f"{asset}.{rule.name}: {constraints}"
    corpus = definitions["production_corpus"]
    assert {"item_id", "label"} <= {c["name"] for c in declared_columns(corpus)}

    for asset in FRESH_ASSETS:
        policy = definitions[asset]["internalFreshnessPolicy"]
        assert policy and policy["__typename"] == "TimeWindowFreshnessPolicy", f"{asset}: {policy}"
        assert 0 < policy["warnWindowSeconds"] < policy["failWindowSeconds"], f"{asset}: {policy}"
    # The demo materialized the corpus minutes ago: fresh, once the daemon has evaluated it.
    status = wait_for_freshness_status(server, "production_corpus")
    assert status == "HEALTHY", (
        f"production_corpus freshness is {status} after {FRESHNESS_TIMEOUT_S}s\n"
        f"server log tail:\n{server.log_tail(30)}"
    )

    shots = tmp_path / "screenshots"
    with _page(browser, 1400, 1250, shots / "FAILED-production_corpus-columns.png") as page:
        page.goto(f"{server.url}/assets/production_corpus")
        expect(page.get_by_text("Columns", exact=True)).to_be_visible()
        table = page.locator("table", has=page.get_by_text("Column name", exact=True))
        for rule in schemas.PRODUCTION_CORPUS_COLUMNS:
            row = table.locator("tr", has=page.get_by_text(rule.name, exact=True))
            expect(row).to_have_count(1)
            expect(row).to_contain_text(rule.dtype)
            expect(row).to_contain_text(rule.description)
            if not rule.nullable:
                expect(row).to_contain_text("non-nullable")
            if rule.unique:
                expect(row).to_contain_text("unique")

        # The freshness policy's section: its windows, and the status the daemon evaluated.
        fails = page.get_by_text(re.compile(r"^Fails if more than .+ since last materialization$"))
        expect(fails).to_be_visible()
        warns = page.get_by_text(re.compile(r"^Warns if more than .+ since last materialization$"))
        expect(warns).to_be_visible()
        expect(page.get_by_text("Freshness policy", exact=True).first).to_be_visible()
        # "Passing" (the status the API reported as HEALTHY) in the same block as the windows.
        status_block = fails.locator(
            "xpath=ancestor::div[.//*[normalize-space(text())='Passing']][1]"
        )
        expect(status_block).to_contain_text("Last materialized")

        # The code version sits in the collapsed "Compute details" section.
        compute = page.get_by_role("button", name="Compute details")
        if compute.get_attribute("aria-expanded") != "true":
            compute.click()
        code_version = page.get_by_text("Code version", exact=True).locator("xpath=..")
        expect(code_version.locator(f"[title={json.dumps(corpus['opVersion'])}]")).to_be_visible()
        _settle(page)
        page.wait_for_timeout(500)  # the section slides open
        _publish(_shot(page, shots / "production_corpus-columns.png"), "production_corpus-columns.png")


def test_jobs_and_automations_list_the_scheduled_checks(chromium, server, browser, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    repository = graphql(server, """query($r: RepositorySelector!) {
      repositoryOrError(repositorySelector: $r) { __typename ... on Repository {
        jobs { name } sensors { name }
        schedules { name pipelineName cronSchedule scheduleState { status } } } } }""",
        {"r": {"repositoryLocationName": CODE_LOCATION, "repositoryName": REPOSITORY}},
    )["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    jobs = sorted(j["name"] for j in repository["jobs"] if not j["name"].startswith("__"))
    assert SCHEDULED_CHECKS_JOB in jobs, jobs
    schedules = {s["name"]: s for s in repository["schedules"]}
    schedule = schedules.get(SCHEDULED_CHECKS_SCHEDULE)
    assert schedule, f"no {SCHEDULED_CHECKS_SCHEDULE}: {sorted(schedules)}"
    assert schedule["pipelineName"] == SCHEDULED_CHECKS_JOB, schedule
    assert schedule["scheduleState"]["status"] == "RUNNING", schedule  # on without a click
    hourly = re.fullmatch(r"(\d+) \* \* \* \*", schedule["cronSchedule"])
    assert hourly, f"{SCHEDULED_CHECKS_SCHEDULE} is not hourly: {schedule['cronSchedule']}"
    past_the_hour = f"{int(hourly.group(1))} minutes past the hour"

    shots = tmp_path / "screenshots"
    with _page(browser, 1400, 900, shots / "FAILED-jobs.png") as page:
        page.goto(f"{server.url}/jobs")

        def job_link(job: str):
            return page.get_by_role("link").filter(has=page.get_by_text(job, exact=True))

        for job in jobs:
            expect(job_link(job)).to_be_visible()

        # The job page: the two checks it runs, and its schedule.
        job_link(SCHEDULED_CHECKS_JOB).click()
        expect(page.get_by_text(past_the_hour).first).to_be_visible()
        for check in SCHEDULED_CHECKS:
            expect(page.get_by_text(re.compile(rf"_{check}$")).first).to_be_visible()

        page.goto(f"{server.url}/automation")
        expect(page.get_by_text(SCHEDULED_CHECKS_SCHEDULE, exact=True)).to_be_visible()
        expect(page.get_by_text(re.compile(past_the_hour)).first).to_be_visible()
        for name in (*schedules, *(s["name"] for s in repository["sensors"])):
            expect(page.get_by_text(name, exact=True)).to_be_visible()


# --- GraphQL -----------------------------------------------------------------------------------


def test_graphql_lineage_of_production_corpus(server):
    workspace = graphql(server, """{ workspaceOrError { ... on Workspace { locationEntries {
      name locationOrLoadError { __typename ... on RepositoryLocation {
        repositories { name jobs { name } sensors { name } } } } } } } }""")
    entries = {e["name"]: e for e in workspace["workspaceOrError"]["locationEntries"]}
    repositories = entries[CODE_LOCATION]["locationOrLoadError"]["repositories"]
    assert [r["name"] for r in repositories] == [REPOSITORY]
    assert {"ingest_job", "retrain_job"} <= {j["name"] for j in repositories[0]["jobs"]}
    assert {s["name"] for s in repositories[0]["sensors"]} >= set(SENSORS)

    nodes = graphql(server, """{ assetNodes { assetKey { path }
        dependencyKeys { path } dependedByKeys { path } } }""")["assetNodes"]
    up = {n["assetKey"]["path"][-1]: {k["path"][-1] for k in n["dependencyKeys"]} for n in nodes}
    down = {n["assetKey"]["path"][-1]: {k["path"][-1] for k in n["dependedByKeys"]} for n in nodes}

    def closure(edges: dict[str, set[str]], start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for neighbour in edges.get(todo.pop(), ()):
                if neighbour not in seen:
                    seen.add(neighbour)
                    todo.append(neighbour)
        return seen

    # Contains, not equals: the graph may grow (review and governance assets, for example).
    assert up["production_corpus"] >= {"validated_labels", "items"}
    upstream = closure(up, "production_corpus")
    assert upstream >= {"validated_labels", "items", "raw_corrections", "predictions"}
    assert "raw_corrections" in up["validated_labels"]
    assert down["production_corpus"] >= {"retrained_model", "label_quality_metrics"}
    downstream = closure(down, "production_corpus")
    assert downstream >= {"retrained_model", "label_quality_metrics"}
    assert not upstream & downstream, "the asset graph has a cycle through production_corpus"
    assert "production_corpus" not in upstream


def test_graphql_client_launches_retrain_and_ingest(server):
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)
    run_ids = {
        job: client.submit_job_execution(
            job, repository_location_name=CODE_LOCATION, repository_name=REPOSITORY
        )
        for job in ("retrain_job", "ingest_job")
    }
    deadline = time.monotonic() + RUN_TIMEOUT_S
    final: dict[str, dg.DagsterRunStatus] = {}
    while len(final) < len(run_ids) and time.monotonic() < deadline:
        for job, run_id in run_ids.items():
            if job not in final:
                status = client.get_run_status(run_id)
                if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                              dg.DagsterRunStatus.CANCELED):
                    final[job] = status
        time.sleep(1)
    for job, run_id in run_ids.items():
        status = final.get(job, f"unfinished after {RUN_TIMEOUT_S}s")
        assert status == dg.DagsterRunStatus.SUCCESS, (
            f"{job} run {run_id} ended {status}: "
            f"{run_failure_detail(server, run_id)}\nserver log tail:\n{server.log_tail(30)}"
        )

    # Each run materialized what its job is for (the two may interleave under the duckdb pool).
    made = {job: _materialized(server, run_id) for job, run_id in run_ids.items()}
    assert "retrained_model" in made["retrain_job"], made
    assert {"raw_corrections", "validated_labels", "production_corpus"} <= set(made["ingest_job"])
    model_version = made["retrain_job"]["retrained_model"]["corpus_version"]
    assert 1 <= model_version <= made["ingest_job"]["production_corpus"]["corpus_version"], made


def _materialized(server: DagsterDev, run_id: str) -> dict[str, dict]:
    """asset name -> metadata (int and markdown entries) of what the run materialized."""
    run = graphql(server, RUN_MATERIALIZATIONS, {"id": run_id})["runOrError"]
    assert run["__typename"] == "Run", run
    return {
        m["assetKey"]["path"][-1]: {
            e["label"]: e.get("intValue", e.get("mdStr")) for e in m["metadataEntries"]
        }
        for m in run["assetMaterializations"]
    }


# --- sensors -----------------------------------------------------------------------------------

def _landing_runs(server: DagsterDev) -> dict[str, str]:
    tags = [{"key": "dagster/sensor_name", "value": "landing_sensor"}]
    answer = graphql(server, RUNS_QUERY, {"tags": tags})["runsOrError"]
    assert answer["__typename"] == "Runs", answer
    return {run["runId"]: run["status"] for run in answer["results"]}


def _sensor_selector(name: str) -> dict:
    return {"repositoryLocationName": CODE_LOCATION, "repositoryName": REPOSITORY,
            "sensorName": name}


def _start_sensor(server: DagsterDev, name: str) -> str:
    started = graphql(server, """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
      __typename ... on Sensor { sensorState { status } }
      ... on PythonError { message } ... on SensorNotFoundError { message }
      ... on UnauthorizedError { message } } }""", {"s": _sensor_selector(name)})["startSensor"]
    assert started["__typename"] == "Sensor", f"startSensor {name}: {started}"
    return started["sensorState"]["status"]


def _stop_sensor(server: DagsterDev, name: str) -> str:
    """The sensor's status after stopping it, or what went wrong (never raises: used in finally)."""
    try:
        return _stop_sensor_or_raise(server, name)
    except Exception as error:  # noqa: BLE001 - the caller's assertion reports it
        return f"{type(error).__name__}: {error}"


def _stop_sensor_or_raise(server: DagsterDev, name: str) -> str:
    sensor = graphql(server, """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
      __typename ... on Sensor { jobOriginId sensorState { id selectorId status } } } }""",
        {"s": _sensor_selector(name)})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", f"sensorOrError {name}: {sensor}"
    state = sensor["sensorState"]
    stopped = graphql(server, """mutation($id: String, $origin: String, $selector: String) {
      stopSensor(id: $id, jobOriginId: $origin, jobSelectorId: $selector) { __typename
        ... on StopSensorMutationResult { instigationState { status } }
        ... on PythonError { message } ... on UnauthorizedError { message } } }""",
        {"id": state["id"], "origin": sensor["jobOriginId"], "selector": state["selectorId"]},
    )["stopSensor"]
    assert stopped["__typename"] == "StopSensorMutationResult", f"stopSensor {name}: {stopped}"
    return stopped["instigationState"]["status"]


def _ticks(server: DagsterDev, name: str) -> list[dict]:
    sensor = graphql(server, """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
      __typename ... on Sensor { sensorState { ticks(limit: 20) {
        status skipReason error { message } } } } } }""",
        {"s": _sensor_selector(name)})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", f"sensorOrError {name}: {sensor}"
    return sensor["sensorState"]["ticks"]


def _first_correctable_item(home: Path) -> tuple[str, str]:
    for path in sorted((home / "landing" / "items").iterdir()):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if not record.get("gold_label") and record.get("initial_label"):
                return record["item_id"], record["initial_label"]
    raise AssertionError("the demo landed no item with an initial label")


def test_sensors_ingest_a_new_correction_file(server, demo_home):
    before = set(_landing_runs(server))
    try:
        for sensor in SENSORS:
            assert _start_sensor(server, sensor) == "RUNNING"
        item_id, current = _first_correctable_item(demo_home)
        corrected = "eight" if current != "eight" else "three"
        tag = uuid.uuid4().hex[:8]
        events = [
            {"event_id": f"e2e-{tag}-{i}", "item_id": item_id, "corrected_label": corrected,
             "user_id": f"e2e-annotator-{i}", "user_role": "annotator", "source": "annotation",
             "consent": True, "created_at": "2026-03-04T09:00:00+00:00",
             "original_label": current, "rationale": "end-to-end test"}
            for i in range(2)
        ]
        folder = demo_home / "landing" / "corrections"
        name = f"e2e-{tag}.jsonl"
        temp = folder / f".{name}"
        temp.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
        temp.rename(folder / name)  # atomic: the sensor never sees a half-written file

        deadline = time.monotonic() + SENSOR_TIMEOUT_S
        found, seen_runs = None, {}
        while found is None and time.monotonic() < deadline:
            seen_runs = {k: v for k, v in _landing_runs(server).items() if k not in before}
            for run_id, status in seen_runs.items():
                if status == "FAILURE":
                    pytest.fail(f"landing_sensor run {run_id} failed: "
                                f"{run_failure_detail(server, run_id)}")
                if status != "SUCCESS":
                    continue
                meta = _materialized(server, run_id).get("raw_corrections", {})
                if f"corrections/{name}" in (meta.get("files") or ""):
                    found = (run_id, meta)
            if found is None:
                time.sleep(2)
        assert found, (
            f"no landing_sensor run ingested corrections/{name} within {SENSOR_TIMEOUT_S}s "
            f"(new sensor runs: {seen_runs})\nserver log tail:\n{server.log_tail(40)}"
        )
        run_id, meta = found
        assert meta["records_in"] == len(events), meta
        assert meta["accepted"] == len(events), meta
        for sensor in SENSORS:
            failed = [t for t in _ticks(server, sensor) if t["status"] == "FAILURE"]
            assert not failed, f"{sensor} ticks failed: {failed}"
    finally:
        stopped = {sensor: _stop_sensor(server, sensor) for sensor in SENSORS}
    assert stopped == dict.fromkeys(SENSORS, "STOPPED")
