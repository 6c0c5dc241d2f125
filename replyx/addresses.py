"""Who is calling: the client address behind our own nginx, used by per-address limits.

nginx (``conf/nginx.conf``) connects from loopback and names the client in
``X-Real-IP``. That header is believed only from a loopback peer: anyone else
could write any address into it and escape a per-address limit.
"""

from __future__ import annotations

import ipaddress

from tornado.httputil import HTTPServerRequest


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def is_direct_loopback(request: HTTPServerRequest) -> bool:
    """A caller on this host that did not come through a proxy.

    Debug endpoints and ``/metrics`` trust it without a token. A request that
    carries ``X-Forwarded-For`` or ``X-Real-IP`` came through nginx (from anywhere),
    so it is not trusted even though its TCP peer is loopback.
    """
    headers = request.headers
    if "X-Forwarded-For" in headers or "X-Real-IP" in headers:
        return False
    return is_loopback(request.remote_ip or "")


def client_address(request: HTTPServerRequest) -> str:
    """The client's address: the peer, or ``X-Real-IP`` when the peer is a local proxy."""
    peer = request.remote_ip or ""
    real = request.headers.get("X-Real-IP", "").strip()
    if real and is_loopback(peer):
        try:
            return str(ipaddress.ip_address(real))
        except ValueError:
            return peer
    return peer


def limit_key(address: str) -> str:
    """The key a per-address limit counts under.

    An IPv6 client usually holds a whole /64 and can rotate through it at will,
    so IPv6 addresses count per /64; IPv4 addresses count one by one.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
