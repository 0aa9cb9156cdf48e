"""Which network addresses an http(s) fetch may reach: the SSRF guard.

Pure functions over IP literals, so the rules are testable without opening a connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from shared.errors import FetchError, ForbiddenSourceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; false for private, loopback,
    link-local (cloud metadata lives at 169.254.169.254), multicast, reserved,
    unspecified, shared (100.64/10) and their IPv4-mapped IPv6 forms."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(mapped)
        if ip.teredo is not None:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def address_allowed(ip: IPAddress, allowed_networks: Iterable[IPNetwork] = ()) -> bool:
    """Public addresses are allowed; others only inside an explicitly allowed network."""
    if is_public_address(ip):
        return True
    return any(ip.version == net.version and ip in net for net in allowed_networks)


def resolve_allowed(host: str, port: int, allowed_networks: Iterable[IPNetwork]) -> IPAddress:
    """Resolve ``host`` and return an address to connect to, refusing the fetch if *any*
    resolved address is forbidden (a name that also points inward is not trusted)."""
    allowed = list(allowed_networks)
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses: list[IPAddress] = [literal]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError(f"cannot resolve host {host!r}: {exc}", reason="fetch_dns") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses:
            raise FetchError(f"host {host!r} resolved to no address", reason="fetch_dns")
    for ip in addresses:
        if not address_allowed(ip, allowed):
            raise ForbiddenSourceError(
                f"refusing to fetch from {host} ({ip}): private, loopback and link-local "
                "addresses are blocked; allow a network with FETCH_ALLOWED_NETWORKS"
            )
    return addresses[0]
