"""SSRF rules, as pure functions on IP literals: no connection is ever made here."""

from __future__ import annotations

import ipaddress

import pytest

from shared.errors import ForbiddenSourceError
from shared.netguard import address_allowed, is_public_address, resolve_allowed

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    "literal",
    ["127.0.0.1", "127.8.9.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
     "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::", "240.0.0.1"],
)
def test_inward_addresses_are_refused(literal: str) -> None:
    assert not is_public_address(ip(literal))
    assert not address_allowed(ip(literal))


@pytest.mark.parametrize("literal", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(literal: str) -> None:
    assert is_public_address(ip(literal))


def test_explicit_allow_list_opens_one_network_only() -> None:
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    assert address_allowed(ip("127.0.0.1"), allowed)
    assert not address_allowed(ip("127.0.0.2"), allowed)
    assert not address_allowed(ip("169.254.169.254"), allowed)


@pytest.mark.parametrize("host", ["169.254.169.254", "10.1.2.3", "[::1]", "127.0.0.1"])
def test_resolve_refuses_literals_without_connecting(host: str) -> None:
    with pytest.raises(ForbiddenSourceError) as info:
        resolve_allowed(host, 80, [])
    assert info.value.reason == "forbidden_uri"
