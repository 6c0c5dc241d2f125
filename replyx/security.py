"""Credentials: operator JWTs, opaque site and guest tokens, password hashes.

Operator JWTs are HS256 only: the algorithm is pinned on verification, never
taken from the token's header; ``exp``, ``iat``, ``iss``, ``aud`` and ``sub``
are required, ``exp`` and ``iat`` must be integers, ``iat`` not in the future and
the lifetime bounded (:func:`verify_operator_token`). Site and guest tokens are
random strings shown once; the database keeps only their SHA-256 (they carry 256
bits of entropy, so a fast hash is enough). Passwords use scrypt, which is memory-hard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import TypeGuard

import jwt

JWT_ALGORITHM = "HS256"
JWT_ISSUER = "replyx"
JWT_AUDIENCE = "replyx-operator"
#: The longest an operator token may live (``exp - iat``), unless the caller says otherwise
#: (the backend passes ``REPLYX_JWT_MAX_LIFETIME``).
DEFAULT_MAX_LIFETIME = 7 * 24 * 3600
#: Clocks of the issuing and the checking host may disagree by this much (seconds).
CLOCK_SKEW = 30

# Prefixes make leaked tokens easy to recognise (and to grep for in logs).
SITE_TOKEN_PREFIX = "rxs_"  # noqa: S105
GUEST_TOKEN_PREFIX = "rxg_"  # noqa: S105

# scrypt cost: 16 MiB of memory and ~50 ms per hash on the project machine.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1


class InvalidTokenError(Exception):
    """The token is missing, malformed, badly signed or expired (never says which to callers)."""


@dataclass(frozen=True)
class OperatorClaims:
    user_id: int
    expires_at: float


def issue_operator_token(user_id: int, secret: bytes, ttl_seconds: int) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user_id),
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def verify_operator_token(
    token: str | None, secret: bytes, *, max_lifetime: float = DEFAULT_MAX_LIFETIME,
    now: float | None = None,
) -> OperatorClaims:
    """The claims of a valid operator token, else :class:`InvalidTokenError`.

    A good signature is not enough: ``sub`` must be a user id in a string, ``iat``
    and ``exp`` integers (JSON numbers, never strings or booleans), ``iat`` not in
    the future, and the token may not live longer than ``max_lifetime`` seconds,
    so a key that leaked once cannot mint tokens that outlive its rotation.
    """
    if not token:
        raise InvalidTokenError("no token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            audience=JWT_AUDIENCE,
            issuer=JWT_ISSUER,
            # iat is checked below, with room for clock skew between hosts.
            options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_iat": False},
        )
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError, OverflowError):
        raise InvalidTokenError("invalid token") from None
    sub, issued, expires = claims.get("sub"), claims.get("iat"), claims.get("exp")
    if not (isinstance(sub, str) and sub.isascii() and sub.isdigit() and len(sub) <= 19):
        raise InvalidTokenError("invalid token")
    if not _is_int(issued) or not _is_int(expires):
        raise InvalidTokenError("invalid token")
    current = time.time() if now is None else now
    if issued > current + CLOCK_SKEW or expires - issued > max_lifetime or expires <= issued:
        raise InvalidTokenError("invalid token")
    user_id = int(sub)
    if user_id <= 0 or user_id >= 2**63:
        raise InvalidTokenError("invalid token")
    return OperatorClaims(user_id=user_id, expires_at=float(expires))


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int to Python, not to JSON.
    return isinstance(value, int) and not isinstance(value, bool)


def new_site_token() -> str:
    return SITE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_guest_token() -> str:
    return GUEST_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database stores for a site or guest token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; with ``stored=None`` it burns the same time and fails."""
    if stored is None:
        _scrypt(password, b"\0" * 16, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest + "==")
        actual = _scrypt(password, base64.urlsafe_b64decode(salt + "=="), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=32,
        maxmem=64 * 1024 * 1024,
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
