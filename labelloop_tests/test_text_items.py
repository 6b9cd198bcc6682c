"""A team with labelled text: `labelloop init`, one materialization, a promoted champion that
serves strings, and a label-issue queue that finds the labels planted wrong."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest

from labelloop_assets import cli, serving
from labelloop_assets.core import store
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN
from labelloop_tests.test_loop import ALL, _materialize
from labelloop_tests.test_pipelines import reviews

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_dagster_instance(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("LABELLOOP_CATALOG", raising=False)


def test_labelled_text_goes_from_init_to_a_champion_and_a_label_issue_queue(tmp_path, capsys, monkeypatch):
    frame, truth = reviews(400, seed=7)
    labels = truth.copy()
    flipped = np.arange(0, 400, 10)  # 40 labels planted wrong, none of them chosen by how they read
    labels[flipped] = np.where(labels[flipped] == "fresh", "rotten", "fresh")
    source = tmp_path / "tickets.jsonl"
    source.write_text("".join(
        json.dumps({"item_id": i, "text": t, "label": str(label), "uri": f"s3://reviews/{i}.txt"}) + "\n"
        for i, t, label in zip(frame["item_id"], frame["text"], labels, strict=True)
    ))
    root = tmp_path / "home"

    assert cli.main(["init", "--from", str(source), "--home", str(root)]) == 0
    out = capsys.readouterr().out
    assert "items carry text: trained by default with TF-IDF + logistic regression" in out
    home = Home(root)
    with dg.instance_for_test() as instance:
        assert _materialize(build_definitions(home, RETRAIN), instance, [*ALL, "label_issue_candidates"]).success

    with store.connect(home.database_file, read_only=True) as con:
        model = store.frame(con, "SELECT model_version, status, algorithm, gold_accuracy FROM models").row(0)
        queue = store.frame(con, "SELECT item_id, rank FROM label_issue_candidates ORDER BY rank")
        stored = store.frame(con, "SELECT count(*) AS n, count(text) AS texts, count(features) AS vectors, "
                                  "count(uri) AS uris FROM items").row(0, named=True)
    assert model[:3] == ("m0001", "champion", "tfidf_vectorizer+logistic_regression")
    assert model[3] >= 0.85  # gold labels come from the same files, 10% planted wrong
    assert stored == {"n": 400, "texts": 400, "vectors": 0, "uris": 400}
    # The top of the queue is mostly the planted wrong labels (among training items; gold ones are
    # held out and were labelled wrong on purpose too, so the queue cannot hold all 40).
    planted = {f"r{i}" for i in flipped}
    top = queue.head(30)["item_id"].to_list()
    assert len(set(top) & planted) >= 20, top

    champion = serving.Champion.load(home)
    assert champion.reads == "text" and champion.feature_length is None
    labels_out, confidence = champion.predict(["a wonderful brilliant film", "dull and tedious"])
    assert labels_out == ["fresh", "rotten"] and (confidence > 0.5).all()
    with pytest.raises(serving.ServingError, match="item 0: m0001 reads text; give a non-empty string"):
        champion.predict([[1.0, 2.0]])
    monkeypatch.setenv("LABELLOOP_HOME", str(root))
    # Label lineage names what the item carries, its text and where its payload is.
    trained_on = queue["item_id"][0]
    assert cli.main(["lineage", trained_on, "--json"]) == 0
    item = json.loads(capsys.readouterr().out)["item"][0]
    assert (item["carries"], item["uri"]) == ("text", f"s3://reviews/{trained_on}.txt")
    assert item["text"] == frame.filter(frame["item_id"] == trained_on)["text"].item()
    assert cli.main(["model", "current", "--json"]) == 0
    current = json.loads(capsys.readouterr().out)
    assert current["reads"] == "text" and current["pipeline"].startswith("TfidfVectorizer(")
