"""Property-based tests: the landing-file parsers never raise and always account for every line;
the resolution rules keep the promises governance.yaml and the README make."""

from __future__ import annotations

import itertools
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labelloop_assets.core import contracts, ingest, store
from labelloop_assets.core.ontology import Ontology
from labelloop_assets.core.resolve import (
    AUTHORITY_ROLES,
    CONFIRMED,
    DECISION_STATUSES,
    ESCALATE,
    ESCALATION_REASONS,
    PENDING,
    PROMOTE,
    ResolutionPolicy,
    resolve,
    stage,
)
from labelloop_assets.core.settings import DEFAULTS_DIR, Home

KEY = b"property-test-key"
FEATURES = [0.5, 1.0, 1.5, 2.0]
REASONS = {v for k, v in vars(contracts).items() if isinstance(v, str) and k.lower() == v}
# Line-level reasons a correction file can produce (review-only and whole-file ones excluded).
LINE_REASONS = REASONS - {
    contracts.UNKNOWN_REVIEWER, contracts.ROLE_NOT_ALLOWED, contracts.UNKNOWN_ESCALATION,
    contracts.ESCALATION_CLOSED, contracts.DECISION_NOT_APPLICABLE, contracts.UNREADABLE_FILE,
    contracts.UNSUPPORTED_FORMAT, contracts.FILE_TOO_LARGE, contracts.FEATURE_LENGTH_MISMATCH,
}

# Small, fixed budgets: the whole file must stay fast and give the same examples on every run.
PARSER_SETTINGS = settings(
    max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RESOLVE_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- parsers


class Landing:
    """One real home and DuckDB file shared by the examples of a test; each example lands a
    file under a new name, so the ledger treats it as new."""

    def __init__(self, root: Path):
        self.home = Home(root / "home").ensure()
        self._connection = store.connect(self.home.database)
        self.con = self._connection.__enter__()
        self.ontology = Ontology.load(self.home.ontology_file)
        self._names = itertools.count()
        folder = self.home.landing_dir("items")
        items = [{"item_id": f"i{n}", "features": FEATURES, "initial_label": "three"} for n in range(1, 4)]
        (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        # Gold item g1 is declared by the deployment, in gold.jsonl.
        self.home.gold_file.write_text(json.dumps({"item_id": "g1", "features": FEATURES, "gold_label": "four"}) + "\n")
        assert ingest.ingest_items(self.con, self.home, self.ontology, "seed").accepted == 3

    def close(self) -> None:
        self._connection.__exit__(None, None, None)

    def land(self, data: bytes) -> str:
        name = f"f{next(self._names):05d}.jsonl"
        (self.home.landing_dir("corrections") / name).write_bytes(data)
        return f"corrections/{name}"

    def ingest(self) -> ingest.IngestReport:
        return ingest.ingest_corrections(self.con, self.home, self.ontology, KEY, "prop")

    def outcome(self, source: str) -> tuple[dict, dict[int, str], set[int]]:
        """(ledger row, quarantined line -> reason, accepted line numbers) of one landing file."""
        ledger = store.frame(self.con, "SELECT * FROM ingested_files WHERE path = ?", [source]).to_dicts()
        assert len(ledger) == 1
        quarantined = store.frame(
            self.con, "SELECT line_no, reason FROM quarantine WHERE source_file = ?", [source]
        )
        accepted = store.frame(
            self.con, "SELECT line_no FROM raw_corrections WHERE source_file = ?", [source]
        )
        lines = dict(quarantined.iter_rows())
        assert len(lines) == quarantined.height, "one quarantine row per line"
        return ledger[0], lines, set(accepted["line_no"].to_list())


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Landing:
    zone = Landing(tmp_path_factory.mktemp("properties"))
    yield zone
    zone.close()


def physical_lines(data: bytes) -> list[bytes]:
    """The lines of a landing file as a reader of the contract sees them (no parser involved)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def assert_accounted(
    landing: Landing, data: bytes, report: ingest.IngestReport
) -> tuple[dict[int, str], set[int]]:
    """Every line of the file is blank, accepted or quarantined with a known reason, once."""
    source = report.files[-1]
    ledger, quarantined, accepted = landing.outcome(source)
    assert report.reconciles
    if None in quarantined:
        # Refused whole (UTF-16 or UTF-32 text): one quarantine row stands for the file.
        assert data.startswith(contracts.UTF16_32_BOMS)
        assert quarantined == {None: contracts.INVALID_ENCODING} and not accepted
        assert (ledger["records_in"], ledger["quarantined"]) == (1, 1)
        return quarantined, accepted
    lines = physical_lines(data)
    assert set(quarantined.values()) <= LINE_REASONS
    assert not quarantined.keys() & accepted
    assert ledger["records_in"] == ledger["accepted"] + ledger["quarantined"]
    assert (ledger["accepted"], ledger["quarantined"]) == (len(accepted), len(quarantined))
    assert ledger["records_in"] + ledger["blank_lines"] == len(lines)
    assert quarantined.keys() | accepted <= set(range(1, len(lines) + 1))
    # A line with a visible character is never taken for a blank one.
    visible = {n for n, line in enumerate(lines, start=1) if any(0x21 <= b <= 0x7E for b in line)}
    assert visible <= quarantined.keys() | accepted
    return quarantined, accepted


def ingest_once(landing: Landing, data: bytes) -> tuple[dict[int, str], set[int]]:
    landing.land(data)
    report = landing.ingest()
    assert len(report.files) == 1
    outcome = assert_accounted(landing, data, report)
    rows = {t: store.scalar(landing.con, f"SELECT count(*) FROM {t}")
            for t in ("raw_corrections", "quarantine", "ingested_files")}
    again = landing.ingest()
    assert (again.files, again.records_in) == ([], 0)
    assert rows == {t: store.scalar(landing.con, f"SELECT count(*) FROM {t}") for t in rows}
    return outcome


@PARSER_SETTINGS
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_and_every_line_is_accounted_for(landing, data):
    ingest_once(landing, data)


@PARSER_SETTINGS
@given(st.lists(st.text(max_size=80), max_size=8), st.booleans())
def test_arbitrary_text_lines_never_raise_and_every_line_is_accounted_for(landing, lines, final_newline):
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    ingest_once(landing, text.encode("utf-8", errors="surrogatepass"))


JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@PARSER_SETTINGS
@given(st.lists(JSON_VALUES, min_size=1, max_size=6))
def test_arbitrary_json_values_never_raise_and_non_objects_are_not_an_object(landing, values):
    data = "".join(json.dumps(v) + "\n" for v in values).encode()
    quarantined, accepted = ingest_once(landing, data)
    # json.dumps never writes a blank line: every value is a record.
    assert len(quarantined) + len(accepted) == len(values)
    for n, value in enumerate(values, start=1):
        if not isinstance(value, dict):
            assert quarantined[n] == contracts.NOT_AN_OBJECT


HOSTILE_TEXT = st.sampled_from([
    "'; DROP TABLE raw_corrections; --", "../../etc/passwd", "\u043ene", "ｏｎｅ", " one ", "ONE",
    "", "   ", "\u0000", "\ufeff", "\u202e", "one\u200b", "x" * 300, "Robert'); --", "%s%s%n",
])
FIELD_VALUES = JSON_VALUES | HOSTILE_TEXT | st.sampled_from(
    ["i1", "g1", "one", "zero", "end_user", "reviewer", "annotation", "2024-05-01T12:00:00Z",
     "2024-05-01T12:00:00", "9999-01-01T00:00:00Z", "1970-01-01T00:00:00Z", 0.5, 1.5, True, False]
)
CORRECTION_FIELDS = [field.name for field in contracts.CORRECTION_SPEC.fields]


def valid_correction(event_id: str) -> dict:
    return {
        "event_id": event_id, "item_id": "i1", "corrected_label": "one", "user_id": "alice",
        "user_role": "annotator", "source": "annotation", "consent": True,
        "created_at": "2024-05-01T12:00:00Z",
    }


@st.composite
def mutated_corrections(draw) -> list[dict]:
    """Valid corrections with some fields replaced by arbitrary or hostile values, or dropped."""
    records = []
    for _n in range(draw(st.integers(1, 5))):
        record = valid_correction(f"ev-{draw(st.integers(0, 3))}")
        for name in draw(st.lists(st.sampled_from(CORRECTION_FIELDS), max_size=3, unique=True)):
            if draw(st.booleans()):
                record[name] = draw(FIELD_VALUES)
            else:
                record.pop(name, None)
        records.append(record)
    return records


@PARSER_SETTINGS
@given(mutated_corrections())
def test_mutated_corrections_are_stored_only_when_they_meet_the_contract(landing, records):
    # Event ids are made unique per example, so earlier examples cannot turn them into replays.
    prefix = f"x{next(landing._names)}-"
    for record in records:
        if isinstance(record.get("event_id"), str) and record["event_id"].startswith("ev-"):
            record["event_id"] = prefix + record["event_id"]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    source = landing.land(data)
    report = landing.ingest()
    quarantined, accepted = assert_accounted(landing, data, report)
    assert len(quarantined) + len(accepted) == len(records)

    stored = store.frame(
        landing.con, "SELECT * FROM raw_corrections WHERE source_file = ? ORDER BY line_no", [source]
    )
    labels = set(landing.ontology.labels)
    for row in stored.to_dicts():
        assert row["corrected_label"] in labels
        assert row["original_label"] is None or row["original_label"] in labels
        assert row["item_id"] in {"i1", "i2", "i3"}
        assert row["user_role"] in contracts.USER_ROLES and row["source"] in contracts.CORRECTION_SOURCES
        assert row["consent"] is True
        assert 0 < len(row["event_id"]) <= 256
        assert row["event_id"] == row["event_id"].strip(" \t\r\n")
        assert row["user_pseudonym"].startswith("u_") and len(row["user_pseudonym"]) == 34
        assert row["user_confidence"] is None or 0.0 <= row["user_confidence"] <= 1.0
        assert datetime(2000, 1, 1, tzinfo=UTC) <= row["created_at"]
        assert row["created_at"] <= datetime.now(UTC) + timedelta(days=1)
        assert row["rationale"] is None or len(row["rationale"]) <= 2000
        assert row["context"] is None or isinstance(json.loads(row["context"]), dict)
    # No two stored events share an id, whatever the file held.
    assert stored["event_id"].n_unique() == stored.height

    # Re-sent under another name: what was accepted is now a replay, the rest keeps its reason.
    copy = landing.home.landing_dir("corrections") / f"resent-{Path(source).name}"
    shutil.copyfile(landing.home.landing / source, copy)
    resent = landing.ingest()
    again, nothing = assert_accounted(landing, data, resent)
    assert nothing == set()
    assert again == {**quarantined, **{n: contracts.DUPLICATE_EVENT for n in accepted}}


# --------------------------------------------------------------------------- resolution


POLICY = ResolutionPolicy.load(DEFAULTS_DIR / "governance.yaml")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LABELS = ("one", "two", "three")
ITEMS = ("a", "b", "c")
PEOPLE = tuple(f"u_{name}" for name in ("ann", "bob", "cy", "dee", "eve", "fay", "gus"))
CORRECTION_SCHEMA = {
    "seq": pl.Int64, "event_id": pl.String, "item_id": pl.String, "corrected_label": pl.String,
    "original_label": pl.String, "user_pseudonym": pl.String, "user_role": pl.String,
    "source": pl.String, "created_at": pl.Datetime("us", "UTC"), "model_version": pl.String,
    "prediction_id": pl.String, "rationale": pl.String,
}
NO_PREDICTIONS = pl.DataFrame(schema={
    "prediction_id": pl.String, "item_id": pl.String, "predicted_label": pl.String,
    "confidence": pl.Float64, "model_version": pl.String,
})
RELIABILITY_SCHEMA = {"user_pseudonym": pl.String, "accuracy": pl.Float64, "n_votes": pl.Int64}

vote_tuples = st.tuples(
    st.sampled_from(ITEMS), st.sampled_from(PEOPLE), st.sampled_from(LABELS),
    st.sampled_from(contracts.USER_ROLES), st.integers(0, 5),
)


def votes_frame(votes: list[tuple]) -> pl.DataFrame:
    """(item, person, label, role, minute) rows; seq and event ids in list order."""
    rows = [
        {"seq": n, "event_id": f"e{n:03d}", "item_id": item, "corrected_label": label,
         "original_label": None, "user_pseudonym": person, "user_role": role, "source": "annotation",
         "created_at": T0 + timedelta(minutes=minute), "model_version": None, "prediction_id": None,
         "rationale": f"r{n}"}
        for n, (item, person, label, role, minute) in enumerate(votes, start=1)
    ]
    return pl.DataFrame(rows, schema=CORRECTION_SCHEMA)


@st.composite
def worlds(draw, min_votes: int = 1):
    votes = draw(st.lists(vote_tuples, min_size=min_votes, max_size=12))
    current = pl.DataFrame(
        [(item, draw(st.sampled_from(LABELS)), draw(st.booleans())) for item in ITEMS],
        schema={"item_id": pl.String, "label": pl.String, "reviewer_confirmed": pl.Boolean},
        orient="row",
    )
    known = draw(st.lists(st.sampled_from(PEOPLE), unique=True, max_size=len(PEOPLE)))
    reliability = pl.DataFrame(
        [(p, draw(st.sampled_from([0.0, 0.3, 0.7, 0.85, 0.9, 1.0])), draw(st.sampled_from([0, 5, 20, 40])))
         for p in known],
        schema=RELIABILITY_SCHEMA, orient="row",
    )
    return votes, current, reliability


def decide(votes: list[tuple] | pl.DataFrame, current: pl.DataFrame, reliability: pl.DataFrame,
           policy: ResolutionPolicy = POLICY, history: dict[str, int] | None = None) -> pl.DataFrame:
    """Established contributors (active on many earlier days) unless `history` gives each
    person's earlier active days."""
    frame = votes if isinstance(votes, pl.DataFrame) else votes_frame(votes)
    staged = stage(frame, NO_PREDICTIONS, current, policy)
    days = pl.col("user_pseudonym").replace_strict(history, default=0, return_dtype=pl.Int64) \
        if history is not None else pl.lit(30, pl.Int64)
    return resolve(staged.with_columns(history=days), current, policy, reliability)


def latest_votes(votes: list[tuple]) -> dict[tuple[str, str], tuple[str, str]]:
    """(item, person) -> (label, role) of each contributor's latest vote: created last, then
    arrived last."""
    latest: dict[tuple[str, str], tuple[int, int, str, str]] = {}
    for seq, (item, person, label, role, minute) in enumerate(votes, start=1):
        if (item, person) not in latest or (minute, seq) > latest[(item, person)][:2]:
            latest[(item, person)] = (minute, seq, label, role)
    return {key: value[2:] for key, value in latest.items()}


def weight(person: str, role: str, reliability: pl.DataFrame) -> float:
    """README: end users' and annotators' votes weigh role weight x accuracy / prior_mean;
    reviewers and domain experts keep their role weight."""
    base = POLICY.role_weights[role]
    if role in AUTHORITY_ROLES:
        return base
    found = reliability.filter(pl.col("user_pseudonym") == person)["accuracy"].to_list()
    accuracy = found[0] if found else POLICY.reliability_prior_mean
    return base * accuracy / POLICY.reliability_prior_mean


@RESOLVE_SETTINGS
@given(worlds(), st.randoms(use_true_random=False))
def test_decisions_do_not_depend_on_the_order_votes_arrive_in(world, rnd):
    votes, current, reliability = world
    frame = votes_frame(votes)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=rnd.randrange(2**32))
    first = decide(frame, current, reliability)
    assert decide(frame, current, reliability).equals(first)  # deterministic
    assert decide(shuffled, current, reliability).equals(first)
    assert decide(frame, current, reliability.reverse()).equals(first)


@RESOLVE_SETTINGS
@given(worlds())
def test_every_decision_is_a_documented_outcome_with_the_documented_support(world):
    votes, current, reliability = world
    decisions = decide(votes, current, reliability)
    latest = latest_votes(votes)
    assert sorted(decisions["item_id"].to_list()) == sorted({item for item, *_ in votes})
    now = dict(current.select("item_id", "label").iter_rows())
    for d in decisions.to_dicts():
        item = d["item_id"]
        assert d["status"] in DECISION_STATUSES
        assert (d["escalation_reason"] is not None) == (d["status"] == ESCALATE)
        assert d["escalation_reason"] is None or d["escalation_reason"] in ESCALATION_REASONS
        mine = {person: vote for (i, person), vote in latest.items() if i == item}
        support = {}
        for person, (label, role) in mine.items():
            support[label] = support.get(label, 0.0) + weight(person, role, reliability)
        assert d["proposed_label"] in support
        assert d["support"] == pytest.approx(support[d["proposed_label"]])
        assert d["support"] == pytest.approx(max(support.values()))
        assert d["total_weight"] == pytest.approx(sum(support.values()))
        assert 0.0 <= d["share"] <= 1.0
        assert d["n_contributors"] == len(mine)
        assert d["n_supporters"] == sum(1 for label, _ in mine.values() if label == d["proposed_label"])
        assert d["current_label"] == now[item]
        if d["status"] in (PROMOTE, CONFIRMED):
            assert d["support"] >= POLICY.min_support and d["share"] >= POLICY.min_share
            assert (d["status"] == CONFIRMED) == (d["proposed_label"] == d["current_label"])


@RESOLVE_SETTINGS
@given(worlds())
def test_no_lone_untrusted_contributor_and_no_crowd_overrides_a_reviewer(world):
    votes, current, reliability = world
    decisions = decide(votes, current, reliability)
    trusted = {
        p for p, accuracy, n in reliability.iter_rows()
        if accuracy >= POLICY.solo_min_accuracy and n >= POLICY.solo_min_votes
    }
    confirmed_by_reviewer = dict(current.select("item_id", "reviewer_confirmed").iter_rows())
    latest = latest_votes(votes)
    for d in decisions.filter(pl.col("status") == PROMOTE).to_dicts():
        backers = [(person, role) for (item, person), (label, role) in latest.items()
                   if item == d["item_id"] and label == d["proposed_label"]]
        authority = any(role in AUTHORITY_ROLES for _, role in backers)
        assert d["by_authority"] == authority
        if len(backers) == 1:
            person, role = backers[0]
            assert role in AUTHORITY_ROLES or person in trusted, "a lone end user flipped a label"
        if confirmed_by_reviewer[d["item_id"]]:
            assert authority, "a reviewer-confirmed label changed without a reviewer"


@RESOLVE_SETTINGS
@given(worlds(), st.lists(st.integers(0, 3), min_size=len(PEOPLE), max_size=len(PEOPLE)))
def test_a_newcomers_vote_weighs_the_newcomer_share_and_never_flips_alone(world, days):
    """governance newcomers: under min_history earlier days, a vote outside the exempt roles
    counts at newcomers.weight of its weight, and a newcomer never flips a label alone."""
    votes, current, reliability = world
    history = dict(zip(PEOPLE, days, strict=True))
    decisions = decide(votes, current, reliability, history=history)
    latest = latest_votes(votes)

    def newcomer(person: str, role: str) -> bool:
        return role not in POLICY.newcomer_exempt_roles and history[person] < POLICY.newcomer_min_history

    for d in decisions.to_dicts():
        mine = {person: vote for (i, person), vote in latest.items() if i == d["item_id"]}
        total = sum(weight(p, role, reliability) * (POLICY.newcomer_weight if newcomer(p, role) else 1.0)
                    for p, (_, role) in mine.items())
        assert d["total_weight"] == pytest.approx(total)
        backers = [(p, role) for p, (label, role) in mine.items() if label == d["proposed_label"]]
        if d["status"] == PROMOTE and len(backers) == 1:
            assert not newcomer(*backers[0]), "a newcomer flipped a label alone"


@RESOLVE_SETTINGS
@given(worlds(), st.sampled_from(contracts.USER_ROLES))
def test_a_vote_for_the_proposed_label_never_moves_the_decision_to_another_label(world, role):
    votes, current, reliability = world
    before = decide(votes, current, reliability)
    newcomer = "u_newcomer"
    for d in before.to_dicts():
        after = decide(votes + [(d["item_id"], newcomer, d["proposed_label"], role, 9)], current, reliability)
        row = after.filter(pl.col("item_id") == d["item_id"]).to_dicts()[0]
        assert row["proposed_label"] == d["proposed_label"]
        assert row["support"] > d["support"] and row["share"] >= d["share"] - 1e-12
        if d["status"] in (PROMOTE, CONFIRMED):
            assert row["status"] == d["status"]


@RESOLVE_SETTINGS
@given(worlds(), st.sampled_from(LABELS))
def test_superseded_votes_do_not_count(world, label):
    votes, current, reliability = world
    before = decide(votes, current, reliability)
    # An older vote of someone who voted later on the same item is never their latest.
    item, person, *_ = votes[0]
    earliest = min(minute for i, p, _, _, minute in votes if (i, p) == (item, person))
    older = [(item, person, label, "domain_expert", earliest - 1)]
    after = decide(votes + older, current, reliability)
    assert after.equals(before)


@RESOLVE_SETTINGS
@given(worlds(), worlds())
def test_items_are_decided_independently(first, second):
    votes_a = [v for v in first[0] if v[0] == "a"]
    others = [v for v in second[0] if v[0] != "a"]
    current, reliability = first[1], first[2]
    alone = decide(votes_a, current, reliability) if votes_a else None
    together = decide(votes_a + others, current, reliability)
    if alone is None:
        assert "a" not in together["item_id"].to_list()
    else:
        # Item a's votes come first in both lists, so even their event ids are the same.
        assert together.filter(pl.col("item_id") == "a").equals(alone)


@RESOLVE_SETTINGS
@given(
    st.sampled_from(AUTHORITY_ROLES), st.sampled_from(LABELS), st.sampled_from(LABELS),
    st.sampled_from(LABELS), st.sampled_from(["end_user"] * 3 + ["annotator"]),
    st.sampled_from([0.0, 0.5, 0.7, 1.0]), st.booleans(),
)
def test_one_reviewer_outweighs_one_end_user_as_the_default_weights_say(
    authority, expert_label, crowd_label, now, crowd_role, accuracy, confirmed
):
    """Default weights: reviewer 4 vs end user 1 x accuracy / 0.7 <= 1.43, a share of at least
    0.74 >= min_share 0.6 (an annotator, 2 x accuracy / 0.7 <= 2.86, still leaves 0.58 < 0.6)."""
    current = pl.DataFrame(
        {"item_id": ["a"], "label": [now], "reviewer_confirmed": [confirmed]}
    )
    reliability = pl.DataFrame([("u_crowd", accuracy, 50)], schema=RELIABILITY_SCHEMA, orient="row")
    votes = [("a", "u_crowd", crowd_label, crowd_role, 1), ("a", "u_expert", expert_label, authority, 2)]
    d = decide(votes, current, reliability).to_dicts()[0]
    if crowd_label == expert_label:
        assert d["status"] in (PROMOTE, CONFIRMED) and d["proposed_label"] == expert_label
        return
    crowd = POLICY.role_weights[crowd_role] * accuracy / POLICY.reliability_prior_mean
    assert d["proposed_label"] == expert_label
    if 4.0 / (4.0 + crowd) >= POLICY.min_share:
        assert d["status"] == (CONFIRMED if expert_label == now else PROMOTE)
    elif expert_label == now:
        # Not enough share to confirm; nothing would change, so there is nothing to escalate.
        assert d["status"] == PENDING
    else:
        assert d["status"] == ESCALATE and d["escalation_reason"] == "disagreement"


@RESOLVE_SETTINGS
@given(st.floats(0.05, 0.95), st.sampled_from(LABELS), st.integers(2, 4))
def test_contributors_at_the_prior_mean_keep_their_role_weight_exactly(prior_mean, label, n_users):
    """README: a typical contributor keeps the role weight. So do n new end users (no reliability
    estimate yet) agreeing on a change reach min_support = n: the change is promoted."""
    policy = ResolutionPolicy(
        role_weights=POLICY.role_weights, min_support=float(n_users), reliability_prior_mean=prior_mean
    )
    current = pl.DataFrame({"item_id": ["a"], "label": ["zero"], "reviewer_confirmed": [False]})
    votes = [("a", f"u_new{k}", label, "end_user", k) for k in range(n_users)]
    none = pl.DataFrame(schema=RELIABILITY_SCHEMA)
    d = decide(votes, current, none, policy).to_dicts()[0]
    assert (d["status"], d["support"], d["share"]) == (PROMOTE, float(n_users), 1.0)
