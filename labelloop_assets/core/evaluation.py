"""The validation plan: how a challenger model is scored, and when it may replace the champion.

The plan is decided before training (`validation.yaml`) and recorded with every evaluation. A
challenger is promoted only when, on the same evaluation items, it is not worse than the
champion on any planned metric (within the tolerance) and no class's recall falls under its
floor. The confidence threshold below which the product should ask a user to confirm a
prediction is recalibrated on the evaluation items of the model that is promoted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from labelloop_assets.core.settings import (
    LabelloopConfigError,
    config_number,
    load_yaml_mapping,
)

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

METRICS = ("accuracy", "macro_f1", "per_class_recall", "calibration_error")
# Higher is better for these; calibration error is better lower.
HIGHER_IS_BETTER = ("accuracy", "macro_f1")
PROMOTE, REJECT = "promote", "reject"


@dataclass(frozen=True)
class ValidationPlan:
    """Metrics, tolerance, per-class floors and evaluation sets, fixed before training."""

    metrics: tuple[str, ...] = METRICS
    tolerance: float = 0.005
    # Per-class recall and calibration error are measured on few items each, so they get looser
    # tolerances: with 36 gold items in a class, one item moves its recall by 0.028.
    per_class_tolerance: float = 0.05
    calibration_tolerance: float = 0.02
    per_class_floor: float = 0.5
    per_class_floors: dict[str, float] = field(default_factory=dict)
    reviewer_confirmed_slice: bool = False
    min_eval_items: int = 30
    calibration_bins: int = 10
    confirm_precision: float = 0.95
    # Release notes retrain without at most this many groups of corrections (one training each).
    attribution_max_groups: int = 6
    # A corpus item this close to a gold item (a fraction of the gold set's own spacing, see
    # gold.find_gold_copies) is a near copy and is not trained on. 0 finds exact copies only.
    gold_copy_distance: float = 0.1

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise LabelloopConfigError(
                f"validation: metrics must be among {', '.join(METRICS)}; got {sorted(unknown) or 'none'}"
            )
        floors = [self.per_class_floor, *self.per_class_floors.values()]
        tolerances = (self.tolerance, self.per_class_tolerance, self.calibration_tolerance)
        if any(not 0 <= t < 1 for t in tolerances) or any(not 0 <= f <= 1 for f in floors):
            raise LabelloopConfigError("validation: tolerances must be in [0, 1) and floors in [0, 1]")
        if self.min_eval_items < 1 or self.calibration_bins < 2:
            raise LabelloopConfigError("validation: min_eval_items >= 1 and calibration_bins >= 2")
        if self.attribution_max_groups < 0:
            raise LabelloopConfigError("validation: attribution_max_groups must not be negative")
        if not 0 < self.confirm_precision < 1:
            raise LabelloopConfigError("validation: confirm_precision must be in (0, 1)")
        if not 0 <= self.gold_copy_distance < 1:
            raise LabelloopConfigError(
                "validation: gold_copy_distance must be in [0, 1) (a fraction of the gold items' spacing)"
            )

    def floor(self, label: str) -> float:
        return self.per_class_floors.get(label, self.per_class_floor)

    def as_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics)}

    @classmethod
    def load(cls, path: Path) -> ValidationPlan:
        raw = load_yaml_mapping(path, "validation")
        where = f"validation file {path}"
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise LabelloopConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values: dict = {}
        for key, value in raw.items():
            if key == "metrics":
                if not isinstance(value, list):
                    raise LabelloopConfigError(f"{where}: metrics must be a list")
                values[key] = tuple(str(v) for v in value)
            elif key == "per_class_floors":
                if not isinstance(value, dict):
                    raise LabelloopConfigError(f"{where}: per_class_floors must map labels to floors")
                values[key] = {str(k): float(config_number(v, 0.0, f"{where}: per_class_floors.{k}"))
                               for k, v in value.items()}
            elif key == "reviewer_confirmed_slice":
                if not isinstance(value, bool):
                    raise LabelloopConfigError(f"{where}: reviewer_confirmed_slice must be true or false")
                values[key] = value
            else:
                values[key] = config_number(value, getattr(cls, key), f"{where}: {key}")
        return cls(**values)


def score(probabilities: np.ndarray, classes: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Accuracy, macro-F1, recall per class and expected calibration error on evaluation items."""
    import numpy as np
    if len(labels) == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "per_class_recall": {}, "calibration_error": None}
    # imported where used: loading the code location must not pay for scikit-learn
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    predicted = classes[probabilities.argmax(axis=1)]
    confidence = probabilities.max(axis=1)
    present = np.unique(labels)
    recalls = recall_score(labels, predicted, labels=present, average=None, zero_division=0)
    return {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {str(c): float(r) for c, r in zip(present, recalls, strict=True)},
        "calibration_error": expected_calibration_error(confidence, predicted == labels, bins),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    import numpy as np
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins)
    accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins)
    filled = counts > 0
    gaps = np.abs(mean_confidence[filled] - accuracy[filled]) / counts[filled]
    return float((gaps * counts[filled]).sum() / counts.sum())


def decide(challenger: dict, champion: dict | None, plan: ValidationPlan) -> tuple[str, list[str]]:
    """(promote | reject, reasons): not worse than the champion on every planned metric."""
    reasons: list[str] = []
    if challenger["n"] < plan.min_eval_items:
        return REJECT, [f"only {challenger['n']} evaluation items; the plan needs {plan.min_eval_items}"]
    if "per_class_recall" in plan.metrics:
        under = {c: r for c, r in challenger["per_class_recall"].items() if r < plan.floor(c)}
        reasons += [
            f"recall of '{c}' is {r:.3f}, under its floor {plan.floor(c):.2f}" for c, r in sorted(under.items())
        ]
    if champion is None:
        return (REJECT, reasons) if reasons else (PROMOTE, ["no champion yet: the first model that meets the floors"])
    for metric in plan.metrics:
        if metric == "per_class_recall":
            worse = {
                c: (champion["per_class_recall"][c], r)
                for c, r in challenger["per_class_recall"].items()
                if c in champion["per_class_recall"] and r < champion["per_class_recall"][c] - plan.per_class_tolerance
            }
            reasons += [f"recall of '{c}' fell from {old:.3f} to {new:.3f}" for c, (old, new) in sorted(worse.items())]
            continue
        new, old = challenger[metric], champion[metric]
        if new is None or old is None:
            continue
        if metric in HIGHER_IS_BETTER and new < old - plan.tolerance:
            reasons.append(f"{metric} fell from {old:.4f} to {new:.4f} (tolerance {plan.tolerance})")
        elif metric not in HIGHER_IS_BETTER and new > old + plan.calibration_tolerance:
            reasons.append(f"{metric} rose from {old:.4f} to {new:.4f} (tolerance {plan.calibration_tolerance})")
    if reasons:
        return REJECT, reasons
    gains = [f"{m} {challenger[m]:.4f} vs {champion[m]:.4f}" for m in HIGHER_IS_BETTER if m in plan.metrics]
    return PROMOTE, ["not worse than the champion on any planned metric: " + ", ".join(gains)]


def confirm_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> float | None:
    """The lowest confidence at which predictions at or above it are right at least `target_precision`
    of the time; the product should ask a user to confirm below it. None when no threshold reaches it."""
    import numpy as np
    if len(confidence) == 0:
        return None
    order = np.argsort(-confidence, kind="stable")
    ranked, hits = confidence[order], np.cumsum(correct[order].astype(float))
    precision = hits / np.arange(1, len(ranked) + 1)
    # Only cut between distinct confidences: equal scores are asked about together or not at all.
    last_of_value = np.r_[ranked[1:] != ranked[:-1], True]
    meets = np.flatnonzero((precision >= target_precision) & last_of_value)
    return float(ranked[meets[-1]]) if meets.size else None


def verdict_text(challenger: str, decision: str, reasons: str | None) -> str:
    """An evaluation's verdict in one line, e.g. `m0001 rejected: only 3 evaluation items; ...`."""
    outcome = {REJECT: "rejected", PROMOTE: "promoted"}.get(decision, decision)
    return f"{challenger} {outcome}: {reasons or 'no reason recorded'}"
