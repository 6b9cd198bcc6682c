"""The `labelloop` command line on a real home."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest

from labelloop_assets import cli
from labelloop_tests.conftest import correction, set_yaml, write_jsonl
from labelloop_tests.test_loop import _materialize

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples" / "landing"


def _loaded_home(home, defs, instance, monkeypatch):
    shutil.copytree(SAMPLES, home.landing, dirs_exist_ok=True)
    # The samples' two end users are new; here they may flip sample-04 (newcomers: test_trust_votes).
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    assert _materialize(defs, instance).success
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))


@pytest.mark.slow
def test_status_quarantine_and_lineage(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)

    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    tables = {t["table_name"]: t["rows"] for t in status["tables"]}
    assert tables["production_corpus"] == 9 and tables["quarantine"] == 3
    assert [m["model_version"] for m in status["models"]] == ["m0001"]

    assert cli.main(["quarantine", "--kind", "corrections", "--json"]) == 0
    reasons = sorted(r["reason"] for r in json.loads(capsys.readouterr().out))
    assert reasons == ["malformed_json", "no_consent", "unknown_label"]
    assert cli.main(["quarantine", "--reason", "no_consent", "--json"]) == 0
    assert [r["record_id"] for r in json.loads(capsys.readouterr().out)] == ["evt-4"]

    assert cli.main(["lineage", "sample-04", "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    versions = lineage["versions"]
    assert [(v["label"], v["valid_from_version"], v["valid_to_version"]) for v in versions] == [
        ("two", 1, 1), ("one", 1, None)
    ]
    assert sorted(versions[1]["event_ids"]) == ["evt-1", "evt-2"]
    assert versions[1]["models_trained"] == ["m0001"]
    assert lineage["item"][0]["initial_label"] == "two" and lineage["item"][0]["label_source"] == "vendor"
    # The model that served it, declared as external.
    assert [p["model_version"] for p in lineage["predictions"]] == ["baseline-v1"]
    assert {c["user_role"] for c in lineage["corrections"]} == {"end_user"}
    assert [d["status"] for d in lineage["decisions"]] == ["promote"]
    assert "dana@example.org" not in json.dumps(lineage)


@pytest.mark.slow
def test_lineage_of_unknown_item_and_missing_database(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)
    assert cli.main(["lineage", "no-such-item"]) == 1
    assert "no label history for item 'no-such-item'" in capsys.readouterr().err

    monkeypatch.setenv("LABELLOOP_HOME", str(home.root.parent / "empty"))
    try:
        cli.main(["status"])
    except SystemExit as exit_:
        assert "no database at" in str(exit_.code)
    else:
        raise AssertionError("status without a database must exit with a message")


def test_demo_needs_a_dagster_home(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    assert cli.main(["demo", "--days", "1"]) == 2
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err


def _refused(argv: list[str], capsys) -> str:
    """argparse's refusal of `argv`: exit 2, and the message."""
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert refused.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("days", ["-3", "0", "366", "99999999999999999999", "six"])
def test_demo_refuses_days_out_of_range_before_anything_runs(days, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_HOME", str(tmp_path / "home"))
    err = _refused(["demo", "--days", days], capsys)
    assert f"argument --days: invalid number '{days}': give a whole number from 1 to 365" in err
    assert "Traceback" not in err and not (tmp_path / "home").exists()


def test_every_option_and_positional_has_help():
    def parsers(parser: argparse.ArgumentParser, path: str = "labelloop"):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions}
                assert helped == set(action.choices), (
                    f"{path}: subcommands without help: {set(action.choices) - helped}"
                )
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")

    missing = [f"{path} {action.option_strings or action.dest}" for path, parser in parsers(cli.build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert not missing, missing


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"labelloop {version('labelloop')}\n"


DTYPE_ROW = re.compile(r"^[\s│┆|-]*(str|i64|i32|f64|bool|datetime\[)")


def test_tables_are_readable_and_never_cut_an_id(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)
    monkeypatch.setenv("COLUMNS", "100")  # a narrow terminal: the rows are wider than it
    assert cli.main(["quarantine", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert cli.main(["quarantine"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if DTYPE_ROW.match(line)], lines  # no Polars dtype rows
    assert not any("┆" in line or "shape:" in line for line in lines)
    text = "\n".join(lines)
    for row in rows:
        # One line a row, with its ids whole and its file named by name and line...
        whole = [f"{row['source_file'].rsplit('/', 1)[-1]}:{row['line_no']} ", row["reason"]] + (
            [row["item_id"]] if row["item_id"] else [])
        assert [line for line in lines if all(part in line for part in whole)], (row, lines)
        # ... and its detail whole, on an indented line under it when the row leaves no room for it.
        assert f"detail: {row['detail']}" in " ".join(text.split()), (row, lines)
    assert "\u2026" not in text and "evt-4" not in text  # nothing cut; record ids only in --json
    assert any(line.startswith("kind") and "file:line" in line for line in lines), lines
    assert max(map(len, lines)) <= 100, lines
    monkeypatch.setenv("COLUMNS", "200")  # room enough: the detail is a column of the table again
    assert cli.main(["quarantine"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert any(re.match(r"^kind +file:line +reason +item_id +detail$", line) for line in wide), wide
    assert not any(line.startswith("    detail:") for line in wide)

    assert cli.main(["status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^production_corpus +9$", status, re.M) and not DTYPE_ROW.search(status)


def test_quarantine_filters_every_kind_and_checks_its_reason(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)
    # A review decision that is not JSON: quarantined as a line of kind "reviews".
    write_jsonl(home.landing_dir("reviews"), "broken.jsonl", ["{not json"])
    assert _materialize(defs, instance, ["review_decisions"]).success

    for kind in ("items", "predictions", "corrections", "reviews"):
        assert cli.main(["quarantine", "--kind", kind, "--json"]) == 0
        assert {r["kind"] for r in json.loads(capsys.readouterr().out)} <= {kind}
    assert cli.main(["quarantine", "--kind", "reviews", "--json"]) == 0
    assert [(r["kind"], r["reason"]) for r in json.loads(capsys.readouterr().out)] == [("reviews", "malformed_json")]
    assert cli.main(["quarantine", "--kind", "predictions"]) == 0
    assert capsys.readouterr().out == "no quarantined rows with kind 'predictions'\n"

    err = _refused(["quarantine", "--reason", "bogus"], capsys)
    assert "invalid reason 'bogus'; the reasons are: " in err and "no_consent" in err and "malformed_json" in err
    assert cli.main(["quarantine", "--reason", "oversize_line"]) == 0
    assert capsys.readouterr().out == "no quarantined rows with reason 'oversize_line'\n"
    assert cli.main(["quarantine", "--reason", "no_consent"]) == 0
    out = capsys.readouterr().out
    assert "\n1 row\n" in out and "sample-08" in out and "1 rows" not in out


def test_counts_read_as_english(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)
    assert cli.main(["model", "list"]) == 0
    assert capsys.readouterr().out.startswith("1 model; champion: none yet\n")
    assert cli.main(["status"]) == 0
    assert "1 model trained" in capsys.readouterr().out
    assert cli.main(["review", "list"]) == 0
    assert capsys.readouterr().out == "0 open escalations, oldest first\n"
    assert cli.main(["quarantine", "--limit", "1"]) == 0
    assert "the newest 1 of 3 rows (--limit 1 reached; raise it for more)" in capsys.readouterr().out


def test_lineage_says_why_a_gold_or_quarantined_item_has_no_history(home, defs, instance, monkeypatch, capsys):
    home.gold_file.write_text(
        json.dumps({"item_id": "gold-01", "features": [0.1, 5.2, 0.0, 1.0], "gold_label": "one"}) + "\n"
    )
    # An item line that cannot be stored (too few features), and corrections of it and of the gold item.
    write_jsonl(home.landing_dir("items"), "more.jsonl", [{"item_id": "lost-07", "features": [1.0, 2.0],
                                                           "initial_label": "one", "label_source": "vendor"}])
    write_jsonl(home.landing_dir("corrections"), "more.jsonl", [
        correction("evt-g", "gold-01", "two"), correction("evt-l", "lost-07", "two")])
    _loaded_home(home, defs, instance, monkeypatch)

    assert cli.main(["lineage", "gold-01"]) == 1
    err = capsys.readouterr().err
    assert (
        "no label history for item 'gold-01': it is a gold item, held out for evaluation and never in the corpus"
        in err
    )
    assert "1 line naming it was quarantined (1 line of corrections: gold_item)" in err

    assert cli.main(["lineage", "lost-07"]) == 1
    err = capsys.readouterr().err
    assert "no label history for item 'lost-07': it is not in the store; 2 lines naming it were quarantined (" in err
    assert "1 line of items: feature_length_mismatch" in err and "1 line of corrections: unknown_item" in err
    assert "see them with `labelloop quarantine --item 'lost-07'`" in err and "not a known item" not in err
    assert cli.main(["quarantine", "--item", "lost-07", "--json"]) == 0
    assert sorted((r["kind"], r["reason"]) for r in json.loads(capsys.readouterr().out)) == [
        ("corrections", "unknown_item"), ("items", "feature_length_mismatch")]


def test_status_bursts_show_sql_and_lineage_read_plainly(home, defs, instance, monkeypatch, capsys):
    _loaded_home(home, defs, instance, monkeypatch)

    # status names the champion, or why there is none: the latest evaluation's verdict.
    assert cli.main(["model", "list", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)
    assert model["decision"] == "reject" and model["reasons"]
    assert cli.main(["status"]) == 0
    status = capsys.readouterr().out
    assert f"1 model trained; no champion yet: m0001 rejected: {model['reasons']}\n" in status
    assert re.search(r"^model +status ", status, re.M) and re.search(r"^m0001 +rejected ", status, re.M)

    # A flagged burst holds nothing: it is listed as a warning, not as awaiting a reviewer.
    from labelloop_assets.core import store

    with store.connect(home.database) as con:
        con.execute("INSERT INTO correction_volume VALUES ('2026-03-02', 'contributor', 'u_x', 9)")
        con.execute(
            "INSERT INTO correction_bursts (burst_id, day, scope, key, n_events, day_total, baseline_days, "
            "baseline_median_share, baseline_mad_share, expected, score, severity, status, reason) "
            "VALUES ('burst-test-flagged', '2026-03-02', 'contributor', 'u_x', 9, 12, 3, 0.18533421, 0.0004217, "
            "2.272650083, 4.41, 'warn', 'flagged', 'contributor u_x sent 9 of the 12 corrections')")
    assert cli.main(["review", "list", "--queue", "bursts"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("no correction burst awaiting a reviewer\n1 warning of the last 14 days, nothing held")
    assert "release or discard" not in listed and "burst-test-flagged" in listed

    # show rounds what it prints (3 decimals; a tiny fraction to 3 significant digits); --json keeps it whole.
    assert cli.main(["review", "show", "burst-test-flagged"]) == 0
    shown = capsys.readouterr().out
    assert "baseline_median_share: 0.185\n" in shown and "expected: 2.273\n" in shown
    assert "baseline_mad_share: 0.000422\n" in shown and "0.18533421" not in shown
    assert cli.main(["review", "show", "burst-test-flagged", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["burst"]["expected"] == 2.272650083

    # sql accepts the read-only queries its message names, and refuses the rest with that message.
    assert cli.main(["sql", "SHOW TABLES", "--json"]) == 0
    assert "items" in {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert cli.main(["sql", "DESCRIBE items"]) == 0 and "item_id" in capsys.readouterr().out
    assert cli.main(["sql", "SET threads = 1"]) == 3
    err = capsys.readouterr().err
    assert "exactly one SELECT or another read-only query (WITH, FROM, VALUES, TABLE, SHOW, DESCRIBE" in err

    # lineage sections read as titles, with their counts in brackets.
    assert cli.main(["lineage", "sample-04"]) == 0
    titles = [line for line in capsys.readouterr().out.splitlines() if line[:1].isupper()]
    assert titles[0] == "Item and initial label" and "Corrections set aside in quarantine: none" in titles
    assert "Resolution decisions (1)" in titles and not any(re.search(r": \d+$", t) for t in titles), titles
