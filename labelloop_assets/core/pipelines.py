"""Which scikit-learn pipeline trains the model: read from training.yaml, checked strictly.

training.yaml names a pipeline in one of two ways:

- `pipeline: <preset>`: `auto` (the default), `logistic_regression` or `hist_gradient_boosting`.
  `auto` is `logistic_regression`, which fits what the items carry: TF-IDF for text, standard
  scaling for features, both side by side for items with both, then a multinomial logistic
  regression. `params` override the final estimator's parameters (C, max_iter, ...).
- `pipeline: [ {ClassName: {param: value}}, ... ]`: any chain of scikit-learn transformers ending
  in a classifier with `predict_proba`, taking one input (`input: text` or `input: features`).

Every class is looked up by name in a fixed list of scikit-learn modules (a file cannot name
arbitrary code), every parameter name is checked against the estimator, and every value by
scikit-learn's own parameter validation, so a typo fails when the file is read, with the reason.
Values that validation cannot judge alone (an `ngram_range` of [2, 1]) fail the training step,
with scikit-learn's reason and the champion untouched.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any

from labelloop_assets.core.settings import LabelloopConfigError

# What an item carries: decided per home by its first accepted items (see core/item_content.py).
TEXT, FEATURES, BOTH = "text", "features", "text+features"
INPUTS = (TEXT, FEATURES, BOTH)
PRESETS = ("auto", "logistic_regression", "hist_gradient_boosting")
# Where a step's class is looked for, in this order. Only estimators count (see _estimator_class).
SKLEARN_MODULES = (
    "sklearn.feature_extraction.text", "sklearn.preprocessing", "sklearn.decomposition",
    "sklearn.feature_selection", "sklearn.impute", "sklearn.kernel_approximation",
    "sklearn.linear_model", "sklearn.ensemble", "sklearn.naive_bayes", "sklearn.svm",
    "sklearn.neighbors", "sklearn.tree", "sklearn.neural_network", "sklearn.discriminant_analysis",
)
TEXT_VECTORIZERS = ("TfidfVectorizer", "CountVectorizer", "HashingVectorizer")
# Fixed so that the same corpus and configuration give the same model.
RANDOM_STATE = 0

# The presets' steps per input; `params` in training.yaml override the last step's.
_LINEAR = {"C": 0.1, "max_iter": 2000}
_TEXT_LINEAR = {"C": 4.0, "max_iter": 2000}
_TFIDF = {"sublinear_tf": True, "ngram_range": (1, 2), "min_df": 2}
PRESET_STEPS: dict[str, dict[str, tuple[tuple[str, dict], ...]]] = {
    "logistic_regression": {
        FEATURES: (("StandardScaler", {}), ("LogisticRegression", _LINEAR)),
        TEXT: (("TfidfVectorizer", _TFIDF), ("LogisticRegression", _TEXT_LINEAR)),
        # One TF-IDF block and one scaled block side by side (a ColumnTransformer), then the model.
        BOTH: (("TfidfVectorizer", _TFIDF), ("StandardScaler", {}), ("LogisticRegression", _TEXT_LINEAR)),
    },
    "hist_gradient_boosting": {
        FEATURES: (("HistGradientBoostingClassifier", {"max_iter": 200}),),
    },
}


@dataclass(frozen=True)
class PipelineSpec:
    """A resolved pipeline: its input and its steps (class name, parameters), nothing left to guess."""

    input: str
    steps: tuple[tuple[str, dict], ...]
    preset: str | None = None

    @property
    def algorithm(self) -> str:
        """Step names as the registry records them, e.g. `tfidf_vectorizer+logistic_regression`."""
        return "+".join(_snake(name) for name, _ in self.steps)

    def as_dict(self) -> dict:
        return {"input": self.input, "preset": self.preset,
                "steps": [{name: _jsonable(params)} for name, params in self.steps]}

    def recorded(self) -> str:
        """The registry's `params` column: the whole pipeline, so a refit needs nothing else."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for people: `TfidfVectorizer(ngram_range=(1, 2)) -> LogisticRegression(C=4.0)`."""
        return " -> ".join(
            f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(params.items()))})" for name, params in self.steps
        )

    @classmethod
    def from_recorded(cls, recorded: str | dict) -> PipelineSpec:
        """The spec a registry row records (models before pipelines recorded C and max_iter only)."""
        raw = json.loads(recorded) if isinstance(recorded, str) else recorded
        if "steps" not in raw:
            return preset_spec("logistic_regression", FEATURES, raw)
        steps = tuple((name, _tupled(params)) for step in raw["steps"] for name, params in step.items())
        return cls(input=raw["input"], steps=steps, preset=raw.get("preset"))

    def build(self, feature_length: int | None = None) -> Any:
        """An unfitted scikit-learn Pipeline for this spec (items with both: a ColumnTransformer)."""
        from sklearn.compose import ColumnTransformer
        from sklearn.pipeline import Pipeline

        estimators = [(_snake(name), _make(name, params)) for name, params in self.steps]
        if self.input == BOTH:
            (text_name, text_step), (features_name, features_step), *rest = estimators
            columns = feature_columns(feature_length or 0)
            joined = ColumnTransformer([(text_name, text_step, "text"), (features_name, features_step, columns)])
            estimators = [("text_and_features", joined), *rest]
        return Pipeline(estimators)


def feature_columns(width: int) -> list[str]:
    return [f"f{i}" for i in range(width)]


def preset_spec(preset: str, item_input: str, params: dict | None = None, where: str = "training.yaml") -> PipelineSpec:
    """A preset's steps for what the items carry, with `params` over its final estimator's."""
    name = _preset_name(preset)
    by_input = PRESET_STEPS[name]
    if item_input not in by_input:
        raise LabelloopConfigError(
            f"{where}: pipeline {preset!r} takes {' or '.join(by_input)}; this home's items carry "
            f"{item_input} (use pipeline: logistic_regression, or a steps list)"
        )
    *head, (last, defaults) = by_input[item_input]
    return PipelineSpec(input=item_input, steps=(*head, (last, {**defaults, **(params or {})})), preset=name)


@dataclass(frozen=True)
class PipelineChoice:
    """What training.yaml asks for, before the home's item content is known."""

    preset: str | None
    steps: tuple[tuple[str, dict], ...]
    params: dict
    input: str | None  # None: what the items carry

    def resolve(self, item_content: str, where: str = "training.yaml") -> PipelineSpec:
        """The spec for a home whose items carry `item_content` (text, features or text+features)."""
        wanted = self.input or item_content
        if self.preset is not None:
            _check_carried(wanted, item_content, where)
            spec = preset_spec(self.preset, wanted, self.params, where)
        else:
            if wanted == BOTH:
                raise LabelloopConfigError(
                    f"{where}: a steps list takes one input; this home's items carry text and features: "
                    "set input: text or input: features, or use pipeline: logistic_regression for both"
                )
            _check_carried(wanted, item_content, where)
            spec = PipelineSpec(input=wanted, steps=self.steps)
        check_spec(spec, where)
        return spec


def _preset_name(preset: str) -> str:
    """`auto` is logistic regression on what the items carry."""
    return "logistic_regression" if preset == "auto" else preset


def _check_carried(wanted: str, carried: str, where: str) -> None:
    if wanted == BOTH and carried != BOTH or wanted not in carried:
        raise LabelloopConfigError(f"{where}: input {wanted} asks for what this home's items do not carry ({carried})")


def parse_choice(raw: dict, where: str) -> PipelineChoice:
    """`pipeline`, `params` and `input` of training.yaml, checked as far as possible without the home."""
    pipeline = raw.get("pipeline", "auto")
    params = raw.get("params") or {}
    item_input = raw.get("input")
    if not isinstance(params, dict):
        raise LabelloopConfigError(f"{where}: params must be a mapping")
    if item_input is not None and item_input not in INPUTS:
        raise LabelloopConfigError(f"{where}: input must be one of {', '.join(INPUTS)}, not {item_input!r}")
    if isinstance(pipeline, str):
        if pipeline not in PRESETS:
            raise LabelloopConfigError(
                f"{where}: pipeline {pipeline!r} is not a preset ({', '.join(PRESETS)}); a list of steps "
                "names scikit-learn classes: [{TfidfVectorizer: {}}, {LogisticRegression: {C: 4.0}}]"
            )
        name = _preset_name(pipeline)
        # The final estimator is the same class for every input of a preset: check params on it.
        final = next(iter(PRESET_STEPS[name].values()))[-1][0]
        checked = _check_params(final, _tupled(params), f"{where}: params")
        return PipelineChoice(preset=pipeline, steps=(), params=checked, input=item_input)
    if params:
        raise LabelloopConfigError(f"{where}: params go with a preset; a steps list gives each step its own")
    if not isinstance(pipeline, list) or not pipeline:
        raise LabelloopConfigError(f"{where}: pipeline must be a preset name or a non-empty list of steps")
    steps = []
    for position, step in enumerate(pipeline, start=1):
        if not (isinstance(step, dict) and len(step) == 1):
            raise LabelloopConfigError(
                f"{where}: pipeline step {position} must be one mapping {{ClassName: {{param: value}}}}, "
                f"not {step!r}"
            )
        (name, step_params), = step.items()
        step_params = step_params or {}
        if not isinstance(step_params, dict):
            raise LabelloopConfigError(f"{where}: pipeline step {position} ({name}): parameters must be a mapping")
        steps.append((str(name), _check_params(str(name), _tupled(step_params), f"{where}: pipeline step "
                                                                               f"{position} ({name})")))
    return PipelineChoice(preset=None, steps=tuple(steps), params={}, input=item_input)


def check_spec(spec: PipelineSpec, where: str) -> None:
    """The shape of a chain: transformers, then one classifier that gives probabilities."""
    from sklearn.base import is_classifier

    *head, (last, last_params) = spec.steps
    final = _make(last, last_params)
    if not is_classifier(final) or not hasattr(final, "predict_proba"):
        raise LabelloopConfigError(
            f"{where}: the last step ({last}) must be a classifier that gives probabilities (predict_proba); "
            + ("set probability: true" if "probability" in final.get_params() else "choose another classifier")
        )
    for name, params in head:
        if not hasattr(_make(name, params), "transform"):
            raise LabelloopConfigError(f"{where}: step {name} must be a transformer (every step but the last)")
    first = spec.steps[0][0]
    if spec.input in (TEXT, BOTH) and first not in TEXT_VECTORIZERS:
        raise LabelloopConfigError(
            f"{where}: input {spec.input}: the first step must turn text into numbers "
            f"({', '.join(TEXT_VECTORIZERS)}), not {first}"
        )
    if spec.input == FEATURES and first in TEXT_VECTORIZERS:
        raise LabelloopConfigError(f"{where}: {first} reads text, and this pipeline's input is features")


def _estimator_class(name: str, where: str) -> type:
    from sklearn.base import BaseEstimator

    if re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
        for module_name in SKLEARN_MODULES:
            found = getattr(importlib.import_module(module_name), name, None)
            if isinstance(found, type) and issubclass(found, BaseEstimator):
                return found
    searched = ", ".join(m.removeprefix("sklearn.") for m in SKLEARN_MODULES)
    raise LabelloopConfigError(f"{where}: {name!r} is not a scikit-learn estimator in {searched}")


def _check_params(name: str, params: dict, where: str) -> dict:
    cls = _estimator_class(name, where)
    try:
        known = cls().get_params(deep=False)
    except TypeError:  # wraps other estimators, which a YAML value cannot be
        raise LabelloopConfigError(f"{where}: {name} needs other estimators as arguments; not supported") from None
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise LabelloopConfigError(f"{where}: unknown parameters {unknown}; {name} takes {sorted(known)}")
    if name in TEXT_VECTORIZERS and params.get("input", "content") != "content":
        # Item texts read as file names would open files on the worker (and on the serving host).
        raise LabelloopConfigError(f"{where}: input must be content: the items' text is what is read, never a "
                                   "file it names")
    for key, value in params.items():
        if not _plain(value):
            raise LabelloopConfigError(f"{where}: {key} must be a number, text, true/false, null or a list of those")
    try:
        cls(**params)._validate_params()
    except (ValueError, TypeError) as error:
        raise LabelloopConfigError(f"{where}: {error}") from None
    return params


def _make(name: str, params: dict) -> Any:
    cls = _estimator_class(name, "training.yaml")
    if "random_state" in cls().get_params(deep=False) and "random_state" not in params:
        params = {**params, "random_state": RANDOM_STATE}
    return cls(**params)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _tupled(params: dict) -> dict:
    """YAML and JSON have lists, scikit-learn wants tuples (ngram_range=(1, 2))."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in params.items()}


def _jsonable(params: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
