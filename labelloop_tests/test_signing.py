"""Signed reviewer actions: a decision counts only when its reviewer's registered, unrevoked key
signed exactly what landed. Unsigned, altered, replayed and wrongly-keyed decisions are refused
and audited; the command line refuses to sign without the reviewer's own key kept outside the home.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest

from labelloop_assets import cli
from labelloop_assets.core import signing, store
from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.settings import pseudonymization_key
from labelloop_assets.jobs import INGEST_JOB
from labelloop_tests.conftest import (
    correction,
    give_keys,
    key_of,
    land_items,
    make_items,
    set_yaml,
    signed,
    write_jsonl,
)

REVIEWERS = "reviewers:\n  - {id: reviewer-0, role: reviewer}\n  - {id: expert-0, role: domain_expert}\n"


def _rows(home, sql, params=None):
    with store.connect(home.database, read_only=True) as con:
        return store.frame(con, sql, params)


def _ingest(defs, instance) -> None:
    assert defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance).success


def _open_ties(home, defs, instance, monkeypatch) -> None:
    """Two tie escalations (two end users for `one`, two for `two`), and two reviewers with keys."""
    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text(REVIEWERS)
    give_keys(home, "reviewer-0", "expert-0")
    # Fresh end-user ids count fully here (newcomers' weight is another suite's subject): 2 v 2 is a tie.
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    land_items(home, make_items()[0])
    write_jsonl(home.landing_dir("corrections"), "ties.jsonl", [
        correction(f"{item}-{k}", item, label, user=f"{item}-user{k}", role="end_user")
        for item in ("item-030", "item-031") for k, label in enumerate(["one", "one", "two", "two"])
    ])
    _ingest(defs, instance)
    assert _rows(home, "SELECT escalation_id FROM escalations ORDER BY 1")["escalation_id"].to_list() == [
        "esc-item-030-1", "esc-item-031-1"]


def _decision(decision_id: str, **overrides) -> dict:
    record = {"decision_id": decision_id, "escalation_id": "esc-item-030-1", "decision": "accept", "label": "two",
              "reviewer_id": "reviewer-0", "rationale": "the loop is open", "decided_at": "2026-03-03T09:00:00+00:00"}
    return {**record, **overrides}


def _refusals(home) -> dict[str, str]:
    return dict(_rows(home, "SELECT record_id, reason FROM quarantine WHERE kind = 'reviews'").iter_rows())


def _label(home, item_id: str) -> tuple:
    return _rows(home, "SELECT label, reviewer_confirmed FROM production_corpus WHERE item_id = ?", [item_id]).row(0)


# --------------------------------------------------------------------------- the signature itself


def test_a_signature_covers_every_field_the_domain_and_nothing_else_verifies():
    key = signing.generate()
    record = signing.sign_review(key, _decision("d-1", rationale="égal — ça marche"))
    public = signing.public_bytes(key)
    message = signing.canonical(signing.REVIEW_DOMAIN, record, signing.REVIEW_FIELDS)
    # Sorted keys, no blanks, UTF-8 as is; the signature and unsigned extras are not part of it.
    assert message.startswith(b'{"decided_at":"2026-03-03T09:00:00+00:00","decision":"accept",')
    assert "égal — ça marche".encode() in message and b"signature" not in message
    assert signing.verify(public, message, record["signature"])
    assert record["key_id"] == signing.key_id_of(key)
    assert signing.canonical(signing.REVIEW_DOMAIN, {**record, "extra": 1}, signing.REVIEW_FIELDS) == message

    for field in signing.REVIEW_FIELDS:
        changed = {**record, field: "something else"}
        assert not signing.verify(public, signing.canonical(signing.REVIEW_DOMAIN, changed, signing.REVIEW_FIELDS),
                                  record["signature"]), field
    without_label = {k: v for k, v in record.items() if k != "label"}
    assert not signing.verify(public, signing.canonical(signing.REVIEW_DOMAIN, without_label, signing.REVIEW_FIELDS),
                              record["signature"])
    # The same fields under another action's domain, another key, a mangled signature: no.
    assert not signing.verify(public, signing.canonical(signing.ROLLBACK_DOMAIN, record, signing.REVIEW_FIELDS),
                              record["signature"])
    assert not signing.verify(signing.public_bytes(signing.generate()), message, record["signature"])
    for bad in ("", "not base64!", record["signature"][:-4] + "AAA=", "A" * 88):
        assert not signing.verify(public, message, bad)


def test_a_key_file_is_private_new_and_ed25519(tmp_path):
    key = signing.generate()
    path = signing.write_private_key(tmp_path / "keys" / "reviewer-0.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert signing.key_id_of(signing.load_private_key(path)) == signing.key_id_of(key)
    with pytest.raises(signing.SigningError, match="never overwritten"):
        signing.write_private_key(path, signing.generate())
    assert signing.key_id_of(signing.load_private_key(path)) == signing.key_id_of(key)  # unchanged

    os.chmod(path, 0o644)
    with pytest.raises(signing.SigningError, match=r"may be read by other users \(mode 644\)"):
        signing.load_private_key(path)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(signing.SigningError, match="not an unencrypted PEM private key"):
        signing.load_private_key(garbage)
    with pytest.raises(signing.SigningError, match="no key file"):
        signing.load_private_key(tmp_path / "missing.key")


# --------------------------------------------------------------------------- ingest


@pytest.mark.slow
def test_unsigned_altered_replayed_and_wrongly_keyed_decisions_are_refused_and_audited(
    home, defs, instance, monkeypatch
):
    _open_ties(home, defs, instance, monkeypatch)
    genuine = signed(_decision("d-genuine", escalation_id="esc-item-031-1", decision="defer", label=None))
    stranger = signing.generate()  # registered nowhere
    write_jsonl(home.landing_dir("reviews"), "by-hand.jsonl", [
        # Written by hand for a listed reviewer, never signed.
        _decision("d-unsigned"),
        # Signed, then the label changed.
        {**signed(_decision("d-altered", label="one")), "label": "two"},
        # Signed by expert-0 (a real key, a real reviewer) while naming reviewer-0.
        signing.sign_review(key_of("expert-0"), _decision("d-borrowed")),
        # Signed by a key the directory does not know.
        signing.sign_review(stranger, _decision("d-stranger")),
        # reviewer-0's genuine signature of another decision, replayed under a new decision_id.
        {**genuine, "decision_id": "d-replayed", "escalation_id": "esc-item-030-1"},
        {**genuine, "decision_id": "d-replayed-same-escalation"},
        genuine,
    ])
    _ingest(defs, instance)

    assert _refusals(home) == {
        "d-unsigned": "unsigned", "d-altered": "bad_signature", "d-borrowed": "bad_signature",
        "d-stranger": "unknown_key", "d-replayed": "bad_signature", "d-replayed-same-escalation": "bad_signature",
    }
    details = dict(_rows(home, "SELECT record_id, detail FROM quarantine WHERE kind = 'reviews'").iter_rows())
    assert "must be signed" in details["d-unsigned"]
    assert "does not verify" in details["d-altered"] and "another contributor" in details["d-borrowed"]
    assert f"key_id {signing.key_id_of(stranger)} is not a key" in details["d-stranger"]
    # Every refusal is in the audit log, with its reason; nothing of them took effect.
    audit = _rows(home, "SELECT actor, outcome, reason FROM audit_log WHERE action LIKE 'review.%' ORDER BY reason")
    assert audit.rows() == [("unverified", "refused", "bad_signature")] * 4 + [
        ("unverified", "refused", "unknown_key"), ("unverified", "refused", "unsigned"),
        (pseudonym(pseudonymization_key(), "reviewer-0"), "accepted", None)]
    assert _rows(home, "SELECT escalation_id FROM escalations ORDER BY 1")["escalation_id"].to_list() == [
        "esc-item-030-1", "esc-item-031-1"]
    assert _label(home, "item-030") == ("zero", False)
    # The genuine one is stored with the key that signed it and the signature that was verified.
    stored = _rows(home, "SELECT decision_id, reviewer_role, key_id, signature FROM review_decisions")
    assert stored.rows() == [("d-genuine", "reviewer", genuine["key_id"], genuine["signature"])]
    # The run names the policy it judged them by.
    used = _rows(home, "SELECT file, sha256 FROM policy_uses WHERE step = 'review_decisions'")
    assert set(used["file"]) == {"governance.yaml", "contributors.yaml", "reviewers.yaml"}
    assert dict(used.iter_rows())["contributors.yaml"] == signing_sha(home.contributors_file)

    # The same signed line landed again is a replay of a stored decision.
    write_jsonl(home.landing_dir("reviews"), "again.jsonl", [genuine])
    _ingest(defs, instance)
    assert _refusals(home)["d-genuine"] == "duplicate_event"
    assert _rows(home, "SELECT deferrals FROM escalations WHERE escalation_id = 'esc-item-031-1'")["deferrals"][0] == 1


def signing_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_role_is_the_signers_from_the_directory_not_the_lines(home, defs, instance, monkeypatch):
    """A line cannot raise its reviewer: the role that decides is contributors.yaml's."""
    _open_ties(home, defs, instance, monkeypatch)
    set_yaml(home.governance_file, {"escalation": {"may_decide": {"tie": ["domain_expert"]}}})
    write_jsonl(home.landing_dir("reviews"), "claims.jsonl", [
        signed({**_decision("d-claims"), "reviewer_role": "domain_expert"}),
        signed(_decision("d-expert", reviewer_id="expert-0", escalation_id="esc-item-031-1")),
    ])
    _ingest(defs, instance)
    assert _refusals(home) == {"d-claims": "role_not_allowed"}
    assert _rows(home, "SELECT decision_id, reviewer_role FROM review_decisions").rows() == [
        ("d-expert", "domain_expert")]


@pytest.mark.slow
def test_revocation_refuses_later_signatures_only(home, defs, instance, monkeypatch, capsys):
    _open_ties(home, defs, instance, monkeypatch)
    old_key = signing.key_id_of(key_of("reviewer-0"))
    write_jsonl(home.landing_dir("reviews"), "before.jsonl", [
        signed(_decision("d-before", decision="defer", label=None, rationale="ask the scanner team"))])
    _ingest(defs, instance)
    assert _rows(home, "SELECT decision_id FROM review_decisions")["decision_id"].to_list() == ["d-before"]

    # The key leaks; the deployment revokes it from now on.
    revoked_at = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    text = home.contributors_file.read_text()
    public = signing.public_key_text(key_of("reviewer-0"))
    assert text.count(public) == 1
    home.contributors_file.write_text(
        text.replace(f"public_key: {public}", f"public_key: {public}\n    revoked_at: '{revoked_at}'")
    )
    assert cli.main(["keys", "list", "--json"]) == 0
    listed = {row["key_id"]: row["status"] for row in json.loads(capsys.readouterr().out)}
    assert listed[old_key] == "revoked"

    # What the leaked key signs now is refused, at ingest and at the command line.
    write_jsonl(home.landing_dir("reviews"), "after.jsonl", [signed(_decision("d-after"))])
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "one", "--rationale", "x",
                     "--as", "reviewer-0"]) == 3
    err = capsys.readouterr().err
    assert f"key {old_key}" in err and "was revoked at" in err
    _ingest(defs, instance)
    assert _refusals(home)["d-after"] == "revoked_key"
    # The decision ingested before the revocation stands.
    assert _rows(home, "SELECT decision_id FROM review_decisions")["decision_id"].to_list() == ["d-before"]
    assert _rows(home, "SELECT deferrals FROM escalations WHERE escalation_id = 'esc-item-030-1'")["deferrals"][0] == 1
    assert _label(home, "item-030") == ("zero", False)

    # A new key, registered, signs again.
    os.rename(signing.default_key_file("reviewer-0"), signing.default_key_file("reviewer-0").with_suffix(".leaked"))
    assert cli.main(["keys", "new", "reviewer-0", "--register"]) == 0
    capsys.readouterr()
    assert cli.main(["review", "decide", "esc-item-030-1", "--label", "two", "--rationale", "checked",
                     "--as", "reviewer-0"]) == 0
    _ingest(defs, instance)
    assert _label(home, "item-030") == ("two", True)


# --------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_the_cli_refuses_to_act_without_the_reviewers_own_key_outside_the_home(
    home, defs, instance, monkeypatch, capsys, tmp_path
):
    _open_ties(home, defs, instance, monkeypatch)
    decide = ["review", "decide", "esc-item-030-1", "--label", "two", "--rationale", "it is a two"]
    # No key where the default looks (expert-0's key file is moved away).
    os.rename(signing.default_key_file("expert-0"), tmp_path / "elsewhere.key")
    assert cli.main([*decide, "--as", "expert-0"]) == 3
    err = capsys.readouterr().err
    assert "no signing key for 'expert-0'" in err and "labelloop keys new 'expert-0' --register" in err
    assert "recorded for the audit log" in err
    # A key file kept inside the home is refused, even a registered one.
    inside = home.root / "expert-0.key"
    os.rename(tmp_path / "elsewhere.key", inside)
    assert cli.main([*decide, "--as", "expert-0", "--key", str(inside)]) == 3
    assert "lies inside LABELLOOP_HOME" in capsys.readouterr().err
    # Another reviewer's key, or one nobody registered (named by LABELLOOP_SIGNING_KEY).
    assert cli.main([*decide, "--as", "expert-0", "--key", str(signing.default_key_file("reviewer-0"))]) == 3
    assert "is registered to another contributor, not to 'expert-0'" in capsys.readouterr().err
    stray = signing.write_private_key(tmp_path / "stray.key", signing.generate())
    monkeypatch.setenv("LABELLOOP_SIGNING_KEY", str(stray))
    assert cli.main([*decide, "--as", "expert-0"]) == 3
    assert "is not one of 'expert-0''s keys in contributors.yaml" in capsys.readouterr().err
    # Arguments holding bytes that are not UTF-8 can be neither signed nor stored: refused, not a crash.
    monkeypatch.delenv("LABELLOOP_SIGNING_KEY")
    assert cli.main(["review", "reject", "esc-item-030-1", "--rationale", "bad \udcff byte", "--as", "reviewer-0"]) == 3
    assert "rationale is not valid text" in capsys.readouterr().err
    _ingest(defs, instance)

    # Five attempts refused and audited; the stray key did sign its attempt, so the audit says which.
    reasons = sorted(_refusals(home).values())
    assert reasons == ["bad_signature", "invalid_value", "unknown_key", "unsigned", "unsigned"]
    audit = _rows(home, "SELECT outcome, reason FROM audit_log WHERE action = 'review.decide' ORDER BY reason")
    assert audit.rows() == [("refused", r) for r in reasons]
    assert _label(home, "item-030") == ("zero", False)

    # With its own key (named by LABELLOOP_SIGNING_KEY) the decision goes through.
    os.rename(inside, tmp_path / "expert-0.key")
    monkeypatch.setenv("LABELLOOP_SIGNING_KEY", str(tmp_path / "expert-0.key"))
    assert cli.main([*decide, "--as", "expert-0"]) == 0
    _ingest(defs, instance)
    assert _label(home, "item-030") == ("two", True)
    stored = _rows(home, "SELECT key_id FROM review_decisions")["key_id"].to_list()
    assert stored == [signing.key_id_of(signing.load_private_key(tmp_path / "expert-0.key"))]


@pytest.mark.slow
def test_keys_new_writes_a_private_key_outside_the_home_and_register_makes_it_sign(
    home, defs, instance, monkeypatch, capsys, tmp_path
):
    _open_ties(home, defs, instance, monkeypatch)
    home.reviewers_file.write_text(REVIEWERS + "  - {id: reviewer-1, role: reviewer}\n")
    header = home.contributors_file.read_text().splitlines()[0]

    # Not listed: a key grants nothing, so it is not registered (and no file is written).
    assert cli.main(["keys", "new", "mallory", "--register"]) == 3
    assert "is not listed in" in capsys.readouterr().err
    assert not signing.default_key_file("mallory").exists()
    # Never inside the home; never over an existing file.
    assert cli.main(["keys", "new", "reviewer-1", "--out", str(home.root / "keys" / "r1.key")]) == 3
    assert "lies inside LABELLOOP_HOME" in capsys.readouterr().err
    assert not (home.root / "keys").exists()
    assert cli.main(["keys", "new", "reviewer-0"]) == 3
    assert "never overwritten" in capsys.readouterr().err

    # Without --register: the key, and the entry to add by hand.
    assert cli.main(["keys", "new", "reviewer-1"]) == 0
    printed = capsys.readouterr().out
    path = signing.default_key_file("reviewer-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not signing.inside(path, home.root)
    key_id = signing.key_id_of(signing.load_private_key(path))
    assert f"key_id:      {key_id}" in printed and "- id: reviewer-1\n    role: reviewer\n    keys:" in printed
    assert cli.main(["review", "reject", "esc-item-030-1", "--rationale", "vendor is right", "--as", "reviewer-1"]) == 3
    capsys.readouterr()

    # --register (reviewer-1 is listed in reviewers.yaml only): the next decision verifies.
    path.unlink()
    assert cli.main(["keys", "new", "reviewer-1", "--register"]) == 0
    assert "registered in" in capsys.readouterr().out
    assert home.contributors_file.read_text().splitlines()[0] == header  # the header comment is kept
    assert cli.main(["review", "reject", "esc-item-030-1", "--rationale", "vendor is right", "--as", "reviewer-1"]) == 0
    capsys.readouterr()
    _ingest(defs, instance)
    assert _label(home, "item-030") == ("zero", True)
    # The attempt before registration was signed with the then-unknown key, and refused as such.
    assert list(_refusals(home).values()) == ["unknown_key"]
    assert _rows(home, "SELECT reviewer_role, key_id FROM review_decisions").rows() == [
        ("reviewer", signing.key_id_of(signing.load_private_key(path)))]

    assert cli.main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["contributor_id"], r["role"], r["status"]) for r in listed} == {
        ("reviewer-0", "reviewer", "active"), ("expert-0", "domain_expert", "active"),
        ("reviewer-1", "reviewer", "active")}


def test_a_rollback_is_signed_and_refused_without_a_key(home, monkeypatch, capsys, tmp_path):
    from labelloop_assets.core import train

    monkeypatch.setenv("LABELLOOP_HOME", str(home.root))
    home.reviewers_file.write_text(REVIEWERS)
    give_keys(home, "reviewer-0")
    # A registry with a retired champion m0001 and the champion m0002 (their files as training writes them).
    with store.connect(home.database) as con:
        for version, status in (("m0001", "retired"), ("m0002", "champion")):
            (home.models / version).mkdir(parents=True)
            (home.models / version / "metadata.json").write_text("{}")
            con.execute("INSERT INTO models (model_version, corpus_version, n_train_rows, n_classes, algorithm, "
                        "params, train_data_hash, n_gold, label_changes_total, path, status) "
                        "VALUES (?, 1, 10, 3, 'logistic_regression', '{}', 'h', 15, 0, ?, ?)",
                        [version, f"models/{version}", status])
    train.set_current(home.models, "m0002")

    assert cli.main(["model", "rollback", "m0001", "--rationale", "m0002 misreads sevens", "--as", "expert-0"]) == 3
    assert "no signing key for 'expert-0'" in capsys.readouterr().err
    assert cli.main(["model", "rollback", "m0001", "--rationale", "bad \udcff", "--as", "reviewer-0"]) == 3
    assert "--rationale: not valid text" in capsys.readouterr().err
    assert train.current_version(home.models) == "m0002"
    assert cli.main(["model", "rollback", "m0001", "--rationale", "m0002 misreads sevens", "--as", "reviewer-0"]) == 0
    assert train.current_version(home.models) == "m0001"

    audit = _rows(home, "SELECT actor, outcome, reason, detail FROM audit_log WHERE action = 'model.rollback' "
                        "ORDER BY logged_at")
    assert [(r["outcome"], r["reason"]) for r in audit.iter_rows(named=True)] == [
        ("refused", "no signing key was found for the reviewer"),
        ("refused", "--rationale: not valid text (bytes that are not UTF-8)"), ("rolled_back", "m0002 misreads sevens")]
    detail = json.loads(audit["detail"][2])
    # The signature in the audit row verifies, for exactly this rollback, with reviewer-0's registered key.
    action = {"rollback_id": detail["rollback_id"], "version": "m0001", "reviewer_id": "reviewer-0",
              "rationale": "m0002 misreads sevens", "decided_at": detail["decided_at"], "key_id": detail["key_id"]}
    public = signing.public_bytes(key_of("reviewer-0"))
    message = signing.canonical(signing.ROLLBACK_DOMAIN, action, signing.ROLLBACK_FIELDS)
    assert detail["key_id"] == signing.key_id_of(key_of("reviewer-0"))
    assert signing.verify(public, message, detail["signature"])
    assert not signing.verify(public, signing.canonical(signing.ROLLBACK_DOMAIN, {**action, "version": "m0002"},
                                                        signing.ROLLBACK_FIELDS), detail["signature"])
