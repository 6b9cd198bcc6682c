"""External trainers: training.yaml names the team's own command, retrained_model runs it through
Dagster Pipes (a real subprocess in a real in-process run), and what it reports back is checked
strictly before the gate judges it like any other challenger."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from labelloop_assets import cli, serving
from labelloop_assets.core import external, store, train
from labelloop_assets.core.settings import Home, LabelloopConfigError
from labelloop_assets.definitions import build_definitions
from labelloop_assets.jobs import RETRAIN_JOB
from labelloop_tests.conftest import RETRAIN, land_items, make_items, prepared_home
from labelloop_tests.test_loop import _materialize

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "trainer" / "train.py"


# ----------------------------------------------------------------------------- training.yaml's trainer


def _config(tmp_path: Path, text: str) -> train.TrainingConfig:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    return train.TrainingConfig.load(path)


def test_a_trainer_is_read_from_training_yaml(tmp_path):
    config = _config(tmp_path, "trainer:\n  command: [python, trainer/train.py, --seed, '3']\n"
                               "  timeout_seconds: 600\n")
    assert config.trainer == external.TrainerConfig(("python", "trainer/train.py", "--seed", "3"), 600.0)
    assert config.trainer.argv()[1:] == ["trainer/train.py", "--seed", "3"]
    assert _config(tmp_path, "pipeline: auto\n").trainer is None


@pytest.mark.parametrize(("text", "reason"), [
    ("trainer: [python, train.py]\n", "trainer must be a mapping with command"),
    ("trainer:\n  command: [python]\n  retries: 2\n", r"unknown keys \['retries'\]"),
    ("trainer:\n  command: []\n", "trainer.command must be a non-empty list"),
    ("trainer:\n  command: python train.py\n", "trainer.command must be a non-empty list"),
    ("trainer:\n  command: [python, 5]\n", "command argument 2 must be non-empty text, not 5"),
    ("trainer:\n  command: [python, '']\n", "command argument 2 must be non-empty text"),
    ("trainer:\n  command: [python]\n  timeout_seconds: 0\n", "timeout_seconds must be above 0"),
    ("trainer:\n  command: [python]\n  timeout_seconds: soon\n", "timeout_seconds must be a finite number"),
])
def test_a_wrong_trainer_is_refused_with_the_reason(tmp_path, text, reason):
    with pytest.raises(LabelloopConfigError, match=reason):
        _config(tmp_path, text)


def test_an_edited_training_script_is_another_configuration(tmp_path):
    (tmp_path / "train.py").write_text("print('v1')\n")
    trainer = external.TrainerConfig(("python", "train.py"))
    first = trainer.recorded(tmp_path)
    (tmp_path / "train.py").write_text("print('v2')\n")
    assert trainer.recorded(tmp_path) != first
    assert json.loads(first)["command"] == ["python", "train.py"]


# ----------------------------------------------------------------------------- the probabilities file


def _probabilities(tmp_path: Path, frame: pl.DataFrame) -> Path:
    path = tmp_path / "p.parquet"
    frame.write_parquet(path)
    return path


TRAIN_IDS, GOLD_IDS = pl.Series(["a", "b"]), pl.Series(["g"])


@pytest.mark.parametrize(("frame", "reason"), [
    (pl.DataFrame({"item_id": ["a", "b"], "x": [0.5, 0.5], "y": [0.5, 0.5]}), r"lacks 1 gold item\(s\), e.g. 'g'"),
    (pl.DataFrame({"item_id": ["a", "b", "g"], "x": [0.5, 0.2, 1.0], "y": [0.5, 0.7, 0.0]}),
     r"1 row\(s\) do not sum to 1 .* e.g. item 'b' sums to 0.9"),
    (pl.DataFrame({"item_id": ["a", "b", "g"], "x": [0.5, 1.5, 1.0], "y": [0.5, -0.5, 0.0]}),
     r"not finite numbers in \[0, 1\], e.g. item 'b'"),
    (pl.DataFrame({"item_id": ["a", "b", "g"], "x": [0.5, float("nan"), 1.0], "y": [0.5, 0.5, 0.0]}),
     "not finite numbers"),
    (pl.DataFrame({"item_id": ["a", "b", "g"], "x": [1.0] * 3}), "one column per class .*; missing: y"),
    (pl.DataFrame({"item_id": ["a", "b", "g"], "x": [1.0] * 3, "y": [0.0] * 3, "z": [0.0] * 3}), "unknown: z"),
    (pl.DataFrame({"item_id": ["a", "a", "b", "g"], "x": [1.0] * 4, "y": [0.0] * 4}), "appear more than once"),
    (pl.DataFrame({"item_id": ["a", "b", "g", "q"], "x": [1.0] * 4, "y": [0.0] * 4}), "did not hand the trainer"),
    (pl.DataFrame({"item_id": [1, 2, 3], "x": [1.0] * 3, "y": [0.0] * 3}), "item_id must be text"),
])
def test_probabilities_are_checked_strictly(tmp_path, frame, reason):
    with pytest.raises(external.TrainerOutputError, match=reason):
        external.check_probabilities(_probabilities(tmp_path, frame), ["x", "y"], TRAIN_IDS, GOLD_IDS)


def test_checked_probabilities_answer_by_item_id_and_refuse_unknown_items(tmp_path):
    frame = pl.DataFrame({"item_id": ["g", "b", "a"], "y": [0.25, 0.0, 1.0], "x": [0.75, 1.0, 0.0]})
    checked = external.check_probabilities(_probabilities(tmp_path, frame), ["x", "y"], TRAIN_IDS, GOLD_IDS)
    assert checked.columns == ["item_id", "x", "y"] and checked["item_id"].to_list() == ["a", "b", "g"]
    folder = train.save_external(checked, tmp_path / "m0001", {"model_version": "m0001", "reference": "s3://m/1"})
    model, metadata = train.load(folder)
    assert metadata["trainer"] == "external" and model.classes.tolist() == ["x", "y"]
    assert model.predict(pl.DataFrame({"item_id": ["g", "a"]})).tolist() == ["x", "y"]
    with pytest.raises(ValueError, match=r"no probabilities for 1 item\(s\) \('new'\).*train it again"):
        model.predict_proba(pl.DataFrame({"item_id": ["g", "new"]}))
    # The stored file is the one its metadata names.
    checked.with_columns(x=pl.lit(0.5), y=pl.lit(0.5)).write_parquet(folder / external.PROBABILITIES_FILE)
    with pytest.raises(train.ModelFileError, match="SHA-256 differs"):
        train.load(folder)


# ----------------------------------------------------------------------------- through Dagster Pipes
# Real subprocesses in real in-process runs: the module's home is trained once (about 20 s), and
# the failing trainers, the reuse and the built-in challenger run against it, in this order.


def _run(home: Home, names: list[str] | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions(home, RETRAIN)
    with dg.instance_for_test() as instance:
        if names is None:
            return defs.resolve_job_def(RETRAIN_JOB).execute_in_process(instance=instance, raise_on_error=False)
        return _materialize(defs, instance, names, raise_on_error=False)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    return " ".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)


def _rows(home: Home, sql: str):
    with store.connect(home.database_file, read_only=True) as con:
        return store.frame(con, sql)


def _use_trainer(home: Home, script: str | None, timeout: float | None = None, name: str = "train.py") -> None:
    """training.yaml names trainer/<name> (the example when `script` is None); None as script and
    name '' removes the trainer."""
    lines = [line for line in home.training_file.read_text().splitlines() if not line.startswith(("trainer:", "  "))]
    if name:
        folder = home.root / "trainer"
        folder.mkdir(exist_ok=True)
        if script is None:
            shutil.copy(EXAMPLE, folder / name)
        else:
            (folder / name).write_text(script)
        lines += ["trainer:", f"  command: [python, trainer/{name}]"]
        if timeout:
            lines.append(f"  timeout_seconds: {timeout}")
    home.training_file.write_text("\n".join(lines) + "\n")


# Trainers that go wrong, each the smallest script that does.
CRASHES = """
import sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    print("cannot reach the GPU pool", file=sys.stderr)
    sys.exit(3)
"""
BAD_PROBABILITIES = """
import os
import polars as pl
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    classes = pipes.get_extra("classes")
    ids = pl.read_parquet(pipes.get_extra("training_items"))["item_id"].to_list()
    gold = pl.read_parquet(pipes.get_extra("gold_items"))["item_id"].to_list()
    {choice}
    columns = {{c: [1.0 if i == 0 else 0.0] * len(ids) for i, c in enumerate(classes)}}
    frame = pl.DataFrame({{"item_id": ids, **columns}})
    {scale}
    frame.write_parquet("p.parquet")
    written = os.path.abspath("p.parquet")
    pipes.report_asset_materialization(metadata={{"reference": "nowhere", "probabilities": written}})
"""
SLEEPS = """
import time
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def features_home(tmp_path_factory) -> Home:
    """Items with features; the example trainer trains m0001, promoted on the 15 gold items."""
    home = prepared_home(tmp_path_factory.mktemp("external") / "home")
    land_items(home, make_items(90)[0])
    defs = build_definitions(home, RETRAIN)
    with dg.instance_for_test() as instance:
        assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance).success
    _use_trainer(home, None)
    result = _run(home)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return home


@pytest.mark.slow
def test_an_external_trainer_makes_a_champion(features_home, capsys, monkeypatch):
    home = features_home
    model = _rows(home, "SELECT model_version, status, algorithm, params, gold_accuracy FROM models").row(0, named=True)
    assert (model["model_version"], model["status"], model["algorithm"]) == ("m0001", "champion", "external")
    assert json.loads(model["params"])["command"] == ["python", "trainer/train.py"]
    assert model["gold_accuracy"] >= 0.9  # the worlds' classes are well separated
    metadata = json.loads((home.models / "m0001" / "metadata.json").read_text())
    reference = metadata["reference"]
    assert metadata["trainer"] == "external" and reference.endswith("output/model.skops") and Path(reference).is_file()
    assert len(metadata["classes"]) == 10  # the ontology's labels, not only those the corpus has
    assert metadata["trainer_metrics"]["out_of_sample_accuracy"] > 0.9
    assert not list((home.models / "external").glob("*/input"))  # the inputs are not kept

    # The label-issue queue read the champion's stored out-of-sample probabilities.
    assert _rows(home, "SELECT count(*) AS n FROM label_issue_candidates")["n"][0] > 0
    notes = (home.reports / "release-notes" / "m0001.md").read_text()
    assert "Trained by the external trainer `python trainer/train.py`." in notes

    champion = serving.Champion.load(home)
    assert champion.external and champion.reference == reference and champion.reads is None
    with pytest.raises(serving.ServingError, match="Serve it from its reference .* prediction log"):
        champion.predict([[1.0, 0.0, 0.0, 0.0]])
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    assert cli.main(["model", "current"]) == 0
    out = capsys.readouterr().out
    assert "trainer:       external" in out and f"reference:     {reference}" in out
    assert cli.main(["model", "current", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainer"] == "external"

    # The same corpus, command and script: the same model.
    again = _run(home, ["retrained_model"])
    assert again.success and _rows(home, "SELECT count(*) AS n FROM models")["n"][0] == 1


@pytest.mark.slow
@pytest.mark.parametrize(("script", "timeout", "reason"), [
    (CRASHES, None, "exited with code 3; the end of its error output:\ncannot reach the GPU pool"),
    (BAD_PROBABILITIES.format(choice="ids = ids + gold[1:]", scale="pass"), None,
     r"lacks 1 gold item\(s\), e.g. 'item-000'"),
    (BAD_PROBABILITIES.format(choice="ids = ids + gold",
                              scale="frame = frame.with_columns(pl.col(classes[0]) * 0.9)"), None,
     r"do not sum to 1"),
    (SLEEPS, 1, r"ran past timeout_seconds \(1 s\) and was stopped"),
])
def test_a_failing_trainer_fails_the_step_and_leaves_the_champion(features_home, script, timeout, reason):
    home = features_home
    _use_trainer(home, script, timeout, name="bad.py")
    try:
        failure = _failure(_run(home, ["retrained_model"]))
    finally:
        _use_trainer(home, None)
    assert "the external trainer (python trainer/bad.py)" in failure and "the champion is untouched" in failure
    assert re.search(reason, failure), failure
    assert _rows(home, "SELECT model_version, status FROM models").rows() == [("m0001", "champion")]
    assert train.current_version(home.models) == "m0001"


SHOWS_ITS_ENVIRONMENT = """
import os, sys
seen = sorted(name for name in os.environ if name.startswith("LABELLOOP_"))
sys.stderr.write("labelloop settings seen: " + (", ".join(seen) or "none") + "\\n")
sys.exit(3)
"""


@pytest.mark.slow
def test_the_trainer_gets_none_of_labelloops_settings(features_home, monkeypatch):
    """Not the pseudonymization key nor any other LABELLOOP_ setting: it gets the Pipes extras."""
    home = features_home
    monkeypatch.setenv("LABELLOOP_SECRET", "Mh4q8vT2xLr9NcW5kPz7bYd3JfG6sQe1uAo0iXnV-Rw")
    _use_trainer(home, SHOWS_ITS_ENVIRONMENT, name="env.py")
    try:
        failure = _failure(_run(home, ["retrained_model"]))
    finally:
        _use_trainer(home, None)
    assert "labelloop settings seen: none" in failure, failure


@pytest.mark.slow
def test_a_built_in_challenger_is_judged_against_an_external_champion(features_home):
    home = features_home
    _use_trainer(home, None, name="")  # back to the built-in trainer: a new configuration
    result = _run(home, ["retrained_model", "model_evaluation", "release_notes", "label_issue_candidates"])
    assert result.success, _failure(result)
    judged = _rows(home, "SELECT challenger, champion, decision, champion_scores FROM model_evaluations "
                         "ORDER BY evaluation_id").rows()
    assert [row[:2] for row in judged] == [("m0001", None), ("m0002", "m0001")]
    assert json.loads(judged[1][3])["accuracy"] >= 0.9  # the external champion, scored from its probabilities
    notes = (home.reports / "release-notes" / "m0002.md").read_text()
    assert "; the champion by an external trainer." in notes
    assert _rows(home, "SELECT count(*) AS n FROM label_issue_candidates")["n"][0] > 0


@pytest.mark.slow
def test_the_example_trainer_trains_a_text_home(tmp_path):
    from labelloop_tests.test_pipelines import reviews

    frame, labels = reviews(160, seed=3)
    home = prepared_home(tmp_path / "home")
    home.ontology_file.write_text("labels: [fresh, rotten]\n")
    records = [{"item_id": i, "text": t, **({"gold_label": str(y)} if n < 40 else
                                           {"initial_label": str(y), "label_source": "vendor"})}
               for n, (i, t, y) in enumerate(zip(frame["item_id"], frame["text"], labels, strict=True))]
    land_items(home, records)
    defs = build_definitions(home, RETRAIN)
    with dg.instance_for_test() as instance:
        assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance).success
    _use_trainer(home, None)
    result = _run(home, ["retrained_model", "model_evaluation"])
    assert result.success, _failure(result)
    model = _rows(home, "SELECT status, algorithm, gold_accuracy FROM models").row(0)
    assert model[:2] == ("champion", "external") and model[2] >= 0.85
    stored, _ = train.load(home.models / "m0001")
    assert np.isclose(stored.probabilities.drop("item_id").sum_horizontal().to_numpy(), 1.0).all()
