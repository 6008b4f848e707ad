"""Downloading a URL image without becoming a proxy into the server's network.

A URL a client sends is fetched by the server, so it must not reach what only the
server can reach (its own ports, the LAN, a cloud metadata address) and it must
not hold a worker for long. Hence:

* every address the host name resolves to is judged before connecting, and the
  connection goes to the judged address (a second DNS answer cannot swap it);
  loopback, private, link-local, multicast, reserved and unspecified addresses are
  refused unless the operator allow-listed the host or its network
  (``--allow-url-host``);
* redirects are followed here, at most :data:`MAX_REDIRECTS`, each judged the same way;
* one deadline covers the whole download: each socket read waits at most for the
  time left, so a sender trickling a byte a second cannot stretch it;
* connection failures (refused, reset, timed out, unreachable) share one message,
  so errors cannot be used to scan which ports are open.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(Exception):
    """The download was refused or failed; the message is safe to show to the client."""


def address_refusal(ip: Address) -> str | None:
    """Why a server-side download may not connect to ``ip``, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (("a loopback", ip.is_loopback), ("a link-local", ip.is_link_local),
                       ("a multicast", ip.is_multicast), ("an unspecified", ip.is_unspecified),
                       ("a private", ip.is_private), ("a reserved", ip.is_reserved)):
        if flag:
            return f"{kind} address"
    if not ip.is_global:
        return "a non-public address"
    return None


@dataclass(frozen=True)
class AllowList:
    """Hosts and networks the operator trusts despite their addresses (``--allow-url-host``)."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        names, networks = set(), []
        for entry in entries:
            entry = entry.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, ip: Address) -> bool:
        return host.lower().rstrip(".") in self.names or any(ip in net for net in self.networks)


def resolve(host: str, port: int, allow: AllowList) -> Address:
    """The address to connect to: the first one DNS gives, if every one it gives may be reached."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchRefused(f"the host name '{host}' does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for ip in addresses:
        reason = address_refusal(ip)
        if reason and not allow.allows(host, ip):
            raise FetchRefused(f"'{host}' resolves to {reason}, which URL images may not reach "
                               f"(the operator can allow a trusted host with --allow-url-host)")
    return addresses[0]


class _Pinned:
    """Connect an http.client connection to an address already judged, not to a fresh DNS answer."""

    def __init__(self, ip: Address) -> None:
        self.ip = ip

    def connect(self, conn: http.client.HTTPConnection, tls: ssl.SSLContext | None, host: str) -> None:
        sock = socket.create_connection((str(self.ip), conn.port), timeout=conn.timeout)
        conn.sock = tls.wrap_socket(sock, server_hostname=host) if tls is not None else sock


def _open(url: str, deadline: float, allow: AllowList) -> tuple[http.client.HTTPConnection,
                                                              http.client.HTTPResponse, socket.socket]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused("only http(s) URLs with a host name can be fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchRefused("the URL's port is not a number") from None
    ip = resolve(parts.hostname, port, allow)
    remaining = max(0.05, deadline - time.monotonic())
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    conn = http.client.HTTPConnection(parts.hostname, port, timeout=remaining) if tls is None else \
        http.client.HTTPSConnection(parts.hostname, port, timeout=remaining, context=tls)
    pinned = _Pinned(ip)
    conn.connect = lambda: pinned.connect(conn, tls, parts.hostname)  # type: ignore[method-assign]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "kiln", "Accept": "image/*", "Host": parts.netloc})
        sock = conn.sock  # the response keeps reading from it after http.client lets go of it
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        return conn, conn.getresponse(), sock
    except (OSError, http.client.HTTPException):
        conn.close()
        if time.monotonic() >= deadline:
            raise FetchRefused("the download took longer than its time limit") from None
        raise FetchRefused("could not download it (the connection failed)") from None


def fetch(url: str, *, max_bytes: int, timeout_s: float, allow: AllowList) -> tuple[bytes, str]:
    """The body and content type of ``url``, within ``timeout_s`` in total and ``max_bytes``."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        conn, resp, sock = _open(url, deadline, allow)
        try:
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchRefused(f"HTTP {resp.status} redirect without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchRefused(f"HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchRefused(f"it is {int(length)} bytes, more than the limit of {max_bytes} bytes")
            return _read_body(sock, resp, deadline, max_bytes), resp.getheader("Content-Type") or ""
        finally:
            resp.close()
            conn.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def _read_body(sock: socket.socket, resp: http.client.HTTPResponse, deadline: float, max_bytes: int) -> bytes:
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused("the download took longer than its time limit")
        sock.settimeout(remaining)  # each read waits at most for the time left
        try:
            chunk = resp.read1(_CHUNK)
        except (OSError, http.client.HTTPException):
            if time.monotonic() >= deadline:
                raise FetchRefused("the download took longer than its time limit") from None
            raise FetchRefused("could not download it (the connection failed)") from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise FetchRefused(f"it is larger than the limit of {max_bytes} bytes")
