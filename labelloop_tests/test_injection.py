"""Injection: hostile text through every CLI argument and every landing field is refused or kept as data.

SQL is parameterized everywhere; a static check keeps it so by failing on any SQL text built
from an interpolated value that is not on the allow-list below (each entry says why it is safe).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import contracts, publish, signing, store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.settings import pseudonymization_key
from labelloop_tests.conftest import (
    correction,
    give_keys,
    key_of,
    land_items,
    leaf_commands,
    make_items,
    set_yaml,
    write_jsonl,
)

CANARY = "labelloop-canary"
SHELL = f"$(rm -rf /) `touch {CANARY}`; touch {CANARY} && $(touch {CANARY})"
HOSTILE = [
    "x'; DROP TABLE production_corpus; --",
    '" OR 1=1 --',
    "item'); DELETE FROM audit_log; --",
    SHELL,
    "../../etc/passwd",
    "nul\x00byte \x1b[2J\x1b[31m %s %d {0} {item_id}",
    "y" * 100_000,
]
# Landing records are cheap to multiply: more shapes there.
HOSTILE_FIELDS = [
    *HOSTILE,
    "'; SELECT * FROM read_csv('/etc/passwd'); --",
    "Robert'); UPDATE production_corpus SET label = 'x'; --",
    "y" * 300,
    "ünï©ødé ✓ 用户 \u202e",
]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _rows(home, sql, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _counts(home) -> dict[str, int]:
    with store.connect(home.database, read_only=True) as con:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        # Names read from the catalog, quoted: identifiers cannot be bound as parameters.
        return {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.endswith(".wal")}


def _ingest(defs, instance) -> None:
    """What ingest_job runs, without the metrics and snapshots."""
    selection = dg.AssetSelection.groups("ingest", "curation").resolve(defs.resolve_asset_graph())
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=list(selection), raise_on_error=False
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]


@pytest.fixture
def loaded(home, defs, instance, monkeypatch, tmp_path):
    """Items and one open tie escalation on item-030; the working directory is a scratch folder,
    where an executed `touch` would leave the canary."""
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    monkeypatch.chdir(tmp_path)
    give_keys(home, "reviewer-0")  # the benign reviewer signs; its key is under tmp_path/keys
    # Fresh end-user ids count fully here (newcomers' weight is test_trust's subject): 2 v 2 is a tie.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "ties.jsonl", [
        correction(f"tie-{k}", "item-030", label, user=f"tier{k}", role="end_user")
        for k, label in enumerate(["one", "one", "two", "two"])
    ])
    _ingest(defs, instance)
    return home


# --------------------------------------------------------------------------- the command line

BENIGN = {"item_id": "item-030", "escalation_id": "esc-item-030-1", "label": "two",
          "rationale": "looked at the scan", "reviewer": "reviewer-0", "version": "m0001",
          "query": "SELECT count(*) FROM items", "contributor_id": "reviewer-0",
          "sources": "no-such-labelled-file.jsonl", "size": "5", "export_file": "no-such-export.json"}


def _arguments(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        yield action


def _argv(path, parser, target, value) -> list[str]:
    """The command with `value` for `target` and a benign value for every other required argument."""
    argv = list(path)
    for action in _arguments(parser):
        needed = action.required or not action.option_strings
        given = value if action is target else BENIGN.get(action.dest) if needed else None
        if given is None:
            assert not needed, f"give `{' '.join(path)}` a benign {action.dest} in BENIGN"
            continue
        argv += [action.option_strings[0], given] if action.option_strings else [given]
    return argv


@pytest.mark.slow
def test_every_cli_argument_refuses_hostile_text_or_keeps_it_as_data(loaded, defs, instance, tmp_path, capsys):
    home = loaded
    before, files_before = _counts(home), _files(tmp_path)
    runs = {"typed": 0, "text": 0, "rollbacks": 0}
    for path, parser in leaf_commands(cli.build_parser()):
        for target in _arguments(parser):
            for value in HOSTILE:
                argv = _argv(path, parser, target, value)
                if target.type is not None or target.choices is not None:
                    # Numbers and fixed choices never reach the code: argparse refuses them.
                    with pytest.raises(SystemExit) as refused:
                        cli.main(argv)
                    assert refused.value.code == 2 and "invalid" in capsys.readouterr().err
                    runs["typed"] += 1
                    continue
                code = cli.main(argv)
                out, err = capsys.readouterr()
                runs["text"] += 1
                runs["rollbacks"] += path == ("model", "rollback")
                assert code in (0, 1, 3), argv[:3]
                assert (code == 0) == (err == ""), (argv[:3], err[:300])
                assert err == "" or err.startswith("labelloop: "), err[:300]
                # Echoed values are escaped and cut short; nothing drives the terminal.
                assert not CONTROL.search(out + err) and len(err) < 2_000, argv[:3]
    assert runs["typed"] >= 5 * len(HOSTILE) and runs["text"] >= 20 * len(HOSTILE)

    assert not Path(CANARY).exists() and not list(tmp_path.rglob(CANARY))
    # The command line never writes the database, except the audited rollback attempts; it lands
    # review attempts as files, and nothing else anywhere.
    after = _counts(home)
    assert after == {**before, "audit_log": before["audit_log"] + runs["rollbacks"]}
    new_files = _files(tmp_path) - files_before
    # `keys new --out FILE` writes the private key it is told to (a hostile name is just a name, in
    # a folder that exists; nothing is created around it), mode 0600.
    keys = {f for f in new_files if not f.startswith("home/landing/reviews/")}
    assert keys and keys <= set(HOSTILE), keys
    assert all(oct((tmp_path / f).stat().st_mode & 0o777) == "0o600" for f in keys)
    assert all((tmp_path / f).read_text().startswith("-----BEGIN PRIVATE KEY-----") for f in keys)
    new_files -= keys
    assert new_files
    rollbacks = _rows(home, "SELECT actor, target, outcome FROM audit_log WHERE action = 'model.rollback'")
    assert set(rollbacks["outcome"]) == {"refused"}
    assert {v[:256] for v in HOSTILE} <= set(rollbacks["target"])
    assert {pseudonym(pseudonymization_key(), v.strip(" \t\r\n")) for v in HOSTILE} <= set(rollbacks["actor"])

    # The next run reads every landed attempt: each is stored as data or refused, and audited.
    _ingest(defs, instance)
    assert set(_counts(home)) == set(before)
    ledger = _rows(home, "SELECT sum(records_in) AS n, sum(accepted) AS a, sum(quarantined) AS q "
                         "FROM ingested_files WHERE kind = 'reviews'").row(0)
    assert ledger[0] == len(new_files) == ledger[1] + ledger[2] and ledger[1] >= 1
    accepted = _rows(home, "SELECT decision, rationale, reviewer_pseudonym FROM review_decisions")
    assert set(accepted["rationale"]) <= set(HOSTILE)
    assert set(accepted["decision"]) <= {"accept", "reject", "defer"}
    refused = _rows(home, "SELECT count(*) AS n FROM audit_log "
                          "WHERE action LIKE 'review.%' AND outcome = 'refused'")
    assert refused["n"][0] == ledger[2]
    assert not Path(CANARY).exists()


# --------------------------------------------------------------------------- the landing zone

TEMPLATES = {
    "items": {"item_id": "it", "features": [1.0, 2.0, 3.0, 4.0], "initial_label": "zero",
              "label_source": "vendor"},
    "predictions": {"prediction_id": "pr", "item_id": "item-040", "model_version": "m0001",
                    "predicted_label": "one", "confidence": 0.5, "served_at": "2026-03-02T10:00:00+00:00"},
    "corrections": correction("ev", "item-040", "two", user="hostile-test-user", role="end_user",
                              rationale="plain words", original_label="one"),
    "reviews": {"decision_id": "rv", "escalation_id": "esc-item-030-1", "decision": "defer",
                "reviewer_id": "reviewer-0", "rationale": "plain words",
                "decided_at": "2026-03-02T12:00:00+00:00"},
}
TABLES = {"items": "items", "predictions": "predictions", "corrections": "raw_corrections",
          "reviews": "review_decisions"}
STORED_AS = {"user_id": "user_pseudonym", "reviewer_id": "reviewer_pseudonym"}


def _hostile_records() -> dict[str, list[tuple[str, str, dict]]]:
    """Per kind: (field, hostile value, record) for every text field of its contract."""
    landed = {}
    for kind, spec in contracts.SPECS.items():
        rows = []
        for field in spec.fields:
            if field.kind not in ("string", "timestamp"):
                continue
            for n, value in enumerate(HOSTILE_FIELDS):
                record = dict(TEMPLATES[kind], **{spec.key: f"{TEMPLATES[kind][spec.key]}-{field.name}-{n}"})
                signature_field = kind == "reviews" and field.name in ("key_id", "signature")
                if signature_field:  # a signed decision whose key_id or signature is then replaced
                    record = signing.sign_review(key_of("reviewer-0"), record)
                record[field.name] = value
                if kind == "reviews" and not signature_field:  # signed as landed, hostile value included
                    record = signing.sign_review(key_of("reviewer-0"), record)
                rows.append((field.name, value, record))
        landed[kind] = rows
    return landed


@pytest.mark.slow
def test_every_landing_text_field_refuses_hostile_text_or_keeps_it_verbatim(loaded, defs, instance, capsys):
    home = loaded
    before = _counts(home)
    landed = _hostile_records()
    assert set(landed) == {"items", "predictions", "corrections", "reviews"}
    for kind, rows in landed.items():
        write_jsonl(home.landing_dir(kind), f"hostile-{kind}.jsonl", [record for _, _, record in rows])
    _ingest(defs, instance)

    after = _counts(home)
    assert set(after) == set(before) and all(after[t] >= before[t] for t in before)
    assert not Path(CANARY).exists()
    key = pseudonymization_key()
    stored_total = quarantined_total = 0
    for kind, rows in landed.items():
        source = f"{kind}/hostile-{kind}.jsonl"
        stored = {r["line_no"]: r for r in _rows(home, f"SELECT * FROM {TABLES[kind]} WHERE source_file = $f",
                                                 {"f": source}).iter_rows(named=True)}
        set_aside = dict(_rows(home, "SELECT line_no, reason FROM quarantine WHERE source_file = $f",
                               {"f": source}).rows())
        for line_no, (name, value, _record) in enumerate(rows, start=1):
            # Each line is exactly one of: a stored record, a quarantined one with its reason.
            assert (line_no in stored) != (line_no in set_aside), (kind, name, value[:40])
            if line_no in set_aside:
                continue
            row = stored[line_no]
            if name in STORED_AS:
                assert row[STORED_AS[name]] == pseudonym(key, value)
            else:
                assert row[name] == value, (kind, name, value[:40])
        assert len(stored) == after[TABLES[kind]] - before[TABLES[kind]]
        stored_total += len(stored)
        quarantined_total += len(set_aside)
        # Hostile text in an id is data; in a label, a role, a time or a reference it is refused.
        assert stored and set_aside, kind
    assert after["quarantine"] - before["quarantine"] == quarantined_total
    assert stored_total + quarantined_total == sum(len(rows) for rows in landed.values())
    assert _rows(home, "SELECT item_id FROM production_corpus WHERE item_id = $i",
                 {"i": HOSTILE[0]})["item_id"].to_list() == [HOSTILE[0]]

    # Reading hostile data back: the lineage shows it as data, and a terminal is not driven by it.
    assert cli.main(["lineage", HOSTILE[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["item"][0]["item_id"] == HOSTILE[0]
    assert cli.main(["lineage", "item-040"]) == 0
    shown = capsys.readouterr().out
    assert "\ufffd[2J" in shown and not CONTROL.search(shown)


# --------------------------------------------------------------------------- SQL in the source

PACKAGE = Path(cli.__file__).resolve().parent
SQL_WORDS = re.compile(
    r"\b(?:SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|COPY|FROM|WHERE|JOIN|VALUES|CASE|WHEN|THEN|ELSE"
    r"|AND|OR|NOT|CAST|TRY_CAST|LIMIT|BETWEEN|IS NULL|IN|AS|INTERVAL|TIMESTAMPTZ)\b"
    r"|\b(?:regexp_\w+|json_\w+|list_\w+|sha256|unhex|encode|length|trim|upper|lower|coalesce|left)\("
)
# Functions that generate SQL text from the landing contracts (FieldSpec and RecordSpec constants,
# checked below to be plain identifiers and numbers) and from column names their callers pass:
# every value of a landing record is bound as a parameter or read from a registered frame.
SQL_BUILDERS = {
    ("core/validation.py", "_trim"), ("core/validation.py", "_field_columns"),
    ("core/validation.py", "_field_rules"), ("core/validation.py", "_extract"),
    ("core/validation.py", "check_records"),
    # Each timestamp field's parse, from the contract's field names (once for all its rules).
    ("core/validation.py", "_time_columns"),
    # A field as text for the payload hash, from the contract's field names.
    ("core/validation.py", "_hashed_text"),
    # Column or parameter names ($inner, $outer) from the callers; the patterns are constants.
    ("core/anonymize.py", "pseudonym_sql"), ("core/anonymize.py", "scrub_sql"),
}
# Everything else, one interpolated expression at a time.
ALLOWED = {
    # `status` binds no parameters (binding imports pandas): the SLA is a float from the validated
    # governance policy, written by Python's float(), and the clock one of two constant expressions.
    ("cli.py", "_loop_state", "float(sla_hours)"), ("cli.py", "_loop_state", "clock"),
    # The callers pass the literals "items" and "predictions".
    ("assets/ingest.py", "_ingest", "table"),
    # The column names of the Pandera schema written in core/schemas.py.
    ("assets/ingest.py", "raw_corrections", "', '.join(schema.columns)"),
    # The callers pass a literal table name and column list; the number column is from SERIALS.
    ("core/store.py", "rows_since", "columns"), ("core/store.py", "rows_since", "table"),
    ("core/store.py", "rows_since", "serial"),
    # Table, column and type names from the constant list of version-4 columns in _migrate.
    ("core/store.py", "_migrate", "table"), ("core/store.py", "_migrate", "column"),
    ("core/store.py", "_migrate", "kind"),
    # A literal written in the function; the filters themselves are bound ($kind, $reason).
    ("cli.py", "cmd_quarantine", "where"),
    # An expression over the bound $rationale and $author only.
    ("core/registry.py", "rollback", "scrub_sql('$rationale', '$author')"),
    # One of two literals, picked by the burst's scope; the key itself is bound ($key).
    ("core/bursts.py", "burst_events", "where"),
    # Table and view names from publish.PUBLISHED (checked below); a file path cannot be bound in
    # COPY ... TO, so _sql_path doubles its quotes.
    ("core/publish.py", "publish", "name"),
    ("core/publish.py", "publish", "_sql_path(tmp)"),
    ("core/publish.py", "publish", "_sql_path(target)"),
    ("core/publish.py", "publish", "_sql_path(path)"),
    # Table, key and column names written in the calling code; rows come in as a registered frame.
    ("core/store.py", "append", "table"), ("core/store.py", "append", "columns"),
    ("core/store.py", "replace", "table"),
    ("core/store.py", "lookup", "table"), ("core/store.py", "lookup", "key"),
    ("core/store.py", "lookup", "columns"),
    # The serial column of a table named in store.SERIALS, and the expression built from it.
    ("core/store.py", "append", "serial"), ("core/store.py", "append", "values"),
    ("core/store.py", "append", "_largest(table)"), ("core/store.py", "next_number", "_largest(table)"),
    ("core/store.py", "_largest", "SERIALS[table]"), ("core/store.py", "_largest", "table"),
    # Table and key names from store.KEYS, a constant.
    ("core/store.py", "duplicate_keys", "key"), ("core/store.py", "duplicate_keys", "table"),
    # Table names from store.copy_into_lake's own list or from the lake's catalog of labelloop's
    # schema, and column names from duckdb_columns() (quoted); ATTACH cannot bind a path, so its
    # quotes are doubled.
    ("core/store.py", "copy_into_lake", "t"), ("core/store.py", "copy_into_lake", "table"),
    ("core/store.py", "copy_into_lake", "names"),
    ("core/store.py", "copy_into_lake", "str(source).replace(chr(39), chr(39) * 2)"),
    # ATTACH and CREATE SECRET cannot bind values: the deployment's own catalog string, data
    # path and AWS variables, with their quotes doubled (lake._quote).
    ("core/lake.py", "_attach", "_quote(catalog)"), ("core/lake.py", "_attach", "suffix"),
    ("core/lake.py", "_s3_secret", "body"),
}


def _is_code_constant(node: ast.AST) -> bool:
    """A literal, or a module constant by convention (UPPER_CASE): fixed when the code is loaded."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, int, float))
    if isinstance(node, ast.Name):
        return node.id.lstrip("_").isupper()
    if isinstance(node, ast.Attribute):
        return node.attr.lstrip("_").isupper()
    if isinstance(node, ast.Subscript):
        return _is_code_constant(node.value) and _is_code_constant(node.slice)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _is_code_constant(node.func.value) and all(
            _is_code_constant(a) for a in [*node.args, *(k.value for k in node.keywords)])
    return False


def sql_interpolations(source: str, filename: str) -> list[tuple[str, str, str]]:
    """(file, function, expression) for every value put into SQL-looking text by an f-string,
    str.format, % or +, unless it is a code constant."""
    tree = ast.parse(source)
    texts: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            text = _literal_text(node.value, {})
            if text is not None:
                texts[node.targets[0].id] = text
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def function(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    def sql(node: ast.AST) -> bool:
        text = _literal_text(node, texts)
        return text is not None and bool(SQL_WORDS.search(text))

    found = []
    for node in ast.walk(tree):
        values: list[ast.AST] = []
        nested = isinstance(parents.get(node), (ast.JoinedStr, ast.FormattedValue))
        if isinstance(node, ast.JoinedStr) and not nested:
            if sql(node):
                values = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            if sql(node.func.value):
                values = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            if sql(node.left):
                values = [node.right]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for text, other in ((node.left, node.right), (node.right, node.left)):
                if sql(text) and _literal_text(other, texts) is None and not isinstance(other, ast.BinOp):
                    values.append(other)
        found += [(filename, function(node), ast.unparse(v)) for v in values if not _is_code_constant(v)]
    return found


def _literal_text(node: ast.AST, texts: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    if isinstance(node, ast.Name):
        return texts.get(node.id)
    return None


def _unsafe(found):
    return sorted(f for f in found if f[:2] not in SQL_BUILDERS and f not in ALLOWED)


def test_sql_is_never_built_from_values():
    found = [
        site for path in sorted(PACKAGE.rglob("*.py"))
        for site in sql_interpolations(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())
    ]
    assert len(found) > 20  # the builders and helpers above are seen
    assert _unsafe(found) == [], "bind values as parameters ($name or ?), or allow-list a constant with its reason"


def test_the_static_check_catches_a_value_put_into_sql():
    planted = '''
def find(con, item_id, rows):
    con.execute(f"SELECT * FROM items WHERE item_id = '{item_id}'")
    con.execute("SELECT * FROM items WHERE item_id = '%s'" % item_id)
    con.execute("SELECT * FROM items WHERE item_id = '{}'".format(item_id))
    con.execute("SELECT * FROM items WHERE item_id = '" + item_id + "'")
    con.execute("SELECT * FROM items WHERE item_id = ?", [item_id])
    con.execute(f"SELECT count(*) FROM {ITEMS_TABLE} LIMIT {MAX_ROWS}")
    print(f"no label history for item {item_id}")

def append(con, table, rows):
    con.execute(f"DELETE FROM {table} WHERE event_id = '{rows}'")
'''
    assert _unsafe(sql_interpolations(planted, "core/store.py")) == [
        ("core/store.py", "append", "rows"),
        *[("core/store.py", "find", "item_id")] * 4,
    ]


def test_what_the_builders_interpolate_are_plain_identifiers_and_numbers():
    identifier = re.compile(r"^[a-z_][a-z0-9_]*$")
    for spec in contracts.SPECS.values():
        assert identifier.match(spec.kind) and identifier.match(spec.key)
        for field in spec.fields:
            assert identifier.match(field.name), field.name
            assert all(identifier.match(v) for v in field.allowed or ())
            for number in (field.max_length, field.minimum, field.maximum):
                assert number is None or isinstance(number, (int, float))
    assert all(identifier.match(name) for name in publish.PUBLISHED)
