"""Bearer tokens: HMAC-SHA256-signed claims of who the caller is, what it may do, and until when.

    mlt1.<payload>.<signature>
    payload   = base64url(JSON {"sub": "alice", "scp": ["generate"], "exp": 1767225600})
    signature = base64url(HMAC-SHA256(key, "mlt1." + payload))

Why signed tokens rather than a table of tokens on every service: a token carries its own
scopes and expiry, so the only thing each service (router replicas, workers, the store) must
hold is the signing key file, which changes only when the key is rotated; issuing a token to a
new client touches no running service. Expiry is built in, so a token handed out for a week
stops working by itself. Revocation before expiry is by rotating the key (see `SigningKeys`).
Services that hold the key mint their own short-lived `service` tokens for the calls they make
to each other, so no token has to be distributed between them. The cost of a symmetric key:
any host that can verify tokens can also mint them, so the key is as secret as the most
powerful token; every service that holds it is trusted to the same degree.

Keys: a file with one key per line (blank lines and `#` comments ignored), each at least 32
characters (`python -m services.common.token_cli new-key`). The first line signs; every line
verifies, so that a new key can be rolled out before tokens signed with it are handed out:
add it as the second line everywhere, then move it first, then remove the old one.

    python -m services.common.token_cli new-key > /etc/manylora/auth.key
    python -m services.common.token_cli mint --key-file /etc/manylora/auth.key \\
        --subject alice --scopes generate --ttl 30d

Neither a token nor a key is ever logged or put in an error message; `repr` of what holds
one says only how many there are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "mlt1"
# Scopes a token can grant (services.common.auth says which RPC needs which).
GENERATE = "generate"
ADAPTERS_WRITE = "adapters:write"
SERVICE = "service"
SCOPES = (GENERATE, ADAPTERS_WRITE, SERVICE)
MIN_KEY_CHARS = 32
# Far above any real token; a longer header is refused before any work is spent on it.
MAX_TOKEN_CHARS = 4096
MAX_SUBJECT_CHARS = 128


class TokenError(ValueError):
    """Why a token was refused; the message never quotes the token."""


@dataclass(frozen=True)
class Claims:
    subject: str
    scopes: frozenset[str]
    expires_at: float | None  # unix seconds; None = never

    def __repr__(self) -> str:
        scopes = ",".join(sorted(self.scopes))
        return f"Claims(subject={self.subject!r}, scopes={scopes}, expires_at={self.expires_at})"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token (not base64url)") from None


class SigningKeys:
    """The keys of one deployment: the first signs, all verify."""

    def __init__(self, keys: Sequence[bytes]):
        if not keys:
            raise ValueError("no signing key")
        for key in keys:
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(f"a key is shorter than {MIN_KEY_CHARS} characters")
        self._keys = tuple(keys)

    def __repr__(self) -> str:
        return f"SigningKeys(<{len(self._keys)} key(s), hidden>)"

    @classmethod
    def from_file(cls, path: str | Path) -> SigningKeys:
        """Raises OSError when the file cannot be read, ValueError when it holds no usable key."""
        lines = Path(path).read_text().splitlines()
        keys = [ln.strip().encode() for ln in lines if ln.strip() and not ln.startswith("#")]
        if not keys:
            raise ValueError("the file holds no key (one per line)")
        return cls(keys)

    def mint(
        self, subject: str, scopes: Iterable[str], ttl_s: float | None, now: float | None = None
    ) -> str:
        """A token for `subject` granting `scopes`, valid for `ttl_s` seconds (None: forever)."""
        scopes = sorted(set(scopes))
        unknown = set(scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}; known: {SCOPES}")
        if not subject or len(subject) > MAX_SUBJECT_CHARS:
            raise ValueError(f"subject must have 1 to {MAX_SUBJECT_CHARS} characters")
        issued = time.time() if now is None else now
        claims: dict[str, Any] = {"sub": subject, "scp": scopes, "iat": int(issued)}
        if ttl_s is not None:
            claims["exp"] = int(issued + ttl_s)
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{VERSION}.{payload}.{_b64encode(self._sign(self._keys[0], payload))}"

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The token's claims; `TokenError` when it is malformed, forged or expired."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"token longer than {MAX_TOKEN_CHARS} characters")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise TokenError(f"malformed token (expected {VERSION}.<payload>.<signature>)")
        _, payload, signature = parts
        given = _b64decode(signature)
        if not any(hmac.compare_digest(self._sign(k, payload), given) for k in self._keys):
            raise TokenError("token signature does not match any key")
        claims = _parse_claims(_b64decode(payload))
        moment = time.time() if now is None else now
        if claims.expires_at is not None and claims.expires_at <= moment:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.expires_at))
            raise TokenError(f"token of {claims.subject!r} expired at {when}")
        return claims

    @staticmethod
    def _sign(key: bytes, payload: str) -> bytes:
        return hmac.new(key, f"{VERSION}.{payload}".encode(), hashlib.sha256).digest()


def _parse_claims(raw: bytes) -> Claims:
    """Claims of a payload whose signature matched (so its content is ours, not a caller's)."""
    try:
        data = json.loads(raw)
        subject, scopes, expires = data["sub"], data["scp"], data.get("exp")
    except (ValueError, KeyError, TypeError):
        raise TokenError("malformed token payload") from None
    if not isinstance(subject, str) or not isinstance(scopes, list):
        raise TokenError("malformed token payload")
    if expires is not None and not isinstance(expires, int):
        raise TokenError("malformed token payload")
    # A scope this version does not know grants nothing here.
    known = frozenset(s for s in scopes if s in SCOPES)
    return Claims(subject, known, None if expires is None else float(expires))


def parse_duration(text: str) -> float | None:
    """Seconds of '90s', '15m', '12h', '30d' (or a plain number of seconds); '0' = never."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 12h or 30d") from None
    if seconds < 0:
        raise ValueError(f"{text!r} is negative")
    return None if seconds == 0 else seconds
