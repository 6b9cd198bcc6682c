"""Release notes for a model decision: what changed in the data, what it did, and which corrections paid off.

Benefit attribution retrains the challenger without one group of corrections at a time (by
source, and by the label they set), with those items back at the label the champion saw, and
measures the gold accuracy lost or gained. A group whose removal makes the model better did harm.
Each group costs one training, so the number of groups is bounded (`max_groups`, largest first).
"""

from __future__ import annotations

import json

import duckdb
import polars as pl

from labelloop_assets.core import store, train
from labelloop_assets.core.pipelines import PipelineSpec

# The label changes between the champion's corpus version and the challenger's, with where the
# corrections behind each came from.
CHANGES_SQL = """
WITH changed AS (
    SELECT h.item_id, h.label, h.previous_label, h.change_kind, h.event_ids, h.corpus_version
    FROM label_history h
    WHERE h.corpus_version > $since AND h.corpus_version <= $until
      AND h.change_kind IN ('correction', 'review', 'revert')
    QUALIFY row_number() OVER (PARTITION BY h.item_id ORDER BY h.corpus_version DESC, h.change_order DESC) = 1
), sources AS (
    SELECT c.item_id, any_value(v.source) AS source, any_value(v.user_role) AS role
    FROM changed c, unnest(c.event_ids) AS e(event_id)
    JOIN validated_labels v ON v.event_id = e.event_id
    GROUP BY c.item_id
)
SELECT c.item_id, c.label, c.previous_label, c.change_kind,
       CASE c.change_kind WHEN 'review' THEN 'review' WHEN 'revert' THEN 'revert'
            ELSE coalesce(s.source, 'unknown') END AS source,
       CASE c.change_kind WHEN 'review' THEN 'reviewer' ELSE coalesce(s.role, 'governance') END AS role
FROM changed c LEFT JOIN sources s USING (item_id)
ORDER BY c.item_id
"""


def label_changes(con: duckdb.DuckDBPyConnection, since_version: int, until_version: int) -> pl.DataFrame:
    """(item_id, label, previous_label, change_kind, source, role) changed in (since, until]."""
    return store.frame(con, CHANGES_SQL, {"since": since_version, "until": until_version})


def attribution(
    con: duckdb.DuckDBPyConnection, changes: pl.DataFrame, since_version: int, until_version: int,
    gold: pl.DataFrame, max_groups: int, spec: PipelineSpec | None = None,
) -> pl.DataFrame:
    """Gold accuracy of the challenger's data minus that of the same data without each group,
    each refitted with the challenger's pipeline (`spec`; none given: nothing is attributed)."""
    # NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
    import numpy as np
    schema = {"group": pl.String, "items": pl.Int64, "accuracy_with": pl.Float64,
              "accuracy_without": pl.Float64, "benefit": pl.Float64}
    if changes.height == 0 or gold.height == 0 or spec is None:
        return pl.DataFrame(schema=schema)
    # Items that copy a gold item were not trained on (gold.find_gold_copies): not here either.
    features = store.frame(con, "SELECT item_id, text, features FROM items ANTI JOIN gold_copies USING (item_id)")
    now = store.frame(con, "SELECT item_id, label FROM corpus_as_of($v)", {"v": until_version})
    before = store.frame(con, "SELECT item_id, label AS label_before FROM corpus_as_of($v)", {"v": since_version})
    base = now.join(before, on="item_id", how="left").join(features, on="item_id").sort("item_id")
    groups = pl.concat([
        changes.select(pl.format("source {}", "source").alias("group"), "item_id"),
        changes.select(pl.format("label {}", "label").alias("group"), "item_id"),
    ])
    sizes = groups.group_by("group").len("items").sort(["items", "group"], descending=[True, False]).head(max_groups)
    gold_y = gold["label"].to_numpy()

    def accuracy(frame: pl.DataFrame) -> float | None:
        if frame["label"].n_unique() < 2:
            return None
        model = train.fit(frame, frame["label"].to_numpy(), spec)
        return float(np.mean(model.predict(gold) == gold_y))

    with_all = accuracy(base)
    rows = []
    for group, items in sizes.iter_rows():
        members = groups.filter(pl.col("group") == group).select("item_id")
        without = base.join(members.with_columns(out=pl.lit(True)), on="item_id", how="left").with_columns(
            label=pl.when(pl.col("out").fill_null(False)).then("label_before").otherwise("label")
        ).drop_nulls("label")
        acc = accuracy(without)
        rows.append({"group": group, "items": items, "accuracy_with": with_all, "accuracy_without": acc,
                     "benefit": None if acc is None or with_all is None else with_all - acc})
    return pl.DataFrame(rows, schema=schema)


def render(
    evaluation: dict, changes: pl.DataFrame, attributed: pl.DataFrame,
    spec: PipelineSpec | None = None, champion_spec: PipelineSpec | None = None,
    external_challenger: dict | None = None, external_champion: bool = False,
) -> str:
    """The release notes as markdown. `external_challenger`: the trainer configuration of a
    challenger an external trainer made (its registry params); `external_champion`: the champion was."""
    challenger = json.loads(evaluation["challenger_scores"])
    champion = json.loads(evaluation["champion_scores"]) if evaluation["champion_scores"] else None
    promoted = evaluation["decision"] == "promote"
    lines = [
        f"# {evaluation['challenger']}: {'promoted' if promoted else 'rejected'}"
        + (f" against {evaluation['champion']}" if evaluation["champion"] else " (first model)"),
        "",
        *[f"- {reason}" for reason in evaluation["reasons"]],
        "",
    ]
    champion_by = (
        "; the champion by an external trainer" if external_champion
        else "" if champion_spec is None else f"; the champion with {champion_spec.describe()}"
    )
    if spec:
        lines += [
            f"Trained with {spec.describe()}"
            + (" (unchanged)" if champion_spec == spec else champion_by) + ".",
            "",
        ]
    elif external_challenger is not None:
        command = " ".join(external_challenger.get("command", []))
        lines += [
            f"Trained by the external trainer `{command}`"
            + (" (as the champion was)" if external_champion else champion_by) + ".",
            "",
        ]
    lines += [
        "## Corrections incorporated",
        "",
        f"{changes.height} label change(s) since the champion's corpus." if champion
        else f"{changes.height} label change(s) in the corpus.",
    ]
    for column, title in (("source", "By source"), ("role", "By role"), ("label", "By label set")):
        if changes.height:
            counts = changes.group_by(column).len("changes").sort(["changes", column], descending=[True, False])
            lines += ["", f"**{title}:** " + ", ".join(f"{k} {n}" for k, n in counts.iter_rows())]
    scored_on = evaluation.get("evaluation_set")
    lines += ["", "## Metrics on the frozen gold items", "",
              f"Both models scored on evaluation set {scored_on} ({challenger.get('n')} gold items)."
              if scored_on is not None else f"Both models scored on the same {challenger.get('n')} gold items.",
              "", "| metric | champion | challenger | delta |", "|---|---:|---:|---:|"]
    for metric in ("accuracy", "macro_f1", "calibration_error"):
        new, old = challenger.get(metric), champion.get(metric) if champion else None
        delta = _signed(new - old, 4) if new is not None and old is not None else ""
        lines.append(f"| {metric} | {_num(old)} | {_num(new)} | {delta} |")
    recalls = challenger.get("per_class_recall", {})
    old_recalls = champion.get("per_class_recall", {}) if champion else {}
    lines += ["", "| class | champion recall | challenger recall | delta |", "|---|---:|---:|---:|"]
    lines += [
        f"| {c} | {_num(old_recalls.get(c))} | {_num(r)} | "
        f"{_signed(r - old_recalls[c], 3) if c in old_recalls else ''} |"
        for c, r in sorted(recalls.items())
    ]
    worse = sorted(c for c, r in recalls.items() if c in old_recalls and r < old_recalls[c])
    lines += ["", "**Classes that got worse:** " + (", ".join(worse) if worse else "none")]
    lines += ["", "## Which corrections paid off", ""]
    if external_challenger is not None:
        lines.append(
            "_Not attributed: attribution retrains the challenger without each group of corrections, and "
            "labelloop can refit only models of its built-in trainer. This challenger was trained by an external "
            "trainer; to attribute, run your trainer without each group yourself. The counts above are complete._"
        )
    elif attributed.height == 0:
        lines.append("_Nothing to attribute: no label changed since the champion's corpus._")
    else:
        lines += [
            "Retrained without each group (its items back at the label the champion saw); benefit is the "
            "gold accuracy the group adds (negative: removing it makes the model better).",
            "", "| group | items | accuracy with | without | benefit |", "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['group']} | {r['items']} | {_num(r['accuracy_with'])} | {_num(r['accuracy_without'])} | "
            f"{_signed(r['benefit'], 4)} |"
            for r in attributed.sort("benefit", descending=True, nulls_last=True).iter_rows(named=True)
        ]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _signed(value, digits: int) -> str:
    return "" if value is None else f"{value:+.{digits}f}"
