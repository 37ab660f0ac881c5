"""Signatures on internal calls: what they cover, replays, staleness and secret rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError, Unauthorized
from appliance.security.signing import HEADER_SIGNATURE, Signer, Verifier, parse_secrets

OLD, NEW = b"o" * 32, b"n" * 32
BODY = b'{"node_id": "a", "incarnation": "x"}'
ROUTE_HEADERS = {
    "X-Appliance-Model": "demo",
    "X-Appliance-Digest": "abc",
    "X-Appliance-Span": "0-3",
    "X-Appliance-Deadline": "1000.5",
    "X-Appliance-Route": '[["4-7", ["http://b"]]]',
}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed(
    signer: Signer,
    method: str = "POST",
    path: str = "/internal/hop?x=1",
    headers: dict[str, str] | None = None,
    body: bytes = BODY,
) -> dict[str, str]:
    headers = dict(ROUTE_HEADERS if headers is None else headers)
    headers[HEADER_SIGNATURE] = signer.header(method, path, headers, body)
    return headers


def test_a_signed_call_is_accepted_once_and_names_its_sender() -> None:
    clock = Clock()
    verifier = Verifier([NEW], window_s=30, clock=clock)
    headers = signed(Signer(NEW, "node-a", clock))
    assert verifier.verify("POST", "/internal/hop?x=1", headers, BODY) == "node-a"
    with pytest.raises(Unauthorized, match="already received"):
        verifier.verify("POST", "/internal/hop?x=1", headers, BODY)


@pytest.mark.parametrize(
    "method, path, change, body",
    [
        ("GET", "/internal/hop?x=1", {}, BODY),
        ("POST", "/internal/hop?x=2", {}, BODY),
        ("POST", "/internal/heartbeat?x=1", {}, BODY),
        ("POST", "/internal/hop?x=1", {}, BODY + b" "),
        ("POST", "/internal/hop?x=1", {"X-Appliance-Deadline": "2000"}, BODY),
        ("POST", "/internal/hop?x=1", {"X-Appliance-Route": "[]"}, BODY),
        ("POST", "/internal/hop?x=1", {"X-Appliance-Span": "0-11"}, BODY),
        ("POST", "/internal/hop?x=1", {"X-Appliance-Digest": "other"}, BODY),
        ("POST", "/internal/hop?x=1", {"X-Request-Id": "added"}, BODY),
    ],
)
def test_any_change_to_what_is_signed_is_refused(
    method: str, path: str, change: dict[str, str], body: bytes
) -> None:
    clock = Clock()
    headers = signed(Signer(NEW, "node-a", clock))
    headers.update(change)
    with pytest.raises(Unauthorized, match="does not match"):
        Verifier([NEW], clock=clock).verify(method, path, headers, body)


def test_a_forged_sender_is_refused() -> None:
    clock = Clock()
    headers = signed(Signer(NEW, "node-a", clock))
    headers[HEADER_SIGNATURE] = headers[HEADER_SIGNATURE].replace("node=node-a", "node=node-b")
    with pytest.raises(Unauthorized, match="does not match"):
        Verifier([NEW], clock=clock).verify("POST", "/internal/hop?x=1", headers, BODY)


def test_stale_and_future_calls_are_refused_and_old_nonces_forgotten() -> None:
    clock = Clock()
    verifier = Verifier([NEW], window_s=30, clock=clock)
    headers = signed(Signer(NEW, "a", clock))
    clock.now += 31
    with pytest.raises(Unauthorized, match="accepted within 30 s"):
        verifier.verify("POST", "/internal/hop?x=1", headers, BODY)
    future = signed(Signer(NEW, "a", Clock(clock.now + 31)))
    with pytest.raises(Unauthorized, match="accepted within"):
        verifier.verify("POST", "/internal/hop?x=1", future, BODY)
    for _ in range(5):
        verifier.verify("POST", "/internal/hop?x=1", signed(Signer(NEW, "a", clock)), BODY)
    assert verifier.remembered == 5
    clock.now += 61  # past twice the window: a replay would be stale anyway
    verifier.verify("POST", "/internal/hop?x=1", signed(Signer(NEW, "a", clock)), BODY)
    assert verifier.remembered == 1


def test_both_secrets_of_a_rotation_are_accepted_and_no_other() -> None:
    clock = Clock()
    verifier = Verifier([NEW, OLD], clock=clock)
    for secret in (NEW, OLD):
        headers = signed(Signer(secret, "a", clock))
        assert verifier.verify("POST", "/internal/hop?x=1", headers, BODY) == "a"
    with pytest.raises(Unauthorized, match="secret this process lacks"):
        verifier.verify("POST", "/internal/hop?x=1", signed(Signer(b"x" * 32, "a", clock)), BODY)


@pytest.mark.parametrize(
    "header, message",
    [
        (None, "must be signed"),
        ("v2 key=a,ts=1,nonce=b,node=c,sig=d", "version 'v2'"),
        ("v1 key=a,ts=1", "lacks nonce, node, sig"),
        ("garbage", "version 'garbage'"),
    ],
)
def test_missing_or_malformed_signatures_say_what_is_wrong(
    header: str | None, message: str
) -> None:
    headers = dict(ROUTE_HEADERS)
    if header is not None:
        headers[HEADER_SIGNATURE] = header
    with pytest.raises(Unauthorized, match=message):
        Verifier([NEW]).verify("POST", "/internal/hop", headers, BODY)


def test_secrets_come_from_config_and_file_and_are_checked(tmp_path: Path) -> None:
    file = tmp_path / "secrets"
    file.write_text("# rotation in progress\n" + "b" * 32 + "\n")
    assert parse_secrets(["a" * 32], str(file)) == [b"a" * 32, b"b" * 32]
    assert parse_secrets([], "") == []
    with pytest.raises(ConfigError, match="too short"):
        parse_secrets(["short"], "")
    with pytest.raises(ConfigError, match="one, or two while rotating"):
        parse_secrets(["a" * 32, "b" * 32, "c" * 32], "")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_secrets([], str(tmp_path / "missing"))
