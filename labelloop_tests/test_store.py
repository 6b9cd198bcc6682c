"""The store's numbered appends and the batch reads that later steps make from them."""

from __future__ import annotations

import polars as pl

from labelloop_assets.core import store


def _rows(event_ids: list[str]) -> pl.DataFrame:
    n = len(event_ids)
    return pl.DataFrame({
        "event_id": event_ids, "item_id": ["i1"] * n, "corrected_label": ["cat"] * n,
        "user_pseudonym": ["u_" + "0" * 32] * n, "user_role": ["annotator"] * n,
        "source": ["annotation"] * n, "consent": [True] * n, "payload_hash": ["h"] * n,
        "created_at": pl.Series(["2026-01-01T00:00:00Z"] * n).str.to_datetime(time_zone="UTC"),
    })


def test_appends_continue_the_numbers_in_frame_order(tmp_path):
    with store.connect(tmp_path / "store.duckdb") as con:
        store.append(con, "raw_corrections", _rows(["a", "b", "c"]))
        store.append(con, "raw_corrections", _rows(["d", "e"]))
        numbered = con.execute("SELECT event_id, seq FROM raw_corrections ORDER BY seq").fetchall()
    assert numbered == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]


def test_rows_since_come_in_number_order_whatever_order_the_store_returns(tmp_path):
    with store.connect(tmp_path / "store.duckdb") as con:
        # Rows stored out of number order (as a lake's files may return them).
        store.append(con, "raw_corrections", _rows(["x", "y", "z"]).with_columns(seq=pl.Series([9, 2, 5])))
        since = store.rows_since(con, "raw_corrections", "seq, event_id", 2)
        everything = store.rows_since(con, "raw_corrections", "seq, event_id", 0)
    assert since.rows() == [(5, "z"), (9, "x")]
    assert everything["seq"].to_list() == [2, 5, 9]
