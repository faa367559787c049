"""HostPolicy, the Host rules of api.middleware, without a server (the doors themselves:
tests/api/test_http_doors.py)."""

from __future__ import annotations

import pytest

from api.middleware import HostPolicy, is_loopback


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_bound_to_loopback_with_no_list_serves_the_loopback_names_on_no_port_or_the_bound_one(bind: str) -> None:
    policy = HostPolicy.build([], bind)
    assert is_loopback(bind) and not policy.any_host
    for host in ("127.0.0.1", "localhost", "[::1]", "127.0.0.1:8080", "LOCALHOST:8080", "localhost.", "[::1]:8080"):
        assert policy.allows(host, 8080), host
    assert policy.allows(bind if ":" not in bind.strip("[]") else "[::1]", 8080)  # the bound address itself
    for host in ("127.0.0.1:8081", "evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.2",
                 "[::2]", "::1", "localhost:80:80", "local host", "localhost@evil", "", "127.0.0.1:", "\u0660"):
        assert not policy.allows(host, 8080), host


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "10.0.0.5", "switchboard.internal"])
def test_bound_elsewhere_with_no_list_serves_any_host(bind: str) -> None:
    assert HostPolicy.build([], bind).any_host


def test_a_listed_name_a_name_with_port_a_domain_and_a_star() -> None:
    policy = HostPolicy.build(["Switchboard.Example.com", "10.0.0.5:8443", ".calls.example.org"], "0.0.0.0")
    assert policy.allows("switchboard.example.com", 8080) and policy.allows("switchboard.example.com:8080", 8080)
    assert not policy.allows("switchboard.example.com:9999", 8080)  # only bare or the connection's own port
    assert policy.allows("10.0.0.5:8443", 8080) and not policy.allows("10.0.0.5", 8080)
    assert policy.allows("calls.example.org", 1) and policy.allows("eu.calls.example.org:443", 1)
    assert not policy.allows("evilcalls.example.org", 1) and not policy.allows("localhost", 8080)
    assert HostPolicy.build(["a.example", "*"], "127.0.0.1").any_host


@pytest.mark.parametrize("entry", ["http://a.example", "a.example/x", ".a.example:443", "a b", ""])
def test_an_entry_that_is_not_a_host_fails_at_start_up(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        HostPolicy.build([entry], "127.0.0.1")


def test_the_client_address_is_believed_only_from_a_trusted_proxy_and_read_from_the_right() -> None:
    from aiohttp.test_utils import make_mocked_request

    from api.middleware import ClientAddress

    def seen(policy: ClientAddress, peer: str, *forwarded: str) -> str:
        headers = [("X-Forwarded-For", f) for f in forwarded]
        transport = type("T", (), {"get_extra_info": lambda self, name, default=None:
                                   (peer, 1234) if name == "peername" else default})()
        return policy.of(make_mocked_request("GET", "/", headers=headers, transport=transport))

    none, proxy = ClientAddress.build([]), ClientAddress.build(["127.0.0.1", "10.0.0.0/8"])
    assert seen(none, "127.0.0.1", "203.0.113.5") == "127.0.0.1"  # nobody trusted: the header is ignored
    assert seen(proxy, "198.51.100.1", "203.0.113.5") == "198.51.100.1"  # an untrusted peer's header is ignored
    assert seen(proxy, "127.0.0.1", "203.0.113.5") == "203.0.113.5"
    # The client wrote the left part; our proxies appended the rest: the rightmost untrusted entry counts.
    assert seen(proxy, "127.0.0.1", "1.2.3.4, 203.0.113.5, 10.1.2.3") == "203.0.113.5"
    assert seen(proxy, "127.0.0.1", "1.2.3.4", "203.0.113.5") == "203.0.113.5"  # repeated headers join
    assert seen(proxy, "127.0.0.1", "203.0.113.5, not-an-address") == "127.0.0.1"  # garbage: no guessing
    assert seen(proxy, "127.0.0.1") == "127.0.0.1"  # no header: the proxy itself
    assert seen(proxy, "127.0.0.1", "10.0.0.1, 127.0.0.1") == "127.0.0.1"  # only proxies: the peer
    assert seen(proxy, "127.0.0.1", "2001:db8::7") == "2001:db8::7"
