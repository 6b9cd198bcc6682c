"""Quality signals through Dagster: agreement, segments, drift, trend chart, label issues, guidelines.

Every test lands files in a real LABELLOOP_HOME and materializes the assets on a real Dagster
instance; expected figures are recomputed here from the landed records (agreement with
core/agreement.py, rates by hand), never read back from the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import re

import dagster as dg
import matplotlib.image
import polars as pl
import pytest

from labelloop_assets import cli
from labelloop_assets.core import charts
from labelloop_assets.core.agreement import fleiss_kappa, krippendorff_alpha_nominal
from labelloop_assets.jobs import INGEST_JOB
from labelloop_tests.conftest import LABELS, correction, land_items, make_items, write_jsonl
from labelloop_tests.test_loop import _materialize, _metadata, _rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _truth(i: int) -> str:
    return LABELS[i % 3]


def _wrong(i: int) -> str:
    return LABELS[(i + 1) % 3]


def _prediction(pid: str, i: int, label: str, model: str, served_at: str, confidence: float = 0.9) -> dict:
    return {"prediction_id": pid, "item_id": f"item-{i:03d}", "model_version": model,
            "predicted_label": label, "confidence": confidence, "served_at": served_at}


def _check(result: dg.ExecuteInProcessResult, name: str):
    found = [e.asset_check_evaluation_data for e in result.all_events
             if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
             and e.asset_check_evaluation_data.check_name == name]
    assert len(found) == 1, name
    return found[0]


def _png(markdown: str) -> bytes:
    match = re.fullmatch(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:80]
    return base64.b64decode(match.group(1), validate=True)


# What a run needs to stage corrections and publish a corpus version (items first).
CURATE = ["items", "raw_corrections", "validated_labels", "production_corpus"]


def _ingest(defs, instance) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance)
    assert result.success
    return result


# ---------------------------------------------------------------------------------------------
# label_quality_signals: agreement, segments and the trend chart
# ---------------------------------------------------------------------------------------------

PANEL = range(15, 27)  # twelve items three annotators all label
BEN_WRONG, CAT_WRONG = {18, 21}, {15, 24}
M1_WRONG, M2_WRONG = {15, 16, 17}, {35, 36}


def _panel_events() -> list[dict]:
    events = []
    for user, wrong in (("ann", set()), ("ben", BEN_WRONG), ("cat", CAT_WRONG)):
        for i in PANEL:
            events.append(correction(
                f"{user}-{i}", f"item-{i:03d}", _wrong(i) if i in wrong else _truth(i), user=user,
                role="annotator", source="review_prompt", prediction_id=f"p1-{i}",
                created_at=f"2026-03-02T{10 + i % 8:02d}:00:00+00:00",
            ))
    # A reviewer fixes one of m0002's mistakes; an end user "corrects" a prediction to the label it had.
    events.append(correction("rita-35", "item-035", _truth(35), user="rita", role="reviewer",
                             source="audit_sample", prediction_id="p2-35", created_at="2026-03-02T16:00:00+00:00"))
    events.append(correction("eve-40", "item-040", _truth(40), user="eve", role="end_user",
                             source="feedback_button", prediction_id="p2-40", created_at="2026-03-02T17:00:00+00:00"))
    return events


def _panel_predictions() -> list[dict]:
    day1 = [_prediction(f"p1-{i}", i, _wrong(i) if i in M1_WRONG else _truth(i), "m0001", "2026-03-01T09:00:00Z")
            for i in range(15, 35)]
    day2 = [_prediction(f"p2-{i}", i, _wrong(i) if i in M2_WRONG else _truth(i), "m0002", "2026-03-02T09:00:00Z")
            for i in range(35, 55)]
    return day1 + day2


@pytest.mark.slow
def test_agreement_segments_and_trend_chart_after_a_small_loop(home, defs, instance):
    land_items(home, make_items()[0])
    predictions = _panel_predictions()
    write_jsonl(home.landing_dir("predictions"), "p.jsonl", predictions)
    events = _panel_events()
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", events)
    _ingest(defs, instance)
    result = _materialize(defs, instance, ["label_quality_signals"])
    meta = _metadata(result, "label_quality_signals")

    # Agreement equals core/agreement.py on the same votes (items two or more contributors rated).
    ratings = pl.DataFrame(
        [(e["item_id"], e["user_id"], e["corrected_label"]) for e in events],
        schema={"item_id": pl.String, "rater": pl.String, "label": pl.String}, orient="row",
    )
    alpha, kappa = krippendorff_alpha_nominal(ratings), fleiss_kappa(ratings)
    assert alpha.n_items == 12 and alpha.n_ratings == 36
    assert 0.5 < alpha.value < 0.9 and 0.5 < kappa.value < 0.9  # real disagreement, not a trivial 1
    assert meta["krippendorff_alpha"] == pytest.approx(alpha.value, abs=1e-4)
    assert meta["fleiss_kappa"] == pytest.approx(kappa.value, abs=1e-4)
    assert meta["agreement_note"] == "computed"
    stored = _rows(home, "SELECT krippendorff_alpha, fleiss_kappa, n_items_multi, n_ratings, n_raters, note "
                         "FROM label_agreement").row(0, named=True)
    assert stored["krippendorff_alpha"] == pytest.approx(alpha.value, abs=1e-12)
    assert stored["fleiss_kappa"] == pytest.approx(kappa.value, abs=1e-12)
    assert (stored["n_items_multi"], stored["n_ratings"], stored["n_raters"], stored["note"]) == (12, 36, 3, None)
    pairs = _rows(home, "SELECT n_shared, kappa FROM label_agreement_pairs")
    assert pairs["n_shared"].to_list() == [12, 12, 12] and pairs["kappa"].is_not_null().all()
    agreement = _check(result, "agreement_above_floor")
    assert agreement.passed == (alpha.value >= 0.667)

    # Segments: by source, model version and day; correction rate = corrected predictions / served.
    segments = _rows(home, "SELECT segment_kind, segment, n_corrections, n_predictions, n_corrected_predictions, "
                           "correction_rate FROM label_quality_by_segment")
    by_kind = {kind: sorted(segments.filter(pl.col("segment_kind") == kind)["segment"].to_list())
               for kind in ("source", "model_version", "day")}
    assert by_kind == {"source": ["audit_sample", "feedback_button", "review_prompt"],
                       "model_version": ["m0001", "m0002"], "day": ["2026-03-01", "2026-03-02"]}
    predicted = {p["prediction_id"]: (p["predicted_label"], p["model_version"]) for p in predictions}
    corrected = {e["prediction_id"] for e in events if e["corrected_label"] != predicted[e["prediction_id"]][0]}
    for model in ("m0001", "m0002"):
        served = [pid for pid, (_, m) in predicted.items() if m == model]
        row = segments.filter(
            (pl.col("segment_kind") == "model_version") & (pl.col("segment") == model)
        ).row(0, named=True)
        assert row["n_predictions"] == len(served) == 20
        assert row["n_corrected_predictions"] == len(corrected & set(served))
        assert row["correction_rate"] == pytest.approx(len(corrected & set(served)) / 20)
    m1 = segments.filter(pl.col("segment") == "m0001").row(0, named=True)
    assert (m1["n_corrected_predictions"], m1["n_corrections"]) == (6, 36)  # 15-17 wrong, 18/21/24 disputed
    sources = dict(segments.filter(pl.col("segment_kind") == "source").select("segment", "n_corrections").iter_rows())
    assert sources == {"audit_sample": 1, "feedback_button": 1, "review_prompt": 36}
    summary = _rows(home, "SELECT correction_rate FROM label_quality_metrics ORDER BY computed_at DESC LIMIT 1")
    assert summary["correction_rate"][0] == pytest.approx(7 / 40)

    # The trend chart is a real PNG inlined as a data URI.
    png = _png(meta["trends"])
    assert png.startswith(PNG_MAGIC)
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_trend_chart_renders_without_history():
    empty = charts.quality_trends_png(pl.DataFrame(), pl.DataFrame(), 0.1, 0.25)
    assert empty.startswith(PNG_MAGIC)
    history = charts.quality_trends_png(
        pl.DataFrame({"krippendorff_alpha": [None, 0.7, 0.8], "fleiss_kappa": [None, 0.6, 0.75],
                      "difficult_prevalence": [0.2, 0.1, 0.1]}),
        pl.DataFrame({"signal": ["predicted_labels", "served_features"], "js_distance": [0.05, None],
                      "max_psi": [None, 0.4]}),
        0.1, 0.25,
    )
    assert history.startswith(PNG_MAGIC) and history != empty
    assert _png(charts.markdown_image(history, "trends")) == history


@pytest.mark.slow
def test_one_contributor_and_no_predictions_give_notes_not_zeros(home, defs, instance):
    land_items(home, make_items()[0])
    # One reviewer, no predictions; 'two' only shows up in the current window.
    baseline = [correction(f"r-{i}", f"item-{i:03d}", _truth(i), user="rita", created_at="2026-03-01T10:00:00Z")
                for i in (15, 16, 18, 19)]  # zero, one, zero, one
    current = [correction(f"r-{i}", f"item-{i:03d}", "two", user="rita", created_at="2026-03-05T10:00:00Z")
               for i in (21, 22)]
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", baseline + current)
    result = _materialize(defs, instance, CURATE + ["label_quality_signals"])
    assert result.success
    meta = _metadata(result, "label_quality_signals")

    assert "krippendorff_alpha" not in meta and "fleiss_kappa" not in meta  # not plotted as 0
    assert meta["agreement_note"] not in (None, "", "computed")
    row = _rows(
        home, "SELECT krippendorff_alpha, fleiss_kappa, n_items_multi, note FROM label_agreement"
    ).row(0, named=True)
    assert row["krippendorff_alpha"] is None and row["fleiss_kappa"] is None and row["n_items_multi"] == 0
    assert row["note"] == meta["agreement_note"]
    agreement = _check(result, "agreement_above_floor")
    assert agreement.passed
    assert agreement.metadata["krippendorff_alpha"].value == "undefined"
    assert agreement.metadata["note"].value == row["note"]

    drift = {r["signal"]: r for r in _rows(home, "SELECT * FROM label_drift").iter_rows(named=True)}
    assert set(drift) == {"predicted_labels", "corrected_labels", "served_features"}
    for signal in ("predicted_labels", "served_features"):
        assert drift[signal]["note"] == "no events yet to define a window"
        assert (drift[signal]["js_distance"], drift[signal]["psi"], drift[signal]["max_psi"],
                drift[signal]["current_to"]) == (None, None, None, None)
        assert (drift[signal]["n_baseline"], drift[signal]["n_current"]) == (0, 0)
    corrected = drift["corrected_labels"]
    assert (corrected["n_baseline"], corrected["n_current"]) == (4, 2)
    assert "two seen in the current window but never in the baseline" in corrected["note"]
    shifts = {d["label"]: d for d in json.loads(corrected["detail"])}
    assert shifts["two"]["baseline_share"] == 0.0 and shifts["two"]["current_share"] == 1.0
    assert corrected["js_distance"] == pytest.approx(1.0)
    feature = _check(result, "feature_drift_within_threshold")
    assert feature.passed and feature.metadata["note"].value == "no events yet to define a window"
    assert _png(meta["trends"]).startswith(PNG_MAGIC)


@pytest.mark.slow
def test_undefined_agreement_note_names_the_real_reason(home, defs, instance):
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c.jsonl", [
        correction(f"r-{i}", f"item-{i:03d}", _truth(i), user="rita") for i in range(15, 21)
    ])
    meta = _metadata(_materialize(defs, instance, CURATE + ["label_quality_signals"]), "label_quality_signals")
    assert "no ratings" not in meta["agreement_note"]
    assert "no item has two or more contributors" in meta["agreement_note"]


# ---------------------------------------------------------------------------------------------
# Drift checks: label mix and served features, current day against the week before
# ---------------------------------------------------------------------------------------------

SERVED = list(range(15, 45))  # ten items of each class
CLASS_TWO = [i for i in range(15, 60) if _truth(i) == "two"]


def _traffic(case: str) -> list[dict]:
    """Five baseline days of the same traffic, then a current day that shifts (or not)."""
    rows = []
    for day in range(1, 6):
        rows += [_prediction(f"b{day}-{i}", i, _truth(i), "m0001", f"2026-03-0{day}T09:00:00Z") for i in SERVED]
    if case == "same":
        rows += [_prediction(f"c-{i}", i, _truth(i), "m0001", "2026-03-06T10:00:00Z") for i in SERVED]
    elif case == "labels_shift":  # the same items, but the model now says "two" to everything
        rows += [_prediction(f"c-{i}", i, "two", "m0001", "2026-03-06T10:00:00Z") for i in SERVED]
    elif case == "features_shift":  # the same label mix, but only class-two items are served
        rows += [_prediction(f"c-{k}", i, LABELS[k % 3], "m0001", "2026-03-06T10:00:00Z")
                 for k, i in enumerate(CLASS_TWO * 2)]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "label_drift", "feature_drift"),
    [("same", False, False), ("labels_shift", True, False), ("features_shift", False, True)],
)
def test_drift_checks_warn_on_a_clear_shift_only(home, defs, instance, case, label_drift, feature_drift):
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("predictions"), "p.jsonl", _traffic(case))
    assert _materialize(defs, instance, ["items", "predictions"]).success
    result = _materialize(defs, instance, ["label_quality_signals"])
    assert result.success

    labels = _check(result, "label_drift_within_threshold")
    assert labels.severity == dg.AssetCheckSeverity.WARN
    assert labels.passed is not label_drift
    assert labels.metadata["drifted_signals"].value == ("predicted_labels" if label_drift else "none")
    features = _check(result, "feature_drift_within_threshold")
    assert features.severity == dg.AssetCheckSeverity.WARN
    assert features.passed is not feature_drift

    drift = {r["signal"]: r for r in _rows(home, "SELECT * FROM label_drift").iter_rows(named=True)}
    predicted, served = drift["predicted_labels"], drift["served_features"]
    assert predicted["n_baseline"] == 150 and served["n_baseline"] == 150
    assert predicted["n_current"] == served["n_current"] == 30
    if case == "same":
        assert predicted["js_distance"] == pytest.approx(0.0, abs=1e-9) and predicted["p_value"] > 0.5
        assert served["max_psi"] == pytest.approx(0.0, abs=1e-9) and served["n_drifted"] == 0
    if case == "labels_shift":
        assert predicted["js_distance"] > 0.5 and predicted["p_value"] < 1e-6
        assert "predicted_labels" in labels.metadata["largest_shifts"].value
        assert served["n_drifted"] == 0
    if case == "features_shift":
        assert predicted["js_distance"] == pytest.approx(0.0, abs=1e-9)
        assert served["n_drifted"] >= 1 and served["max_psi"] > 0.25
        assert features.metadata["features_drifted"].value == served["n_drifted"]
        assert "f2" in features.metadata["worst_features"].value  # class two lives on feature 2
    meta = _metadata(result, "label_quality_signals")
    assert meta["predicted_labels_js_distance"] == pytest.approx(predicted["js_distance"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# label_issue_candidates and the issues queue
# ---------------------------------------------------------------------------------------------

# Well-separated classes with four wrong initial labels planted.
PLANTED = {"item-030": "one", "item-031": "two", "item-032": "zero", "item-046": "two"}
ISSUES = ["items", "production_corpus", "contributor_reliability", "label_issue_candidates"]


def _planted_items(home) -> dict[str, str]:
    records, truth = make_items(90)
    for record in records:
        if record["item_id"] in PLANTED:
            assert PLANTED[record["item_id"]] != truth[record["item_id"]]
            record["initial_label"] = PLANTED[record["item_id"]]
    land_items(home, records)
    return truth


@pytest.mark.slow
def test_planted_wrong_labels_top_the_issue_queue(home, defs, instance, monkeypatch, capsys):
    truth = _planted_items(home)
    result = _materialize(defs, instance, ISSUES)
    assert result.success
    meta = _metadata(result, "label_issue_candidates")
    assert meta["items_scored"] == 75 and meta["passive_signal"] == "5-fold out-of-sample probabilities"
    assert meta["confident_learning_issues"] >= len(PLANTED)

    queue = _rows(home, "SELECT rank, item_id, label, suggested_label, score, cl_issue, reasons "
                        "FROM label_issue_candidates ORDER BY rank")
    assert queue.height == 75 and queue["rank"].to_list() == list(range(1, 76))
    top = queue.head(len(PLANTED))
    assert set(top["item_id"]) == set(PLANTED)
    for row in top.iter_rows(named=True):
        assert row["suggested_label"] == truth[row["item_id"]] and row["cl_issue"]
        assert row["score"] > 0.9
        assert any("confident learning: off-diagonal" in r for r in row["reasons"])
        assert any(f"suggests '{truth[row['item_id']]}'" in r for r in row["reasons"])

    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    assert cli.main(["review", "list", "--queue", "issues", "--limit", "4", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in listed] == top["item_id"].to_list()
    assert all("confident learning" in r["reasons"] for r in listed)
    assert cli.main(["review", "list", "--queue", "issues", "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("4 label-issue candidates") and "(--limit 4 reached)" in text
    assert all(item in text for item in PLANTED)


@pytest.mark.slow
def test_every_confident_learning_issue_is_explained(home, defs, instance):
    _planted_items(home)
    assert _materialize(defs, instance, ISSUES).success
    flagged = _rows(home, "SELECT item_id, label, suggested_label, reasons FROM label_issue_candidates "
                          "WHERE cl_issue ORDER BY rank")
    assert set(PLANTED) <= set(flagged["item_id"])
    for row in flagged.iter_rows(named=True):
        assert any(r.startswith("confident learning") for r in row["reasons"]), row
        assert row["suggested_label"] != row["label"], row


@pytest.mark.slow
def test_a_one_class_corpus_gives_a_prior_only_queue_with_a_note(home, defs, instance):
    records = [dict(r, initial_label="zero") for r in make_items()[0] if "initial_label" in r]
    land_items(home, records)
    result = _materialize(defs, instance, ISSUES)
    assert result.success
    meta = _metadata(result, "label_issue_candidates")
    assert "need two classes" in meta["passive_signal"]
    assert meta["confident_learning_issues"] == 0
    queue = _rows(home, "SELECT score, suggested_label, reasons FROM label_issue_candidates")
    assert queue.height == 45
    assert queue["suggested_label"].is_null().all()
    assert queue["score"].n_unique() == 1  # nothing tells the items apart: the prior only
    assert all(r.to_list() == ["no model signal (no out-of-sample probability for this item)"]
               for r in queue["reasons"])


# ---------------------------------------------------------------------------------------------
# guideline_report
# ---------------------------------------------------------------------------------------------


def _fix(event_id: str, i: int, label: str, rationale: str, user: str = "rita") -> dict:
    return correction(event_id, f"item-{i:03d}", label, user=user, rationale=rationale,
                      created_at=f"2026-03-02T{10 + i % 10:02d}:00:00+00:00")


# Reviewers change labels: three zero -> one (items 15, 18, 21), one one -> two (item 16).
FIRST_FIXES = [
    _fix("g-1", 15, "one", "closed loop on top, see ops.lead@example.com"),
    _fix("g-2", 18, "one", "single stroke"),
    _fix("g-3", 21, "one", "single stroke, no loop", user="rob"),
    _fix("g-4", 16, "two", "curved base"),
]


@pytest.mark.slow
def test_guideline_report_ranks_pairs_scrubs_rationales_and_shows_change(home, defs, instance):
    land_items(home, make_items()[0])
    assert _materialize(defs, instance, ["items", "production_corpus"]).success
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", FIRST_FIXES)
    result = _materialize(defs, instance, CURATE[1:] + ["guideline_report"])
    report = (home.reports / "guidelines.md").read_text()
    assert _metadata(result, "guideline_report")["pairs"] == 2
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| zero | one | 3 | 0 | 3 | first report |", "| one | two | 1 | 0 | 1 | first report |"]
    assert report.index("## zero -> one") < report.index("## one -> two")
    assert "ops.lead@example.com" not in report
    most_corrected = report.split("## zero -> one")[1].split("## ")[0]
    assert '- `item-015` (reviewer): `closed loop on top, see [email]`' in most_corrected
    assert "This is the first report" in report

    write_jsonl(home.landing_dir("corrections"), "c2.jsonl", [
        _fix("g-5", 24, "one", "single stroke again"),
        _fix("g-6", 27, "one", "same as before"),
        _fix("g-7", 17, "zero", "filled loop"),  # item-017 is a "two"
    ])
    assert _materialize(defs, instance, CURATE[1:] + ["guideline_report"]).success
    second = (home.reports / "guidelines.md").read_text()
    rows = [line for line in second.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| zero | one | 5 | 0 | 5 | +2 |", "| one | two | 1 | 0 | 1 | +0 |",
                    "| two | zero | 1 | 0 | 1 | new in the top pairs |"]
    first_version = _rows(home, "SELECT min(corpus_version) AS v FROM guideline_pairs")["v"][0]
    assert f"Change is against the previous report (corpus v{first_version})" in second
    assert "ops.lead@example.com" not in second



@pytest.mark.slow
def test_corrections_landed_with_their_items_reach_the_guideline_report(home, defs, instance):
    # The README's quick start lands items and corrections together and materializes once.
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", FIRST_FIXES)
    assert _materialize(defs, instance, CURATE + ["guideline_report"]).success
    history = _rows(home, "SELECT previous_label, label FROM label_history WHERE change_kind = 'correction' "
                          "ORDER BY item_id")
    assert history.rows() == [("zero", "one"), ("one", "two"), ("zero", "one"), ("zero", "one")]
    report = (home.reports / "guidelines.md").read_text()
    assert "| zero | one | 3 |" in report


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("drift:\n  current_days: 0\n", "drift windows must be positive"),
        ("label_issues:\n  keep: 0\n", "must be at least 1"),
        ("label_issues:\n  folds: 2.5\n", "issues_folds must be a whole number"),
        ("difficult_confidence: 1.5\n", "difficult_confidence must be in (0, 1]"),
        ("agreement:\n  pairs: true\n", "agreement_pairs must be a whole number"),
        ("drift:\n  label_p_value: 1\n", "label_p_value must be in (0, 1)"),
        ("drift:\n  bins: 10\n", "unknown setting drift.bins"),
        ("alerts: {}\n", "unknown sections ['alerts']"),
    ],
)
def test_monitoring_settings_refuse_bad_values_with_the_key(tmp_path, text, message):
    from labelloop_assets.core.settings import LabelloopConfigError, MonitoringSettings

    path = tmp_path / "monitoring.yaml"
    path.write_text(text)
    with pytest.raises(LabelloopConfigError) as error:
        MonitoringSettings.load(path)
    assert message in str(error.value)


def test_shipped_monitoring_settings_load():
    from labelloop_assets.core.settings import DEFAULTS_DIR, MonitoringSettings

    settings = MonitoringSettings.load(DEFAULTS_DIR / "monitoring.yaml")
    assert (settings.issues_folds, settings.drift_feature_psi_warn, settings.segment_days) == (5, 0.25, 30)
