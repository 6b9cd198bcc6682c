"""The evaluation set: gold is declared by the deployment (gold.jsonl), versioned, append-only, and
its features never reach training."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import polars as pl
import pytest

from labelloop_assets.core import contracts, gold, store, train
from labelloop_assets.core.evaluation import ValidationPlan
from labelloop_assets.core.settings import file_sha256
from labelloop_assets.demo import simulator
from labelloop_assets.jobs import RETRAIN_JOB
from labelloop_assets.sensors import landing_sensor
from labelloop_tests.conftest import LABELS, correction, land_and_train, land_items, make_items, write_jsonl


def _rows(home, sql, params=None) -> pl.DataFrame:
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _run(defs, instance, job: str, succeed: bool = True) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
    if succeed:
        assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _metadata(result, asset: str) -> dict:
    for event in reversed(result.get_asset_materialization_events()):
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"{asset} did not materialize")


def _failure(result) -> str:
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failures, "the run was expected to fail"
    return failures[0].step_failure_data.error.message


def _new_corpus_version(home, defs, instance, tag: str) -> None:
    """A reviewer confirms two labels: a new corpus version, and with it the next challenger."""
    write_jsonl(home.landing_dir("corrections"), f"{tag}.jsonl", [
        correction(f"{tag}-1", "item-020", "two", user="rita"),
        correction(f"{tag}-2", "item-021", "zero", user="rita"),
    ])
    _run(defs, instance, "ingest_job")


def _gold_lines(home) -> list[dict]:
    return [json.loads(line) for line in home.gold_file.read_text().splitlines() if line.strip()]


def _write_gold(home, records: list[dict]) -> None:
    home.gold_file.write_text("".join(json.dumps(r) + "\n" for r in records))


def _build_loop(home, defs, instance) -> dg.ExecuteInProcessResult:
    return land_and_train(home, defs, instance)[0]


@pytest.fixture
def loop(trained_world, home, defs, instance):
    """15 gold items declared in gold.jsonl, 45 landed items, and a first champion (m0001); the
    ingest's result. Built once for the module (conftest.TrainedWorld): `home` and `instance` are
    a fresh copy of it for each test."""
    if trained_world is not None:
        return trained_world.ingested
    return _build_loop(home, defs, instance)


@pytest.fixture
def loop_built_here(home, defs, instance):
    """The same state built in this test's own home: the landing sensor knows files by their
    inode's change time, which a copy cannot keep (to it, every file of a copy is new)."""
    return _build_loop(home, defs, instance)


@pytest.mark.slow
def test_the_first_declaration_is_evaluation_set_1(home, loop):
    items = _metadata(loop, "items")
    assert (items["evaluation_set"], items["n_gold"], items["n_gold_added"]) == (1, 15, 15)
    sets = _rows(home, "SELECT evaluation_set, sha256, n_items, n_added FROM evaluation_sets")
    assert sets.rows() == [(1, file_sha256(home.gold_file.read_bytes()), 15, 15)]
    declared = _rows(home, "SELECT count(*) AS n, min(source_file) AS f FROM items WHERE gold_label IS NOT NULL")
    assert declared.row(0) == (15, "gold.jsonl")
    evaluation = _rows(home, "SELECT evaluation_set, n_eval FROM model_evaluations")
    assert evaluation.rows() == [(1, 15)]


@pytest.mark.slow
def test_a_landing_file_cannot_declare_gold(home, defs, instance, loop):
    """The attack: 1,200 new items carrying gold_label, every label wrong for its features, would
    have made the champion look bad (and any challenger trained to agree with them look good)."""
    before = _rows(home, "SELECT challenger_scores FROM model_evaluations")["challenger_scores"][0]
    rng = np.random.default_rng(5)
    forged = [
        {"item_id": f"forged-{k:04d}", "features": (np.eye(4)[k % 3] * 6 + rng.normal(size=4)).round(3).tolist(),
         "gold_label": LABELS[(k + 1) % 3]}
        for k in range(1_200)
    ]
    write_jsonl(home.landing_dir("items"), "more-gold.jsonl", forged)
    result = _run(defs, instance, "ingest_job")

    items = _metadata(result, "items")
    assert (items["records_in"], items["accepted"], items["quarantined"]) == (1_200, 0, 1_200)
    assert (items["evaluation_set"], items["n_gold"], items["n_gold_added"]) == (1, 15, 0)
    refused = _rows(home, "SELECT reason, detail, count(*) AS n FROM quarantine WHERE kind = 'items' GROUP BY ALL")
    assert refused.rows() == [(
        contracts.GOLD_NOT_DECLARED,
        "gold_label: gold items are declared in gold.jsonl by the deployment, not by landing files", 1_200,
    )]
    assert _rows(home, "SELECT count(*) AS n FROM items WHERE gold_label IS NOT NULL")["n"][0] == 15
    assert _rows(home, "SELECT count(*) AS n FROM evaluation_sets")["n"][0] == 1

    # The next comparison still scores the champion on the 15 declared items, as before.
    _new_corpus_version(home, defs, instance, "v2")
    _run(defs, instance, RETRAIN_JOB)
    latest = _rows(home, "SELECT * FROM model_evaluations ORDER BY evaluation_id DESC LIMIT 1").row(0, named=True)
    assert (latest["champion"], latest["evaluation_set"], latest["n_eval"]) == ("m0001", 1, 15)
    assert json.loads(latest["champion_scores"])["accuracy"] == json.loads(before)["accuracy"] == 1.0


@pytest.mark.slow
def test_a_landing_item_cannot_reuse_a_gold_items_id(home, defs, instance, loop):
    write_jsonl(home.landing_dir("items"), "reuse.jsonl", [
        {"item_id": "item-000", "features": [9.0, 9.0, 9.0, 9.0], "initial_label": "two"},
        {"item_id": "fresh-1", "features": [6.0, 0.1, 0.2, 0.3], "initial_label": "zero"},
    ])
    items = _metadata(_run(defs, instance, "ingest_job"), "items")
    assert (items["accepted"], items["quarantined"]) == (1, 1)
    refused = _rows(home, "SELECT item_id, reason FROM quarantine WHERE kind = 'items'")
    assert refused.rows() == [("item-000", contracts.GOLD_ITEM)]
    stored = _rows(home, "SELECT features, gold_label FROM items WHERE item_id = 'item-000'")
    assert stored["gold_label"].to_list() == ["zero"] and stored["features"][0].to_list() != [9.0] * 4


@pytest.mark.slow
def test_adding_gold_starts_set_2_and_both_models_are_scored_on_it(home, defs, instance, loop):
    first = _rows(home, "SELECT champion_scores, challenger_scores FROM model_evaluations").row(0, named=True)
    assert json.loads(first["challenger_scores"])["n"] == 15  # m0001 was promoted on set 1
    # The deployment adds 15 gold items; 5 of them are hard (features of one class, labelled as
    # another), so a model's score on set 2 differs from its score on set 1.
    rng = np.random.default_rng(11)
    added = [
        {"item_id": f"gold2-{k:02d}", "features": (np.eye(4)[k % 3] * 6 + rng.normal(size=4)).round(3).tolist(),
         "gold_label": LABELS[(k + 1) % 3] if k < 5 else LABELS[k % 3]}
        for k in range(15)
    ]
    _write_gold(home, _gold_lines(home) + added)

    _new_corpus_version(home, defs, instance, "v2")
    sets = _rows(home, "SELECT evaluation_set, n_items, n_added FROM evaluation_sets ORDER BY 1")
    assert sets.rows() == [(1, 15, 15), (2, 30, 15)]
    result = _run(defs, instance, RETRAIN_JOB)

    evaluation = _metadata(result, "model_evaluation")
    assert (evaluation["evaluation_set"], evaluation["n_eval"]) == (2, 30)
    assert evaluation["champion_rescored"] == (
        "m0001 rescored on set 2; last scored on set 1 (another set: its stored score is not comparable)"
    )
    latest = _rows(home, "SELECT * FROM model_evaluations ORDER BY evaluation_id DESC LIMIT 1").row(0, named=True)
    champion, challenger = json.loads(latest["champion_scores"]), json.loads(latest["challenger_scores"])
    assert (latest["champion"], latest["evaluation_set"]) == ("m0001", 2)
    assert champion["n"] == challenger["n"] == 30
    # Rescored: m0001 was at 1.0 on set 1; on set 2 it misses (at least) the 5 hard items.
    assert champion["accuracy"] <= 25 / 30 < json.loads(first["challenger_scores"])["accuracy"]
    # The registry's gold metrics follow both models to set 2 (what status and dashboards show).
    stored = _rows(home, "SELECT model_version, n_gold, gold_accuracy FROM models ORDER BY 1")
    assert stored.rows() == [("m0001", 30, pytest.approx(champion["accuracy"])),
                             ("m0002", 30, pytest.approx(challenger["accuracy"]))]
    # The release notes and the recorded policies name what the decision used.
    notes = _rows(home, "SELECT markdown FROM release_notes ORDER BY evaluation_id DESC LIMIT 1")["markdown"][0]
    assert "Both models scored on evaluation set 2 (30 gold items)." in notes
    used = dict(_rows(
        home, "SELECT file, sha256 FROM policy_uses WHERE step = 'model_evaluation' AND run_id = ?", [result.run_id]
    ).iter_rows())
    assert used == {name: file_sha256((home.root / name).read_bytes()) for name in ("validation.yaml", "training.yaml")}


def test_an_edited_gold_file_wakes_the_landing_sensor(home, instance, resources, loop_built_here):
    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
            return landing_sensor(context)

    # The loop's ingest runs recorded the listing and gold.jsonl they read: nothing new, no run.
    assert isinstance(tick(), dg.SkipReason)
    _write_gold(home, _gold_lines(home) + [{"item_id": "gold2-00", "features": [6.0, 0, 0, 0], "gold_label": "zero"}])
    woken = tick()
    assert isinstance(woken, dg.SensorResult) and len(woken.run_requests) == 1
    assert woken.run_requests[0].tags["labelloop/gold_changed"] == "true"
    assert isinstance(tick(woken.cursor), dg.SkipReason)


@pytest.mark.slow
def test_changing_or_dropping_declared_gold_fails_the_step(home, defs, instance, loop):
    declared = _gold_lines(home)
    original = home.gold_file.read_bytes()
    changed = [dict(r, gold_label="two") if r["item_id"] == "item-000" else r for r in declared]
    _write_gold(home, changed)
    message = _failure(_run(defs, instance, "ingest_job", succeed=False))
    assert "line 1: gold item 'item-000' changed its label from 'zero' to 'two'" in message
    assert "append-only" in message and "new item_id" in message and "meaningless" in message

    moved = [dict(r, features=[0.0, 0.0, 0.0, 1.0]) if r["item_id"] == "item-003" else r for r in declared]
    _write_gold(home, moved)
    assert "line 4: gold item 'item-003' changed its text, features or uri" in _failure(
        _run(defs, instance, "ingest_job", succeed=False)
    )
    # The payload's address is part of the yardstick too: the team's code reads the item there.
    pointed = [dict(r, uri="s3://elsewhere/item-005.png") if r["item_id"] == "item-005" else r for r in declared]
    _write_gold(home, pointed)
    assert "gold item 'item-005' changed its text, features or uri" in _failure(
        _run(defs, instance, "ingest_job", succeed=False)
    )
    _write_gold(home, declared[1:])
    assert "1 declared gold item(s) are no longer in the file: 'item-000'" in _failure(
        _run(defs, instance, "ingest_job", succeed=False)
    )
    home.gold_file.unlink()
    assert "gold.jsonl is missing, but evaluation set 1 declared 15 gold item(s)" in _failure(
        _run(defs, instance, "ingest_job", succeed=False)
    )
    # Nothing moved: one evaluation set, the declared labels.
    assert _rows(home, "SELECT count(*) AS n FROM evaluation_sets")["n"][0] == 1
    assert _rows(home, "SELECT gold_label FROM items WHERE item_id = 'item-000'")["gold_label"][0] == "zero"
    # Restored as it was, the file is the same set again, and ingest goes on.
    home.gold_file.write_bytes(original)
    assert _metadata(_run(defs, instance, "ingest_job"), "items")["evaluation_set"] == 1


def test_bad_lines_in_gold_jsonl_fail_the_step_naming_them(home, defs, instance):
    records, _ = make_items()
    land_items(home, records)
    lines = home.gold_file.read_text().splitlines()
    lines[2] = '{"item_id": "item-002", "features": [1, 2, 3, 4], "gold_label": "eleven"}'
    lines[5] = '{"item_id": "item-005", "features": [1, 2'
    lines.append(lines[0])  # item-000 declared twice
    lines.append('{"item_id": "wide", "features": [1, 2, 3, 4, 5], "gold_label": "one"}')
    lines.append('{"item_id": "no-label", "features": [1, 2, 3, 4]}')
    home.gold_file.write_text("\n".join(lines) + "\n")
    result = _run(defs, instance, "ingest_job", succeed=False)
    message = _failure(result)
    assert "has 5 bad line(s)" in message
    for expected in ("line 3: gold_label 'eleven' is not in the ontology", "line 6: malformed_json",
                     "line 16: item_id 'item-000' already declared on line 1",
                     "line 17: features: 5 values, this deployment uses 4",
                     "line 18: missing_field (gold_label)", "no line of it is skipped"):
        assert expected in message
    assert _rows(home, "SELECT count(*) AS n FROM items")["n"][0] == 0  # the step wrote nothing


def test_gold_jsonl_must_be_a_regular_file(home, defs, instance, tmp_path):
    elsewhere = tmp_path / "anyone-can-write.jsonl"
    elsewhere.write_text(json.dumps({"item_id": "g", "features": [1, 2, 3, 4], "gold_label": "one"}) + "\n")
    home.gold_file.symlink_to(elsewhere)
    message = _failure(_run(defs, instance, "ingest_job", succeed=False))
    assert "gold.jsonl is a symbolic link; gold.jsonl must be a regular file in the home" in message
    assert _rows(home, "SELECT count(*) AS n FROM evaluation_sets")["n"][0] == 0


def test_a_gold_item_must_be_new(home, defs, instance, loop):
    """Declaring an item the model was trained on as gold would score it on what it learned."""
    _write_gold(home, _gold_lines(home) + [{"item_id": "item-030", "features": [6.0, 0, 0, 0], "gold_label": "zero"}])
    message = _failure(_run(defs, instance, "ingest_job", succeed=False))
    assert "line 16: 'item-030' is already an ordinary item" in message


@pytest.mark.slow
def test_copies_of_gold_features_are_found_recorded_and_not_trained_on(home, defs, instance):
    records, _ = make_items()
    by_id = {r["item_id"]: r for r in records}
    exact = by_id["item-000"]["features"]
    near = (np.array(by_id["item-001"]["features"]) + [0.01, -0.01, 0.01, 0.0]).tolist()
    ordinary = (np.array(by_id["item-030"]["features"]) + 0.3).tolist()  # a genuine neighbour
    land_items(home, records + [
        {"item_id": "copy-exact", "features": exact, "initial_label": "zero"},
        {"item_id": "copy-near", "features": near, "initial_label": "one"},
        {"item_id": "ordinary", "features": ordinary, "initial_label": "zero"},
    ])
    _run(defs, instance, "ingest_job")
    result = _run(defs, instance, RETRAIN_JOB)

    copies = _rows(home, "SELECT item_id, gold_item_id, kind, distance FROM gold_copies ORDER BY item_id")
    assert copies.select("item_id", "gold_item_id", "kind").rows() == [
        ("copy-exact", "item-000", "exact"), ("copy-near", "item-001", "near")
    ]
    assert copies["distance"][0] == 0.0 and 0 < copies["distance"][1] < 0.1
    model = _metadata(result, "retrained_model")
    assert (model["gold_copies_excluded"], model["gold_copies"]) == (2, {"exact": 1, "near": 1})
    # 45 landed items + the ordinary one; the copies are in the corpus but not in the training rows.
    assert model["n_train_rows"] == 46
    corpus = _rows(home, "SELECT item_id, label FROM production_corpus ORDER BY item_id")
    assert {"copy-exact", "copy-near", "ordinary"} <= set(corpus["item_id"])
    expected = train.training_data_hash(corpus.filter(~pl.col("item_id").is_in(["copy-exact", "copy-near"])))
    assert _rows(home, "SELECT train_data_hash FROM models")["train_data_hash"][0] == expected
    _, saved = train.load(home.models / "m0001")
    assert (saved["gold_copies_excluded"], saved["evaluation_set"]) == (2, 1)

    # The next training finds them again and records nothing twice.
    _new_corpus_version(home, defs, instance, "v2")
    _run(defs, instance, RETRAIN_JOB)
    assert _rows(home, "SELECT count(*) AS n FROM gold_copies")["n"][0] == 2
    assert _rows(home, "SELECT n_train_rows FROM models ORDER BY model_version")["n_train_rows"].to_list() == [46, 46]


def test_the_near_copy_threshold_on_the_demo_world():
    """The default (0.1 of the gold set's spacing) on the demo's digits: no genuine item is a near
    copy (the closest is 0.25), while gold items with pixel noise of sd 0.1 (pixels are 0..16) are."""
    world = simulator.build_world()
    frame = pl.DataFrame({"item_id": world.item_ids, "features": world.features.tolist()})
    gold_items, corpus = frame.filter(pl.Series(world.gold)), frame.filter(~pl.Series(world.gold))
    threshold = ValidationPlan().gold_copy_distance

    genuine = gold.find_gold_copies(corpus, gold_items, threshold)
    assert genuine.copies.height == 0
    closest = gold.find_gold_copies(corpus, gold_items, 0.99).copies["distance"].min()
    assert 0.2 < closest < 0.3  # 2.5 times the threshold: a margin for other data sets like it

    noisy = world.features[world.gold] + np.random.default_rng(0).normal(scale=0.1, size=(world.gold.sum(), 64))
    copies = pl.DataFrame({"item_id": [f"copy-{i}" for i in range(len(noisy))], "features": noisy.tolist()})
    found = gold.find_gold_copies(copies, gold_items, threshold)
    assert found.counts() == {"exact": 0, "near": int(world.gold.sum())}
    assert (found.copies["gold_item_id"].to_numpy() == world.item_ids[world.gold][
        [int(i.split("-")[1]) for i in found.copies["item_id"]]
    ]).all()
