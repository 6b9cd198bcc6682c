"""The check that LABELLOOP_SECRET is the key a store's pseudonyms were made with.

The store keeps a check value so that another key is refused (it would give each person a second
pseudonym and a second vote). That value must not let whoever holds the database test guesses of
the key quickly: it is a salted scrypt hash, about 70 ms and 32 MiB per guess, stored as
`scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>`. Stores made before hold a fast keyed hash of a
constant; it is verified once the old way and then replaced by the slow form.

The pseudonyms themselves stay HMAC-SHA256(key, user_id): existing stores hold them and they
cannot be recomputed without the user ids. The strength rule for the key
(`settings.secret_problems`) is what keeps someone who knows a user id from guessing the key
through that user's pseudonym.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

from labelloop_assets.core.anonymize import pseudonym
from labelloop_assets.core.settings import LabelloopConfigError

# scrypt's cost: n (CPU and memory, a power of two), r (block size), p (parallel lanes). Memory is
# 128 * n * r bytes = 32 MiB; one check took 72 ms on the reference machine (2 cores).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
# What a stored value may ask for: a database altered to hold n = 2**40 must not make every run
# allocate terabytes (the bounds allow stronger settings than the default, never unbounded ones).
MAX_MEMORY = 256 * 1024 * 1024
MAX_WORK = 2**22  # n * r * p
CHECK_ROW = "pseudonym_key_check"
# The constant whose keyed hash stores made before the slow check hold.
LEGACY_KEY_CHECK = "labelloop:pseudonymization-key-check"
_LEGACY = re.compile(r"^u_[0-9a-f]{32}$")

KEY_REFUSED = (
    "LABELLOOP_SECRET is not the key this database's user pseudonyms were made with; "
    "restore that key (a different one would give each person a second pseudonym and a "
    "second vote)"
)

# (SHA-256 of the key, stored value) pairs this process has verified: steps that ingest again
# in the same process do not pay the slow hash twice.
_VERIFIED: set[tuple[bytes, str]] = set()


def check_value(key: bytes, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
                p: int = SCRYPT_P) -> str:
    """A new self-describing check value for `key`, with a fresh random salt unless one is given."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = _scrypt(key, salt, n, r, p, HASH_BYTES)
    return "$".join(("scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)))


def matches(key: bytes, stored: str) -> bool:
    """Whether `key` made the stored check value (slow form or legacy form).

    A value of neither form, or one whose scrypt parameters are out of bounds, is a config error:
    labelloop never writes one, so the database was altered.
    """
    if _LEGACY.match(stored):
        return hmac.compare_digest(stored, pseudonym(key, LEGACY_KEY_CHECK))
    n, r, p, salt, digest = _parse(stored)
    return hmac.compare_digest(_scrypt(key, salt, n, r, p, len(digest)), digest)


def check_pseudonymization_key(con, key: bytes) -> None:
    """Refuse a key other than the one the stored pseudonyms were made with.

    The first key seen is recorded as a slow check value; a legacy fast value is verified and
    replaced by the slow form. `con` is a connection to the store (embedded or lake): only its
    `schema_info(key, value)` table is read and written.
    """
    fingerprint = hashlib.sha256(key).digest()
    stored = [
        value for (value,) in con.execute(
            "SELECT value FROM schema_info WHERE key = ?", [CHECK_ROW]
        ).fetchall()
    ]
    if not stored:
        value = check_value(key)
        con.execute("INSERT INTO schema_info VALUES (?, ?)", [CHECK_ROW, value])
        _VERIFIED.add((fingerprint, value))
        return
    # Two first runs at once on the lake (no UNIQUE there) may each have stored one: the key must
    # match every value stored.
    for value in stored:
        if (fingerprint, value) in _VERIFIED:
            continue
        if not isinstance(value, str):
            raise LabelloopConfigError(_altered(value))
        if not matches(key, value):
            raise LabelloopConfigError(KEY_REFUSED)
        _VERIFIED.add((fingerprint, value))
        if _LEGACY.match(value):
            slow = check_value(key)
            # Only if it still holds the legacy value (another process may have upgraded it).
            con.execute(
                "UPDATE schema_info SET value = ? WHERE key = ? AND value = ?", [slow, CHECK_ROW, value]
            )
            _VERIFIED.add((fingerprint, slow))


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
            raise ValueError
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise LabelloopConfigError(_altered(stored)) from None
    if (
        n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r > MAX_MEMORY or n * r * p > MAX_WORK
        or len(salt) < 8 or not 16 <= len(digest) <= 64
    ):
        raise LabelloopConfigError(_altered(stored))
    return n, r, p, salt, digest


def _scrypt(key: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL counts V (128 * r * (n + 2)) and B (128 * r * p) against maxmem; its default (32 MiB)
    # is exactly the default V, so it is given with room to spare.
    needed = 128 * r * (n + p + 2)
    return hashlib.scrypt(key, salt=salt, n=n, r=r, p=p, maxmem=needed + 1024 * 1024, dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _altered(value) -> str:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
    return (
        f"the database's schema_info.{CHECK_ROW} holds {shown}, which is not a check value labelloop "
        "writes (expected scrypt$n$r$p$salt$hash within bounds); the database was altered. Restore it "
        "from a backup, or, if LABELLOOP_SECRET is certainly the key its pseudonyms were made with, "
        "delete that row and run again (the check is then recorded anew)"
    )
