"""The audit log: who did what to which target, with what outcome and why.

Every row of `audit_log` is written here, inside the caller's transaction, so that an audited
change and its audit row commit or vanish together.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from labelloop_assets.core import store

TABLE = "audit_log"
# The loop itself, for what its runs decide (a publication, a promotion, a hold).
SYSTEM_ACTOR = "labelloop"
# The columns a writer fills; logged_at is the store's clock (the transaction's start).
SCHEMA = {
    "actor": pl.String, "actor_role": pl.String, "action": pl.String, "target": pl.String,
    "outcome": pl.String, "reason": pl.String, "detail": pl.String, "run_id": pl.String,
}


def record_audit(
    con: Any,
    actor: str,
    action: str,
    target: str | None,
    outcome: str,
    reason: str | None = None,
    detail: str | None = None,
    run_id: str | None = None,
    role: str | None = None,
) -> None:
    """One audit row, in the caller's transaction."""
    con.execute(
        f"INSERT INTO {TABLE} (actor, actor_role, action, target, outcome, reason, detail, run_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [actor, role, action, target, outcome, reason, detail, run_id],
    )


def record_audit_rows(con: Any, rows: pl.DataFrame) -> int:
    """A batch's audit rows at once (its refusals, its downgrades), in the caller's transaction.

    `rows` has some of the SCHEMA columns (the rest stay empty); another column is a mistake in
    the calling code, refused before anything is written.
    """
    unknown = [name for name in rows.columns if name not in SCHEMA]
    if unknown:
        raise ValueError(f"not audit_log columns: {', '.join(unknown)}")
    return store.append(con, TABLE, rows)
