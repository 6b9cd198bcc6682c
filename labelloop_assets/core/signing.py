"""Ed25519 signatures on reviewer actions: key files, a canonical form, sign and verify.

A reviewer action (a review decision, a model rollback) is signed over a canonical form of every
field that matters, as the signer wrote it (before ingest trims, scrubs or pseudonymizes), with a
domain tag so that a signature made for one kind of action is no signature for another. The
private key stays outside LABELLOOP_HOME; the public key is listed in contributors.yaml.
The cryptography is the `cryptography` package's; nothing here is hand-written crypto.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from labelloop_assets.core.directory import encode_key, key_id

REVIEW_DOMAIN = "labelloop/v1/review"
ROLLBACK_DOMAIN = "labelloop/v1/model.rollback"
# The fields of a review decision a signature covers (absent ones as null): any change to one of
# them, the decision_id included (so a signature cannot be replayed under a new id), breaks it.
REVIEW_FIELDS = (
    "decision_id", "escalation_id", "decision", "label", "reviewer_id", "rationale", "decided_at", "key_id",
)
ROLLBACK_FIELDS = ("rollback_id", "version", "reviewer_id", "rationale", "decided_at", "key_id")

KEYS_DIR_ENV = "LABELLOOP_KEYS_DIR"
SIGNING_KEY_ENV = "LABELLOOP_SIGNING_KEY"
DEFAULT_KEYS_DIR = "~/.config/labelloop/keys"


class SigningError(Exception):
    """A key file that cannot be used; the message says why and what to do."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PrivateKey) -> str:
    """The id contributors.yaml knows the key's public half by."""
    return key_id(public_bytes(key))


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The base64 public key, as contributors.yaml lists it."""
    return encode_key(public_bytes(key))


def keys_dir() -> Path:
    return Path(os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR).expanduser()


def default_key_file(contributor_id: str) -> Path:
    return keys_dir() / f"{contributor_id}.key"


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` (links resolved) lies in `folder`: a key in the home is readable by whatever
    reads the home (backups, runs, the UI), so it is no secret there."""
    return path.resolve().is_relative_to(folder.resolve())


def write_private_key(path: Path, key: Ed25519PrivateKey) -> Path:
    """PEM PKCS8, created with mode 0600; an existing file is never overwritten."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: the file is new, so no one else holds it open, and its mode is ours from the start.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} already exists; a key file is never overwritten (choose --out)") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    return path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """A key file written by `labelloop keys new`; refused when others may read it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"no key file at {path}") from None
    except OSError as error:
        raise SigningError(f"cannot read the key file {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(
            f"the key file {path} may be read by other users (mode {stat.S_IMODE(mode):o}); "
            f"`chmod 600 {path}` if it was never exposed, or make a new key"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningError(f"{path} is not an unencrypted PEM private key (`labelloop keys new` writes one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a private key that is not Ed25519")
    return key


def canonical(domain: str, fields: Mapping[str, object], names: tuple[str, ...]) -> bytes:
    """The bytes a signature covers: a domain tag and the named fields (absent ones as null),
    as compact UTF-8 JSON with sorted keys."""
    document = {name: fields.get(name) for name in names}
    document["domain"] = domain
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(public_key: bytes, message: bytes, signature: str) -> bool:
    """True only for a valid signature of `message` by the key whose raw bytes are `public_key`."""
    try:
        raw = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw, message)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def sign_review(key: Ed25519PrivateKey, record: Mapping[str, object]) -> dict:
    """The decision record with its key_id and signature added."""
    signed = {**record, "key_id": key_id_of(key)}
    signed["signature"] = sign(key, canonical(REVIEW_DOMAIN, signed, REVIEW_FIELDS))
    return signed


def register_public_key(home, contributor_id: str, role: str, public_key: str) -> None:
    """Add a public key to the contributor's entry in the home's contributors.yaml (an entry with
    `role` is added for one listed only in reviewers.yaml). The file is rewritten: its leading
    comment block is kept, comments further down are not. The result must load as a directory
    before it replaces the file."""
    import yaml

    from labelloop_assets.core.directory import Directory
    from labelloop_assets.core.settings import DEFAULTS_DIR, LabelloopConfigError, load_yaml_mapping

    target = home.contributors_file
    source = target if target.exists() else DEFAULTS_DIR / "contributors.yaml"
    header = []
    for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        header.append(line)
    data = load_yaml_mapping(source, "contributors")
    people = data.get("contributors") or []
    data["contributors"] = people
    entry = next((p for p in people if isinstance(p, dict) and p.get("id") == contributor_id), None)
    if entry is None:
        entry = {"id": contributor_id, "role": role}
        people.append(entry)
    entry["keys"] = [*(entry.get("keys") or []), {"public_key": public_key}]
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(
        "".join(header) + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False),
        encoding="utf-8",
    )
    try:
        if target.exists():
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        Directory.load(temporary, home.reviewers_file)  # still a valid directory, or nothing changes
    except LabelloopConfigError:
        temporary.unlink()
        raise
    os.replace(temporary, target)
