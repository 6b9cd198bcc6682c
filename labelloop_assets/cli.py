"""`labelloop`: the command line for running the demo and reading the loop's state."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from labelloop_assets.core import store
from labelloop_assets.core.contracts import TRIMMED
from labelloop_assets.core.lake import Lake, LakeError
from labelloop_assets.core.settings import Home, LabelloopConfigError, apply_file_access, quoted

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def _home() -> Home:
    # Whatever a command writes (a review file, the audit log, models/CURRENT, a migrated store)
    # is created with LABELLOOP_FILE_ACCESS; an unknown value stops it as a config error.
    apply_file_access()
    return Home.from_env()


def _read(home: Home):
    if not home.has_store():
        raise SystemExit(
            f"labelloop: no database at {home.database} yet; run `make demo` or materialize the "
            "assets first (LABELLOOP_HOME selects the folder)"
        )
    try:
        return store.connect(home.database, read_only=True)
    except (duckdb.IOException, LakeError) as error:
        raise SystemExit(f"labelloop: cannot open {home.database} for reading: {error}") from None


# Landed text is data: control characters in it (an escape sequence in a rationale) must not
# drive the terminal of whoever reads a table. Tabs and line breaks stay.
_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"


def _safe(value) -> str:
    return re.sub(_CONTROL, "\ufffd", str(value))


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """'1 model', '3 models': a number with its noun in the right number."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


# Columns whose values are kept whole in a table, however narrow the terminal: an id, a version, a
# hash or a file name cut short is a wrong one. Other text may be shortened with an ellipsis.
_WHOLE = re.compile(r"(^|_)(id|ids|version|versions|hash|file|path|pseudonym)$")
_CELL_LIMIT = 400  # free text longer than this is shortened even on a wide terminal
_GAP = "  "


def _width(text: str) -> int:
    """Columns the text takes in a terminal: East Asian wide characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _ellipsis() -> str:
    """"…", or "..." where standard output cannot encode it (an ASCII-only PYTHONIOENCODING)."""
    try:
        "\u2026".encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "..."
    return "\u2026"


def _fit(text: str, width: int, ellipsis: str = "\u2026") -> str:
    """The text cut to `width` terminal columns, ending in an ellipsis when cut."""
    if _width(text) <= width:
        return text
    kept, used = [], 0
    for ch in text:
        used += _width(ch)
        if used > width - len(ellipsis):
            break
        kept.append(ch)
    return "".join(kept) + ellipsis


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() == timedelta(0):
            return value.strftime("%Y-%m-%d %H:%M:%S UTC")
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, default=str, ensure_ascii=False)
    # One row a line: a line break or tab inside a value would break the table's columns.
    return re.sub(r"[\t\n]", " ", _safe(value))


def _table(frame: pl.DataFrame, width: int) -> list[str]:
    """The frame as aligned text lines: a header, a rule, one line a row. Ids are never cut. When the
    rows are wider than `width`, the widest free-text column (a reason, a detail) gets the width the
    others leave; if its text does not fit there, it is printed whole on an indented line under each
    row instead of being cut to a few characters. Other free text is shortened first."""
    ellipsis = _ellipsis()
    names = [_cell(name) for name in frame.columns]
    columns = [[_cell(v) for v in frame.get_column(name).to_list()] for name in frame.columns]
    shortenable = [not _WHOLE.search(name) and _is_free_text(frame.get_column(name))
                   for name in frame.columns]
    for i, cells in enumerate(columns):
        if shortenable[i]:
            columns[i] = [_fit(cell, _CELL_LIMIT, ellipsis) for cell in cells]
    natural = [max([_width(names[i]), *map(_width, cells)]) for i, cells in enumerate(columns)]
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    budget = width - len(_GAP) * (len(names) - 1)
    beneath = None  # the column printed under its rows
    if sum(natural) > budget and any(shortenable):
        widest = max((i for i in range(len(names)) if shortenable[i]), key=lambda i: natural[i])
        rest = [i for i in range(len(names)) if i != widest]
        rest_widths = _shrunk([natural[i] for i in rest], [_smallest(names[i], shortenable[i], natural[i])
                                                             for i in rest], budget - len(_GAP))
        if budget - len(_GAP) - sum(rest_widths) < natural[widest]:
            beneath = widest
    kept = [i for i in range(len(names)) if i != beneath]
    widths = _shrunk([natural[i] for i in kept], [_smallest(names[i], shortenable[i], natural[i]) for i in kept],
                     width - len(_GAP) * (len(kept) - 1))
    lines = []
    for number, row in enumerate([names, names, *zip(*columns, strict=True)]):
        parts = []
        for w, i in zip(widths, kept, strict=True):
            cell = "-" * w if number == 1 else _fit(row[i], w, ellipsis) if shortenable[i] else row[i]
            pad = " " * (w - _width(cell))
            parts.append(pad + cell if numeric[i] else cell + pad)
        lines.append(_GAP.join(parts).rstrip())
        if beneath is not None and number > 1 and row[beneath] != "-":
            lines.extend(textwrap.wrap(f"{names[beneath]}: {row[beneath]}", max(width, 40), initial_indent="    ",
                                       subsequent_indent="      ", break_long_words=False, break_on_hyphens=False))
    return lines


def _smallest(name: str, shortenable: bool, natural: int) -> int:
    """How narrow a column may become: free text to 12 columns (or its header), anything else not at all."""
    return max(_width(name), 12) if shortenable else natural


def _is_free_text(column: pl.Series) -> bool:
    """Prose (text with blanks, lists of numbers, records) may be shortened; a column of single words
    (ids, pseudonyms, codes) or of numbers and times may not."""
    dtype = column.dtype
    if isinstance(dtype, pl.Struct):
        return True
    if isinstance(dtype, (pl.List, pl.Array)):
        if dtype.inner != pl.String:
            return True
        column = column.explode()
    elif dtype != pl.String:
        return False
    return bool(column.str.contains(r"\s").any())


def _shrunk(natural: list[int], smallest: list[int], budget: int) -> list[int]:
    """Column widths within `budget`: the widest shortenable columns are brought down to one common
    width (never below their smallest); if even that cannot fit, the table is wider than the budget."""
    if sum(natural) <= budget:
        return natural
    def total(level: int) -> int:
        return sum(min(n, max(level, s)) for n, s in zip(natural, smallest, strict=True))
    low, high = 0, max(natural)
    while low < high:  # the widest common width that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if total(middle) <= budget else (low, middle - 1)
    return [min(n, max(low, s)) for n, s in zip(natural, smallest, strict=True)]


def _print(frame: pl.DataFrame, as_json: bool) -> None:
    if as_json:
        print(json.dumps(frame.to_dicts(), indent=2, default=str))
        return
    # Piped output has no terminal to measure: it gets a wide table (COLUMNS sets another width).
    width = shutil.get_terminal_size((160, 24)).columns
    print("\n".join(_table(frame, width)))


# The demo's home per world, unless LABELLOOP_HOME names one: the two demos never share a store.
DEMO_HOMES = {"digits": "data/home", "text": "data/home-text"}


def cmd_demo(args: argparse.Namespace) -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print(
            "labelloop: DAGSTER_HOME is not set. Run `make demo`, or point DAGSTER_HOME at the "
            "folder holding dagster.yaml so that `dagster dev` can show the demo's runs.",
            file=sys.stderr,
        )
        return 2
    # Dagster takes seconds to import: only once the demo can run.
    import dagster as dg

    from labelloop_assets.core.settings import ALLOW_DEV_SECRET_ENV
    from labelloop_assets.demo.rotten_tomatoes import DemoDataMissing, load_snippets
    from labelloop_assets.demo.run import DemoRefused, DemoStopped, prepare_home, run_demo
    from labelloop_assets.demo.simulator import WORLDS

    if args.world == "text":
        # Before the home is wiped: without its data the text demo stops, saying how to get it.
        try:
            load_snippets()
        except DemoDataMissing as error:
            print(f"labelloop: {error}", file=sys.stderr)
            return 2
    # Each world has a home of its own (the Makefile's WORLD sets LABELLOOP_HOME the same way).
    root = Path(os.environ.get("LABELLOOP_HOME", DEMO_HOMES[args.world])).resolve()
    if not os.environ.get("LABELLOOP_SECRET"):
        # The demo's simulated people may use the public development key (it says so when it
        # starts); anywhere else a missing LABELLOOP_SECRET stops the run.
        os.environ[ALLOW_DEV_SECRET_ENV] = "1"
    try:
        home = prepare_home(root, args.world)
    except DemoRefused as error:
        print(f"labelloop: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("LABELLOOP_DAGSTER_STORAGE", str(home.root / "dagster"))
    config = dataclasses.replace(WORLDS[args.world].config, seed=args.seed)
    with dg.DagsterInstance.get() as instance:
        try:
            rows = run_demo(home, instance, days=args.days, config=config, world_name=args.world)
        except DemoStopped as error:
            print(f"labelloop: the demo stopped: {error}", file=sys.stderr)
            return 1
    first, last = rows[0], rows[-1]
    print()
    print(
        f"corpus label accuracy {first['corpus_label_accuracy']:.3f} -> "
        f"{last['corpus_label_accuracy']:.3f}; model accuracy on gold "
        f"{first['model_gold_accuracy']:.3f} -> {last['model_gold_accuracy']:.3f} "
        f"(trained on the true labels: {last['clean_label_ceiling']:.3f})"
    )
    print(f"state:   {home.root}  (store: {home.database})")
    print(f"report:  {home.reports / 'demo.json'}")
    make_dev = "make dev" if args.world == "digits" else f"make dev WORLD={args.world}"
    print(f"open it: {make_dev}   (then http://127.0.0.1:3000: Assets, Runs, Automation)")
    cli = Path(sys.argv[0])
    command = os.path.relpath(cli) if cli.is_absolute() else str(cli)
    print(f"inspect: {command} status | {command} quarantine | {command} lineage ITEM_ID")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from labelloop_assets.core import scaffold as sc

    home = _home()  # also sets the file access that what init writes is created with
    if args.home_dir:
        try:
            home = Home(Path(args.home_dir).resolve())
        except (OSError, ValueError):  # a NUL byte or an over-long name
            print(f"labelloop: --home {quoted(args.home_dir)} is not a usable folder name", file=sys.stderr)
            return 1
    try:
        read = sc.read_labelled([Path(p) for p in args.sources])
    except sc.ScaffoldError as error:
        print(f"labelloop: {_cut(_safe(error))}", file=sys.stderr)
        return 1
    print(f"read {_count(len(args.sources), 'file')}: {_count(read.lines, 'line')}, {len(read.records):,} accepted, "
          f"{read.rejected:,} rejected")
    for problem in read.errors[:20]:
        print(f"  {_safe(problem)}")
    if read.rejected > 20:
        print(f"  ... and {read.rejected - 20:,} more")
    classes = {r.label for r in read.records}
    if len(classes) < 2:
        print(f"labelloop: a model needs at least two classes; the accepted records have {len(classes)}: "
              "no home was made", file=sys.stderr)
        return 1
    plan = sc.plan_split(read.records, args.gold, args.gold_fraction)
    try:
        sc.scaffold(home, read.records, plan, args.seed, args.force)
    except sc.ScaffoldError as error:
        print(f"labelloop: {_cut(_safe(error))}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"labelloop: cannot write the home {_safe(home.root)}: {error.strerror}", file=sys.stderr)
        return 1
    gold = ", ".join(f"{_safe(label)} {n}" for label, n in plan.gold_per_class.items())
    classes = _count(len(plan.per_class), "class", "classes")
    print(f"home {_safe(home.root)}: {_count(len(read.records), 'item')} in {classes}; "
          f"{plan.gold_total:,} held out as gold ({gold}); {len(read.records) - plan.gold_total:,} landed as items "
          f"with their labels (landing/items/{sc.ITEMS_FILE})")
    carries = read.records[0].carries
    trained = {"text": "TF-IDF + logistic regression", "features": "standard scaling + logistic regression",
               "text+features": "TF-IDF beside scaled features + logistic regression"}[carries]
    print(f"items carry {carries}: trained by default with {trained} (training.yaml pipeline: auto)")
    if plan.promotable:
        print(f"the validation plan can promote: {plan.gold_total} gold items (min_eval_items {plan.min_eval_items}), "
              f"at least {plan.needed_gold_per_class} of every class")
    else:
        needs = ", ".join(f"{n} more for class '{_safe(label)}'" for label, n in plan.short.items())
        print(f"too few labelled items for a promotable plan: each class needs {plan.needed_gold_per_class} gold items "
              f"(and keeps {sc.MIN_TRAIN_PER_CLASS} to train on); gold items still needed: {needs}")
    print("next:")
    print(f"  export LABELLOOP_HOME={_safe(home.root)}")
    print("  dagster asset materialize -m labelloop_assets.definitions --select '*'")
    print("  labelloop status")
    return 0


def _gold_fraction(text: str) -> float:
    """An argparse type: a fraction strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"invalid fraction {quoted(text)}: give a number between 0 and 1, e.g. 0.2")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    home = _home()
    with _read(home) as con:
        counts = store.frame(
            con,
            """
            SELECT 'items' AS table_name, count(*) AS rows FROM items
            UNION ALL SELECT 'predictions', count(*) FROM predictions
            UNION ALL SELECT 'raw_corrections', count(*) FROM raw_corrections
            UNION ALL SELECT 'quarantine', count(*) FROM quarantine
            UNION ALL SELECT 'ingested_files', count(*) FROM ingested_files
            UNION ALL SELECT 'validated_labels', count(*) FROM validated_labels
            UNION ALL SELECT 'label_decisions', count(*) FROM label_decisions
            UNION ALL SELECT 'production_corpus', count(*) FROM production_corpus
            UNION ALL SELECT 'label_history', count(*) FROM label_history
            UNION ALL SELECT 'corpus_versions', count(*) FROM corpus_versions
            UNION ALL SELECT 'models', count(*) FROM models
            UNION ALL SELECT 'label_quality_metrics', count(*) FROM label_quality_metrics
            """,
        )
        models = store.frame(
            con,
            "SELECT model_version, status, corpus_version, n_train_rows, round(gold_accuracy, 4) AS "
            "gold_accuracy, trained_at FROM models ORDER BY trained_at",
        )
        latest = store.frame(
            con, "SELECT challenger, decision, array_to_string(reasons, '; ') AS reasons FROM model_evaluations "
            "ORDER BY evaluation_id DESC LIMIT 1")
        loop = _loop_state(home, con, models, latest)
    if args.json:
        print(json.dumps({"home": str(home.root), "tables": counts.to_dicts(),
                          "models": models.to_dicts(), **loop}, indent=2, default=str))
        return 0
    print(f"LABELLOOP_HOME {home.root}")
    _print(counts, False)
    print()
    for name in ("champion", "holds", "escalations", "last_runs", "next_step"):
        print(f"{name.replace('_', ' ')}: {_safe(loop[name]['line'])}")
    print()
    if models.height:
        print(f"{_count(models.height, 'model')} trained; {_champion_line(models, latest)}")
        # Short headers keep the table within a narrow terminal; --json keeps the column names.
        _print(models.rename({"model_version": "model", "corpus_version": "corpus", "n_train_rows": "train_rows",
                              "gold_accuracy": "accuracy"}), False)
    else:
        print("no model trained yet")
    return 0


# Queries here bind no parameters: DuckDB imports pandas to bind them, and `status` stays light.
def _loop_state(home: Home, con, models: pl.DataFrame, latest: pl.DataFrame) -> dict:
    """What holds the loop and what to do next: champion, holds, overdue escalations, last runs, next step."""
    champion = models.filter(pl.col("status") == "champion")["model_version"].to_list()
    short = _gold_shortfall(home, con, latest)
    held = store.frame(con, "SELECT burst_id, key FROM correction_bursts WHERE status = 'held' "
                       "ORDER BY day DESC, score DESC")
    failing, checks_note = _failing_blocking_checks()
    sla_hours, event_clock = _escalation_clock(home)
    # The governance clock: wall time, or (`clock: events`, replays) the newest correction's time.
    clock = "(SELECT max(created_at) FROM validated_labels)" if event_clock else "now()"
    overdue = store.frame(con, f"""
        SELECT escalation_id, item_id, opened_at FROM escalations
        WHERE opened_at + to_seconds(CAST({float(sla_hours)} * 3600 AS BIGINT)) < {clock} ORDER BY opened_at""")
    runs = store.frame(con, "SELECT (SELECT max(created_at) FROM corpus_versions) AS corpus_version_at, "
                       "(SELECT max(trained_at) FROM models) AS trained_at")
    run = runs.row(0, named=True)
    bursts_part = "; ".join(f"burst {b} held" for b in held["burst_id"].to_list()) or "no burst held"
    if checks_note:
        checks_part = f"blocking checks {checks_note}"
    else:
        checks_part = "; ".join(f"check {c} failing" for c in failing) or "no blocking check failing"
    holds_line = f"{bursts_part}; {checks_part}"
    if held.height:
        step = (f"release or discard burst {held['burst_id'][0]}: labelloop review release|discard "
                f"{held['burst_id'][0]} --rationale ... --as REVIEWER_ID")
    elif failing:
        step = f"fix what fails check {failing[0]} (the Dagster UI shows its metadata), then materialize again"
    elif overdue.height:
        step = f"review {_count(overdue.height, 'overdue escalation')}: labelloop review list"
    elif not champion and short:
        label, n = max(short.items(), key=lambda kv: kv[1])
        step = (f"land more gold items: {n} more needed for class '{label}'"
                + (f" (and {len(short) - 1} other classes)" if len(short) > 1 else ""))
    elif not models.height:
        step = "materialize the assets: dagster asset materialize -m labelloop_assets.definitions --select '*'"
    elif not champion and latest.height:
        step = (f"see why {latest['challenger'][0]} was not promoted (labelloop model list), then land the "
                "corrections or gold items it lacks and retrain")
    else:
        step = "nothing to do"
    return {
        "champion": {"model": champion[0] if champion else None, "line": _champion_summary(models, latest)},
        "holds": {"held_bursts": held["burst_id"].to_list(), "failing_blocking_checks": failing,
                  "checks_checked": checks_note is None, "line": holds_line},
        "escalations": {"overdue": overdue.height, "sla_hours": sla_hours,
                        "line": f"{_count(overdue.height, 'escalation')} open past the {sla_hours:g} h SLA"},
        "last_runs": {**run, "line": f"latest corpus version {_cell(run['corpus_version_at'])}; "
                                     f"latest training {_cell(run['trained_at'])}"},
        "next_step": {"gold_needed": short, "line": step},
    }


def _champion_summary(models: pl.DataFrame, latest: pl.DataFrame) -> str:
    if not models.height:
        return "none: no model trained yet"
    champion = models.filter(pl.col("status") == "champion").row(0, named=True) \
        if (models["status"] == "champion").any() else None
    if champion is None:
        return _champion_line(models, latest)
    trained = _cell(champion["trained_at"])
    return f"{champion['model_version']} (gold accuracy {champion['gold_accuracy']}, trained {trained})"


def _gold_shortfall(home: Home, con, latest: pl.DataFrame) -> dict[str, int]:
    """Gold items each class still needs for the plan to promote, when the latest verdict was a
    rejection for want of them: to `min_eval_items` in all, and a share of them per class."""
    import math

    import yaml

    if not latest.height or latest["decision"][0] != "reject":
        return {}
    try:
        plan = yaml.safe_load(home.validation_file.read_text()) or {}
        min_eval = int(plan.get("min_eval_items", 30))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return {}
    gold = store.frame(con, "SELECT gold_label AS label, count(*) AS n FROM items WHERE gold_label IS NOT NULL "
                       "GROUP BY ALL ORDER BY ALL")
    labels = _ontology_labels(home)
    have = dict(zip(gold["label"].to_list(), gold["n"].to_list(), strict=True)) if gold.height else {}
    if not labels:
        return {}
    from labelloop_assets.core.scaffold import MIN_GOLD_PER_CLASS

    needed = max(MIN_GOLD_PER_CLASS, math.ceil(min_eval / len(labels)))
    return {label: needed - have.get(label, 0) for label in labels if have.get(label, 0) < needed}


def _ontology_labels(home: Home) -> list[str]:
    import yaml

    try:
        labels = (yaml.safe_load(home.ontology_file.read_text()) or {}).get("labels") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [str(label) for label in labels] if isinstance(labels, list) else []


def _escalation_clock(home: Home) -> tuple[float, bool]:
    """governance.yaml's escalation.sla_hours (48 when unset or unreadable) and whether its clock is `events`."""
    import yaml

    try:
        escalation = (yaml.safe_load(home.governance_file.read_text()) or {}).get("escalation") or {}
        hours = float(escalation.get("sla_hours", 48))
        event_clock = escalation.get("clock") == "events"
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return 48.0, False
    return (hours if hours > 0 else 48.0), event_clock


def _failing_blocking_checks() -> tuple[list[str], str | None]:
    """Blocking asset checks whose latest evaluation failed, from the Dagster instance that
    DAGSTER_HOME names; ([], why not) when no instance is reachable. Dagster is imported only here."""
    if not os.environ.get("DAGSTER_HOME") or not os.environ.get("LABELLOOP_DAGSTER_STORAGE"):
        return [], "not checked (set DAGSTER_HOME and LABELLOOP_DAGSTER_STORAGE to read Dagster's runs)"
    # Opening an instance creates its storage: a status read must not make one where no run ever was.
    if not Path(os.environ["LABELLOOP_DAGSTER_STORAGE"]).is_dir():
        return [], "not checked (no Dagster storage at LABELLOOP_DAGSTER_STORAGE yet)"
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dagster as dg

            with dg.DagsterInstance.get() as instance:
                records = instance.get_event_records(
                    dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION), limit=1000)
    except Exception as error:  # noqa: BLE001 - any failure to reach the instance is reported, not raised
        return [], f"not checked (Dagster instance unreadable: {type(error).__name__})"
    latest: dict[str, object] = {}
    for record in records:  # newest first
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        latest.setdefault(name, evaluation)
    return sorted(n for n, e in latest.items() if not e.passed and getattr(e, "blocking", False)), None


def _champion_line(models: pl.DataFrame, latest: pl.DataFrame) -> str:
    """Which model is the champion, or why none is yet (the latest evaluation's verdict)."""
    champion = models.filter(pl.col("status") == "champion")["model_version"].to_list()
    if champion:
        return f"champion: {champion[0]}"
    if not latest.height:
        return "no champion yet (no model evaluated)"
    from labelloop_assets.core.evaluation import verdict_text

    verdict = latest.row(0, named=True)
    return f"no champion yet: {_safe(verdict_text(verdict['challenger'], verdict['decision'], verdict['reasons']))}"


def cmd_quarantine(args: argparse.Namespace) -> int:
    where = ("($kind IS NULL OR kind = $kind) AND ($reason IS NULL OR reason = $reason) "
             "AND ($item IS NULL OR item_id = $item)")
    filters = {"kind": args.kind, "reason": args.reason, "item": args.item}
    with _read(_home()) as con:
        rows = store.frame(
            con,
            f"""
            SELECT kind, source_file, line_no, reason, detail, record_id, item_id, quarantined_at
            FROM quarantine WHERE {where}
            ORDER BY quarantined_at DESC, source_file, line_no LIMIT $limit
            """,
            {**filters, "limit": args.limit},
        )
        summary = store.frame(
            con,
            f"SELECT kind, reason, count(*) AS rows FROM quarantine WHERE {where} "
            "GROUP BY ALL ORDER BY ALL",
            filters,
        )
    total = int(summary["rows"].sum()) if summary.height else 0
    if args.json:
        _print(rows, True)
        return 0
    if total == 0:
        chosen = [f"{name} {quoted(value)}" for name, value in
                  (("kind", args.kind), ("reason", args.reason), ("item", args.item)) if value is not None]
        print("no quarantined rows" + (f" with {' and '.join(chosen)}" if chosen else ""))
        return 0
    _print(summary, False)
    print()
    shown = f"the newest {rows.height:,} of {_count(total, 'row')}" if rows.height < total else _count(total, "row")
    print(shown + (f" (--limit {args.limit} reached; raise it for more)" if rows.height < total else ""))
    # The table keeps what a person needs to find and judge a line; --json keeps every column.
    readable = rows.select(
        "kind",
        (pl.col("source_file").str.split("/").list.last() + ":" + pl.col("line_no").cast(pl.String)).alias("file:line"),
        "reason", "item_id", "detail",
    )
    _print(readable, False)
    return 0


def _quarantine_reason(text: str) -> str:
    """--reason: one of the reason codes quarantine rows carry; another is refused, naming them."""
    from labelloop_assets.core.contracts import QUARANTINE_REASONS

    if text not in QUARANTINE_REASONS:
        raise argparse.ArgumentTypeError(
            f"invalid reason {quoted(text)}; the reasons are: {', '.join(sorted(QUARANTINE_REASONS))}")
    return text


def _whole_number(minimum: int, maximum: int):
    """An argparse type: a whole number from `minimum` to `maximum`, refused with the range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"invalid number {quoted(text)}: give a whole number from {minimum} to {maximum}")
        return value

    parse.__name__ = "whole number"
    return parse


_positive = _whole_number(1, 1_000_000_000)


def cmd_lineage(args: argparse.Namespace) -> int:
    from labelloop_assets.core.lineage import item_trail, quarantined_lines

    home = _home()
    with _read(home) as con:
        trail = item_trail(con, args.item_id, _store_clock(home, con))
        set_aside = quarantined_lines(con, args.item_id)
    if trail["versions"].height == 0 and trail["corrections"].height == 0:
        print(f"labelloop: no label history for item {quoted(args.item_id)}: "
              f"{_why_no_history(args.item_id, trail['item'], set_aside)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"item_id": args.item_id, **{k: v.to_dicts() for k, v in trail.items()},
                          "quarantined_lines": set_aside.to_dicts()}, indent=2, default=str))
        return 0
    titles = {
        "item": "Item and initial label",  # one row: no count
        "predictions": "Predictions served",
        "tasks": "Review tasks issued, with their answers and the label changes they made",
        "corrections": "Corrections, pseudonymized",
        "set_aside": "Corrections set aside in quarantine",
        "decisions": "Resolution decisions",
        "reviews": "Reviewer decisions",
        "versions": "Labels by corpus version, with the models trained on them",
    }
    for number, (name, frame) in enumerate(trail.items()):
        # A blank line between sections; an empty one says so in its title.
        count = "" if name == "item" and frame.height == 1 else f" ({frame.height:,})" if frame.height else ": none"
        print(("\n" if number else "") + titles[name] + count)
        if frame.height:
            _print(frame, False)
    if set_aside.filter(pl.col("kind") != "corrections").height:
        # Set-aside corrections are listed above; lines of other kinds are only counted here.
        n = int(set_aside.filter(pl.col("kind") != "corrections")["lines"].sum())
        print(f"other lines naming it that were quarantined: {n} (labelloop quarantine --item {quoted(args.item_id)})")
    return 0


def _why_no_history(item_id: str, item: pl.DataFrame, set_aside: pl.DataFrame) -> str:
    if item.height and item["is_gold"][0]:
        why = "it is a gold item, held out for evaluation and never in the corpus"
    elif item.height:
        why = "it has no label yet"
    elif set_aside.height:
        why = "it is not in the store"
    else:
        why = "it is not a known item (no item, prediction or correction names it)"
    if set_aside.height:
        n = int(set_aside["lines"].sum())
        lines = "; ".join(f"{_count(row['lines'], 'line')} of {row['kind']}: {row['reason']}"
                          for row in set_aside.iter_rows(named=True))
        why += (f"; {_count(n, 'line')} naming it {'was' if n == 1 else 'were'} quarantined ({_safe(lines)}): "
                f"see {'it' if n == 1 else 'them'} with `labelloop quarantine --item {quoted(item_id)}`")
    return why


def _escalation(con, escalation_id: str) -> dict | None:
    found = store.frame(con, "SELECT * FROM escalations WHERE escalation_id = ?", [escalation_id])
    return found.to_dicts()[0] if found.height else None


# Each queue: its noun (singular, plural), the rest of the listing's title, and its query.
QUEUES = {
    "escalations": (
        ("open escalation", "open escalations"), ", oldest first",
        "SELECT escalation_id, item_id, reason, current_label, proposed_label, "
        "round(share, 2) AS share, n_contributors, round(age_hours, 1) AS age_hours, "
        "sla_deadline, sla_breached, deferrals FROM escalations ORDER BY opened_at, item_id LIMIT $limit",
    ),
    "bursts": (
        ("correction burst", "correction bursts"),
        " held, then warnings of the last 14 days",
        "SELECT burst_id, status, severity, day, scope, n_events, round(expected, 1) AS expected, "
        "round(score, 1) AS score, reason FROM correction_bursts "
        "WHERE status = 'held' OR (status = 'flagged' AND day > (SELECT max(day) FROM correction_volume) - 14) "
        "ORDER BY status = 'held' DESC, day DESC, score DESC LIMIT $limit",
    ),
    "issues": (
        ("label-issue candidate", "label-issue candidates"), ": current labels most likely wrong, best first",
        "SELECT rank, item_id, label, suggested_label, round(score, 3) AS score, "
        "array_to_string(reasons, '; ') AS reasons FROM label_issue_candidates ORDER BY rank LIMIT $limit",
    ),
}


def cmd_review_list(args: argparse.Namespace) -> int:
    noun, title, sql = QUEUES[args.queue]
    with _read(_home()) as con:
        try:
            rows = store.frame(con, sql, {"limit": args.limit})
        except duckdb.CatalogException:
            print(f"labelloop: the database has no {args.queue} queue yet: run the loop once with this "
                  "version of labelloop (it upgrades the file)", file=sys.stderr)
            return 1
    if args.json:
        _print(rows, True)
    elif args.queue == "bursts":
        _print_bursts(rows, args.limit)
    else:
        print(f"{_count(rows.height, *noun)}{title}"
              + (f" (--limit {args.limit} reached)" if rows.height == args.limit else ""))
        if rows.height:
            _print(rows, False)
    return 0


def cmd_review_audit_sample(args: argparse.Namespace) -> int:
    """Items drawn at random from the corpus for a blind audit: the unbiased measure of how often
    each initial label source is right (reviews of doubted items are a biased sample)."""
    from labelloop_assets.core import reliability

    with _read(_home()) as con:
        corpus = store.frame(con, "SELECT item_id FROM production_corpus")["item_id"]
        audited = store.frame(con, reliability.AUDIT_VERDICTS_SQL)["item_id"]
    sample = reliability.draw_audit_sample(corpus, args.size, args.seed, exclude=audited)
    if args.json:
        _print(sample, True)
        return 0
    print(f"{_count(sample.height, 'item')} drawn at random for audit (seed {args.seed}; "
          f"{_count(audited.len(), 'item')} audited before, not drawn again)"
          + (f": only {sample.height} left to draw" if sample.height < args.size else ""))
    if sample.height:
        _print(sample, False)
        print(f"Label each item without looking at its current label, and send the answers as corrections "
              f"with source {reliability.AUDIT_SOURCE!r} under a reviewer's or domain expert's id.")
    return 0


TASK_STATUSES = ("open", "answered", "expired", "all")


def _store_clock(home: Home, con) -> datetime:
    """Now as the loop judges tasks: governance.yaml's escalation.clock (the wall clock, or the events')."""
    from labelloop_assets.core import tasks
    from labelloop_assets.core.resolve import ResolutionPolicy

    try:
        events = ResolutionPolicy.load(home.governance_file).escalation_clock == "events"
    except LabelloopConfigError as error:
        raise SystemExit(f"labelloop: {error}") from None
    return tasks.clock(con, events)


def cmd_tasks_list(args: argparse.Namespace) -> int:
    """The review tasks the loop issued, newest first, with their answers so far."""
    from labelloop_assets.core import tasks

    home = _home()
    with _read(home) as con:
        rows = tasks.task_status(con, _store_clock(home, con))
    if args.status != "all":
        rows = rows.filter(pl.col("status") == args.status)
    rows = rows.sort(["issued_at", "rank"], descending=[True, False]).head(args.limit).select(
        "task_id", "item_id", "role", "policy", "rank", pl.col("score").round(3), "status", "answers",
        "answers_wanted", "attempt", "expires_at", "why",
    )
    if args.json:
        _print(rows, True)
        return 0
    shown = "" if args.status == "all" else f"{args.status} "
    print(f"{_count(rows.height, shown + 'review task')}, newest first"
          + (f" (--limit {args.limit} reached)" if rows.height == args.limit else ""))
    if rows.height:
        _print(rows, False)
        print("Answer a task with a correction that carries its task_id (see docs: review tasks).")
    return 0


def cmd_tasks_efficacy(args: argparse.Namespace) -> int:
    """Label changes per 100 answers, by routing policy."""
    from labelloop_assets.core import tasks

    with _read(_home()) as con:
        rows = tasks.efficacy(con)
    if args.json:
        _print(rows, True)
        return 0
    if rows.height == 0:
        print("no review tasks issued yet (the review_tasks asset issues them; see `labelloop tasks list`)")
        return 0
    print("Label changes per 100 answers, by routing policy (loop: expected benefit; controls: "
          "least_confidence, random)")
    _print(rows, False)
    return 0


def _print_bursts(rows: pl.DataFrame, limit: int) -> None:
    """Held bursts, which wait for a reviewer's release or discard, apart from warnings, which hold
    nothing and need no decision."""
    held, warnings = rows.filter(pl.col("status") == "held"), rows.filter(pl.col("status") != "held")
    print((f"{_count(held.height, 'correction burst')} awaiting a reviewer (held): release or discard "
           f"{'it' if held.height == 1 else 'them'}" if held.height else "no correction burst awaiting a reviewer")
          + (f" (--limit {limit} reached)" if rows.height == limit else ""))
    if held.height:
        _print(held, False)
    if warnings.height:
        print(("\n" if held.height else "") + f"{_count(warnings.height, 'warning')} of the last 14 days"
              + ("" if held.height else ", nothing held") + ": flagged only, no decision needed")
        _print(warnings, False)


def _burst(con, burst_id: str) -> dict | None:
    found = store.frame(con, "SELECT * FROM correction_bursts WHERE burst_id = ?", [burst_id])
    return found.to_dicts()[0] if found.height else None


def cmd_review_show(args: argparse.Namespace) -> int:
    from labelloop_assets.core.bursts import BURST_PREFIX

    if args.escalation_id.startswith(BURST_PREFIX):
        return _show_burst(args)
    with _read(_home()) as con:
        escalation = _escalation(con, args.escalation_id)
        if escalation is None:
            print(f"labelloop: no open escalation {quoted(args.escalation_id)}", file=sys.stderr)
            return 1
        votes = store.frame(
            con,
            "SELECT event_id, corrected_label, user_pseudonym, user_role, source, vote_weight, "
            "round(prediction_confidence, 3) AS model_confidence, predicted_label, rationale, "
            "created_at FROM validated_labels WHERE item_id = ? ORDER BY created_at",
            [escalation["item_id"]],
        )
    if args.json:
        print(json.dumps({"escalation": escalation, "votes": votes.to_dicts()}, indent=2, default=str))
        return 0
    for key, value in escalation.items():
        print(f"{key:>17}: {_detail(value)}")
    print(_count(votes.height, "vote"))
    if votes.height:
        _print(votes, False)
    return 0


def _detail(value) -> str:
    """A field of `review show`: a number to 3 decimals, as the lists round them (--json keeps them whole)."""
    if not isinstance(value, float):
        return _safe(value)
    # A tiny nonzero fraction keeps 3 significant digits rather than reading as 0.
    return str(round(value, 3)) if round(value, 3) or not value else f"{value:.3g}"


def _show_burst(args: argparse.Namespace) -> int:
    from labelloop_assets.core.bursts import burst_events

    with _read(_home()) as con:
        burst = _burst(con, args.escalation_id)
        if burst is None:
            print(f"labelloop: no correction burst {quoted(args.escalation_id)}", file=sys.stderr)
            return 1
        events = burst_events(con, burst).head(20)
    if args.json:
        print(json.dumps({"burst": burst, "events": events.to_dicts()}, indent=2, default=str))
        return 0
    for name, value in burst.items():
        print(f"{name:>21}: {_detail(value)}")
    n_events = burst["n_events"]
    print(f"its {_count(n_events, 'correction')}" if events.height == n_events
          else f"the first {events.height:,} of its {n_events:,} corrections")
    if events.height:
        _print(events, False)
    return 0


def _is_text(value: str) -> bool:
    """False for arguments holding bytes that were not UTF-8 (Python keeps them as lone surrogates):
    they can be neither signed nor stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: str) -> str:
    return value if _is_text(value) else value.encode("utf-8", "replace").decode("utf-8")


def _field_problems(values: dict[str, str | None]) -> list[str]:
    """The review contract's own limits, so that what is refused here is refused at ingest too."""
    from labelloop_assets.core.contracts import REVIEW_SPEC

    problems = []
    for field in REVIEW_SPEC.fields:
        value = values.get(field.name)
        if value is None:
            continue
        if value == "":
            problems.append(f"{field.name} is empty")
        elif not _is_text(value):
            problems.append(f"{field.name} is not valid text (bytes that are not UTF-8)")
        elif field.max_length is not None and len(value) > field.max_length:
            problems.append(f"{field.name} is longer than {field.max_length} characters ({len(value)})")
    return problems


def cmd_review_decide(args: argparse.Namespace) -> int:
    """Check the decision as far as can be known here, then land it; ingest checks it again."""
    from labelloop_assets.core import review
    from labelloop_assets.core.ontology import Ontology
    from labelloop_assets.core.resolve import ResolutionPolicy

    home = _home().ensure()
    decision = {"decide": "accept", "reject": "reject", "defer": "defer", "release": "release",
                "discard": "discard"}[args.review_command]
    # Checked as ingest will read them: " reviewer-0" is reviewer-0 there, so it must be here.
    escalation_id, reviewer = args.escalation_id.strip(TRIMMED), args.reviewer.strip(TRIMMED)
    rationale = args.rationale.strip(TRIMMED)
    label = None if getattr(args, "label", None) is None else args.label.strip(TRIMMED)
    problems = _field_problems(
        {"escalation_id": escalation_id, "reviewer_id": reviewer, "rationale": rationale, "label": label}
    )
    if not all(_is_text(v) for v in (escalation_id, reviewer, rationale, label or "")):
        # Refused (above); what cannot be encoded is replaced ("?") so that the attempt can still
        # be signed and landed for the audit log.
        escalation_id, reviewer, rationale = _as_text(escalation_id), _as_text(reviewer), _as_text(rationale)
        label = None if label is None else _as_text(label)
    directory = review.directory(home)
    role = directory.authorities().get(reviewer)
    signer = None
    if role is None:
        problems.append(f"{quoted(reviewer)} is not a reviewer in {home.contributors_file.name}")
    else:
        signer = _signer(home, reviewer, args.key, directory)
        problems.extend(signer.terminal)
    key = signer.key if signer else None
    if decision in ("release", "discard"):
        problems.extend(_burst_problems(home, escalation_id, role))
        return _land(home, escalation_id, decision, reviewer, rationale, None, problems, key)
    if label is not None:
        ontology = Ontology.load(home.ontology_file)
        if ontology.resolve_term(label.strip()) not in ontology.labels:
            problems.append(f"label {quoted(label)} is not in the ontology ({', '.join(ontology.labels)})")
    try:
        with store.connect(home.database, read_only=True) as con:
            escalation = _escalation(con, escalation_id)
    except (duckdb.IOException, duckdb.ConnectionException):
        escalation = "unknown"  # a run holds the file: the ingest run will check instead
    if escalation is None:
        problems.append(f"{quoted(escalation_id)} is not an open escalation")
    elif isinstance(escalation, dict) and role is not None:
        allowed = ResolutionPolicy.load(home.governance_file).deciders(escalation["reason"])
        if role not in allowed:
            problems.append(
                f"role {role} may not decide a {escalation['reason']} escalation "
                f"(allowed: {', '.join(allowed)})"
            )
    return _land(home, escalation_id, decision, reviewer, rationale, label, problems, key)


@dataclasses.dataclass
class _Signer:
    """The private key `--as ID` signs with, and why it may not be used (for the terminal, and
    without paths or the raw id for the audit log)."""

    key: Ed25519PrivateKey | None = None
    key_id: str | None = None
    terminal: list[str] = dataclasses.field(default_factory=list)
    audit: list[str] = dataclasses.field(default_factory=list)

    def refuse(self, terminal: str, audit: str) -> _Signer:
        self.terminal.append(terminal)
        self.audit.append(audit)
        return self


def _signer(home: Home, reviewer: str, explicit: str | None, directory) -> _Signer:
    """ID's private key: --key FILE, else LABELLOOP_SIGNING_KEY, else $LABELLOOP_KEYS_DIR/ID.key.

    A key that is found but not (or no longer) registered to ID still signs a refused attempt:
    the audit log then names the key that tried."""
    from labelloop_assets.core import signing

    found = _Signer()
    if explicit:
        path, source = Path(explicit).expanduser(), "--key"
    elif os.environ.get(signing.SIGNING_KEY_ENV):
        path, source = Path(os.environ[signing.SIGNING_KEY_ENV]).expanduser(), signing.SIGNING_KEY_ENV
    else:
        path, source = signing.default_key_file(reviewer), f"the default, ${signing.KEYS_DIR_ENV}/ID.key"
    shown = quoted(str(path))
    try:
        exists, in_home = path.exists(), signing.inside(path, home.root)
    except (OSError, ValueError) as error:  # a name too long, a NUL byte...
        return found.refuse(f"cannot use the key file {shown}: {_reason(error)}", "the signing key could not be used")
    if not exists:
        return found.refuse(
            f"no signing key for {quoted(reviewer)}: {shown} (from {source}) does not exist; give --key FILE, "
            f"set {signing.SIGNING_KEY_ENV}, or make one with `labelloop keys new {quoted(reviewer)} --register`",
            "no signing key was found for the reviewer",
        )
    if in_home:
        return found.refuse(
            f"the signing key {shown} lies inside LABELLOOP_HOME ({home.root}), where whatever reads the home "
            "can read it; it is not used: make a new key outside the home (`labelloop keys new`) and revoke this one",
            "the signing key lies inside LABELLOOP_HOME",
        )
    try:
        found.key = signing.load_private_key(path)
    except signing.SigningError as error:
        return found.refuse(_safe(error), "the signing key could not be used")
    found.key_id = signing.key_id_of(found.key)
    listed = directory.key(found.key_id)
    if listed is None:
        found.refuse(
            f"key {found.key_id} ({shown}) is not one of {quoted(reviewer)}'s keys in {home.contributors_file.name} "
            f"(`labelloop keys new {quoted(reviewer)} --register` registers a new one)",
            f"key {found.key_id} is not registered in contributors.yaml",
        )
    elif listed[0].id != reviewer:
        found.refuse(f"key {found.key_id} ({shown}) is registered to another contributor, not to {quoted(reviewer)}",
                     f"key {found.key_id} belongs to another contributor")
    elif listed[1].revoked(datetime.now(UTC)):
        found.refuse(f"key {found.key_id} ({shown}) was revoked at {listed[1].revoked_at.isoformat()}",
                     f"key {found.key_id} is revoked")
    return found


def _burst_problems(home: Home, burst_id: str, role: str | None) -> list[str]:
    from labelloop_assets.core.bursts import BurstPolicy
    from labelloop_assets.core.settings import load_yaml_mapping

    policy = BurstPolicy.from_mapping(load_yaml_mapping(home.governance_file, "governance").get("bursts"))
    problems = []
    if role is not None and role not in policy.may_acknowledge:
        problems.append(
            f"role {role} may not acknowledge a correction burst (allowed: {', '.join(policy.may_acknowledge)})"
        )
    try:
        with store.connect(home.database, read_only=True) as con:
            burst = _burst(con, burst_id)
    except (duckdb.IOException, duckdb.ConnectionException, duckdb.CatalogException):
        return problems  # a run holds the file: the ingest run will check instead
    if burst is None:
        problems.append(
            f"{quoted(burst_id)} is not a detected correction burst (labelloop review list --queue bursts)"
        )
    elif burst["status"] in ("released", "discarded"):
        problems.append(f"{burst_id} was already {burst['status']} by {burst['acknowledged_by']}")
    return problems


def _land(
    home: Home, escalation_id: str, decision: str, reviewer: str, rationale: str, label: str | None,
    problems: list[str], key=None,
) -> int:
    from labelloop_assets.core import review

    # Refused attempts are landed too, so that the ingest run writes them to the audit log; they
    # are marked, so that ingest refuses them even if what was wrong here is right by then.
    path = review.write_decision(
        home, escalation_id, decision, reviewer, rationale, label, refused=bool(problems), signer=key
    )
    if problems:
        for problem in problems:
            print(f"labelloop: refused: {problem}", file=sys.stderr)
        print(f"labelloop: the attempt is recorded for the audit log ({path.name})", file=sys.stderr)
        return 3
    print(f"recorded {decision} of {_safe(escalation_id)} as {path.name}; the next ingest run applies it")
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    with _read(_home()) as con:
        rows = store.frame(
            con,
            "SELECT m.model_version, m.status, m.corpus_version, m.trained_at, left(m.train_data_hash, 12) AS "
            "train_data_hash, m.params, round(m.gold_accuracy, 4) AS gold_accuracy, round(m.gold_macro_f1, 4) AS "
            "gold_macro_f1, round(m.confirm_below, 3) AS confirm_below, e.decision, "
            "array_to_string(e.reasons, '; ') AS reasons FROM models m LEFT JOIN ("
            "  SELECT * FROM model_evaluations QUALIFY row_number() OVER ("
            "    PARTITION BY challenger ORDER BY evaluation_id DESC) = 1) e ON e.challenger = m.model_version "
            "ORDER BY m.trained_at",
        )
    if args.json:
        _print(rows, True)
    else:
        champion = rows.filter(pl.col("status") == "champion")["model_version"].to_list()
        print(f"{_count(rows.height, 'model')}; champion: {champion[0] if champion else 'none yet'}")
        if rows.height:
            # What decides a rollback, under short headers so the reasons have room; --json has the rest.
            _print(rows.select(
                pl.col("model_version").alias("model"), "status", pl.col("corpus_version").alias("corpus"),
                "trained_at", pl.col("gold_accuracy").alias("accuracy"), pl.col("gold_macro_f1").alias("macro_f1"),
                "train_data_hash", "decision", "reasons"), False)
    return 0


def cmd_model_current(args: argparse.Namespace) -> int:
    """The model serving code should load: the champion the registry and models/CURRENT agree on."""
    from labelloop_assets import serving

    try:
        champion = serving.Champion.load(_home())
    except serving.ServingError as error:
        print(f"labelloop: {_safe(error)}", file=sys.stderr)
        return 1
    described = serving.describe(champion)
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    threshold = described["confirm_below"]
    print(f"champion {described['model_version']} (trained on corpus v{described['corpus_version']} "
          f"at {described['trained_at']})")
    print(f"  files:         {described['path']}")
    print(f"  classes:       {', '.join(_safe(label) for label in described['classes'])}")
    if described["trainer"] == "external":
        # labelloop holds only its probabilities: serving code loads the model from its reference.
        print("  trainer:       external (serve it from its reference with your own code)")
        print(f"  reference:     {_safe(described['reference'])}")
        print(f"  command:       {_safe(' '.join(described['command'] or []))}")
    else:
        reads = described["reads"].replace("features", f"features ({described['feature_length']} numbers per item)")
        print(f"  reads:         {reads}")
        print(f"  pipeline:      {_safe(described['pipeline'])}")
    print("  confirm_below: " + (f"{threshold:.3f} (predictions less confident than this go to review)"
                                 if threshold is not None else "none recorded"))
    metrics = described["gold_metrics"]
    shown = {key: "n/a" if value is None else f"{value:.4f}" for key, value in metrics.items() if key != "n_gold"}
    print(f"  gold:          accuracy {shown['accuracy']}, macro F1 {shown['macro_f1']} "
          f"on {_count(metrics['n_gold'], 'item')}")
    return 0


ROLLBACK_ROLES = ("reviewer", "domain_expert")


def cmd_model_rollback(args: argparse.Namespace) -> int:
    """Make an earlier champion the champion again: registry, pointer and audit in one step."""
    from labelloop_assets.core import registry, review, signing, train

    home = _home()
    reviewer, rationale = args.reviewer.strip(TRIMMED), args.rationale.strip(TRIMMED)
    version = args.version
    not_text = [name for name, value in (("version", version), ("--rationale", rationale), ("--as", reviewer))
                if not _is_text(value)]
    reviewer, rationale, version = _as_text(reviewer), _as_text(rationale), _as_text(version)
    directory = review.directory(home)
    role = directory.authorities().get(reviewer)
    if not home.has_store():
        print("labelloop: no models yet", file=sys.stderr)
        return 1
    # The rollback is signed like a review decision, and the signature checked against the
    # directory before anything changes; both go into the audit row.
    signer = _signer(home, reviewer, args.key, directory) if role in ROLLBACK_ROLES else _Signer()
    action = {"rollback_id": f"rb-{uuid.uuid4()}", "version": version, "reviewer_id": reviewer,
              "rationale": rationale, "decided_at": datetime.now(UTC).isoformat(),
              "key_id": signer.key_id}
    signature = None
    if signer.key is not None and not signer.audit:
        signature = signing.sign(
            signer.key, signing.canonical(signing.ROLLBACK_DOMAIN, action, signing.ROLLBACK_FIELDS)
        )
        if not _verified_rollback(directory, action, signature):
            signer.refuse("the rollback's signature does not verify against contributors.yaml",
                          "the rollback's signature does not verify")
    # What the registry is not asked about: who asks, and how. The audit log keeps a refusal
    # without the raw identity and without paths of this machine; the terminal gets both.
    refusal = (
        f"{', '.join(not_text)}: not valid text (bytes that are not UTF-8)" if not_text
        else "not a reviewer or domain expert in contributors.yaml" if role is None
        else f"role {role} may not roll back a model (allowed: {', '.join(ROLLBACK_ROLES)})"
        if role not in ROLLBACK_ROLES
        else "a rationale is required (--rationale)" if not rationale
        else signer.audit[0] if signer.audit
        else None
    )
    request = registry.Rollback(
        version=version, actor=pseudonym_of(reviewer), role=role, author=reviewer, rationale=rationale,
        detail={"rollback_id": action["rollback_id"], "decided_at": action["decided_at"],
                "key_id": signer.key_id, "signature": signature},
        refusal=refusal,
    )
    try:
        with store.connect(home.database) as con:
            outcome = registry.rollback(
                con, request, lambda model: (home.model_folder(model["path"]) / "metadata.json").exists()
            )
    except (duckdb.IOException, LakeError) as error:
        print(f"labelloop: a run holds {home.database}; try again when it finishes ({error})", file=sys.stderr)
        return 1
    problem, target, current = outcome.problem, outcome.target, outcome.previous_champion
    if problem:
        if not_text:
            pass
        elif role is None:
            problem = f"{quoted(reviewer)} is {problem.replace('contributors.yaml', str(home.contributors_file))}"
        elif signer.audit and problem == signer.audit[0]:
            problem = signer.terminal[0]
        elif problem.startswith("the files of"):
            problem += f" under {home.model_folder(target['path'])}"
        print(f"labelloop: refused: {problem}", file=sys.stderr)
        return 3
    train.set_current(home.models, version)
    print(f"{version} is the champion again (was {current}); models/CURRENT points to it")
    return 0


def _verified_rollback(directory, action: dict, signature: str) -> bool:
    """The rollback's signature, checked as ingest checks a decision's: by a key of the reviewer
    that the directory lists and has not revoked."""
    from labelloop_assets.core import signing

    listed = directory.key(action["key_id"])
    return (
        listed is not None and listed[0].id == action["reviewer_id"]
        and not listed[1].revoked(datetime.now(UTC))
        and signing.verify(listed[1].raw, signing.canonical(signing.ROLLBACK_DOMAIN, action, signing.ROLLBACK_FIELDS),
                           signature)
    )


def cmd_sql(args: argparse.Namespace) -> int:
    """A read-only query on the store: the embedded file opened read-only, or the lake attached
    read-only with the reader role (LABELLOOP_READER_CATALOG) when one is configured."""
    try:
        statements = duckdb.extract_statements(args.query)
    except duckdb.Error as error:
        print(f"labelloop: the query failed: {_safe(_cut(str(error)))}", file=sys.stderr)
        return 1
    # One statement that only reads: ATTACH, COPY ... TO, SET and the like are refused here,
    # before the store's own read-only guard.
    if len(statements) != 1 or statements[0].type not in _READING:
        print(f"labelloop: refused: {SQL_ACCEPTED}", file=sys.stderr)
        return 3
    home = _home()
    with _read(home) as con:
        try:
            result = con.sql(args.query)
        except duckdb.Error as error:
            print(f"labelloop: the query failed: {_safe(_cut(str(error)))}", file=sys.stderr)
            return 1
        try:
            rows = result.pl() if result is not None else pl.DataFrame()
        except Exception as error:  # noqa: BLE001 - DuckDB, Arrow and Polars each raise their own
            # The query ran, but a column's type (an INTERVAL, say) has no Polars equivalent.
            print(f"labelloop: the result cannot be shown: {_safe(_cut(str(error), 300))}; cast the column "
                  "to another type (e.g. VARCHAR)", file=sys.stderr)
            return 1
    if args.limit is not None:
        rows = rows.head(args.limit)
    _print(rows, args.json)
    return 0


# DuckDB parses WITH, FROM-first, VALUES, TABLE, SHOW, DESCRIBE and SUMMARIZE as SELECT statements.
_READING = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
SQL_ACCEPTED = ("give exactly one SELECT or another read-only query (WITH, FROM, VALUES, TABLE, SHOW, DESCRIBE, "
                "SUMMARIZE, or EXPLAIN of one); statements that write or change settings (INSERT, COPY, ATTACH, "
                "SET, CALL, ...) and several statements are refused")


def _reason(error: Exception) -> str:
    """An OS error's reason without the path it names (echoed, escaped, by the caller)."""
    return _safe(error.strerror if isinstance(error, OSError) and error.strerror else _cut(str(error), 200))


def _cut(text: str, limit: int = 800) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy this home's embedded DuckDB file into the lake that LABELLOOP_CATALOG names."""
    home = _home()
    target = home.database
    if not isinstance(target, Lake):
        print("labelloop: set LABELLOOP_CATALOG (a libpq string) to the lake to copy into", file=sys.stderr)
        return 1
    source = Path(args.source) if args.source else home.database_file
    if not source.is_file():
        print(f"labelloop: no DuckDB file at {quoted(str(source))}", file=sys.stderr)
        return 1
    try:
        copied = store.copy_into_lake(source, target)
    except (LakeError, duckdb.Error) as error:
        print(f"labelloop: nothing copied: {_safe(error)}", file=sys.stderr)
        return 1
    for table, rows in copied.items():
        print(f"{table:28} {rows:>10,}")
    print(f"copied {source} into the {target}; the file is unchanged")
    return 0


_CONTRIBUTOR_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def cmd_keys_new(args: argparse.Namespace) -> int:
    """A new Ed25519 key pair for a contributor: the private key to a 0600 file outside the home,
    the public key printed (and, with --register, added to contributors.yaml)."""
    from labelloop_assets.core import review, signing

    home = _home()
    ident = args.contributor_id.strip(TRIMMED)
    if not ident or ident != args.contributor_id or re.search(_CONTROL, ident) or not _is_text(ident):
        print("labelloop: refused: give the contributor id as it is listed (no surrounding blanks, no control "
              "characters)", file=sys.stderr)
        return 3
    if args.out:
        path = Path(args.out).expanduser()
    elif _CONTRIBUTOR_FILE_NAME.match(ident):
        path = signing.default_key_file(ident)
    else:
        print(f"labelloop: refused: {quoted(ident)} does not make a file name; give --out FILE", file=sys.stderr)
        return 3
    try:
        in_home = signing.inside(path, home.root)
        # --out names the file, in a folder that exists; only the default keys folder is created.
        folder_missing = bool(args.out) and not path.parent.is_dir()
    except (OSError, ValueError) as error:
        print(f"labelloop: refused: cannot write a key to {quoted(str(path))}: {_reason(error)}", file=sys.stderr)
        return 3
    if in_home:
        print(f"labelloop: refused: {quoted(str(path))} lies inside LABELLOOP_HOME ({home.root}); a private key must "
              f"be kept outside the home (default: {signing.KEYS_DIR_ENV}, now {signing.keys_dir()})", file=sys.stderr)
        return 3
    if folder_missing:
        print(f"labelloop: refused: the folder of {quoted(str(path))} does not exist", file=sys.stderr)
        return 3
    role = review.directory(home).role_of(ident)
    if args.register and role is None:
        # Registering grants nothing: the deployment lists the person (and role) first.
        print(f"labelloop: refused: {quoted(ident)} is not listed in {home.contributors_file} (nor in "
              f"{home.reviewers_file.name}); add `- {{id: {ident}, role: reviewer}}` (or their role) under "
              "contributors first", file=sys.stderr)
        return 3
    key = signing.generate()
    try:
        signing.write_private_key(path, key)
    except (signing.SigningError, OSError, ValueError) as error:
        message = str(error) if isinstance(error, signing.SigningError) else _reason(error)
        print(f"labelloop: refused: cannot write {quoted(str(path))}: {_safe(_cut(message, 300))}", file=sys.stderr)
        return 3
    key_id, public = signing.key_id_of(key), signing.public_key_text(key)
    print(f"private key: {_safe(path)} (mode 0600; keep it outside LABELLOOP_HOME, never share it)")
    print(f"key_id:      {key_id}")
    print(f"public_key:  {public}")
    if args.register:
        signing.register_public_key(home, ident, role, public)
        print(f"registered in {home.contributors_file}; `--as {ident}` now signs with it")
    else:
        print(f"add to {home.contributors_file} (or run again with --register):")
        print(f"  - id: {ident}\n    role: {role or 'reviewer'}\n    keys:\n      - public_key: {public}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Contributors with their roles and keys (ids only: public keys are in contributors.yaml)."""
    from labelloop_assets.core import review

    now = datetime.now(UTC)
    rows = []
    for person in review.directory(_home()).contributors.values():
        for key in person.keys:
            rows.append({"contributor_id": person.id, "role": person.role, "key_id": key.key_id,
                         "status": "revoked" if key.revoked(now) else "active",
                         "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None})
        if not person.keys:
            rows.append({"contributor_id": person.id, "role": person.role, "key_id": None,
                         "status": "no key", "revoked_at": None})
    frame = pl.DataFrame(rows, schema={"contributor_id": pl.String, "role": pl.String, "key_id": pl.String,
                                       "status": pl.String, "revoked_at": pl.String}).sort("contributor_id", "key_id")
    if args.json:
        _print(frame, True)
    else:
        print(f"{_count(frame['contributor_id'].n_unique(), 'contributor')}, "
              f"{_count(frame['key_id'].drop_nulls().len(), 'key')}")
        if frame.height:
            _print(frame, False)
    return 0


def cmd_secret_new(args: argparse.Namespace) -> int:
    """A fresh random value for LABELLOOP_SECRET (256 bits), the only thing on standard output."""
    import secrets

    from labelloop_assets.core.settings import secret_problems

    value = secrets.token_urlsafe(32)
    while secret_problems(value):  # about once in 20,000 a random value holds a common word
        value = secrets.token_urlsafe(32)
    print(value)
    print("labelloop: keep it outside LABELLOOP_HOME, the same on every host; a store keeps needing the "
          "key its pseudonyms were made with (set it before the first run)", file=sys.stderr)
    return 0


def cmd_secret_check(args: argparse.Namespace) -> int:
    """Whether LABELLOOP_SECRET meets the strength rule (exit 0) or not (exit 2, with the reasons;
    the value is never printed)."""
    from labelloop_assets.core.settings import (
        NEW_SECRET_HINT,
        SECRET_RULE,
        secret_problems,
        weak_secret_message,
    )

    value = os.environ.get("LABELLOOP_SECRET")
    if not value:
        print(f"labelloop: LABELLOOP_SECRET is not set; {NEW_SECRET_HINT}", file=sys.stderr)
        return 2
    problems = secret_problems(value)
    if problems:
        print(f"labelloop: {weak_secret_message(problems)}", file=sys.stderr)
        return 2
    print(f"LABELLOOP_SECRET meets the rule: {SECRET_RULE}")
    return 0


def pseudonym_of(user_id: str) -> str:
    from labelloop_assets.core.anonymize import pseudonym
    from labelloop_assets.core.settings import pseudonymization_key

    return pseudonym(pseudonymization_key(), user_id)


# ----------------------------------------------------------------------- label-studio (reviewers' front end)
# Pure logic in core/label_studio.py; these commands read the home, print, and land one file.


def cmd_label_studio_config(args: argparse.Namespace) -> int:
    """The labeling config (Label Studio XML) for the home's ontology."""
    from labelloop_assets.core import label_studio
    from labelloop_assets.core.ontology import Ontology

    print(label_studio.labeling_config(Ontology.load(_home().ontology_file)), end="")
    return 0


def cmd_label_studio_export(args: argparse.Namespace) -> int:
    """The latest review-task file of the outbox as Label Studio import JSON."""
    from labelloop_assets.core import label_studio
    from labelloop_assets.core.files import write_atomically
    from labelloop_assets.core.ontology import Ontology
    from labelloop_assets.core.tasks import OUTBOX, latest_outbox

    home = _home()
    try:
        source = latest_outbox(home.root)
        lines = label_studio.read_outbox(source) if source else None
    except OSError as error:
        print(f"labelloop: cannot read the outbox: {_safe(_cut(_reason(error)))}", file=sys.stderr)
        return 1
    if source is None:
        print(f"labelloop: no review tasks yet: {_safe(home.root / OUTBOX)} holds no work list (the review_tasks asset "
              "writes one when it picks items to review)", file=sys.stderr)
        return 1
    export = label_studio.import_tasks(lines, Ontology.load(home.ontology_file))
    text = json.dumps(export.tasks, indent=2, ensure_ascii=False) + "\n"
    summary = (f"{_count(len(export.tasks), 'task')} from {source.name} ({export.with_prediction:,} with the "
               f"champion's prediction), {_count(len(export.refused), 'line')} refused")
    refusals = [f"line {r['line']}: {r['reason']}: {_safe(r['detail'])}" for r in export.refused]
    if not args.out:
        print(text, end="")
        for refusal in refusals:  # beside the JSON, not in it
            print(f"labelloop: refused {refusal}", file=sys.stderr)
        return 0
    out = Path(args.out).expanduser()
    try:
        write_atomically(out, text)
    except (OSError, ValueError) as error:
        print(f"labelloop: cannot write {quoted(str(out))}: {_safe(_reason(error))}", file=sys.stderr)
        return 1
    print(f"{summary}; written to {_safe(out)}")
    for refusal in refusals:
        print(f"  refused {refusal}")
    return 0


def cmd_label_studio_import(args: argparse.Namespace) -> int:
    """Label Studio's JSON export as one correction file in landing/corrections/label-studio/."""
    from labelloop_assets.core import label_studio, review
    from labelloop_assets.core.files import write_atomically
    from labelloop_assets.core.ontology import Ontology

    home = _home()
    try:
        export = label_studio.load_export(Path(args.export_file))
        users = label_studio.load_users(Path(args.users)) if args.users else None
    except label_studio.LabelStudioError as error:
        print(f"labelloop: {_safe(_cut(str(error)))}", file=sys.stderr)
        return 1
    directory, ontology = review.directory(home), Ontology.load(home.ontology_file)
    try:
        result = label_studio.corrections(export, directory, ontology, args.project, users)
    except label_studio.LabelStudioError as error:
        print(f"labelloop: {_safe(_cut(str(error)))}", file=sys.stderr)
        return 2
    # A whole-project export holds every earlier answer again: those already ingested are left out.
    known = _ingested_event_ids(home, [f"{label_studio.PRODUCER}/{line['event_id']}" for line in result.lines])
    new_lines = [line for line in result.lines if f"{label_studio.PRODUCER}/{line['event_id']}" not in known]
    target, landed = None, False
    if new_lines:
        folder = home.landing_dir("corrections") / label_studio.PRODUCER
        linked = next((p for p in (home.landing, home.landing_dir("corrections"), folder) if p.is_symlink()), None)
        if linked is not None:
            # Ingest never reads through a link: answers written there would be lost.
            print(f"labelloop: {quoted(str(linked))} is a symbolic link; landing folders must be real folders "
                  "(ingest does not follow links), so nothing was written", file=sys.stderr)
            return 1
        text = label_studio.landing_text(new_lines)
        target = folder / label_studio.landing_name(result.project, text)
        landed = target.exists()  # the same export again: the file it landed is already there
        if not landed:
            try:
                write_atomically(target, text, durable=True)
            except OSError as error:
                print(f"labelloop: cannot write {quoted(str(target))}: {_safe(_reason(error))}", file=sys.stderr)
                return 1
    report = {"project": result.project, "annotations": result.annotations, "written": len(new_lines),
              "already_ingested": len(result.lines) - len(new_lines),
              "refused": len(result.refused), "reasons": result.reasons(),
              "file": str(target) if target else None, "already_landed": landed,
              "refused_annotations": result.refused}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"project {result.project}: {_count(result.annotations, 'annotation')} in, {len(new_lines):,} written, "
          f"{len(result.lines) - len(new_lines):,} already ingested, {len(result.refused):,} refused")
    if target:
        print(f"{'already landed as' if landed else 'landed'} {_safe(target)}; the next ingest run reads it")
    for refusal in result.refused:
        print(f"  refused task {_safe(refusal['task'])} annotation {_safe(refusal['annotation'])}: "
              f"{refusal['reason']}: {_safe(_cut(str(refusal['detail']), 300))}")
    return 0


def _ingested_event_ids(home: Home, event_ids: list[str]) -> set[str]:
    """Which of these (scoped) event ids the store already holds; none when there is no store yet."""
    if not event_ids or not home.has_store():
        return set()
    with _read(home) as con:
        found = store.lookup(con, "raw_corrections", "event_id", pl.DataFrame({"event_id": event_ids}), "true")
    return set(found["event_id"].to_list())


def _label_studio_commands(commands) -> None:
    """`labelloop label-studio config|export|import`."""
    tool = commands.add_parser(
        "label-studio", help="Label Studio as the reviewers' front end: config, export tasks, import answers")
    actions = tool.add_subparsers(dest="label_studio_command", required=True, metavar="ACTION")
    config = actions.add_parser("config", help="print the labeling config (XML) for the home's ontology")
    config.set_defaults(func=cmd_label_studio_config)
    export = actions.add_parser("export", help="the latest review tasks as Label Studio import JSON")
    export.add_argument("--out", metavar="FILE", help="write the JSON to FILE (default: standard output)")
    export.set_defaults(func=cmd_label_studio_export)
    importing = actions.add_parser(
        "import", help="Label Studio's JSON export as corrections in landing/corrections/label-studio/")
    importing.add_argument("export_file", metavar="FILE", help="the JSON export of one Label Studio project")
    importing.add_argument("--project", type=_whole_number(1, 2**31 - 1), metavar="N",
                           help="the project's number (default: the one the export names)")
    importing.add_argument("--users", metavar="FILE",
                           help="Label Studio's users list (GET /api/users/), for an export that names "
                                "annotators by number only")
    importing.add_argument("--json", action="store_true", help="print the report as JSON")
    importing.set_defaults(func=cmd_label_studio_import)


KEY_HELP = ("the private key to sign with (default: $LABELLOOP_SIGNING_KEY, else "
            "$LABELLOOP_KEYS_DIR/REVIEWER_ID.key); never inside LABELLOOP_HOME")


JSON_HELP = "print JSON instead of a table (for scripts)"
LIMIT_HELP = "show at most N rows (default: %(default)s)"
ID_HELP = "an escalation id (esc-...) or a correction burst id (burst-...), as `labelloop review list` shows it"


def _version() -> str:
    """The installed distribution's version (pyproject.toml's [project] name is labelloop)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labelloop")
    except PackageNotFoundError:
        return "unknown (not installed: `pip install -e .`)"


def build_parser() -> argparse.ArgumentParser:
    from labelloop_assets.core.settings import LANDING_KINDS

    parser = argparse.ArgumentParser(prog="labelloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed version of labelloop and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the loop on simulated days of digits (or text) traffic")
    demo.add_argument("--world", choices=tuple(DEMO_HOMES), default="digits",
                      help="what the simulated product classifies: digits (scikit-learn's handwritten digits, "
                           "items with features) or text (Rotten Tomatoes snippets: fresh, rotten or plot; "
                           "data fetched by `make venv`); each has its own home, data/home or data/home-text, "
                           "unless LABELLOOP_HOME is set (default: %(default)s)")
    demo.add_argument("--days", type=_whole_number(1, 365), default=6, metavar="N",
                      help="simulated days after the first (default: %(default)s)")
    demo.add_argument("--seed", type=_whole_number(0, 2**63 - 1), default=7, metavar="N",
                      help="seed of the simulated traffic; the same seed gives the same demo (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)
    init = commands.add_parser("init", help="a new home from labelled files: ontology, gold set, plan, first items")
    init.add_argument("--from", dest="sources", nargs="+", required=True, metavar="FILE",
                      help="labelled files, JSON Lines or CSV: item_id, text and/or features, and label "
                           "(or initial_label)")
    init.add_argument("--home", dest="home_dir", metavar="DIR", help="the home to make (default: $LABELLOOP_HOME)")
    sizing = init.add_mutually_exclusive_group()
    sizing.add_argument("--gold", type=_whole_number(1, 10_000_000), metavar="N",
                        help="gold items in all, spread evenly over the classes (default: what the plan needs)")
    sizing.add_argument("--gold-fraction", type=_gold_fraction, metavar="F",
                        help="the fraction of every class held out as gold")
    init.add_argument("--seed", type=_whole_number(0, 2**63 - 1), default=0, metavar="N",
                      help="seed of the gold sample; the same seed and files give the same split "
                      "(default: %(default)s)")
    init.add_argument("--force", action="store_true",
                      help="overwrite the files init writes in a folder that is not empty")
    init.set_defaults(func=cmd_init)
    status = commands.add_parser("status", help="table sizes and trained models")
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    status.set_defaults(func=cmd_status)
    quarantine = commands.add_parser("quarantine", help="rows set aside, with their reasons")
    quarantine.add_argument("--kind", choices=LANDING_KINDS,
                            help="only lines of this kind of landing file: %(choices)s")
    quarantine.add_argument("--reason", type=_quarantine_reason, metavar="REASON",
                            help="only rows with this reason code (e.g. no_consent); another lists the codes")
    quarantine.add_argument("--item", metavar="ITEM_ID", help="only lines that named this item")
    quarantine.add_argument("--limit", type=_positive, default=50, metavar="N", help=LIMIT_HELP)
    quarantine.add_argument("--json", action="store_true", help=JSON_HELP)
    quarantine.set_defaults(func=cmd_quarantine)
    reviewing = commands.add_parser(
        "review", help="review queues: escalations, correction bursts, label issues; audit samples"
    )
    review_commands = reviewing.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    listing = review_commands.add_parser("list", help="a review queue: escalations, bursts or issues")
    listing.add_argument("--queue", choices=list(QUEUES), default="escalations",
                         help="which queue: %(choices)s (default: %(default)s)")
    listing.add_argument("--limit", type=_positive, default=50, metavar="N", help=LIMIT_HELP)
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(func=cmd_review_list)
    auditing = review_commands.add_parser(
        "audit-sample", help="items drawn at random for a blind audit (measures each label source's accuracy)"
    )
    auditing.add_argument("--size", type=_positive, required=True, metavar="N", help="how many items to draw")
    auditing.add_argument("--seed", type=_whole_number(0, 2**63 - 1), default=0, metavar="S",
                          help="the random seed: the same seed and store give the same items (default: %(default)s)")
    auditing.add_argument("--json", action="store_true", help=JSON_HELP)
    auditing.set_defaults(func=cmd_review_audit_sample)
    showing = review_commands.add_parser(
        "show", help="one escalation with its votes, or one burst with its corrections"
    )
    showing.add_argument("escalation_id", metavar="ID", help=ID_HELP)
    showing.add_argument("--json", action="store_true", help=JSON_HELP)
    showing.set_defaults(func=cmd_review_show)
    for name, text in (("decide", "set the label"), ("reject", "keep the current label"),
                       ("defer", "leave it open, with a note"),
                       ("release", "a held burst is genuine: its corrections count"),
                       ("discard", "a burst is not genuine: its corrections never count")):
        action = review_commands.add_parser(name, help=text)
        action.add_argument("escalation_id", metavar="ID", help=(
            "the held burst's id (burst-...), as `labelloop review list --queue bursts` shows it"
            if name in ("release", "discard")
            else "the escalation's id (esc-...), as `labelloop review list` shows it"))
        if name == "decide":
            action.add_argument("--label", required=True, help="the label to set: a term of the ontology")
        action.add_argument("--rationale", required=True,
                            help="why, in words (kept in the audit log, scrubbed of personal data)")
        action.add_argument("--as", dest="reviewer", required=True, metavar="REVIEWER_ID",
                            help="your id as contributors.yaml lists it (its role there decides what you may decide)")
        action.add_argument("--key", metavar="FILE", help=KEY_HELP)
        action.set_defaults(func=cmd_review_decide)
    tasking = commands.add_parser("tasks", help="review tasks the loop issued: list, efficacy by routing policy")
    task_commands = tasking.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    task_list = task_commands.add_parser("list", help="issued tasks with their status and answers, newest first")
    task_list.add_argument("--status", choices=TASK_STATUSES, default="open",
                           help="which tasks: %(choices)s (default: %(default)s)")
    task_list.add_argument("--limit", type=_positive, default=50, metavar="N", help=LIMIT_HELP)
    task_list.add_argument("--json", action="store_true", help=JSON_HELP)
    task_list.set_defaults(func=cmd_tasks_list)
    task_efficacy = task_commands.add_parser("efficacy", help="label changes per 100 answers, by routing policy")
    task_efficacy.add_argument("--json", action="store_true", help=JSON_HELP)
    task_efficacy.set_defaults(func=cmd_tasks_efficacy)
    models = commands.add_parser("model", help="the model registry: list, current, rollback")
    model_commands = models.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    listing = model_commands.add_parser("list", help="every model with its status, data hash, metrics, decision")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(func=cmd_model_list)
    current = model_commands.add_parser(
        "current", help="the champion serving code should load: files, classes, confirm_below, gold metrics")
    current.add_argument("--json", action="store_true", help="one JSON object (keys in docs/serving.md)")
    current.set_defaults(func=cmd_model_current)
    rollback = model_commands.add_parser("rollback", help="make a retired champion the champion again")
    rollback.add_argument("version", help="the model version to restore, e.g. m0003 (`labelloop model list`)")
    rollback.add_argument("--rationale", required=True, help="why, in words (kept in the audit log, scrubbed)")
    rollback.add_argument("--as", dest="reviewer", required=True, metavar="REVIEWER_ID",
                          help="your id as contributors.yaml lists it (a reviewer or domain expert)")
    rollback.add_argument("--key", metavar="FILE", help=KEY_HELP)
    rollback.set_defaults(func=cmd_model_rollback)
    keys = commands.add_parser("keys", help="signing keys of reviewers: new, list")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new_key = key_commands.add_parser(
        "new", help="make a contributor's Ed25519 key pair (private key outside the home)"
    )
    new_key.add_argument("contributor_id", help="the contributor's id as contributors.yaml lists it")
    new_key.add_argument("--out", metavar="FILE", help="where to write the private key "
                         "(default: $LABELLOOP_KEYS_DIR/ID.key, "
                         "LABELLOOP_KEYS_DIR defaults to ~/.config/labelloop/keys)")
    new_key.add_argument("--register", action="store_true",
                         help="add the public key to the contributor's entry in the home's contributors.yaml")
    new_key.set_defaults(func=cmd_keys_new)
    key_list = key_commands.add_parser("list", help="contributors, roles, key ids, revoked or not")
    key_list.add_argument("--json", action="store_true", help=JSON_HELP)
    key_list.set_defaults(func=cmd_keys_list)
    secret = commands.add_parser("secret", help="the pseudonymization key (LABELLOOP_SECRET): new, check")
    secret_commands = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    new_secret = secret_commands.add_parser("new", help="print a fresh random value for LABELLOOP_SECRET")
    new_secret.set_defaults(func=cmd_secret_new)
    check_secret = secret_commands.add_parser(
        "check", help="whether LABELLOOP_SECRET is strong enough (exit 0) or not (exit 2, with the reasons)")
    check_secret.set_defaults(func=cmd_secret_check)
    sql = commands.add_parser("sql", help="a read-only SQL query on the store (either backend)")
    sql.add_argument("query", help="one read-only query: SELECT (or WITH, FROM, VALUES, TABLE), SHOW, DESCRIBE, "
                     "SUMMARIZE or EXPLAIN, e.g. \"SELECT label, count(*) FROM production_corpus GROUP BY 1\"")
    sql.add_argument("--json", action="store_true", help="rows as a JSON list of objects")
    sql.add_argument("--limit", type=_positive, metavar="N", help="print at most this many rows")
    sql.set_defaults(func=cmd_sql)
    migrate = commands.add_parser("migrate", help="copy the embedded DuckDB file into the lake (LABELLOOP_CATALOG)")
    migrate.add_argument("--from", dest="source", metavar="FILE",
                         help="the DuckDB file to copy (default: the home's labelloop.duckdb)")
    migrate.set_defaults(func=cmd_migrate)
    lineage = commands.add_parser("lineage", help="every change of one item's label, and why")
    lineage.add_argument("item_id", help="the item's id, as landed (e.g. from `labelloop review list`)")
    lineage.add_argument("--json", action="store_true", help=JSON_HELP)
    lineage.set_defaults(func=cmd_lineage)
    _label_studio_commands(commands)
    return parser


# What a shell reports for a process ended by SIGPIPE (128 + 13): the reader went away.
BROKEN_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # Text a terminal's encoding cannot show (a wide character on an ASCII-only stream) is
        # escaped rather than ending the command.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            args = build_parser().parse_args(argv)
            problem = _undecodable_argument(args)
            if problem:
                print(f"labelloop: {problem}", file=sys.stderr)
                return 2
            try:
                return args.func(args)
            except LabelloopConfigError as error:
                print(f"labelloop: configuration error: {error}", file=sys.stderr)
                return 2
        finally:
            # Written out here, where a reader that has gone away (`| head -1`) can be handled,
            # rather than by the interpreter at exit, where it would print a traceback.
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt:
        print("labelloop: interrupted", file=sys.stderr)
        return 130


# File names may hold any bytes; these commands check their text themselves and land (or audit) a
# refused attempt with what cannot be encoded replaced.
_PATH_ARGUMENTS = ("source", "out", "key")


def _undecodable_argument(args: argparse.Namespace) -> str | None:
    """Why an argument cannot be used: bytes that are not UTF-8 (Python keeps them as lone
    surrogates) can be neither looked up nor stored."""
    if args.func in (cmd_review_decide, cmd_model_rollback, cmd_keys_new):
        return None
    for name, value in vars(args).items():
        if isinstance(value, str) and name not in _PATH_ARGUMENTS and not _is_text(value):
            return f"{name.replace('_', ' ')} {quoted(value, 40)} is not valid text (bytes that are not UTF-8)"
    return None


def _discard_stdout() -> None:
    """Point standard output at the null device, so that the output still buffered is dropped
    quietly when the interpreter exits."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (a test's capture): nothing is flushed at exit


if __name__ == "__main__":
    sys.exit(main())
