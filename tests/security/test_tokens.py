"""Signed tokens: what verifies, what is refused, key rotation, and that neither a token nor
a key shows in a repr or an error message. The signature is checked against an independent
HMAC-SHA256 computed here with the standard library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from pathlib import Path

import pytest

from services.common.channels import MintedServiceToken, StaticToken
from services.common.tokens import (
    ADAPTERS_WRITE,
    GENERATE,
    SERVICE,
    SigningKeys,
    TokenError,
    parse_duration,
)

KEY = b"k" * 40
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: dict, key: bytes) -> str:
    """A token built by hand from the documented format."""
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(key, f"mlt1.{body}".encode(), hashlib.sha256).digest()
    return f"mlt1.{body}.{b64(signature)}"


def test_minted_token_has_the_documented_format_and_verifies():
    keys = SigningKeys([KEY])
    token = keys.mint("alice", [GENERATE, ADAPTERS_WRITE], 60, now=NOW)
    _, body, signature = token.split(".")
    expected = hmac.new(KEY, f"mlt1.{body}".encode(), hashlib.sha256).digest()
    assert signature == b64(expected)
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert payload["sub"] == "alice" and payload["exp"] == NOW + 60
    claims = keys.verify(token, now=NOW + 59)
    assert claims.subject == "alice"
    assert claims.scopes == {GENERATE, ADAPTERS_WRITE}


def test_a_hand_built_token_verifies_and_one_without_expiry_never_expires():
    keys = SigningKeys([KEY])
    claims = keys.verify(forge({"sub": "bob", "scp": [SERVICE]}, KEY), now=NOW * 10)
    assert claims.scopes == {SERVICE} and claims.expires_at is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda k: k.mint("a", [GENERATE], 60, now=NOW - 61), "expired"),
        (lambda k: k.mint("a", [GENERATE], 60, now=NOW - 60), "expired"),  # exp == now
        (lambda k: SigningKeys([b"o" * 40]).mint("a", [GENERATE], 60, now=NOW), "signature"),
        (lambda k: forge({"sub": "a", "scp": [GENERATE]}, b"o" * 40), "signature"),
        (lambda k: "", "malformed"),
        (lambda k: "abc", "malformed"),
        (lambda k: "mlt2.a.b", "malformed"),
        (lambda k: "mlt1.a.b.c", "malformed"),
        (lambda k: "mlt1.!!!.###", "signature|base64"),
        (lambda k: "x" * 5000, "longer"),
        (lambda k: forge({"sub": "a"}, KEY), "payload"),
        (lambda k: forge({"sub": "a", "scp": "generate"}, KEY), "payload"),
        (lambda k: forge({"sub": "a", "scp": [], "exp": "soon"}, KEY), "payload"),
    ],
)
def test_refused_tokens_say_why_without_quoting_the_token(make, reason):
    keys = SigningKeys([KEY])
    token = make(keys)
    with pytest.raises(TokenError, match=reason) as caught:
        keys.verify(token, now=NOW)
    if len(token) > 16:
        assert token not in str(caught.value)
        assert token.split(".")[-1] not in str(caught.value)


def test_changing_the_scopes_of_a_signed_token_breaks_its_signature():
    keys = SigningKeys([KEY])
    version, _, signature = keys.mint("alice", [GENERATE], 60, now=NOW).split(".")
    wider = b64(json.dumps({"sub": "alice", "scp": [ADAPTERS_WRITE], "exp": NOW + 60}).encode())
    with pytest.raises(TokenError, match="signature"):
        keys.verify(f"{version}.{wider}.{signature}", now=NOW)


def test_rotation_first_key_signs_every_key_verifies(tmp_path: Path):
    old, new = secrets.token_urlsafe(40), secrets.token_urlsafe(40)
    (tmp_path / "before").write_text(f"{old}\n")
    (tmp_path / "during").write_text(f"# rotating\n{new}\n\n{old}\n")
    (tmp_path / "after").write_text(f"{new}\n")
    before, during, after = (
        SigningKeys.from_file(tmp_path / n) for n in ("before", "during", "after")
    )
    old_token = before.mint("a", [GENERATE], 60, now=NOW)
    new_token = during.mint("a", [GENERATE], 60, now=NOW)
    assert during.verify(old_token, now=NOW).subject == "a"
    assert after.verify(new_token, now=NOW).subject == "a"
    with pytest.raises(TokenError):
        after.verify(old_token, now=NOW)


def test_unknown_scopes_cannot_be_minted_and_grant_nothing():
    keys = SigningKeys([KEY])
    with pytest.raises(ValueError, match="unknown scope"):
        keys.mint("a", ["admin"], 60)
    claims = keys.verify(forge({"sub": "a", "scp": ["admin", GENERATE]}, KEY), now=NOW)
    assert claims.scopes == {GENERATE}


def test_short_or_missing_keys_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="shorter"):
        SigningKeys([b"short"])
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no key"):
        SigningKeys.from_file(tmp_path / "empty")


def test_reprs_hide_keys_and_tokens():
    keys = SigningKeys([KEY])
    token = keys.mint("alice", [GENERATE], 60)
    shown = [repr(keys), repr(StaticToken(token)), repr(MintedServiceToken(keys, "router"))]
    shown.append(repr(keys.verify(token)))
    for text in shown:
        assert KEY.decode() not in text and token not in text


def test_minted_service_tokens_are_renewed_before_they_expire(monkeypatch):
    keys = SigningKeys([KEY])
    clock = [NOW]
    monkeypatch.setattr("services.common.channels.time.time", lambda: clock[0])
    source = MintedServiceToken(keys, "router", ttl_s=100)
    first = source()
    assert keys.verify(first, now=NOW).scopes == {SERVICE}
    clock[0] = NOW + 40
    assert source() == first  # still fresh
    clock[0] = NOW + 60
    renewed = source()
    assert renewed != first
    assert keys.verify(renewed, now=NOW + 150).subject == "router"  # valid past the first's end


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("7", 7)]
)
def test_durations(text: str, seconds: float):
    assert parse_duration(text) == seconds


def test_duration_zero_is_never_and_nonsense_is_refused():
    assert parse_duration("0") is None
    for bad in ("soon", "-5m", "3w"):
        with pytest.raises(ValueError):
            parse_duration(bad)
