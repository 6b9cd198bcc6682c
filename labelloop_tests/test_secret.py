"""The pseudonymization key resists guessing.

Two ways in, each reproduced first: the check value the store keeps (a fast keyed hash of a
constant let a dictionary recover a weak key at once, without knowing any user id), and a weak
LABELLOOP_SECRET itself (accepted, however short). Now the check value is a salted scrypt hash,
and a weak key is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.core import lake, secret, store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.lake import Lake
from labelloop_assets.core.settings import (
    ALLOW_DEV_SECRET_ENV,
    DEV_SECRET,
    LabelloopConfigError,
    pseudonymization_key,
    secret_problems,
)
from labelloop_tests import pg
from labelloop_tests.conftest import correction, land_items, make_items, write_jsonl
from labelloop_tests.test_loop import _materialize

STRONG = "dFSRmBCQNYKpl-BZt5DipdDUIrZ1onc6fWitdp_gUhQ"
OTHER_STRONG = "Zm9j2MNR3yrg7xRDp8xcfjvhTxdIUiUtPJB4KF9hdmo"
# Keys people choose, and the words an attacker's dictionary starts with.
DICTIONARY = ["secret", "password", "changeme", "labelloop", "prod-key", "first-key", "letmein",
              "company-secret-2026", "labelloop-prod", "s3cr3t"] + [f"key-{n}" for n in range(2000)]
WEAK_KEY = b"company-secret-2026"



@pytest.fixture
def con(tmp_path):
    with store.connect(tmp_path / "store.duckdb") as connection:
        yield connection


@pytest.fixture(params=["embedded", pytest.param("lake", marks=pytest.mark.postgres)])
def either_con(request, tmp_path, monkeypatch):
    """The embedded file, or the lake on a real PostgreSQL: the same schema_info table."""
    if request.param == "embedded":
        yield request.getfixturevalue("con")
        return
    pg.require_server()
    monkeypatch.setenv(lake.CATALOG_ENV, pg.fresh_database("secret"))
    with store.connect(Lake.from_env(tmp_path)) as connection:
        yield connection


@pytest.fixture(autouse=True)
def _nothing_verified_yet():
    secret._VERIFIED.clear()
    yield
    secret._VERIFIED.clear()


def stored_checks(con) -> list[str]:
    return [v for (v,) in con.execute(
        "SELECT value FROM schema_info WHERE key = 'pseudonym_key_check'").fetchall()]


def guess(stored: str, dictionary: list[str], budget_seconds: float) -> tuple[str | None, int]:
    """An attacker with the database: each word of the dictionary tested against the check value,
    until it matches or the time budget is spent. Returns the key found and the words tried."""
    deadline = time.perf_counter() + budget_seconds
    for tried, word in enumerate(dictionary, 1):
        if secret.matches(word.encode(), stored):
            return word, tried
        if time.perf_counter() > deadline:
            return None, tried
    return None, len(dictionary)


# --------------------------------------------------------------------------- the check value


def test_a_legacy_check_value_gives_a_weak_key_to_a_dictionary_at_once(con):
    """The finding, reproduced: the fast check value stores made before hold."""
    legacy = pseudonym(WEAK_KEY, secret.LEGACY_KEY_CHECK)
    found, tried = guess(legacy, DICTIONARY, budget_seconds=5)
    assert found == WEAK_KEY.decode() and tried == DICTIONARY.index(found) + 1


def test_the_stored_check_value_is_a_salted_slow_hash(con):
    secret.check_pseudonymization_key(con, WEAK_KEY)

    [stored] = stored_checks(con)
    algorithm, n, r, p, salt, digest = stored.split("$")
    assert (algorithm, int(n), int(r), int(p)) == ("scrypt", 2**15, 8, 1)
    assert len(salt) == 24 and len(digest) == 44  # 16 and 32 bytes, base64
    # Salted: the same key gives another value in another store.
    assert secret.check_value(WEAK_KEY) != stored
    # Nothing fast to test guesses against: the legacy value and the key are not in it.
    assert pseudonym(WEAK_KEY, secret.LEGACY_KEY_CHECK) not in stored and WEAK_KEY.decode() not in stored
    # Each guess costs a slow hash: the same budget that found the key above tries a handful.
    found, tried = guess(stored, [w for w in DICTIONARY if w != WEAK_KEY.decode()], budget_seconds=0.5)
    assert found is None and tried < 50
    slow = _seconds_per_guess(lambda: secret.matches(b"a-guess", stored), 3)
    fast = _seconds_per_guess(lambda: hmac.new(b"a-guess", secret.LEGACY_KEY_CHECK.encode(), hashlib.sha256), 2000)
    assert slow > 0.01 and slow / fast > 1000, (slow, fast)
    assert secret.matches(WEAK_KEY, stored)


def _seconds_per_guess(attempt, times: int) -> float:
    started = time.perf_counter()
    for _ in range(times):
        attempt()
    return (time.perf_counter() - started) / times


def test_another_key_is_still_refused_and_the_first_one_still_accepted(either_con):
    secret.check_pseudonymization_key(either_con, STRONG.encode())
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_SECRET is not the key"):
        secret.check_pseudonymization_key(either_con, OTHER_STRONG.encode())
    secret._VERIFIED.clear()  # a new process
    secret.check_pseudonymization_key(either_con, STRONG.encode())
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_SECRET is not the key"):
        secret.check_pseudonymization_key(either_con, OTHER_STRONG.encode())
    assert len(stored_checks(either_con)) == 1


def test_a_legacy_check_value_is_verified_once_and_replaced_by_the_slow_form(either_con):
    legacy = pseudonym(STRONG.encode(), secret.LEGACY_KEY_CHECK)
    either_con.execute("INSERT INTO schema_info VALUES ('pseudonym_key_check', ?)", [legacy])

    # The wrong key is refused the old way, and the value stays what it was.
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_SECRET is not the key"):
        secret.check_pseudonymization_key(either_con, OTHER_STRONG.encode())
    assert stored_checks(either_con) == [legacy]

    secret.check_pseudonymization_key(either_con, STRONG.encode())

    [upgraded] = stored_checks(either_con)
    assert upgraded.startswith("scrypt$32768$8$1$") and secret.matches(STRONG.encode(), upgraded)
    secret._VERIFIED.clear()  # the next process verifies the slow form
    secret.check_pseudonymization_key(either_con, STRONG.encode())
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_SECRET is not the key"):
        secret.check_pseudonymization_key(either_con, OTHER_STRONG.encode())
    assert stored_checks(either_con) == [upgraded]


def test_a_process_verifies_each_key_and_value_once(con, monkeypatch):
    calls = []
    real = secret._scrypt

    def counted(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(secret, "_scrypt", counted)
    secret.check_pseudonymization_key(con, STRONG.encode())  # records the value: one hash
    for _ in range(5):
        secret.check_pseudonymization_key(con, STRONG.encode())
    assert len(calls) == 1
    secret._VERIFIED.clear()
    for _ in range(5):
        secret.check_pseudonymization_key(con, STRONG.encode())
    assert len(calls) == 2
    # A refused key is refused every time (nothing about it is remembered as good).
    for _ in range(2):
        with pytest.raises(LabelloopConfigError):
            secret.check_pseudonymization_key(con, OTHER_STRONG.encode())
    assert len(calls) == 4


def test_two_values_stored_at_once_must_both_match(either_con):
    """Two first runs at once on the lake (no UNIQUE there) may each store a value."""
    either_con.execute("INSERT INTO schema_info VALUES ('pseudonym_key_check', ?)",
                       [secret.check_value(STRONG.encode())])
    either_con.execute("INSERT INTO schema_info VALUES ('pseudonym_key_check', ?)",
                       [secret.check_value(STRONG.encode())])
    secret.check_pseudonymization_key(either_con, STRONG.encode())
    either_con.execute("INSERT INTO schema_info VALUES ('pseudonym_key_check', ?)",
                       [secret.check_value(OTHER_STRONG.encode())])
    with pytest.raises(LabelloopConfigError, match="LABELLOOP_SECRET is not the key"):
        secret.check_pseudonymization_key(either_con, STRONG.encode())


@pytest.mark.parametrize("altered", [
    "scrypt$1099511627776$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # 128 TiB of memory asked for
    "scrypt$32768$8$100000$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # hours of work
    "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # n not a power of two
    "scrypt$32768$8$1$not base64!$" + "A" * 44,
    "plain-text",
])
def test_an_altered_check_value_is_a_clear_error_not_a_hang(con, altered):
    con.execute("INSERT INTO schema_info VALUES ('pseudonym_key_check', ?)", [altered])
    started = time.thread_time()  # CPU time: a busy machine's other processes do not count
    with pytest.raises(LabelloopConfigError, match="not a check value labelloop writes"):
        secret.check_pseudonymization_key(con, STRONG.encode())
    assert time.thread_time() - started < 1


@pytest.mark.slow
def test_a_real_run_stores_the_slow_form_and_refuses_another_key(home, defs, instance, monkeypatch):
    monkeypatch.setenv("LABELLOOP_SECRET", STRONG)
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one", user="zed")])
    assert _materialize(defs, instance, ["items", "raw_corrections"]).success
    with store.connect(home.database, read_only=True) as con:
        [stored] = stored_checks(con)
    assert stored.startswith("scrypt$32768$8$1$") and secret.matches(STRONG.encode(), stored)

    monkeypatch.setenv("LABELLOOP_SECRET", OTHER_STRONG)
    write_jsonl(home.landing_dir("corrections"), "c2.jsonl", [correction("e-2", "item-030", "one", user="zed")])
    result = _materialize(defs, instance, ["raw_corrections"], raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE][0]
    assert "LABELLOOP_SECRET is not the key" in failure.step_failure_data.error.message


# --------------------------------------------------------------------------- the key's strength


@pytest.mark.parametrize("weak, reason", [
    ("first-key", "shorter than 32 characters"),
    ("privacy-test-key-5c1d7e9a", "shorter than 32 characters"),
    ("abababababababababababababababababab", "fewer than 10 different characters"),
    ("93847561029384756102938475610293847561", "under 128 bits"),
    ("zqxjvkwpyfmgbhdtlcrnzqxjvkwpyf", "shorter than 32"),
    ("qmzvxkwjpyfgbhdtlcrnsaeiouqmzvxkwjpy", "a stretch of 8 characters comes twice"),
    ("Xy7#Kp2$Lm9!Qw4%Xy7#Kp2$Lm9!Qw4%Xy7#Kp2$", "a stretch of 8 characters comes twice"),
    ("abcdefghijklmnopqrstuvwxyz0123456789", "sequential pattern"),
    ("Zr8abcdefghijk5Qm2Lx9Wv4Tn7Yp1Hs6Bd", "sequential pattern"),
    ("my-company-production-secret-2026-v2", "common word"),
    ("Tr0ub4dor&3-LABELLOOP-Prod-Kx9#Qw7!", "common word"),
    (DEV_SECRET, "public development key"),
    # Found by an independent attack on the first version of the rule (each passed it):
    ("aZ1!aZ2!aZ3!aZ4!aZ5!aZ6!aZ7!aZ8!aZ9!", "strided pattern"),
    ("Aa1!Bb2@Cc3#Dd4$Ee5%Ff6^Gg7&Hh8*", "strided pattern"),
    ("Welcome1Welcome2Welcome3Welcome4!", "strided pattern"),
    ("1q2w3e4r5t6y7u8i9o0pAZSXDCFVGBHN", "password crackers try first"),
    ("iloveyou-princess-sunshine-monkey!", "password crackers try first"),
])
def test_a_weak_key_is_refused_with_the_reason(monkeypatch, weak, reason):
    monkeypatch.delenv(ALLOW_DEV_SECRET_ENV, raising=False)
    monkeypatch.setenv("LABELLOOP_SECRET", weak)
    with pytest.raises(LabelloopConfigError) as refused:
        pseudonymization_key()
    message = str(refused.value)
    assert "LABELLOOP_SECRET is too weak" in message and reason in message
    assert "labelloop secret new" in message  # how to make one
    assert weak not in message  # never quoted


@pytest.mark.slow
def test_random_keys_pass():
    assert not secret_problems(STRONG) and not secret_problems(OTHER_STRONG)
    # What `labelloop secret new`, secrets.token_urlsafe(32) and a 128-bit hex key give.
    # (500 each: zxcvbn takes about 5 ms a value; 3,000 of each refused 1 hex key and no other.)
    refused = [v for v in (secrets.token_urlsafe(32) for _ in range(500)) if secret_problems(v)]
    assert len(refused) <= 1, refused  # a common word by chance: about 1 in 20,000
    assert sum(bool(secret_problems(secrets.token_hex(16))) for _ in range(500)) <= 2
    assert not secret_problems("4f3c9a0b1e2d8c7f6a5b4c3d2e1f0a9b")


def test_the_public_development_key_only_with_its_switch(monkeypatch):
    monkeypatch.delenv("LABELLOOP_SECRET", raising=False)
    monkeypatch.setenv(ALLOW_DEV_SECRET_ENV, "1")
    assert pseudonymization_key() == DEV_SECRET.encode()
    monkeypatch.setenv("LABELLOOP_SECRET", DEV_SECRET)
    assert pseudonymization_key() == DEV_SECRET.encode()
    monkeypatch.delenv(ALLOW_DEV_SECRET_ENV)
    with pytest.raises(LabelloopConfigError, match="public development key"):
        pseudonymization_key()
    monkeypatch.setenv("LABELLOOP_SECRET", STRONG)
    assert pseudonymization_key() == STRONG.encode()


def test_a_run_with_a_weak_key_fails_at_once_and_ingests_nothing(home, defs, instance, monkeypatch):
    monkeypatch.setenv("LABELLOOP_SECRET", "company-secret-2026")
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "c1.jsonl", [correction("e-1", "item-030", "one", user="zed")])

    result = _materialize(defs, instance, ["items", "raw_corrections"], raise_on_error=False)

    assert not result.success
    failure = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE][0]
    assert "LABELLOOP_SECRET is too weak" in failure.step_failure_data.error.message
    assert "company-secret-2026" not in failure.step_failure_data.error.message
    with store.connect(home.database, read_only=True) as con:
        assert store.scalar(con, "SELECT count(*) FROM raw_corrections") == 0
        assert stored_checks(con) == []


# --------------------------------------------------------------------------- the command line


def test_secret_new_prints_a_fresh_strong_value(capsys):
    values = set()
    for _ in range(3):
        assert cli.main(["secret", "new"]) == 0
        printed = capsys.readouterr()
        value = printed.out.strip()
        assert printed.out == value + "\n" and len(value) == 43 and not secret_problems(value)
        assert "outside LABELLOOP_HOME" in printed.err
        values.add(value)
    assert len(values) == 3


def test_secret_check_says_whether_the_key_meets_the_rule(monkeypatch, capsys):
    monkeypatch.setenv("LABELLOOP_SECRET", STRONG)
    assert cli.main(["secret", "check"]) == 0
    assert "meets the rule" in capsys.readouterr().out

    monkeypatch.setenv("LABELLOOP_SECRET", "prod-key-2026")
    assert cli.main(["secret", "check"]) == 2
    printed = capsys.readouterr()
    assert "too weak" in printed.err and "shorter than 32" in printed.err and "prod-key-2026" not in printed.err

    monkeypatch.delenv("LABELLOOP_SECRET")
    assert cli.main(["secret", "check"]) == 2
    assert "LABELLOOP_SECRET is not set" in capsys.readouterr().err
