"""The lake with its data files in S3: a real S3 API (moto's server) on 127.0.0.1, a real
PostgreSQL catalog, and the same loop as on the embedded store. Nothing reaches the internet:
the only endpoint is the loopback one moto listens on."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import lake, store
from labelloop_assets.core.lake import Lake
from labelloop_tests import pg
from labelloop_tests.conftest import prepared_home
from labelloop_tests.test_lake import _run_days, _tables, assert_same_tables, embedded_reference

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

BUCKET = "labelloop-lake"
PREFIX = "lake/"
START_TIMEOUT_S = 30
# Whatever the machine's AWS setup says, only what this test sets may reach DuckDB and boto3.
AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
           "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: object  # a boto3 S3 client on that endpoint


def _start_moto():
    """moto's S3 API in a thread of this process, on a free port of 127.0.0.1 only."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        pg.unavailable(f"moto's server is not installed ({error}): install moto[server]")

    class Server(ThreadedMotoServer):
        # moto's start() waits forever when the server cannot bind: record why, and stop waiting.
        failure: BaseException | None = None

        def _server_entry(self) -> None:
            try:
                super()._server_entry()
            except BaseException as error:
                self.failure = error
                self._server_ready_event.set()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    starting = threading.Thread(target=server.start, daemon=True)
    starting.start()
    starting.join(START_TIMEOUT_S)
    if starting.is_alive() or server.failure is not None:
        why = (
            f"{type(server.failure).__name__}: {server.failure}" if server.failure
            else f"no answer in {START_TIMEOUT_S} s"
        )
        pg.unavailable(f"moto's S3 server could not start on 127.0.0.1 ({why})")
    return server


@pytest.fixture
def s3(monkeypatch) -> Iterator[S3]:
    """A bucket on moto's server; the AWS variables point DuckDB (and boto3) at it."""
    import boto3

    # moto's server logs every request through werkzeug, which otherwise adds a handler of its
    # own bound to the stderr pytest captures (and closes) for this test: keep only its warnings.
    requests_log = logging.getLogger("werkzeug")
    quiet = logging.NullHandler()
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    requests_log.addHandler(quiet)
    server = None
    try:
        server = _start_moto()
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1", host
        endpoint = f"http://127.0.0.1:{port}"
        for name in AWS_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy of the machine's must not get in between
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            client.create_bucket(Bucket=BUCKET)
        except Exception as error:  # noqa: BLE001 - any failure here means moto is not serving S3
            pg.unavailable(f"moto's S3 server on {endpoint} refused to create a bucket: {error}")
        yield S3(endpoint, client)
        # moto keeps its buckets in this process's memory: drop them.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    finally:
        if server is not None:
            server.stop()
        requests_log.removeHandler(quiet)
        requests_log.setLevel(level)


def _keys(s3: S3) -> list[str]:
    keys, token = [], None
    while True:
        page = s3.client.list_objects_v2(
            Bucket=BUCKET, Prefix=PREFIX, **({"ContinuationToken": token} if token else {})
        )
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_the_loop_on_a_lake_with_its_data_in_s3(tmp_path, monkeypatch, capsys, s3):
    pg.require_server()
    for name in (lake.CATALOG_ENV, lake.DATA_PATH_ENV, lake.READER_CATALOG_ENV):
        monkeypatch.delenv(name, raising=False)
    _, expected = embedded_reference(tmp_path / "embedded")

    catalog = pg.fresh_database("lake_s3")
    monkeypatch.setenv(lake.CATALOG_ENV, catalog)
    monkeypatch.setenv(lake.DATA_PATH_ENV, f"s3://{BUCKET}/{PREFIX}")
    home = prepared_home(tmp_path / "s3-home")
    assert isinstance(home.database, Lake) and home.database.data_path == f"s3://{BUCKET}/{PREFIX}"
    with dg.instance_for_test() as instance:
        _run_days(home, instance)

    # (a) The same outcome as on the embedded store.
    assert_same_tables(_tables(home), expected)

    # (b) The data files are objects in the bucket, and the catalog says that is where they are.
    keys = _keys(s3)
    assert any(k.endswith(".parquet") for k in keys), keys
    [(data_path,)] = pg.query(catalog, "SELECT value FROM ducklake_metadata WHERE key = 'data_path'")
    assert data_path.startswith(f"s3://{BUCKET}/{PREFIX}"), data_path

    # (c) Nothing of the store is on the home's disk: no DuckDB file, no local lake folder.
    assert not home.database_file.exists()
    local = home.root / "lake"
    assert not local.exists() or not any(p.is_file() for p in local.rglob("*")), sorted(local.rglob("*"))

    # (d) An analyst's `labelloop sql` reads the corpus back from S3.
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    capsys.readouterr()
    assert cli.main(["sql", "SELECT item_id, label FROM production_corpus ORDER BY item_id", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["item_id"], r["label"]) for r in rows] == [(r[0], r[1]) for r in expected["production_corpus"]]

    # (e) Time travel to the snapshot that committed corpus version 1, its files read from S3.
    with store.connect(home.database, read_only=True) as con:
        snapshot, n_items = con.execute(
            "SELECT lake_snapshot, n_items FROM corpus_versions WHERE corpus_version = 1").fetchone()
        assert snapshot is not None
        assert con.execute(
            f"SELECT count(*) FROM production_corpus AT (VERSION => {int(snapshot)})").fetchone()[0] == n_items
        then = con.execute(
            f"SELECT item_id, label FROM production_corpus AT (VERSION => {int(snapshot)}) ORDER BY 1").fetchall()
        now = con.execute("SELECT item_id, label FROM production_corpus ORDER BY 1").fetchall()
    assert then != now  # version 1 is the corpus before the later days' corrections
