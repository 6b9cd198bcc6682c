"""A new home from a team's labelled files: the label set, a stratified gold set sized so the
validation plan can promote, the other items as the first landing batch, and a plan sized to the gold set.

Pure logic and file writing; the `labelloop init` command prints what `scaffold` returns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from labelloop_assets.core.contracts import MAX_ITEM_TEXT, URI_PATTERN
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.settings import DEFAULTS_DIR, Home

# Field names a labelled record may use for its label: the items contract's first label, the gold
# contract's true label, or the plain name most exports use.
LABEL_FIELDS = ("label", "initial_label", "gold_label")
ID_MAX = 256  # the items contract's longest item_id
LABEL_MAX = 64
FEATURES_MAX = 4096  # the items contract's longest feature vector
# Per-class recall on k gold items moves in steps of 1/k: below 10 items one mistake is a swing of
# more than 0.1, too coarse to compare a challenger with the champion.
MIN_GOLD_PER_CLASS = 10
# A class needs items to train on as well, or no model can predict it and its recall is 0.
MIN_TRAIN_PER_CLASS = 5
ITEMS_FILE = "init-items.jsonl"
DEFAULT_LABEL_SOURCE = "init"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ScaffoldError(ValueError):
    """The input cannot make a home; the message says why (no traceback)."""


@dataclass
class Record:
    item_id: str
    text: str | None
    features: list[float] | None
    uri: str | None
    label: str
    label_source: str

    @property
    def carries(self) -> str:
        """text, features or text+features (the items contract's content)."""
        return "+".join(name for name, value in (("text", self.text), ("features", self.features)) if value)

    def item(self) -> dict:
        """The item's own fields (text, features, uri: those it has), for gold.jsonl and landing."""
        return {key: value for key, value in (("text", self.text), ("features", self.features), ("uri", self.uri))
                if value is not None}


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "file:line: why", one per rejected line
    lines: int = 0  # non-blank lines read (header rows of CSV files not counted)

    @property
    def rejected(self) -> int:
        return len(self.errors)


@dataclass
class Plan:
    """How the labelled items are split, and what the validation plan needs that they lack."""

    per_class: dict[str, int]  # labelled items per class
    gold_per_class: dict[str, int]
    needed_gold_per_class: int  # what a promotable plan needs of every class
    min_eval_items: int
    short: dict[str, int]  # more labelled items each class needs (to be gold), when it has too few

    @property
    def gold_total(self) -> int:
        return sum(self.gold_per_class.values())

    @property
    def promotable(self) -> bool:
        return not self.short and self.gold_total >= self.min_eval_items


def read_labelled(paths: list[Path]) -> ReadResult:
    """Every record of the files, or a per-line reason it was refused; ids must be unique across files."""
    result = ReadResult()
    seen: dict[str, str] = {}
    length: int | None = None
    carries: str | None = None
    for path in paths:
        for where, raw in _raw_records(path, result):
            result.lines += 1
            try:
                record = _record(raw)
                # One model reads every item: the first record fixes what they all carry.
                carries = carries or record.carries
                if record.carries != carries:
                    raise ScaffoldError(f"the record carries {record.carries}; the first record carries {carries}")
                if length is None and record.features:
                    length = len(record.features)
                elif record.features and len(record.features) != length:
                    raise ScaffoldError(f"features has {len(record.features)} values; the first record has {length}")
                if record.item_id in seen:
                    raise ScaffoldError(f"item_id {record.item_id!r} repeats {seen[record.item_id]}")
            except ScaffoldError as error:
                result.errors.append(f"{where}: {error}")
                continue
            seen[record.item_id] = where
            result.records.append(record)
    return result


def _raw_records(path: Path, result: ReadResult):
    """(file:line, parsed record or the reason it cannot be parsed) for each non-blank line."""
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a NUL byte or an over-long name: no file can have it
        raise ScaffoldError(f"{str(path)!r}: not a usable file name") from None
    if not is_file:
        raise ScaffoldError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports write one) is not part of the first field.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ScaffoldError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ScaffoldError(f"{path}: cannot read it ({error.strerror})") from None
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path, text)
        return
    # Lines end at \n only, as ingest reads them: a U+2028 inside a JSON string is not a line break.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except ValueError as error:
            yield f"{path}:{number}", ScaffoldError(f"not JSON ({error})")


def _csv_records(path: Path, text: str):
    """CSV with a header: item_id, a label column, optionally `text` and `uri`, and either a
    `features` column (a JSON array, or numbers separated by spaces or semicolons), one column per
    feature, or (for items that carry text only) no other column."""
    # newline="": a quoted field may hold line breaks, kept as written.
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header:
        raise ScaffoldError(f"{path}: empty CSV file (a header row is needed)")
    header = [name.strip() for name in header]
    if "item_id" not in header:
        shown = ", ".join(repr(name) for name in header[:8])
        raise ScaffoldError(f"{path}: the header has no item_id column (columns found: {shown}); CSV files are "
                            "comma-separated with a header row")
    fixed = {"item_id", "label_source", "features", "text", "uri", *LABEL_FIELDS}
    feature_columns = [i for i, name in enumerate(header) if name not in fixed]
    number = rows.line_num + 1
    for row in rows:
        where, number = f"{path}:{number}", rows.line_num + 1  # a record may span lines: name its first
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield where, ScaffoldError(f"{len(row)} columns; the header has {len(header)}")
            continue
        record = {name: cell for name, cell in zip(header, row, strict=True) if name in fixed}
        if "features" in record:
            cell = record["features"].strip()
            if cell.startswith("["):
                try:
                    record["features"] = json.loads(cell)
                except ValueError:
                    yield where, ScaffoldError(f"features {cell[:40]!r} is not a JSON array")
                    continue
            else:
                record["features"] = [_number(v) for v in re.split(r"[;\s]+", cell) if v]
        elif feature_columns:
            record["features"] = [_number(row[i]) for i in feature_columns]
        yield where, record


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # refused with the field's name by `_record`


def _record(raw) -> Record:
    if isinstance(raw, ScaffoldError):
        raise raw
    if not isinstance(raw, dict):
        raise ScaffoldError(f"a record must be an object, got {type(raw).__name__}")
    for name in ("item_id", "text", "uri", "label_source", *LABEL_FIELDS):
        if isinstance(raw.get(name), str) and not _encodable(raw[name]):
            # JSON can escape a lone surrogate (\ud800); it is not text, and ingest refuses the line.
            raise ScaffoldError(f"{name} holds an unpaired surrogate: not valid Unicode text")
    item_id = raw.get("item_id")
    if not isinstance(item_id, str) or not item_id.strip():
        raise ScaffoldError("item_id is missing or not a non-empty string")
    item_id = item_id.strip()
    if len(item_id) > ID_MAX or _CONTROL.search(item_id):
        raise ScaffoldError(f"item_id is longer than {ID_MAX} characters or holds control characters")
    text, features, uri = (raw.get(name) if raw.get(name) != "" else None for name in ("text", "features", "uri"))
    if text is None and features is None:
        raise ScaffoldError("no text and no features: an item carries text, features or both")
    if text is not None and (not isinstance(text, str) or not text.strip() or len(text) > MAX_ITEM_TEXT):
        raise ScaffoldError(f"text must be a non-empty string of at most {MAX_ITEM_TEXT} characters")
    if uri is not None and (not isinstance(uri, str) or len(uri) > 2048 or not re.match(URI_PATTERN, uri)):
        raise ScaffoldError("uri must be an absolute URI with a scheme (s3://, https://, file:///...), no spaces")
    if features is None:
        return _labelled(raw, item_id, text.strip(), None, uri)
    if not isinstance(features, list) or not features:
        raise ScaffoldError("features is not a non-empty array of numbers")
    if len(features) > FEATURES_MAX:
        raise ScaffoldError(f"features has {len(features)} values; at most {FEATURES_MAX}")
    bad = [i for i, v in enumerate(features)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise ScaffoldError(f"features[{bad[0]}] is {features[bad[0]]!r}, not a finite number")
    return _labelled(raw, item_id, text.strip() if text else None, [float(v) for v in features], uri)


def _labelled(raw: dict, item_id: str, text: str | None, features: list[float] | None, uri: str | None) -> Record:
    present = [name for name in LABEL_FIELDS if raw.get(name) not in (None, "")]
    if not present:
        raise ScaffoldError(f"no label: give one of {', '.join(LABEL_FIELDS)}")
    label = raw[present[0]]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ScaffoldError(f"{present[0]} must be a string, got {type(label).__name__}")
    label = str(label).strip()
    if not label or len(label) > LABEL_MAX or _CONTROL.search(label):
        raise ScaffoldError(f"{present[0]} must be 1 to {LABEL_MAX} characters without control characters")
    source = raw.get("label_source")
    if not isinstance(source, str) or not source.strip() or len(source) > 64 or _CONTROL.search(source):
        source = DEFAULT_LABEL_SOURCE
    return Record(item_id, text, features, uri, label, source.strip())


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_min_eval_items() -> int:
    return int(yaml.safe_load((DEFAULTS_DIR / "validation.yaml").read_text())["min_eval_items"])


def plan_split(records: list[Record], gold: int | None = None, gold_fraction: float | None = None) -> Plan:
    """Gold items per class: by default enough for the shipped plan to promote (at least
    MIN_GOLD_PER_CLASS of every class and `min_eval_items` in all), each class keeping
    MIN_TRAIN_PER_CLASS items to train on. `gold` (a total, spread evenly) or `gold_fraction` (of
    every class) choose the size instead; the plan's needs are reported either way."""
    per_class = dict(sorted(Counter(r.label for r in records).items()))
    min_eval = default_min_eval_items()
    needed = max(MIN_GOLD_PER_CLASS, math.ceil(min_eval / len(per_class)))
    if gold is not None:
        wanted = dict.fromkeys(per_class, gold // len(per_class))
        for label in list(per_class)[: gold % len(per_class)]:
            wanted[label] += 1
    elif gold_fraction is not None:
        wanted = {label: math.floor(n * gold_fraction) for label, n in per_class.items()}
    else:
        wanted = dict.fromkeys(per_class, needed)
    taken = {label: max(0, min(wanted[label], n - MIN_TRAIN_PER_CLASS)) for label, n in per_class.items()}
    # What each class lacks for the plan: gold items of its own, plus the items it keeps to train on.
    short = {label: needed - taken[label] for label in per_class if taken[label] < needed}
    return Plan(per_class, taken, needed, min_eval, short)


def choose_gold(records: list[Record], plan: Plan, seed: int) -> tuple[list[Record], list[Record]]:
    """(gold, the rest): a seeded random sample of each class, the same for the same input and seed."""
    rng = random.Random(seed)
    gold_ids: set[str] = set()
    for label, k in plan.gold_per_class.items():
        ids = sorted(r.item_id for r in records if r.label == label)
        gold_ids.update(rng.sample(ids, k))
    return ([r for r in records if r.item_id in gold_ids], [r for r in records if r.item_id not in gold_ids])


def existing_content(root: Path) -> list[str]:
    """What is already in the folder (a few names), so that a refusal can say what it protects."""
    if not root.exists():
        return []
    if not root.is_dir():
        return [root.name]
    return sorted(p.name for p in root.iterdir())[:5]


def scaffold(home: Home, records: list[Record], plan: Plan, seed: int, force: bool) -> None:
    """Write the home: layout and shipped defaults, then ontology.yaml, gold.jsonl, validation.yaml
    and the items landing file made from the records."""
    if home.root.exists() and not home.root.is_dir():
        raise ScaffoldError(f"{home.root} is a file, not a folder")
    content = existing_content(home.root)
    if content and not force:
        raise ScaffoldError(f"{home.root} is not empty ({', '.join(content)}); choose a new folder, or "
                            "pass --force to overwrite the files init writes")
    # gold.jsonl is append-only once a store has declared it: rewriting it would fail the next run.
    if home.database_file.exists():
        raise ScaffoldError(f"{home.root} already holds a store ({home.database_file.name}); its gold "
                            "items cannot be rewritten, even with --force: start a new home")
    gold, rest = choose_gold(records, plan, seed)
    home.ensure()
    write_atomically(home.ontology_file, ontology_text(plan))
    write_atomically(home.validation_file, validation_text(plan))
    write_atomically(home.gold_file, "".join(
        json.dumps({"item_id": r.item_id, **r.item(), "gold_label": r.label}) + "\n" for r in gold
    ))
    write_atomically(home.landing_dir("items") / ITEMS_FILE, "".join(
        json.dumps({"item_id": r.item_id, **r.item(), "initial_label": r.label,
                    "label_source": r.label_source}) + "\n" for r in rest
    ))


def ontology_text(plan: Plan) -> str:
    counts = "".join(f"#   {label}: {n}\n" for label, n in plan.per_class.items())
    return ("# The label set, from the labelled files `labelloop init` read (items per label):\n" + counts
            + "# Renames harmonize old terms into current ones (old -> current).\n"
            + yaml.safe_dump({"labels": list(plan.per_class)}, default_flow_style=None, allow_unicode=True)
            + "renames: {}\n")


def validation_text(plan: Plan) -> str:
    """The shipped plan, with the per-class tolerance widened to at least one gold item of the
    smallest class: with k items a class's recall moves in steps of 1/k, and a tolerance under one
    step would reject a challenger for a single item."""
    text = (DEFAULTS_DIR / "validation.yaml").read_text()
    smallest = min(plan.gold_per_class.values()) if plan.gold_per_class else 0
    step = math.ceil(100 / smallest) / 100 if smallest else 0
    tolerance = max(float(yaml.safe_load(text)["per_class_tolerance"]), min(step, 0.5))
    text = re.sub(r"^per_class_tolerance:.*$",
                  f"per_class_tolerance: {tolerance:g}  # per-class recall: one gold item of the smallest class",
                  text, flags=re.M)
    sizes = ", ".join(f"{label} {n}" for label, n in plan.gold_per_class.items())
    return (f"# Sized by `labelloop init` to gold.jsonl: {plan.gold_total} gold items ({sizes}).\n" + text)
