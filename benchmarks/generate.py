"""Seeded workload generator: landing files written through the contract, at any scale.

Corrections are heavy-tailed per item and per contributor (Zipf), carry realistic rationale text
(some with e-mail addresses and phone numbers), and about 5% of rows are bad in the ways real
feeds are bad: truncated lines, unknown labels, unknown items, no consent, zone-less timestamps,
invalid roles. Everything is built as Polars columns; no Python loop runs per row.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.settings import Home

ROLES = ("end_user", "annotator", "reviewer", "domain_expert")
ROLE_SHARE = (0.80, 0.15, 0.04, 0.01)
ROLE_ACCURACY = (0.80, 0.92, 0.98, 0.99)
SOURCE_OF_ROLE = ("feedback_button", "review_prompt", "audit_sample", "annotation")
WORDS = (
    "shape", "stroke", "colour", "edge", "texture", "background", "corner", "blurred", "cropped",
    "rotated", "label", "vendor", "obviously", "probably", "customer", "complained", "again",
    "looks", "like", "definitely", "not", "the", "a", "same", "as", "yesterday", "ticket",
)
TEMPLATES = (
    "{w1} {w2} {w3}, so it is {label}",
    "this is clearly {label}: the {w1} and the {w2} give it away",
    "customer ticket says {label}; {w1} {w2}",
    "{label} — reach me at {email} if you disagree",
    "called the client on {phone}: they confirm {label}",
    "not {other}, {w1} {w2} {w3} {label}",
)
FEATURES = 16
BAD_SHARE = {  # of all rows; they add up to 5%
    "malformed_json": 0.010,
    "unknown_label": 0.010,
    "unknown_item": 0.010,
    "no_consent": 0.010,
    "bad_timestamp": 0.005,
    "invalid_value": 0.005,
}


@dataclass(frozen=True)
class Workload:
    n_items: int = 100_000
    n_classes: int = 30
    n_users: int = 20_000
    gold_share: float = 0.02
    seed: int = 11

    @property
    def labels(self) -> list[str]:
        return [f"class_{k:03d}" for k in range(self.n_classes)]


def _write_atomic(folder: Path, name: str, frame: pl.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    frame.write_ndjson(tmp)
    os.replace(tmp, folder / name)
    return folder / name


def _truth(workload: Workload) -> np.ndarray:
    return np.random.default_rng(workload.seed).integers(0, workload.n_classes, workload.n_items)


def write_items(home: Home, workload: Workload) -> int:
    """The items file(s) and an ontology for the workload's label set."""
    rng = np.random.default_rng(workload.seed + 1)
    truth = _truth(workload)
    labels = np.array(workload.labels)
    centres = rng.normal(scale=3.0, size=(workload.n_classes, FEATURES))
    features = (centres[truth] + rng.normal(size=(workload.n_items, FEATURES))).round(3)
    noisy = rng.random(workload.n_items) < 0.2
    initial = np.where(noisy, rng.integers(0, workload.n_classes, workload.n_items), truth)
    gold = rng.random(workload.n_items) < workload.gold_share
    gold_item = pl.col("gold")
    items = pl.DataFrame(
        {
            "n": np.arange(workload.n_items),
            "features": features,
            "initial": labels[initial],
            "truth": labels[truth],
            "gold": gold,
        }
    ).select(
        pl.format("it{}", pl.col("n").cast(pl.String).str.zfill(8)).alias("item_id"),
        pl.col("features").arr.to_list(),
        pl.when(~gold_item).then("initial").alias("initial_label"),
        pl.when(~gold_item).then(pl.lit("vendor")).alias("label_source"),
        pl.when(gold_item).then("truth").alias("gold_label"),
    )
    home.ensure()
    home.ontology_file.write_text(yaml.safe_dump({"labels": workload.labels, "renames": {}}))
    # The generator is one producer the deployment trusts to assert the roles it simulates, as a
    # deployment lists its annotation tool in contributors.yaml (docs/trust.md).
    home.contributors_file.write_text("contributors: []\nproducers:\n  - {folder: '.', may_claim: domain_expert}\n")
    # Gold items are declared by the deployment in gold.jsonl; a landing file cannot declare them.
    gold_items = items.filter(pl.col("gold_label").is_not_null()).select("item_id", "features", "gold_label")
    _write_atomic(home.root, home.gold_file.name, gold_items)
    _write_atomic(home.landing_dir("items"), "items-000.jsonl", items.filter(pl.col("gold_label").is_null()))
    return items.height


def correction_events(workload: Workload, n_events: int, first_event: int, seed: int) -> pl.DataFrame:
    """n_events correction rows as strings ready to serialize, 5% of them bad."""
    rng = np.random.default_rng(seed)
    truth = _truth(workload)
    labels = np.array(workload.labels)
    item = np.minimum(rng.zipf(1.3, n_events) - 1, workload.n_items - 1)
    item = rng.permutation(workload.n_items)[item]  # popular items spread over the id space
    user = np.minimum(rng.zipf(1.5, n_events) - 1, workload.n_users - 1)
    role = rng.choice(len(ROLES), size=n_events, p=ROLE_SHARE)
    right = rng.random(n_events) < np.array(ROLE_ACCURACY)[role]
    label = np.where(right, truth[item], rng.integers(0, workload.n_classes, n_events))
    seconds = np.sort(rng.integers(0, 30 * 86_400, n_events))
    template = rng.integers(0, len(TEMPLATES), n_events)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), (n_events, 3))]
    frame = pl.DataFrame(
        {
            "event_id": pl.int_range(first_event, first_event + n_events, eager=True),
            "item": item,
            "user": user,
            "role": role,
            "label": labels[label],
            "other": labels[rng.integers(0, workload.n_classes, n_events)],
            "seconds": seconds,
            "template": template,
            "w1": words[:, 0], "w2": words[:, 1], "w3": words[:, 2],
            "has_rationale": rng.random(n_events) < 0.4,
            "confidence": rng.uniform(0.3, 1.0, n_events).round(2),
            "bad": rng.choice(
                len(BAD_SHARE) + 1, size=n_events,
                p=[*BAD_SHARE.values(), 1 - sum(BAD_SHARE.values())],
            ),
        }
    )
    bad = {name: i for i, name in enumerate(BAD_SHARE)}
    user_id = pl.format("user{}@example.com", pl.col("user"))
    fills = {
        "label": pl.col("label"), "other": pl.col("other"),
        "w1": pl.col("w1"), "w2": pl.col("w2"), "w3": pl.col("w3"), "email": user_id,
        "phone": pl.format("+1 415 555 {}", (pl.col("user") % 10_000).cast(pl.String).str.zfill(4)),
    }
    rationale = pl.coalesce(
        [
            pl.when(pl.col("template") == i).then(
                pl.format(re.sub(r"\{\w+\}", "{}", t), *[fills[n] for n in re.findall(r"\{(\w+)\}", t)])
            )
            for i, t in enumerate(TEMPLATES)
        ]
    )
    created = (
        pl.lit(np.datetime64("2026-01-01T00:00:00", "s")) + pl.duration(seconds=pl.col("seconds"))
    ).dt.strftime("%Y-%m-%dT%H:%M:%S")
    return frame.select(
        pl.format("ev{}", pl.col("event_id")).alias("event_id"),
        pl.when(pl.col("bad") == bad["unknown_item"]).then(pl.format("ghost{}", pl.col("item")))
        .otherwise(pl.format("it{}", pl.col("item").cast(pl.String).str.zfill(8))).alias("item_id"),
        pl.when(pl.col("bad") == bad["unknown_label"]).then(pl.lit("no_such_class"))
        .otherwise(pl.col("label")).alias("corrected_label"),
        user_id.alias("user_id"),
        pl.when(pl.col("bad") == bad["invalid_value"]).then(pl.lit("boss"))
        .otherwise(pl.col("role").replace_strict(dict(enumerate(ROLES)))).alias("user_role"),
        pl.col("role").replace_strict(dict(enumerate(SOURCE_OF_ROLE))).alias("source"),
        (pl.col("bad") != bad["no_consent"]).alias("consent"),
        pl.when(pl.col("bad") == bad["bad_timestamp"]).then(created)
        .otherwise(created + "Z").alias("created_at"),
        pl.when(pl.col("has_rationale")).then(rationale).alias("rationale"),
        pl.col("confidence").alias("user_confidence"),
        (pl.col("bad") == bad["malformed_json"]).alias("_truncate"),
    )


def write_corrections(
    home: Home, workload: Workload, n_events: int, n_files: int, first_event: int = 0,
    prefix: str = "corrections", seed: int | None = None,
) -> list[Path]:
    """n_events correction events over n_files landing files."""
    events = correction_events(workload, n_events, first_event, seed or workload.seed + first_event + 7)
    folder = home.landing_dir("corrections")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, chunk in enumerate(np.array_split(np.arange(n_events), n_files)):
        rows = events[int(chunk[0]): int(chunk[-1]) + 1] if len(chunk) else events.clear()
        name = f"{prefix}-{first_event:09d}-{part:05d}.jsonl"
        paths.append(write_atomically(folder / name, event_lines(rows).str.join("\n").item() + "\n"))
    return paths


def event_lines(events: pl.DataFrame) -> pl.Series:
    """One JSON line per event; the rows marked `_truncate` are cut in half (malformed JSON)."""
    lines = events.drop("_truncate").select(pl.struct(pl.all()).struct.json_encode().alias("line"))
    return lines.with_columns(events["_truncate"]).select(
        pl.when(pl.col("_truncate")).then(pl.col("line").str.slice(0, pl.col("line").str.len_chars() // 2))
        .otherwise(pl.col("line"))
    ).to_series()
