"""Privacy, proven on what labelloop actually writes.

A small demo runs through Dagster with a known LABELLOOP_SECRET; then an operator uses the CLI
with personal data in rationales and identities. Every table and view of the DuckDB file, every
file under LABELLOOP_HOME except the landing zone (the input), and Dagster's own storage for the
runs are searched for every raw user id, e-mail address and phone number the inputs held, and for
the key in every form the code derives. The searcher is first shown to find planted values in
each kind of place, so that a clean result means something.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import sqlite3
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import corpus, store, train
from labelloop_assets.core.anonymize import hmac_pads, pseudonym
from labelloop_assets.core.settings import Home, RetrainPolicy
from labelloop_assets.definitions import build_definitions
from labelloop_assets.demo.run import demo_keys_dir, prepare_home, run_demo
from labelloop_assets.demo.simulator import DemoConfig
from labelloop_tests.conftest import correction, land_items, make_items, write_jsonl
from labelloop_tests.test_loop import _materialize

SECRET = "bQYWxPuJ69AVMixHHinrkWHa3MPItoA7ZCo3kA8DjYc"
DEMO_RETRAIN = RetrainPolicy(min_label_changes=15, min_interval_seconds=0)
# The simulator's rationales hold contacts like these; the operator's CLI input adds more.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"\+\d{1,3}(?: \d+){2,}")
IDENTITY = re.compile(r'"(?:user_id|reviewer_id)"\s*:\s*"((?:[^"\\]|\\.)*)"')


# --------------------------------------------------------------------------- the searcher


def key_forms(key: str) -> dict[str, str]:
    """The key, and every encoding of it or of what HMAC derives from it (the padded keys)."""
    raw = key.encode()
    inner, outer = hmac_pads(raw)
    forms = {"key": key}
    for name, value in (("key", raw), ("inner pad", inner), ("outer pad", outer)):
        forms[f"{name} hex"] = value.hex()
        forms[f"{name} base64"] = base64.b64encode(value).decode()
        forms[f"{name} urlsafe base64"] = base64.urlsafe_b64encode(value).decode()
    return forms


@dataclass
class Needles:
    """What must never be found, by kind; matched case-insensitively ("Reviewer-0" leaks too)."""

    kinds: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, values) -> None:
        for value in values:
            if value:
                self.kinds.setdefault(value.lower(), kind)

    def of_kind(self, kind: str) -> set[str]:
        return {value for value, k in self.kinds.items() if k == kind}

    def add_phones(self, text: str) -> None:
        phones = PHONE.findall(text)
        # The subscriber part alone is still the number.
        self.add("phone number", [*phones, *(p.split(" ", 1)[1] for p in phones)])

    def find(self, text: str) -> set[str]:
        if not self.kinds:
            return set()
        pattern = "|".join(re.escape(n) for n in sorted(self.kinds, key=len, reverse=True))
        return set(re.findall(pattern, text.lower()))


def needles_from_landing(home: Home) -> Needles:
    """Every identity, e-mail address and phone number in the correction and review files."""
    needles = Needles()
    for kind in ("corrections", "reviews"):
        for path in sorted(home.landing_dir(kind).iterdir()):
            text = path.read_text(encoding="utf-8")
            needles.add("user id", (json.loads(f'"{m}"') for m in IDENTITY.findall(text)))
            needles.add("e-mail address", EMAIL.findall(text))
            needles.add_phones(text)
    return needles


def database_texts(database: Path) -> Iterator[tuple[str, str]]:
    """Each table and view as text: every row cast whole, so list and struct columns count too."""
    with duckdb.connect(str(database), read_only=True) as con:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
        ).fetchall()]
        for name in names:
            quoted = '"' + name.replace('"', '""') + '"'
            # An identifier read from the catalog, not a value: it cannot be bound as a parameter.
            text = con.execute(f"SELECT string_agg(CAST(t AS VARCHAR), chr(10)) FROM {quoted} AS t").fetchone()[0]
            yield f"table {name}", text or ""


def _skops_texts(path: Path) -> Iterator[str]:
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith(".npy"):
                array = np.load(io.BytesIO(data), allow_pickle=False)
                if array.dtype.kind in "US":
                    yield f"{name}: " + " ".join(map(str, array.ravel()))
            else:
                yield f"{name}: " + data.decode("utf-8", "replace")


def file_texts(root: Path, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """Every file under root as text: Parquet rows, NumPy arrays (no pickles), the rest as bytes."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in skip or path.suffix in (".duckdb", ".wal"):
            continue
        if path.suffix == ".parquet":
            with duckdb.connect() as con:
                text = con.execute(
                    "SELECT string_agg(CAST(t AS VARCHAR), chr(10)) FROM read_parquet($path) AS t",
                    {"path": str(path)},
                ).fetchone()[0]
            yield relative, text or ""
        elif path.suffix == ".skops":
            # A model file is a zip: its schema (class names, parameters, the TF-IDF vocabulary)
            # and its arrays, each a .npy member whose strings are read as text.
            yield relative, "\n".join(_skops_texts(path))
        elif path.suffix == ".db" and path.read_bytes()[:16] == b"SQLite format 3\x00":
            with sqlite3.connect(path) as con:
                tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                rows = [
                    " ".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row)
                    for table in tables for row in con.execute(f'SELECT * FROM "{table}"')
                ]
            yield relative, "\n".join(rows)
        else:
            yield relative, path.read_bytes().decode("utf-8", "replace")


def dagster_texts(instance: dg.DagsterInstance) -> Iterator[tuple[str, str]]:
    """Every run's tags and config and every event of its log, as stored; then the storage files."""
    for run in instance.get_runs():
        yield f"run {run.run_id} tags", json.dumps(run.tags)
        yield f"run {run.run_id} config", json.dumps(run.run_config, default=str)
        for event in instance.all_logs(run.run_id):
            yield f"run {run.run_id} event log", dg.serialize_value(event)
    yield from (
        (f"dagster storage {name}", text) for name, text in file_texts(Path(instance.root_directory))
    )


def find_leaks(needles: Needles, sources) -> dict[str, list[str]]:
    leaks = {}
    for where, text in sources:
        found = needles.find(text)
        if found:
            leaks[where] = sorted(f"{needles.kinds[n]}: {n}" for n in found)
    return leaks


# --------------------------------------------------------------------------- the demo


@contextmanager
def captured_logs() -> Iterator[tuple[io.StringIO, list[str]]]:
    """Everything printed, and every Python log record at any level, while the block runs."""
    printed, records = io.StringIO(), []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with redirect_stdout(printed), redirect_stderr(printed):
            yield printed, records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@dataclass
class Demo:
    home: Home
    instance: dg.DagsterInstance
    rows: list[dict]
    needles: Needles
    printed: str
    log_records: list[str]


def _pending_review_targets(home: Home) -> set[str]:
    return {
        json.loads(line)["escalation_id"]
        for path in home.landing_dir("reviews").glob("*.jsonl")
        for line in path.read_text().splitlines() if line.strip()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("privacy")
    operator_ids = ["reviewer-1", "customer042@shop.example", "reviewer-0", "annotator-2"]
    operator_text = [
        "called customer042@shop.example back on +44 20 7946 0042, it is fine -- reviewer-1",
        "I am sure it is a seven, mail me at customer042@shop.example",
        "m0002 misreads sevens, ops agree (+44 20 7946 0077, ops@labels.example) -- Reviewer-0",
        "roll back please, annotator-2 (+44 20 7946 0099)",
    ]
    with pytest.MonkeyPatch.context() as env, dg.instance_for_test() as instance:
        env.setenv("LABELLOOP_SECRET", SECRET)
        with captured_logs() as (printed, records):
            home = prepare_home(root / "home")
            env.setenv("LABELLOOP_HOME", str(home.root))
            # The operator signs with the demo reviewers' keys, kept beside the home.
            env.setenv("LABELLOOP_KEYS_DIR", str(demo_keys_dir(home.root)))
            # More end users than usual withhold consent, so that there is something to keep out.
            # Reviewers decide one escalation a day, so that the operator finds one nobody decided yet.
            config = DemoConfig(served_per_day=400, annotator_items_per_day=100, weak_training_day=99,
                                no_consent_rate=0.3, reviews_per_day=1)
            # Two days, as before the trust rules: the first model and a second (the rollback needs both).
            rows = run_demo(home, instance, days=2, config=config, retrain=DEMO_RETRAIN, echo=print)
            assert [(e["challenger"], e["decision"]) for r in rows for e in r["model_evaluations"]] == [
                ("m0001", "promote"), ("m0002", "promote")]
            # An operator at the command line, with personal data where people put it.
            with store.connect(home.database, read_only=True) as con:
                open_ids = store.frame(con, "SELECT escalation_id FROM escalations ORDER BY opened_at, item_id")
            free = [e for e in open_ids["escalation_id"] if e not in _pending_review_targets(home)]
            assert free, "the demo leaves an escalation nobody decided yet"
            assert cli.main(["review", "reject", free[0], "--rationale", operator_text[0],
                             "--as", operator_ids[0]]) == 0
            assert cli.main(["review", "decide", free[0], "--label", "seven", "--rationale", operator_text[1],
                             "--as", operator_ids[1]]) == 3
            assert cli.main(["model", "rollback", "m0001", "--rationale", operator_text[2],
                             "--as", operator_ids[2]]) == 0
            assert cli.main(["model", "rollback", "m0002", "--rationale", operator_text[3],
                             "--as", operator_ids[3]]) == 3
            # The next ingest run applies the day's review decisions and the operator's.
            defs = build_definitions(home, DEMO_RETRAIN)
            assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance).success
        needles = needles_from_landing(home)
        needles.add("user id", operator_ids)
        needles.add("e-mail address", (e for t in operator_text for e in EMAIL.findall(t)))
        for text in operator_text:
            needles.add_phones(text)
        for kind, value in key_forms(SECRET).items():
            needles.add(kind, [value])
        yield Demo(home, instance, rows, needles, printed.getvalue(), records)


def test_the_scanner_finds_what_is_planted_in_every_kind_of_place(tmp_path, instance):
    needles = Needles()
    needles.add("user id", ["planted-user-7"])
    needles.add("e-mail address", ["planted@contact.example"])
    needles.add("phone number", ["+44 20 7946 0001"])
    for kind, value in key_forms("planted-key").items():
        needles.add(kind, [value])
    database = tmp_path / "planted.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE clean (id VARCHAR, n DOUBLE)")
        con.execute("INSERT INTO clean VALUES ('nothing here', 1.0)")
        con.execute("CREATE TABLE lists (ids VARCHAR[], who STRUCT(name VARCHAR, contact VARCHAR))")
        con.execute("INSERT INTO lists VALUES (['a', '+44 20 7946 0001'], "
                    "{'name': 'x', 'contact': 'planted@contact.example'})")
        con.execute("CREATE VIEW shouting AS SELECT upper('planted-user-7') AS id")
    found = dict(find_leaks(needles, database_texts(database)))
    assert found == {
        "table lists": ["e-mail address: planted@contact.example", "phone number: +44 20 7946 0001"],
        "table shouting": ["user id: planted-user-7"],
    }
    files = tmp_path / "home"
    (files / "reports").mkdir(parents=True)
    (files / "reports" / "note.md").write_text("signed PLANTED-USER-7")
    (files / "published").mkdir()
    pl.DataFrame({"k": [key_forms("planted-key")["key hex"]]}).write_parquet(files / "published" / "x.parquet")
    (files / "models" / "m0001").mkdir(parents=True)
    import skops.io

    skops.io.dump({"classes": np.array(["a", key_forms("planted-key")["inner pad hex"]])},
                  files / "models" / "m0001" / "model.skops")
    (files / "landing").mkdir()
    (files / "landing" / "input.jsonl").write_text('{"user_id": "planted-user-7"}')
    found = find_leaks(needles, file_texts(files, skip=("landing",)))
    assert found == {
        "models/m0001/model.skops": ["inner pad hex: " + key_forms("planted-key")["inner pad hex"]],
        "published/x.parquet": ["key hex: " + key_forms("planted-key")["key hex"]],
        "reports/note.md": ["user id: planted-user-7"],
    }

    @dg.asset
    def leaky(context):
        context.log.info("using planted-key")
        return dg.MaterializeResult(metadata={"contact": "planted@contact.example"})

    assert dg.materialize([leaky], instance=instance, tags={"owner": "planted-user-7"}).success
    leaks = find_leaks(needles, dagster_texts(instance))
    kinds = {leak.split(":")[0] for found in leaks.values() for leak in found}
    assert kinds == {"key", "e-mail address", "user id"}


@pytest.mark.slow
def test_nothing_labelloop_writes_holds_an_identity_a_contact_or_the_key(demo):
    needles = demo.needles
    ids = needles.of_kind("user id")
    # The inputs really hold what is searched for: end users' e-mail ids, annotators, reviewers,
    # the intern refused on day 2, contacts in rationales, and the key the runs used.
    assert {"annotator-3", "reviewer-0", "reviewer-1", "intern-7", "annotator-2"} <= ids
    assert len({n for n in needles.kinds if "@" in n}) >= 10 and len(needles.of_kind("phone number")) >= 10
    leaks = {
        **find_leaks(needles, database_texts(demo.home.database)),
        # Landing files are the input; the directory names contributors by design.
        **find_leaks(needles, file_texts(demo.home.root, skip=("landing", "reviewers.yaml", "contributors.yaml"))),
        **find_leaks(needles, dagster_texts(demo.instance)),
    }
    assert leaks == {}
    # The key was really used, and the operator's free text really was written, scrubbed.
    with store.connect(demo.home.database, read_only=True) as con:
        reviewers = set(store.frame(con, "SELECT reviewer_pseudonym FROM review_decisions")["reviewer_pseudonym"])
        rollback = store.frame(con, "SELECT actor, outcome, reason FROM audit_log WHERE action = 'model.rollback' "
                                    "ORDER BY logged_at").rows()
    assert pseudonym(SECRET.encode(), "reviewer-1") in reviewers
    assert rollback == [
        (pseudonym(SECRET.encode(), "reviewer-0"), "rolled_back",
         "m0002 misreads sevens, ops agree ([phone], [email]) -- [user]"),
        (pseudonym(SECRET.encode(), "annotator-2"), "refused",
         "role annotator may not roll back a model (allowed: reviewer, domain_expert)"),
    ]


def trained_on_events(con, corpus_version: int) -> set[str]:
    """The correction events behind every label a model trained on `corpus_version` saw."""
    rows = store.frame(
        con,
        """
        SELECT h.event_ids FROM corpus_as_of($version) a
        JOIN label_history h ON h.item_id = a.item_id AND h.corpus_version = a.labelled_in_version
        QUALIFY row_number() OVER (PARTITION BY h.item_id ORDER BY h.change_order DESC) = 1
        """,
        {"version": corpus_version},
    )
    return {e for ids in rows["event_ids"].drop_nulls() for e in ids}


def models_and_their_events(con) -> dict[str, set[str]]:
    models = store.frame(con, "SELECT model_version, corpus_version, train_data_hash FROM models ORDER BY 1")
    found = {}
    for version, corpus_version, data_hash in models.rows():
        # The lineage reproduces exactly what the model was trained on, or it proves nothing.
        assert train.training_data_hash(corpus.corpus_as_of(con, corpus_version)) == data_hash, version
        found[version] = trained_on_events(con, corpus_version)
    return found


@pytest.mark.slow
def test_events_without_consent_never_reach_a_corpus_or_a_model(demo):
    sent = [json.loads(line) for path in demo.home.landing_dir("corrections").iterdir()
            for line in path.read_text().splitlines() if _parses(line)]
    without = {e["event_id"] for e in sent if e.get("consent") is False}
    with_consent = {e["event_id"] for e in sent if e.get("consent") is True}
    assert len(without) >= 5
    with store.connect(demo.home.database, read_only=True) as con:
        set_aside = store.frame(con, "SELECT record_id, reason FROM quarantine WHERE kind = 'corrections'")
        trained = models_and_their_events(con)
    assert without <= set(set_aside["record_id"])
    assert "no_consent" in set(set_aside["reason"])
    # Nowhere but in the quarantine: not staged, voted, decided, escalated, versioned or in lineage.
    ids = Needles()
    ids.add("event without consent", without)
    leaks = find_leaks(ids, database_texts(demo.home.database))
    assert set(leaks) == {"table quarantine", "table quarantined_corrections"}
    published = find_leaks(ids, file_texts(demo.home.published))
    assert set(published) == {"quarantine.parquet"}
    # Both models learned from corrections, none of them without consent.
    assert set(trained) == {"m0001", "m0002"}
    assert trained["m0002"] & with_consent
    assert not any(events & without for events in trained.values())


def test_a_correction_without_consent_changes_no_label_and_trains_no_model(home, defs, instance, monkeypatch):
    monkeypatch.setenv("LABELLOOP_SECRET", SECRET)
    land_items(home, make_items()[0])
    # A reviewer may flip a label alone: only consent tells these two apart.
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction("with-consent", "item-030", "one", user="rita"),
        correction("without-consent", "item-031", "zero", user="rita", consent=False),
    ])
    assert _materialize(defs, instance).success
    with store.connect(home.database, read_only=True) as con:
        labels = dict(store.frame(con, "SELECT item_id, label FROM production_corpus "
                                       "WHERE item_id IN ('item-030', 'item-031')").rows())
        reason = store.scalar(con, "SELECT reason FROM quarantine WHERE record_id = 'without-consent'")
        trained = models_and_their_events(con)
    assert labels == {"item-030": "one", "item-031": "one"}
    assert reason == "no_consent"
    assert trained == {"m0001": {"with-consent"}}


@pytest.mark.slow
def test_the_key_never_appears_in_logs(demo):
    events = [
        e for run in demo.instance.get_runs() for e in demo.instance.all_logs(run.run_id)
    ]
    messages = [e.message or "" for e in events] + [e.user_message or "" for e in events]
    assert any("Materialized value raw_corrections" in m for m in messages)
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in demo.instance.get_runs())
    # The runs used this key: their metadata says so, and the stored pseudonyms are its HMACs.
    raw = [e.asset_materialization.metadata for e in events
           if e.asset_materialization and e.asset_materialization.asset_key == dg.AssetKey("raw_corrections")]
    assert raw and {m["pseudonymization_key"].value for m in raw} == {"from LABELLOOP_SECRET"}
    keys = Needles()
    for kind, value in key_forms(SECRET).items():
        keys.add(kind, [value])
    assert "| day |" in demo.printed and "recorded reject of" in demo.printed and demo.log_records
    logs = [*messages, demo.printed, *demo.log_records, *(text for _, text in dagster_texts(demo.instance))]
    assert not [text for text in logs if keys.find(text)]


def _parses(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@pytest.mark.slow
def test_the_demo_reviewers_sign_with_private_keys_kept_outside_its_home(demo):
    """Every applied review decision carries a signature that verifies with its reviewer's key in
    contributors.yaml; the private keys live beside the home, mode 0600, and nothing in the home
    (files, the store) holds one."""
    from labelloop_assets.core import review, signing

    directory = review.directory(demo.home)
    with store.connect(demo.home.database, read_only=True) as con:
        decisions = store.frame(con, "SELECT key_id, signature FROM review_decisions")
    assert decisions.height >= 1 and decisions["signature"].is_not_null().all()
    owners = {directory.key(key_id)[0].id for key_id in decisions["key_id"]}
    assert owners <= {"reviewer-0", "reviewer-1"} and "reviewer-1" in owners

    folder = demo_keys_dir(demo.home.root)
    assert not signing.inside(folder, demo.home.root)
    keys = sorted(folder.glob("*.key"))
    assert [k.name for k in keys] == ["reviewer-0.key", "reviewer-1.key"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    pems = {k.read_text().splitlines()[1] for k in keys}  # the base64 body of each private key
    leaks = [name for name, text in [*file_texts(demo.home.root), *database_texts(demo.home.database)]
             if "PRIVATE KEY" in text or any(body in text for body in pems)]
    assert leaks == []
