"""Join tokens and passwords, as pure logic (randomness and the clock are arguments or stdlib).

A join token is "kvm1.<CA sha256 hex>.<id>.<secret>":
- the CA hash pins the center for the joining host (kubeadm's discovery-token-ca-cert-hash): it
  checks the CA the center shows before it sends the token, and the center refuses a token made
  for another cluster's CA;
- the id finds the token; only sha256(secret) is stored, so a copy of the store joins nobody;
- each token expires, and may allow a number of joins.
Refusals are one line and never quote the secret. The secret is compared in constant time, and a
token's expiry or use count is told only to a caller who knows its secret.

Passwords are stored as "scrypt$<log2 N>$<r>$<p>$<salt hex>$<hash hex>" (the cost travels with
the hash, so it can rise later), compared in constant time; an unknown user costs the same hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from kvmotion.api.center import TokenParts
from kvmotion.center.store import TokenRow
from kvmotion.core.errors import InvalidInput, Unauthorized

DEFAULT_TTL = 86400.0


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(ca_sha256: str, now: float, ttl: float, uses: int | None, created_by: str) -> tuple[TokenParts, TokenRow]:
    """A fresh token (128-bit secret) and the row that stores it hashed."""
    if ttl <= 0:
        raise InvalidInput(f"invalid token lifetime {ttl} s: must be positive")
    if uses is not None and uses < 1:
        raise InvalidInput(f"invalid number of uses {uses}: at least 1")
    parts = TokenParts(ca_sha256=ca_sha256, id=secrets.token_hex(6), secret=secrets.token_hex(16))
    row = TokenRow(id=parts.id, secret_hash=secret_hash(parts.secret), expires=now + ttl, uses_left=uses,
                   created=now, created_by=created_by)
    return parts, row


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_token(parts: TokenParts, ca_sha256: str, row: TokenRow | None, now: float) -> None:
    """Unauthorized, in one line, unless the token may join a host now."""
    if not hmac.compare_digest(parts.ca_sha256, ca_sha256):
        raise Unauthorized("the join token is for another cluster: its CA hash is not this center's CA")
    if row is None:
        raise Unauthorized(f"unknown join token {parts.id}: create one with `kvmotion center token create`")
    if not hmac.compare_digest(secret_hash(parts.secret), row.secret_hash):
        raise Unauthorized(f"join token {parts.id} is forged: its secret does not match")
    if now >= row.expires:
        raise Unauthorized(f"join token {parts.id} expired at {_when(row.expires)}: create a new one")
    if row.uses_left is not None and row.uses_left <= 0:
        raise Unauthorized(f"join token {parts.id} is used up: create a new one")


# ---- passwords ------------------------------------------------------------------------------------------
SCRYPT_LOG2_N = 15  # 32 MiB and about 0.1 s per hash here
SCRYPT_R, SCRYPT_P = 8, 1
MIN_PASSWORD = 12


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)


def hash_password(password: str, log2_n: int = SCRYPT_LOG2_N) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not (10 <= int(log2_n) <= 20 and 1 <= int(r) <= 32 and 1 <= int(p) <= 16):
            return False
        expected = bytes.fromhex(digest)
        actual = _scrypt(password, bytes.fromhex(salt), int(log2_n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


class Passwords:
    """Checks logins at one cost: a user that does not exist takes as long as a wrong password."""

    def __init__(self, log2_n: int = SCRYPT_LOG2_N) -> None:
        self.log2_n = log2_n
        self._decoy = hash_password(secrets.token_hex(16), log2_n)

    def hash(self, password: str) -> str:
        return hash_password(password, self.log2_n)

    def check(self, password: str, stored: str | None) -> bool:
        ok = verify_password(password, stored if stored is not None else self._decoy)
        return ok and stored is not None


def new_password() -> str:
    """A random password for a user the admin adds without one (and the first admin): 128 bits."""
    return secrets.token_urlsafe(16)


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"password too short: use at least {MIN_PASSWORD} characters")
    return password
