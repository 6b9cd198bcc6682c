"""The contributor directory: the roles the deployment grants, the keys that sign reviewer
actions, and the landing folders (producers) that may assert roles for their users.

Authority comes from files the deployment owns in the home (`contributors.yaml`, and the
older `reviewers.yaml`), never from a landing file or a run's config. A correction line's
`user_role` is a claim: it counts only up to what the directory grants (see `effective_role`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.contracts import USER_ROLES
from labelloop_assets.core.settings import LabelloopConfigError, load_yaml_mapping

# Higher rank, more authority. A claim above what is granted counts at the grant.
ROLE_RANK = {role: rank for rank, role in enumerate(USER_ROLES)}
END_USER = USER_ROLES[0]
# Landing files directly in `landing/<kind>/` come from this producer; a subfolder
# `landing/<kind>/<name>/` is producer <name>, and the deployment gives each producer its own
# folder (its write permission is the producer's identity).
ROOT_PRODUCER = "."
PRODUCER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ED25519_PUBLIC_KEY_BYTES = 32
LABEL_STUDIO_ADDRESS = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")


@dataclass(frozen=True)
class PublicKey:
    """One Ed25519 public key of a contributor; revoked keys verify nothing ingested after `revoked_at`."""

    key_id: str
    raw: bytes
    revoked_at: datetime | None = None

    def revoked(self, at: datetime) -> bool:
        return self.revoked_at is not None and at >= self.revoked_at


@dataclass(frozen=True)
class Contributor:
    """A person the deployment granted a role to; `via` limits the producers whose lines carry the grant."""

    id: str
    role: str
    keys: tuple[PublicKey, ...] = ()
    via: tuple[str, ...] | None = None
    # The e-mail address they sign in to Label Studio with (core/label_studio.py maps answers by it).
    label_studio: str | None = None


@dataclass(frozen=True)
class Directory:
    """contributors.yaml (and reviewers.yaml, read for older homes) as one lookup."""

    contributors: dict[str, Contributor]
    # producer folder -> the highest role its lines may claim for a user the directory does not list
    # (a listed user counts at their grant, wherever their line comes from)
    producers: dict[str, str]

    @classmethod
    def load(cls, contributors_file: Path, reviewers_file: Path | None = None) -> Directory:
        contributors: dict[str, Contributor] = {}
        producers: dict[str, str] = {}
        if contributors_file.exists():
            raw = load_yaml_mapping(contributors_file, "contributors")
            unknown = set(raw) - {"contributors", "producers"}
            if unknown:
                raise LabelloopConfigError(
                    f"contributors file {contributors_file}: unknown sections {sorted(unknown)}; "
                    "known: contributors, producers"
                )
            for entry in _entries(raw, "contributors", contributors_file):
                person = _contributor(entry, contributors_file)
                if person.id in contributors:
                    raise LabelloopConfigError(f"contributors file {contributors_file}: {person.id!r} is listed twice")
                contributors[person.id] = person
            for entry in _entries(raw, "producers", contributors_file):
                folder, claim = _producer(entry, contributors_file)
                producers[folder] = claim
        if reviewers_file is not None and reviewers_file.exists():
            # reviewers.yaml (before contributors.yaml existed) still grants its roles; an id in
            # both files must not be granted two different roles.
            raw = load_yaml_mapping(reviewers_file, "reviewers")
            for entry in _entries(raw, "reviewers", reviewers_file):
                person = _contributor(entry, reviewers_file)
                known = contributors.get(person.id)
                if known is None:
                    contributors[person.id] = person
                elif known.role != person.role:
                    raise LabelloopConfigError(
                        f"{person.id!r} is a {person.role} in {reviewers_file} but a {known.role} in "
                        f"{contributors_file}; keep one (contributors.yaml is the directory)"
                    )
        addresses = [p.label_studio.casefold() for p in contributors.values() if p.label_studio]
        if len(addresses) != len(set(addresses)):
            raise LabelloopConfigError(
                f"contributors file {contributors_file}: the same label_studio address is listed for two people")
        key_ids = [key.key_id for person in contributors.values() for key in person.keys]
        if len(key_ids) != len(set(key_ids)):
            raise LabelloopConfigError(f"contributors file {contributors_file}: the same public key is listed twice")
        return cls(contributors, producers)

    def role_of(self, user_id: str) -> str | None:
        person = self.contributors.get(user_id)
        return person.role if person else None

    def authorities(self) -> dict[str, str]:
        """Contributor id -> role, for roles above end_user (who may act as a reviewer)."""
        return {p.id: p.role for p in self.contributors.values() if p.role != END_USER}

    def label_studio_addresses(self) -> dict[str, Contributor]:
        """Label Studio sign-in address (case-folded) -> the contributor it belongs to."""
        return {p.label_studio.casefold(): p for p in self.contributors.values() if p.label_studio}

    def key(self, key_id: str) -> tuple[Contributor, PublicKey] | None:
        for person in self.contributors.values():
            for key in person.keys:
                if key.key_id == key_id:
                    return person, key
        return None

    def grants(self, secret: bytes) -> pl.DataFrame:
        """(user_pseudonym, granted_role, granted_via) for every listed contributor: joined to
        pseudonymized corrections, so no raw id is needed at ingest."""
        people = list(self.contributors.values())
        return pl.DataFrame(
            {
                "user_pseudonym": [pseudonym(secret, p.id) for p in people],
                "granted_role": [p.role for p in people],
                "granted_via": [list(p.via) if p.via is not None else None for p in people],
            },
            schema={"user_pseudonym": pl.String, "granted_role": pl.String, "granted_via": pl.List(pl.String)},
        )

    def producer_claims(self) -> pl.DataFrame:
        return pl.DataFrame(
            {"producer": list(self.producers), "may_claim": list(self.producers.values())},
            schema={"producer": pl.String, "may_claim": pl.String},
        )


def producer_expr(relative_path: pl.Expr) -> pl.Expr:
    """The producer of each landing file from its path under landing/ (`kind/name` or
    `kind/producer/name`)."""
    parts = relative_path.str.split("/")
    return pl.when(parts.list.len() > 2).then(parts.list.get(1, null_on_oob=True)).otherwise(pl.lit(ROOT_PRODUCER))


def effective_role(claimed: pl.Expr, granted: pl.Expr, producer_may_claim: pl.Expr) -> pl.Expr:
    """The role a vote counts at: its claim, capped by the higher of the directory's grant and
    what its producer may assert. An unlisted user from an untrusted producer is an end user."""
    def ranked(role: pl.Expr) -> pl.Expr:
        return role.replace_strict(ROLE_RANK, default=0, return_dtype=pl.Int64)

    counted = pl.min_horizontal(ranked(claimed), pl.max_horizontal(ranked(granted), ranked(producer_may_claim)))
    return counted.replace_strict(dict(enumerate(USER_ROLES)), return_dtype=pl.String)


def key_id(raw: bytes) -> str:
    """A public key's id: a fingerprint of its bytes (what signed records name)."""
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:24]


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _entries(raw: dict, section: str, path: Path) -> list[dict]:
    entries = raw.get(section) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LabelloopConfigError(f"{path.name} {path}: `{section}` must be a list of mappings")
    return entries


def _contributor(entry: dict, path: Path) -> Contributor:
    unknown = set(entry) - {"id", "role", "keys", "via", "label_studio"}
    if unknown:
        raise LabelloopConfigError(
            f"{path}: unknown fields {sorted(unknown)} in {entry.get('id')!r}; known: id, role, keys, via, label_studio"
        )
    ident, role = entry.get("id"), entry.get("role")
    if not isinstance(ident, str) or not ident.strip() or ident != ident.strip():
        raise LabelloopConfigError(f"{path}: each entry needs an `id` (text without surrounding spaces)")
    if role not in USER_ROLES:
        raise LabelloopConfigError(f"{path}: role {role!r} of {ident!r} is not one of {', '.join(USER_ROLES)}")
    via = entry.get("via")
    if via is not None:
        if not isinstance(via, list) or not all(isinstance(v, str) and _is_producer(v) for v in via):
            raise LabelloopConfigError(f"{path}: `via` of {ident!r} must list producer folders (or '.')")
        via = tuple(via)
    address = entry.get("label_studio")
    if address is not None and (not isinstance(address, str) or not LABEL_STUDIO_ADDRESS.match(address)):
        raise LabelloopConfigError(f"{path}: `label_studio` of {ident!r} must be the e-mail address they sign in with")
    keys = entry.get("keys") or []
    if not isinstance(keys, list):
        raise LabelloopConfigError(f"{path}: `keys` of {ident!r} must be a list of {{public_key: ...}} entries")
    return Contributor(ident, role, tuple(_public_key(k, ident, path) for k in keys), via, address)


def _public_key(entry, owner: str, path: Path) -> PublicKey:
    if isinstance(entry, str):
        entry = {"public_key": entry}
    if not isinstance(entry, dict) or set(entry) - {"public_key", "revoked_at", "key_id"}:
        raise LabelloopConfigError(f"{path}: each key of {owner!r} is a mapping with public_key (and revoked_at)")
    try:
        raw = base64.b64decode(str(entry.get("public_key", "")), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise LabelloopConfigError(
            f"{path}: a public_key of {owner!r} is not a base64 Ed25519 public key (32 bytes); "
            "`labelloop keys new` prints one"
        )
    derived = key_id(raw)
    if entry.get("key_id") not in (None, derived):
        raise LabelloopConfigError(
            f"{path}: key_id {entry['key_id']!r} of {owner!r} does not match its public_key ({derived})"
        )
    revoked = entry.get("revoked_at")
    if revoked is not None:
        revoked = _timestamp(revoked, f"{path}: revoked_at of a key of {owner!r}")
    return PublicKey(derived, raw, revoked)


def _timestamp(value, where: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise LabelloopConfigError(f"{where} must be an ISO-8601 time, not {value!r}") from None
    if parsed.tzinfo is None:
        raise LabelloopConfigError(f"{where} needs a time zone (e.g. 2026-12-01T09:00:00Z)")
    return parsed.astimezone(UTC)


def _producer(entry: dict, path: Path) -> tuple[str, str]:
    folder, claim = entry.get("folder"), entry.get("may_claim", END_USER)
    if set(entry) - {"folder", "may_claim"} or not isinstance(folder, str) or not _is_producer(folder):
        raise LabelloopConfigError(
            f"{path}: each producer is {{folder: NAME, may_claim: ROLE}}; NAME is a landing subfolder "
            f"(letters, digits, . _ -) or '.' for files directly in landing/<kind>/"
        )
    if claim not in USER_ROLES:
        raise LabelloopConfigError(f"{path}: may_claim of producer {folder!r} must be one of {', '.join(USER_ROLES)}")
    return folder, claim


def _is_producer(name: str) -> bool:
    return name == ROOT_PRODUCER or bool(PRODUCER_NAME.match(name))
