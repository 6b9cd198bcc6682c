"""Hostile landing files, as an attacker would make them: every line is still accounted for, and
no file can take more memory than the lines it carries, or block the files landed with it.

The memory attacks run ingest in a child process under an address-space limit
(`resource.setrlimit`), on real files: a file of newlines, a Parquet file of a few kilobytes
that decompresses into gigabytes, one line of 100 MiB. Before bounded reading, the first of
them took 9.45 GB and the second 8.1 GB, and under a 4 GB limit they blocked every correction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelloop_assets.core import contracts, store
from labelloop_assets.sensors import landed_files, landing_sensor
from labelloop_tests.test_ingest import (  # noqa: F401 (fixtures)
    correction,
    db,
    item,
    land,
    lhome,
    quarantine,
    run_ingest,
    seeded,
)


def _replace(path, lines: list[dict]) -> None:
    """Rewrite a landed file the way a careless producer does: a new file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    os.replace(tmp, path)


def _ledger(con, path: str) -> list[dict]:
    return store.frame(
        con, "SELECT * FROM ingested_files WHERE path = ? ORDER BY version", [path]
    ).to_dicts()


def _accounted(con, source: str) -> int:
    accepted = store.scalar(con, "SELECT count(*) FROM raw_corrections WHERE source_file = ?", [source])
    return accepted + len(quarantine(con, source))


# --------------------------------------------------------------------------- rewritten files


def test_a_file_rewritten_under_an_ingested_name_is_read_again_as_a_new_version(seeded):
    """The attack: 5 events ingested, then 50 atomically renamed over the same name; none of the
    50 was accepted or quarantined and the ledger still said 5 lines."""
    home, con = seeded
    path = land(home, "corrections", "corrections-day07.jsonl", [correction(f"e{n}") for n in range(5)])
    assert run_ingest(con, home, "corrections").accepted == 5

    _replace(path, [correction(f"e{n}", item_id=f"i{1 + n % 4}") for n in range(50)])
    report = run_ingest(con, home, "corrections")

    source = "corrections/corrections-day07.jsonl@v2"
    assert report.files == [source] and report.records_in == 50 and report.reconciles
    assert _accounted(con, source) == 50
    # e0..e4 again, now on other items: conflicting replays of events already stored, quarantined.
    replayed = [r for r in quarantine(con, source)]
    assert {r["reason"] for r in replayed} <= {contracts.DUPLICATE_EVENT, contracts.CONFLICTING_DUPLICATE}
    assert len(replayed) == 5 and report.accepted == 45
    v1, v2 = _ledger(con, "corrections/corrections-day07.jsonl")
    assert (v1["version"], v1["records_in"], v2["version"], v2["records_in"]) == (1, 5, 2, 50)
    assert v2["size_bytes"] == path.stat().st_size and v2["first_line"] == 1 and v2["line_count"] == 50
    assert v2["sha256"] != v1["sha256"]
    # Nothing changes after: the version read is the version on disk.
    assert run_ingest(con, home, "corrections").files == []


def test_lines_appended_to_an_ingested_file_are_read_from_where_it_ended(seeded):
    home, con = seeded
    path = land(home, "corrections", "log.jsonl", [correction(f"a{n}") for n in range(3)])
    run_ingest(con, home, "corrections")
    with path.open("a") as log:
        log.write("\n" + json.dumps(correction("a3")) + "\n" + json.dumps(correction("a4")) + "\n")

    report = run_ingest(con, home, "corrections")

    assert report.files == ["corrections/log.jsonl@v2"] and report.accepted == 2 and report.quarantined == 0
    assert report.blank_lines == 1
    lines = store.frame(con, "SELECT event_id, line_no FROM raw_corrections WHERE source_file = "
                             "'corrections/log.jsonl@v2' ORDER BY line_no").rows()
    assert lines == [("a3", 5), ("a4", 6)]  # the file's own line numbers
    assert _ledger(con, "corrections/log.jsonl")[1]["first_line"] == 4


def test_an_append_to_a_last_line_without_newline_rereads_the_whole_file(seeded):
    """The ingested part did not end a line: the 'appended' bytes changed that line, so nothing
    of the old reading can be kept; every line is read and the unchanged ones are replays."""
    home, con = seeded
    path = home.landing_dir("corrections") / "open.jsonl"
    path.write_text(json.dumps(correction("o1")) + "\n" + json.dumps(correction("o2")))
    run_ingest(con, home, "corrections")
    path.write_text(path.read_text() + "\n" + json.dumps(correction("o3")) + "\n")

    report = run_ingest(con, home, "corrections")

    assert report.records_in == 3 and report.accepted == 1 and report.reconciles
    assert report.reasons == {contracts.DUPLICATE_EVENT: 2}


def test_a_touched_file_is_not_read_again_and_a_same_size_edit_is(seeded):
    home, con = seeded
    path = land(home, "corrections", "c.jsonl", [correction("t1")])
    run_ingest(con, home, "corrections")
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert run_ingest(con, home, "corrections").files == []
    # Hashed once, found unchanged, and the new change time kept so that it is not hashed again.
    assert _ledger(con, "corrections/c.jsonl")[0]["ctime_ns"] == path.stat().st_ctime_ns

    edited = path.read_text().replace('"five"', '"four"')
    assert len(edited) == path.stat().st_size
    path.write_text(edited)
    report = run_ingest(con, home, "corrections")
    assert report.files == ["corrections/c.jsonl@v2"]
    assert report.reasons == {contracts.CONFLICTING_DUPLICATE: 1}


def test_an_edit_that_puts_the_modification_time_back_is_still_seen(seeded):
    """Same size, same modification time as when it was read: the change time gives it away."""
    home, con = seeded
    path = land(home, "corrections", "c.jsonl", [correction("t1")])
    run_ingest(con, home, "corrections")
    before = path.stat()
    path.write_text(path.read_text().replace('"five"', '"four"'))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns

    report = run_ingest(con, home, "corrections")

    assert report.files == ["corrections/c.jsonl@v2"] and report.reasons == {contracts.CONFLICTING_DUPLICATE: 1}


def test_a_refused_link_replaced_by_a_file_of_the_same_length_is_read(seeded):
    home, con = seeded
    folder = home.landing_dir("corrections")
    target = home.root / "elsewhere.jsonl"
    target.write_text(json.dumps(correction("far")) + "\n")
    (folder / "c.jsonl").symlink_to(target)
    assert run_ingest(con, home, "corrections").reasons == {contracts.UNREADABLE_FILE: 1}
    length = os.lstat(folder / "c.jsonl").st_size  # the link's own size: its target's path
    (folder / "c.jsonl").unlink()
    (folder / "c.jsonl").write_text("x" * (length - 1) + "\n")
    assert os.lstat(folder / "c.jsonl").st_size == length

    report = run_ingest(con, home, "corrections")

    assert report.files == ["corrections/c.jsonl@v2"] and report.reasons == {contracts.MALFORMED_JSON: 1}


def test_the_landing_sensor_requests_a_run_for_a_rewritten_file(home, instance, resources):
    path = home.landing_dir("corrections") / "c.jsonl"
    path.write_text("{}\n")

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
            return landing_sensor(context)

    first = tick()
    assert isinstance(tick(first.cursor), dg.SkipReason)
    _replace(path, [correction(f"x{n}") for n in range(3)])
    again = tick(first.cursor)
    assert isinstance(again, dg.SensorResult) and again.run_requests[0].tags["labelloop/changed_kinds"] == "corrections"
    assert again.run_requests[0].run_key != first.run_requests[0].run_key
    # A cursor written before sizes were kept takes today's files as seen: no burst of runs.
    legacy = json.dumps({"seen": list(landed_files(home))})
    assert isinstance(tick(legacy), dg.SkipReason)


# --------------------------------------------------------------------------- memory

CHILD = textwrap.dedent(
    """
    import json, resource, sys

    def peak_rss_mb():
        # VmHWM: this process's own peak (ru_maxrss can carry the forking parent's over exec).
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from pathlib import Path
    from labelloop_assets.core import ingest, store
    from labelloop_assets.core.ontology import Ontology
    from labelloop_assets.core.settings import Home
    home = Home(Path(sys.argv[1]))
    with store.connect(home.database) as con:
        report = ingest.ingest_corrections(
            con, home, Ontology.load(home.ontology_file), b"test-pseudonymization-key", "child")
        reasons = dict(con.execute(
            "SELECT source_file, reason FROM quarantine WHERE line_no IS NULL").fetchall())
    print(json.dumps({"accepted": report.accepted, "quarantined": report.quarantined,
                      "records_in": report.records_in, "blank": report.blank_lines,
                      "reconciles": report.reconciles, "files": report.files, "whole_file": reasons,
                      "peak_rss_mb": peak_rss_mb()}))
    """
)
LIMIT_BYTES = 3 * 1024**3  # address space: the interpreter, DuckDB and Polars take about 1.5 GB of it


def _bombs(folder) -> dict[str, str]:
    """The attacker's files, and the reason each must be quarantined with."""
    (folder / "newlines.jsonl").write_bytes(b"\n" * (128 * 1024 * 1024))
    # 20,000 rows of one 60,000-character string: about 15 KB of zstd Parquet, 1.2 GB as text.
    # Written by DuckDB as it streams: the test must not hold the 1.2 GB it attacks with.
    with duckdb.connect() as con:
        con.execute(
            "COPY (SELECT 'z' || i AS event_id, repeat('x', 60000) AS rationale FROM range(20000) t(i)) "
            "TO ? (FORMAT parquet, COMPRESSION zstd)", [str(folder / "bomb.parquet")]
        )
    # One line of 100 MiB, between two genuine ones.
    with (folder / "long-line.jsonl").open("wb") as handle:
        handle.write(json.dumps(correction("before")).encode() + b"\n")
        handle.write(b'{"event_id": "huge", "rationale": "' + b"y" * (100 * 1024 * 1024) + b'"}\n')
        handle.write(json.dumps(correction("after")).encode() + b"\n")
    # The same text inside a list: 10 copies per row, 12 GB once decoded, in 20 KB. Built from a
    # dictionary array, so that the test itself never holds the text.
    rows, copies = 20_000, 10
    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows * copies, pa.int32()), pa.array(["x" * 60_000]))
    lists = pa.ListArray.from_arrays(pa.array(range(0, rows * copies + 1, copies), pa.int32()), text)
    pq.write_table(pa.table({"event_id": [f"l{n}" for n in range(rows)], "context": lists}),
                   folder / "list-bomb.parquet", compression="zstd")
    return {
        "corrections/newlines.jsonl": contracts.TOO_MANY_LINES,
        "corrections/bomb.parquet": contracts.DECOMPRESSED_TOO_LARGE,
        "corrections/list-bomb.parquet": contracts.DECOMPRESSED_TOO_LARGE,
    }


def test_bombs_cost_bounded_memory_and_do_not_block_genuine_files(seeded):
    home, con = seeded
    con.close()
    folder = home.landing_dir("corrections")
    expected = _bombs(folder)
    assert (folder / "bomb.parquet").stat().st_size < 50_000
    assert (folder / "list-bomb.parquet").stat().st_size < 100_000
    land(home, "corrections", "genuine.jsonl", [correction(f"g{n}", item_id=f"i{1 + n % 4}") for n in range(20)])

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(home.root), str(LIMIT_BYTES)],
        capture_output=True, text=True, timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak memory of the child under a {LIMIT_BYTES / 1024**3:.0f} GiB limit: {result['peak_rss_mb']:.0f} MB")
    # What a file may cost is bounded by the blocks and chunks read, not by what it holds.
    assert result["peak_rss_mb"] < 1000
    assert result["whole_file"] == expected
    # 20 genuine lines, and the long-line file's two genuine lines around its 100 MiB one.
    assert result["accepted"] == 22 and result["reconciles"]
    with store.connect(home.database, read_only=True) as con:
        huge = quarantine(con, "corrections/long-line.jsonl")
        assert [(r["line_no"], r["reason"]) for r in huge] == [(2, contracts.OVERSIZE_LINE)]
        assert len(huge[0]["line_sha256"]) == 64  # the rejected line is identified, not kept
        assert store.scalar(con, "SELECT count(*) FROM raw_corrections WHERE source_file = "
                                 "'corrections/genuine.jsonl'") == 20


def test_a_file_that_exhausts_memory_is_quarantined_alone(seeded):
    """A file whose lines need more memory than the store may use fails alone: the files landed
    with it go through, and it is quarantined with its reason instead of failing every later run."""
    home, con = seeded
    land(home, "corrections", "a-small.jsonl", [correction("s1"), correction("s2", item_id="i2")])
    land(home, "corrections", "b-large.jsonl",
         [correction(f"l{n}", rationale="r" * 200) for n in range(150_000)])
    land(home, "corrections", "c-small.jsonl", [correction("s3", item_id="i3")])
    con.execute("SET memory_limit = '20MB'")  # the deployment's machine, much smaller

    report = run_ingest(con, home, "corrections")

    assert report.accepted == 3 and report.reconciles
    rows = quarantine(con, "corrections/b-large.jsonl")
    assert [(r["line_no"], r["reason"]) for r in rows] == [(None, contracts.RESOURCE_LIMIT)]
    assert "ran out of memory" in rows[0]["detail"] and "the other files went through" in rows[0]["detail"]
    assert store.scalar(
        con, "SELECT count(*) FROM raw_corrections WHERE source_file = 'corrections/b-large.jsonl'"
    ) == 0
    # The next run does not try it again (it would fail the same way): the ledger has it.
    con.execute("RESET memory_limit")
    assert run_ingest(con, home, "corrections").files == []


@pytest.mark.parametrize("kind", ["float16", "decimal256", "twice_the_same_column"])
def test_a_parquet_file_the_reader_cannot_convert_is_quarantined_alone(seeded, kind):
    """Such a file once stopped every ingest of its kind: DuckDB's conversion error escaped."""
    home, con = seeded
    path = home.landing_dir("corrections") / "exotic.parquet"
    ids = pa.array(["a"])
    columns = {
        "float16": ({"event_id": ids, "h": pa.array([1.0], pa.float32()).cast(pa.float16())}, None),
        "decimal256": ({"event_id": ids, "d": pa.array([1], pa.int64()).cast(pa.decimal256(60, 1))}, None),
        "twice_the_same_column": (None, pa.Table.from_arrays([ids, pa.array(["b"])], names=["event_id", "event_id"])),
    }[kind]
    pq.write_table(columns[1] if columns[1] is not None else pa.table(columns[0]), path)
    land(home, "corrections", "genuine.jsonl", [correction("g1"), correction("g2", item_id="i2")])

    for _ in range(2):  # and the next run is not blocked either
        report = run_ingest(con, home, "corrections")
        assert report.reconciles

    assert store.scalar(con, "SELECT count(*) FROM raw_corrections") == 2
    rows = quarantine(con, "corrections/exotic.parquet")
    # Whole, or as a line with its reason (two columns of one name make a key given twice).
    assert [r["reason"] for r in rows] in ([contracts.UNREADABLE_FILE], [contracts.MALFORMED_JSON])
    print(kind, rows[0]["reason"], rows[0]["detail"])


def test_a_parquet_column_named_like_the_readers_alias_is_still_a_row(seeded):
    home, con = seeded
    row = correction("t-col")
    pl.DataFrame([{**row, "t": "x", "labelloop_parquet_row": "y"}]).write_parquet(
        home.landing_dir("corrections") / "alias.parquet")
    report = run_ingest(con, home, "corrections")
    assert report.accepted == 1, report.reasons


# --------------------------------------------------------------------------- quarantine details

TYPED = ("Jane Doe", "jane.doe@example.com", "555-123-4567", "4111 1111 1111 1111")


def test_nothing_a_person_typed_is_copied_into_quarantine_details(seeded):
    """Every field that can fail a rule, with text a person might type: each line is quarantined
    with its reason, and no detail repeats the text (the line is found by source_file:line_no)."""
    home, con = seeded
    lines = []
    for n, typed in enumerate(TYPED):
        for field in ("corrected_label", "original_label", "user_role", "source", "created_at",
                      "item_id", "model_version"):
            lines.append(correction(f"q{n}-{field}", **{field: typed}))
        lines.append(correction(f"q{n}-confidence", user_confidence=typed))
        lines.append(correction(f"q{n}-consent", consent=typed))
    land(home, "corrections", "typed.jsonl", lines)
    land(home, "items", "typed-items.jsonl", [item(f"t{n}", initial_label=t) for n, t in enumerate(TYPED)])
    land(home, "predictions", "typed-predictions.jsonl",
         [{"prediction_id": f"p{n}", "item_id": "i1", "model_version": "m-001", "predicted_label": t,
           "confidence": 0.5, "served_at": "2024-05-01T11:00:00Z"} for n, t in enumerate(TYPED)])

    reports = [run_ingest(con, home, kind) for kind in ("items", "predictions", "corrections")]

    assert all(r.reconciles and r.accepted == 0 for r in reports)
    details = store.frame(con, "SELECT reason, detail FROM quarantine")
    assert details.height == len(lines) + 2 * len(TYPED)
    leaked = [(reason, detail) for reason, detail in details.rows()
              if any(t.lower() in (detail or "").lower() for t in TYPED)]
    assert leaked == []
