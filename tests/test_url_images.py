"""URL images: one deadline per download, one download per job, no reaching the server's own network.

Every server here is the test's own, on 127.0.0.1; other address ranges are only
classified, never contacted.
"""
from __future__ import annotations

import ipaddress
import io
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from engine.context import Environment, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from nodes import image_io
from nodes.url_fetch import AllowList, address_refusal


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    image_io._url_cache.clear()
    env = Environment(paths=Paths.under(tmp_path))
    env.settings.allow_url_images = True
    env.settings.url_timeout_s = 1.0
    yield env
    image_io._url_cache.clear()


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), (0, 128, 255)).save(out, "PNG")
    return out.getvalue()


class RawServer:
    """A TCP server on 127.0.0.1 whose every connection is handled by ``serve(conn)``; counts connections."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.serve = serve
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            self.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def servers():
    made: list[RawServer] = []

    def make(serve: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(serve))
        return made[-1]
    yield make
    for server in made:
        server.close()


def serve_png(conn: socket.socket) -> None:
    body = png_bytes()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)


def trickle(conn: socket.socket) -> None:
    """A byte every 0.1 s of a body that claims 100 kB: never a read timeout, never done."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(600):
        conn.sendall(b"x")
        time.sleep(0.1)


def redirect_to(location: str) -> Callable[[socket.socket], None]:
    def serve(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
                     f"Connection: close\r\n\r\n".encode())
    return serve


def job(url: str) -> Any:
    return parse({"version": 1, "nodes": {"1": {"type": "LoadImage", "inputs": {"image": url}},
                                          "2": {"type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})


def run(registry, env, url: str) -> Any:
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("o", Executor(registry, env).run(job(url), force=True)),
                              daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the job hung"
    return box["o"], time.monotonic() - started


def test_a_trickling_sender_cannot_stretch_the_deadline_and_is_fetched_once(registry, env, servers):
    slow = servers(trickle)
    env.settings.url_allow_hosts = ("127.0.0.1",)
    outcome, seconds = run(registry, env, f"http://127.0.0.1:{slow.port}/slow.png")
    assert outcome.status == "failed" and "longer than its time limit" in outcome.error.message
    assert seconds < 10  # one 1 s deadline (the old per-read timeout let this run for hours)
    assert slow.connections == 1  # the fingerprint's attempt is the job's only one


def test_an_image_is_downloaded_once_per_job(registry, env, servers):
    server = servers(serve_png)
    env.settings.url_allow_hosts = ("127.0.0.1",)
    outcome, _ = run(registry, env, f"http://127.0.0.1:{server.port}/pic.png")
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    assert tuple(outcome.results["1"][0].shape) == (1, 16, 24, 3)
    assert server.connections == 1


def test_loopback_is_refused_by_default_after_resolving_names_without_connecting(registry, env, servers):
    server = servers(serve_png)
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        image_io._url_cache.clear()
        outcome, _ = run(registry, env, f"http://{host}:{server.port}/pic.png")
        assert outcome.status == "failed"
        assert "loopback address" in outcome.error.message and "--allow-url-host" in outcome.error.message
    assert server.connections == 0


def test_every_redirect_is_judged_again(registry, env, servers):
    target = servers(serve_png)
    hop = servers(redirect_to(f"http://127.0.0.2:{target.port}/pic.png"))
    env.settings.url_allow_hosts = ("127.0.0.1",)  # the first hop only
    outcome, _ = run(registry, env, f"http://127.0.0.1:{hop.port}/go")
    assert outcome.status == "failed" and "'127.0.0.2' resolves to a loopback address" in outcome.error.message
    assert hop.connections == 1 and target.connections == 0
    # a network on the allow-list covers both hops
    image_io._url_cache.clear()
    env.settings.url_allow_hosts = ("127.0.0.0/8",)
    hop2 = servers(redirect_to(f"http://127.0.0.1:{target.port}/pic.png"))
    outcome, _ = run(registry, env, f"http://127.0.0.1:{hop2.port}/go")
    assert outcome.status == "succeeded" and target.connections == 1


def test_errors_do_not_tell_a_closed_port_from_a_silent_or_rude_one(registry, env, servers):
    env.settings.url_allow_hosts = ("127.0.0.1",)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens here now
    rude = servers(lambda conn: conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"))
    silent = servers(lambda conn: time.sleep(3))
    messages = set()
    for port in (closed_port, rude.port, silent.port):
        image_io._url_cache.clear()
        outcome, _ = run(registry, env, f"http://127.0.0.1:{port}/x.png")
        messages.add(outcome.error.message.replace(str(port), "PORT"))
    # the silent one runs out of time; the refused and the reset ones read alike
    assert len(messages - {m for m in messages if "time limit" in m}) == 1, messages


@pytest.mark.parametrize("address, kind", [
    ("10.1.2.3", "a private"), ("172.16.0.1", "a private"), ("192.168.1.1", "a private"),
    ("169.254.169.254", "a link-local"), ("fe80::1", "a link-local"), ("224.0.0.1", "a multicast"),
    ("ff02::1", "a multicast"), ("::1", "a loopback"), ("127.9.9.9", "a loopback"),
    ("::ffff:10.0.0.1", "a private"), ("0.0.0.0", "an unspecified"), ("100.64.0.1", "a non-public"),
    ("fc00::1", "a private"), ("240.0.0.1", "a private"),
])
def test_address_classes_are_refused_without_connecting(address, kind):
    reason = address_refusal(ipaddress.ip_address(address))
    assert reason is not None and reason.startswith(kind), reason


def test_public_addresses_pass_and_the_allow_list_matches_names_and_networks():
    for address in ("93.184.216.34", "2606:4700::1111"):
        assert address_refusal(ipaddress.ip_address(address)) is None
    allow = AllowList.parse(["images.lan", "10.1.0.0/16", " "])
    assert allow.allows("IMAGES.lan.", ipaddress.ip_address("192.168.0.9"))
    assert allow.allows("x", ipaddress.ip_address("10.1.200.3"))
    assert not allow.allows("x", ipaddress.ip_address("10.2.0.1"))
