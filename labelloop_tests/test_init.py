"""`labelloop init` makes a home from a team's labelled files, and the loop run on it promotes a
first model; `labelloop status` then says what holds the loop and what to do next."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from labelloop_assets import cli
from labelloop_assets.core import store
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN, correction, make_items, set_yaml, write_jsonl
from labelloop_tests.test_loop import ALL, _materialize


@pytest.fixture(autouse=True)
def _no_dagster_instance(monkeypatch):
    # `status` reads blocking checks only from an instance DAGSTER_HOME names; these homes have none.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("LABELLOOP_CATALOG", raising=False)


def _labelled(n: int) -> list[dict]:
    """n items of three well-separated classes, labelled the way a team exports them (`label`)."""
    records, _ = make_items(n, n_gold=0)
    return [{"item_id": r["item_id"], "features": r["features"], "label": r["initial_label"]} for r in records]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _init(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["init", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _status(capsys, home: Home, monkeypatch) -> tuple[dict, str]:
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    assert cli.main(["status", "--json"]) == 0
    loop = json.loads(capsys.readouterr().out)
    assert cli.main(["status"]) == 0
    return loop, capsys.readouterr().out


def test_init_then_the_loop_promotes_a_first_model(tmp_path, capsys, monkeypatch):
    records = _labelled(120)
    jsonl = _write_jsonl(tmp_path / "part1.jsonl", records[:90])
    # The rest as CSV, one column per feature, the label under the items contract's name.
    csv = tmp_path / "part2.csv"
    csv.write_text("item_id,initial_label,f0,f1,f2,f3\n" + "".join(
        f"{r['item_id']},{r['label']},{','.join(map(str, r['features']))}\n" for r in records[90:]))
    root = tmp_path / "home"

    code, out, err = _init(capsys, "--from", jsonl, csv, "--home", root)

    assert code == 0, err
    assert "read 2 files: 120 lines, 120 accepted, 0 rejected" in out
    assert "120 items in 3 classes; 30 held out as gold (one 10, two 10, zero 10); 90 landed as items" in out
    assert "the validation plan can promote" in out
    assert "dagster asset materialize" in out and "labelloop status" in out
    home = Home(root)
    assert yaml.safe_load(home.ontology_file.read_text())["labels"] == ["one", "two", "zero"]
    assert "#   zero: 40" in home.ontology_file.read_text()
    gold = [json.loads(line) for line in home.gold_file.read_text().splitlines()]
    assert sorted({g["gold_label"] for g in gold}) == ["one", "two", "zero"] and len(gold) == 30
    landed = [json.loads(line) for line in (home.landing_dir("items") / "init-items.jsonl").read_text().splitlines()]
    assert len(landed) == 90 and {r["label_source"] for r in landed} == {"init"}
    assert not {g["item_id"] for g in gold} & {r["item_id"] for r in landed}
    plan = yaml.safe_load(home.validation_file.read_text())
    assert plan["min_eval_items"] == 30 and plan["per_class_tolerance"] == 0.1

    with dg.instance_for_test() as instance:
        assert _materialize(build_definitions(home, RETRAIN), instance).success
    with store.connect(home.database_file, read_only=True) as con:
        statuses = store.frame(con, "SELECT model_version, status FROM models").rows()
    assert statuses == [("m0001", "champion")]

    loop, text = _status(capsys, home, monkeypatch)
    assert loop["champion"]["model"] == "m0001"
    assert loop["next_step"]["line"] == "nothing to do"
    assert loop["holds"]["held_bursts"] == [] and loop["holds"]["checks_checked"] is False
    assert loop["escalations"]["overdue"] == 0
    assert loop["last_runs"]["trained_at"] is not None and loop["last_runs"]["corpus_version_at"] is not None
    assert {"home", "tables", "models"} <= set(loop)  # the keys status always had
    assert "champion: m0001 (gold accuracy " in text
    assert "holds: no burst held; blocking checks not checked" in text
    assert "escalations: 0 escalations open past the 48 h SLA" in text
    assert "next step: nothing to do" in text


def test_too_few_labelled_items_say_how_many_gold_items_each_class_needs(tmp_path, capsys, monkeypatch):
    source = _write_jsonl(tmp_path / "small.jsonl", _labelled(36))  # 12 a class: 7 gold, 5 to train on
    root = tmp_path / "home"

    code, out, _ = _init(capsys, "--from", source, "--home", root)

    assert code == 0
    assert "21 held out as gold (one 7, two 7, zero 7)" in out
    assert ("too few labelled items for a promotable plan: each class needs 10 gold items (and keeps 5 to train "
            "on); gold items still needed: 3 more for class 'one', 3 more for class 'two', 3 more for class 'zero'"
            ) in out

    home = Home(root)
    with dg.instance_for_test() as instance:
        assert _materialize(build_definitions(home, RETRAIN), instance).success
    loop, text = _status(capsys, home, monkeypatch)
    assert loop["champion"]["model"] is None
    assert "only 21 evaluation items; the plan needs 30" in loop["champion"]["line"]
    assert loop["next_step"]["gold_needed"] == {"one": 3, "two": 3, "zero": 3}
    assert "next step: land more gold items: 3 more needed for class 'one' (and 2 other classes)" in text
    assert "champion: no champion yet: m0001 rejected: only 21 evaluation items" in text


def test_malformed_lines_are_named_with_file_and_line_and_the_counts_reconcile(tmp_path, capsys):
    good = _labelled(60)
    source = _write_jsonl(tmp_path / "mixed.jsonl", [
        *good[:30],
        "{not json",
        "[1, 2]",
        {"item_id": "no-features", "label": "one"},
        {"item_id": "nan", "features": [float("nan"), 1, 2, 3], "label": "one"},
        {"item_id": "short", "features": [1, 2], "label": "one"},
        {"item_id": "unlabelled", "features": [1, 2, 3, 4]},
        {"item_id": "true", "features": [1, 2, 3, 4], "label": True},
        good[0],  # the same id again
        "",
        *good[30:],
    ])

    code, out, _ = _init(capsys, "--from", source, "--home", tmp_path / "home")

    assert code == 0
    assert "read 1 file: 68 lines, 60 accepted, 8 rejected" in out
    for line, why in ((31, "not JSON"), (32, "a record must be an object, got list"),
                      (33, "no text and no features: an item carries text, features or both"),
                      (34, "features[0] is nan, not a finite number"),
                      (35, "features has 2 values; the first record has 4"),
                      (36, "no label: give one of label, initial_label, gold_label"),
                      (37, "label must be a string, got bool"),
                      (38, f"item_id 'item-000' repeats {source}:1")):
        assert f"{source}:{line}: {why}" in out
    assert len((tmp_path / "home" / "gold.jsonl").read_text().splitlines()) == 30


def test_bad_input_is_refused_with_a_message_and_makes_no_home(tmp_path, capsys):
    root = tmp_path / "home"
    code, _, err = _init(capsys, "--from", tmp_path / "missing.jsonl", "--home", root)
    assert (code, err.strip()) == (1, f"labelloop: {tmp_path / 'missing.jsonl'}: no such file")
    one_class = _write_jsonl(tmp_path / "one.jsonl", [r for r in _labelled(30) if r["label"] == "one"])
    code, _, err = _init(capsys, "--from", one_class, "--home", root)
    assert code == 1 and "at least two classes" in err
    assert not root.exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["init", "--from", str(one_class), "--gold", "10", "--gold-fraction", "0.2"])
    assert exit_.value.code == 2


def test_an_existing_home_is_not_overwritten_without_force(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "items.jsonl", _labelled(120))
    root = tmp_path / "home"
    assert _init(capsys, "--from", source, "--home", root)[0] == 0
    gold = (root / "gold.jsonl").read_text()

    code, _, err = _init(capsys, "--from", source, "--home", root, "--seed", "5")
    assert code == 1 and "is not empty" in err and "--force" in err
    assert (root / "gold.jsonl").read_text() == gold

    code, out, _ = _init(capsys, "--from", source, "--home", root, "--seed", "5", "--force")
    assert code == 0 and (root / "gold.jsonl").read_text() != gold  # another seed, another sample

    # Once a store has declared the gold items they cannot be rewritten, --force or not.
    store.connect(Home(root).database_file).close()
    code, _, err = _init(capsys, "--from", source, "--home", root, "--force")
    assert code == 1 and "already holds a store" in err


def test_status_names_a_failing_blocking_check_from_the_dagster_instance(tmp_path, capsys, monkeypatch):
    source = _write_jsonl(tmp_path / "items.jsonl", _labelled(120))
    root = tmp_path / "home"
    assert _init(capsys, "--from", source, "--home", root)[0] == 0
    home = Home(root)
    # A persistent instance, found the way `status` finds it: DAGSTER_HOME and its storage folder.
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("LABELLOOP_DAGSTER_STORAGE", str(dagster_home))
    correction_file = home.landing_dir("corrections") / "c1.jsonl"
    correction_file.write_text(json.dumps({
        "event_id": "e-1", "item_id": landed_id(home), "corrected_label": "two", "user_id": "alice",
        "user_role": "end_user", "source": "annotation", "consent": True, "created_at": "2026-03-02T10:00:00+00:00",
    }) + "\n")
    defs = build_definitions(home, RETRAIN)
    with dg.DagsterInstance.get() as instance:
        assert _materialize(defs, instance).success
        # The ontology drops "two": the next batch's staged correction breaks validated_labels' schema.
        correction_file.with_name("c2.jsonl").write_text(correction_file.read_text().replace("e-1", "e-2"))
        assert _materialize(defs, instance, ["raw_corrections"]).success
        home.ontology_file.write_text("labels: [one, zero]\nrenames: {}\n")
        assert not _materialize(defs, instance, ["validated_labels"], raise_on_error=False).success

    loop, text = _status(capsys, home, monkeypatch)
    assert loop["holds"]["checks_checked"] is True
    assert loop["holds"]["failing_blocking_checks"] == ["validated_labels:validated_labels_schema"]
    assert "holds: no burst held; check validated_labels:validated_labels_schema failing" in text
    assert "next step: fix what fails check validated_labels:validated_labels_schema" in text


def landed_id(home: Home) -> str:
    first = (home.landing_dir("items") / "init-items.jsonl").read_text().splitlines()[0]
    return json.loads(first)["item_id"]


def test_status_counts_escalations_past_the_sla_and_sends_the_reviewer_to_them(tmp_path, capsys, monkeypatch):
    source = _write_jsonl(tmp_path / "items.jsonl", _labelled(120))
    root = tmp_path / "home"
    assert _init(capsys, "--from", source, "--home", root)[0] == 0
    home = Home(root)
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    # Two against two: a tie the resolver escalates to a reviewer (48 hours SLA).
    item = landed_id(home)
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [
        correction(f"e-{k}", item, label, user=f"user{k}", role="end_user")
        for k, label in enumerate(["one", "one", "two", "two"])])
    with dg.instance_for_test() as instance:
        assert _materialize(build_definitions(home, RETRAIN), instance, [*ALL, "escalations"]).success
    loop, _ = _status(capsys, home, monkeypatch)
    assert loop["escalations"]["overdue"] == 0  # opened just now

    with store.connect(home.database_file) as con:  # three days pass without a review
        con.execute("UPDATE escalations SET opened_at = opened_at - INTERVAL 3 DAY")
    loop, text = _status(capsys, home, monkeypatch)
    assert loop["escalations"]["overdue"] == 1
    assert "escalations: 1 escalation open past the 48 h SLA" in text
    assert "next step: review 1 overdue escalation: labelloop review list" in text


def test_text_files_are_read_as_ingest_reads_them(tmp_path, capsys):
    """Line breaks inside text survive, a byte-order mark is not part of a column name, and text
    that ingest would refuse is refused here, so the counts init reports are the corpus's."""
    texts = [f"a review that is {'good' if i % 2 else 'bad'} number {i}" for i in range(60)]
    source = tmp_path / "reviews.jsonl"
    records = [{"item_id": f"r{i}", "text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(texts)]
    records[0]["text"] = "first line\u2028second line"  # legal inside a JSON string: not a line break
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.append('{"item_id": "bad", "text": "broken \\ud800 surrogate", "label": "neg"}')
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _ = _init(capsys, "--from", source, "--home", tmp_path / "home")
    assert code == 0
    assert "read 1 file: 61 lines, 60 accepted, 1 rejected" in out
    assert f"{source}:61: text holds an unpaired surrogate: not valid Unicode text" in out
    assert _written_texts(tmp_path / "home")["r0"] == "first line\u2028second line"

    # A spreadsheet's CSV: a byte-order mark, and a quoted text with a line break in it.
    csv = tmp_path / "export.csv"
    rows = "".join(f'r{i},"{t}",{"pos" if i % 2 else "neg"}\r\n' for i, t in enumerate(texts))
    csv.write_bytes(b"\xef\xbb\xbf" + ('item_id,text,label\r\nm0,"two\nlines",neg\r\n' + rows).encode())
    code, out, _ = _init(capsys, "--from", csv, "--home", tmp_path / "csv-home")
    assert code == 0 and "read 1 file: 61 lines, 61 accepted, 0 rejected" in out
    assert _written_texts(tmp_path / "csv-home")["m0"] == "two\nlines"

    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("item_id;text;label\nx1;hello;pos\n")
    code, _, err = _init(capsys, "--from", semicolons, "--home", tmp_path / "x")
    assert code == 1 and "the header has no item_id column (columns found: 'item_id;text;label')" in err
    code, _, err = _init(capsys, "--from", "/dev/null", "--home", tmp_path / "y")
    assert code == 1 and "/dev/null: not a regular file" in err


def _written_texts(root: Path) -> dict[str, str]:
    """item_id -> text of every item init wrote (gold and landing), read as ingest reads lines."""
    data = (root / "gold.jsonl").read_bytes() + (root / "landing" / "items" / "init-items.jsonl").read_bytes()
    return {r["item_id"]: r["text"] for r in map(json.loads, filter(None, data.split(b"\n")))}
