"""Files the loop writes are readable by their owner only (LABELLOOP_FILE_ACCESS=owner, the
default), or by the home's group too (=group), never by anyone else.

Each run process starts with whatever umask it inherited (usually 022: files 0644, folders 0755,
readable by every account on the machine). The tests start the loop that way, in a real home, and
look at the mode of everything it created.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import store
from labelloop_assets.core.settings import FILE_ACCESS_ENV, Home, LabelloopConfigError
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN, correction, land_items, make_items, prepared_home, write_jsonl

USUAL_UMASK = 0o022
SECRET = "ZtrPzvKv1wTzFnxo8ATKYOJDscKhPxzbGe1fQrKbNiU"


@pytest.fixture(autouse=True)
def _umask_restored():
    """Home.ensure sets this process's umask; the tests after these get theirs back."""
    before = os.umask(USUAL_UMASK)
    os.umask(before)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def created_by_labelloop(home: Home, written_by_test: set[Path]) -> dict[Path, int]:
    """Every file and folder under the home (the home too) but those the test wrote, with modes."""
    found = {home.root: mode(home.root)}
    for folder, folders, files in os.walk(home.root):
        for name in (*folders, *files):
            path = Path(folder) / name
            if path not in written_by_test:
                found[path] = mode(path)
    return found


def run_the_loop(home: Home, instance: dg.DagsterInstance) -> set[Path]:
    """Land items and corrections as a producer would (umask 022), then materialize every asset
    in a process whose umask is the usual 022. Returns the files the test wrote."""
    os.umask(USUAL_UMASK)
    records, _ = make_items()
    written = {
        land_items(home, records),
        home.gold_file,
        write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
            correction("e-1", "item-030", "one", user="rita"),
            correction("e-2", "item-031", "zero", user="sam", rationale="call me on +44 20 7946 0042"),
        ]),
    }
    os.umask(USUAL_UMASK)  # a fresh run process
    job = build_definitions(home, RETRAIN).resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance).success
    return written


@pytest.mark.slow
def test_everything_the_loop_writes_is_readable_by_its_owner_only(tmp_path, instance, monkeypatch):
    monkeypatch.delenv(FILE_ACCESS_ENV, raising=False)
    monkeypatch.setenv("LABELLOOP_SECRET", SECRET)
    home = prepared_home(tmp_path / "home")

    written = run_the_loop(home, instance)

    found = created_by_labelloop(home, written)
    # What the loop writes is all there: the store, a model, published Parquet, reports.
    names = {p.name for p in found}
    assert {"labelloop.duckdb", "model.skops", "production_corpus.parquet", "views.sql", "CURRENT"} <= names
    assert any(p.parent == home.reports and p.is_file() for p in found)
    open_to_others = {str(p.relative_to(home.root)): oct(m) for p, m in found.items() if m & 0o077}
    assert open_to_others == {}
    assert mode(home.database_file) == 0o600 and mode(home.models) == 0o700
    # The producer's own files keep the mode it gave them: labelloop does not touch landed files.
    assert all(mode(p) == 0o644 for p in written)


@pytest.mark.slow
def test_with_group_access_the_group_reads_and_nobody_else(tmp_path, instance, monkeypatch):
    monkeypatch.setenv(FILE_ACCESS_ENV, "group")
    monkeypatch.setenv("LABELLOOP_SECRET", SECRET)
    home = prepared_home(tmp_path / "home")

    written = run_the_loop(home, instance)

    found = created_by_labelloop(home, written)
    too_open = {str(p.relative_to(home.root)): oct(m) for p, m in found.items() if m & 0o027}
    assert too_open == {}
    # The group may read (and enter folders): the store, models and published views.
    assert mode(home.database_file) == 0o640 and mode(home.root) == 0o750 and mode(home.models) == 0o750
    assert mode(home.published / "production_corpus.parquet") == 0o640


def test_a_home_made_before_is_tightened_but_its_landing_zone_is_left_as_its_operator_set_it(tmp_path, monkeypatch):
    """A home that an earlier version (or another tool) made world-readable: the next run takes
    the group and other bits away from the home's own files and folders. The landing folders keep
    theirs: producers under other accounts may write there."""
    monkeypatch.delenv(FILE_ACCESS_ENV, raising=False)
    os.umask(USUAL_UMASK)
    root = tmp_path / "home"
    for kind in ("items", "corrections"):
        (root / "landing" / kind).mkdir(parents=True)
    (root / "landing" / "corrections").chmod(0o3777)  # the operator's drop box for producers
    landed = root / "landing" / "items" / "items.jsonl"
    landed.write_text("{}\n")
    with store.connect(root / "labelloop.duckdb") as con:
        con.execute("CHECKPOINT")
    (root / "models" / "m0001").mkdir(parents=True)
    (root / "models" / "m0001" / "model.skops").write_bytes(b"model")
    (root / "models" / "CURRENT").write_text("m0001\n")
    (root / "published").mkdir()
    (root / "published" / "views.sql").write_text("-- views\n")
    (root / "contributors.yaml").write_text("contributors: []\n")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the home's\n")
    (root / "models" / "elsewhere").symlink_to(outside)
    before = {
        p: mode(p) for p in (root / "landing", root / "landing" / "items", root / "landing" / "corrections", landed)
    }
    assert mode(root / "labelloop.duckdb") == 0o644 and mode(root / "models" / "m0001") == 0o755

    home = Home(root).ensure()

    for path in (root, root / "models", root / "models" / "m0001", root / "published", root / "reports"):
        assert mode(path) == 0o700, path
    for path in (root / "labelloop.duckdb", root / "models" / "m0001" / "model.skops", root / "models" / "CURRENT",
                 root / "published" / "views.sql", root / "contributors.yaml", home.governance_file):
        assert mode(path) == 0o600, path
    assert {p: mode(p) for p in before} == before
    assert mode(outside) == 0o644  # a link's target outside the home is not the home's to change
    # Landing folders labelloop creates now follow the setting.
    assert mode(home.landing_dir("reviews")) == 0o700


def test_group_access_never_widens_what_the_owner_narrowed(tmp_path, monkeypatch):
    monkeypatch.setenv(FILE_ACCESS_ENV, "group")
    os.umask(0o077)
    root = tmp_path / "home"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.skops").write_bytes(b"model")
    Home(root).ensure()
    assert mode(root / "models") == 0o700 and mode(root / "models" / "model.skops") == 0o600


def test_an_unknown_file_access_setting_is_a_config_error(tmp_path, monkeypatch, instance, capsys):
    monkeypatch.setenv(FILE_ACCESS_ENV, "world")
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_FILE_ACCESS='world' is not a file access setting"):
        Home(tmp_path / "home").ensure()
    assert not (tmp_path / "home").exists()

    # The command line says so and stops.
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    assert cli.main(["status"]) == 2
    assert "LABELLOOP_FILE_ACCESS='world'" in capsys.readouterr().err

    # A run fails at its first step, naming the setting.
    monkeypatch.setenv(FILE_ACCESS_ENV, "owner")
    home = prepared_home(tmp_path / "run-home")
    defs = build_definitions(home, RETRAIN)
    monkeypatch.setenv(FILE_ACCESS_ENV, "Owner")
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("items")]
    )
    assert not result.success
    failure = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE][0]
    assert "LABELLOOP_FILE_ACCESS='Owner'" in failure.step_failure_data.error.message
