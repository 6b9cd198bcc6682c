"""The validation plan's pure parts: metrics, the promotion rule and threshold recalibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score

from labelloop_assets.core import evaluation as ev
from labelloop_assets.core import train
from labelloop_assets.core.settings import LabelloopConfigError

PLAN = ev.ValidationPlan(tolerance=0.01, per_class_tolerance=0.01, calibration_tolerance=0.01,
                         per_class_floor=0.5, min_eval_items=10)


def _scores(accuracy=0.9, macro_f1=0.9, recalls=None, ece=0.05, n=100) -> dict:
    return {"n": n, "accuracy": accuracy, "macro_f1": macro_f1,
            "per_class_recall": recalls or {"a": 0.9, "b": 0.9}, "calibration_error": ece}


def test_expected_calibration_error_by_hand():
    # Bin 0.9: confidence 0.9, accuracy 0.5 (gap 0.4, 2 items); bin 0.6: 0.6 vs 1.0 (gap 0.4, 2 items).
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    assert ev.expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.4)
    # A perfectly calibrated set: confidence 0.75, right 3 times in 4.
    assert ev.expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0)


def test_score_matches_scikit_learn_on_a_real_model():
    x, y = load_digits(return_X_y=True)
    labels = y.astype(str)
    model = train.fit(x[:1200], labels[:1200])
    probabilities = model.predict_proba(x[1200:])
    scored = ev.score(probabilities, model.classes, labels[1200:])
    predicted = model.predict(x[1200:])
    assert scored["n"] == len(labels) - 1200
    assert scored["accuracy"] == pytest.approx(accuracy_score(labels[1200:], predicted))
    assert scored["macro_f1"] == pytest.approx(f1_score(labels[1200:], predicted, average="macro"))
    assert set(scored["per_class_recall"]) == set(np.unique(labels[1200:]))
    assert 0 <= scored["calibration_error"] < 0.2
    assert ev.score(probabilities[:0], model.classes, labels[:0])["accuracy"] is None


def test_the_first_model_is_promoted_when_it_meets_the_floors():
    decision, reasons = ev.decide(_scores(), None, PLAN)
    assert decision == ev.PROMOTE and "no champion yet" in reasons[0]
    decision, reasons = ev.decide(_scores(recalls={"a": 0.9, "b": 0.3}), None, PLAN)
    assert decision == ev.REJECT and reasons == ["recall of 'b' is 0.300, under its floor 0.50"]


def test_a_challenger_not_worse_within_the_tolerance_is_promoted():
    decision, reasons = ev.decide(_scores(accuracy=0.895, ece=0.055), _scores(), PLAN)
    assert decision == ev.PROMOTE and "accuracy 0.8950 vs 0.9000" in reasons[0]


def test_a_worse_challenger_is_rejected_with_every_reason():
    challenger = _scores(accuracy=0.85, ece=0.12, recalls={"a": 0.95, "b": 0.7})
    decision, reasons = ev.decide(challenger, _scores(), PLAN)
    assert decision == ev.REJECT
    assert reasons == [
        "accuracy fell from 0.9000 to 0.8500 (tolerance 0.01)",
        "recall of 'b' fell from 0.900 to 0.700",
        "calibration_error rose from 0.0500 to 0.1200 (tolerance 0.01)",
    ]


def test_only_the_planned_metrics_count_and_class_floors_can_differ():
    plan = ev.ValidationPlan(metrics=("accuracy",), tolerance=0.0, per_class_floor=0.0,
                             per_class_floors={"b": 0.8}, min_eval_items=10)
    assert plan.floor("a") == 0.0 and plan.floor("b") == 0.8
    # Calibration got worse, but the plan does not look at it.
    assert ev.decide(_scores(ece=0.5), _scores(), plan)[0] == ev.PROMOTE
    assert ev.decide(_scores(recalls={"a": 0.9, "b": 0.79}), _scores(), plan)[0] == ev.PROMOTE
    too_few = ev.decide(_scores(n=5), _scores(), plan)
    assert too_few == (ev.REJECT, ["only 5 evaluation items; the plan needs 10"])


def test_the_confirm_threshold_is_the_lowest_confidence_that_keeps_the_precision():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    # Above 0.8 every prediction is right; adding 0.7 drops precision to 4/5.
    assert ev.confirm_threshold(confidence, correct, 0.95) == pytest.approx(0.8)
    assert ev.confirm_threshold(confidence, correct, 0.8) == pytest.approx(0.6)  # 5 of 6
    assert ev.confirm_threshold(confidence, ~correct, 0.5) is None
    assert ev.confirm_threshold(confidence[:0], correct[:0], 0.9) is None
    # Ties are cut together: two predictions at 0.9, one of them wrong.
    assert ev.confirm_threshold(np.array([0.95, 0.9, 0.9]), np.array([1, 1, 0], bool), 0.9) == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metrics: [accuracy, f2]\n", "metrics must be among"),
        ("tolerance: 2\n", "tolerances must be in [0, 1)"),
        ("per_class_floors: {b: 1.5}\n", "floors in [0, 1]"),
        ("min_eval_items: 2.5\n", "min_eval_items must be a whole number"),
        ("holdout: 0.2\n", "unknown keys ['holdout']"),
        ("reviewer_confirmed_slice: maybe\n", "must be true or false"),
        ("gold_copy_distance: 1.5\n", "gold_copy_distance must be in [0, 1)"),
        ("gold_copy_distance: near\n", "gold_copy_distance must be a finite number"),
    ],
)
def test_a_wrong_plan_is_refused_with_the_key(tmp_path, text, message):
    path = tmp_path / "validation.yaml"
    path.write_text(text)
    with pytest.raises(LabelloopConfigError) as error:
        ev.ValidationPlan.load(path)
    assert message in str(error.value)


def test_a_plan_file_loads_and_is_recorded_whole(tmp_path):
    path = tmp_path / "validation.yaml"
    path.write_text("metrics: [accuracy, macro_f1]\ntolerance: 0.01\nper_class_floors: {eight: 0.7}\n"
                    "reviewer_confirmed_slice: true\n")
    plan = ev.ValidationPlan.load(path)
    assert plan.metrics == ("accuracy", "macro_f1") and plan.floor("eight") == 0.7
    assert plan.as_dict()["metrics"] == ["accuracy", "macro_f1"] and plan.reviewer_confirmed_slice
    # The near-copy threshold has a default, and the shipped file names it.
    assert plan.gold_copy_distance == 0.1 and plan.as_dict()["gold_copy_distance"] == 0.1
    shipped = ev.ValidationPlan.load(Path(ev.__file__).parent.parent / "defaults" / "validation.yaml")
    assert shipped.gold_copy_distance == 0.1


def test_per_class_recall_and_calibration_have_their_own_tolerances():
    plan = ev.ValidationPlan(min_eval_items=10)  # shipped defaults: 0.005, 0.05, 0.02
    one_item_worse = _scores(accuracy=0.93, recalls={"a": 0.952, "b": 0.95}, ece=0.06)
    champion = _scores(accuracy=0.92, recalls={"a": 1.0, "b": 0.9}, ece=0.05)
    assert ev.decide(one_item_worse, champion, plan)[0] == ev.PROMOTE
    two_items_worse = _scores(accuracy=0.93, recalls={"a": 0.90, "b": 0.95})
    assert ev.decide(two_items_worse, champion, plan) == (ev.REJECT, ["recall of 'a' fell from 1.000 to 0.900"])
