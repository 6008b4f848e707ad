"""Security defaults on a real server: same-origin writes, the bearer token, loopback-only binds."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from engine.server.security import BindRefused, check_bind, is_loopback, origin_matches, resolve_token

import stub_nodes

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = {"version": 1, "nodes": {"1": {"type": "Number", "inputs": {"value": 1.0}},
                                    "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
                                    "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}
TOKEN = "s3cret-token"


async def _client(aiohttp_client: Any, tmp_path: Path, token: str | None = None) -> Any:
    from engine.server.app import make_app

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", token=token,
                   registry=stub_nodes.make_registry())
    return await aiohttp_client(app)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await _client(aiohttp_client, tmp_path)


def own_origin(client: Any) -> str:
    return f"http://{client.server.host}:{client.server.port}"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (5, 6, 7)).save(out, "PNG")
    return out.getvalue()


def _form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", _png(), filename="o.png", content_type="image/png")
    return form


# (method, path, body kind) of state-changing routes a hostile page might aim at
WRITES = [("POST", "/api/jobs", "job"), ("POST", "/prompt", "prompt"), ("POST", "/api/prompt", "prompt"),
          ("PUT", "/api/workflows/x.json", "workflow"), ("DELETE", "/api/workflows/x.json", None),
          ("POST", "/upload/image", "upload"), ("POST", "/interrupt", "empty"), ("POST", "/api/cache/clear", None),
          ("POST", "/queue", "clear")]


def _body(kind: str | None) -> dict[str, Any]:
    if kind == "job":
        return {"json": {"workflow": WORKFLOW}}
    if kind == "prompt":
        return {"json": {"prompt": {k: {"class_type": v["type"], "inputs": v["inputs"]}
                                    for k, v in WORKFLOW["nodes"].items()}}}
    if kind == "workflow":
        return {"json": WORKFLOW}
    if kind == "upload":
        return {"data": _form()}
    if kind == "empty":
        return {"json": {}}
    if kind == "clear":
        return {"json": {"clear": True}}
    return {}


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example",
                                    "https://127.0.0.1", "OTHER_PORT"])
async def test_cross_origin_writes_are_refused(client: Any, tmp_path: Path, origin: str) -> None:
    if origin == "OTHER_PORT":
        origin = f"http://127.0.0.1:{client.server.port + 1}"
    for method, path, kind in WRITES:
        r = await client.request(method, path, headers={"Origin": origin}, **_body(kind))
        assert r.status == 403, (method, path, r.status, await r.text())
        assert (await r.json())["error"]["type"] == "cross_origin"
    # nothing happened: no job, no saved workflow, no upload
    assert (await (await client.get("/api/jobs")).json())["total"] == 0
    assert not (tmp_path / "workflows" / "x.json").exists()
    assert not any((tmp_path / "data" / "input").iterdir())


async def test_sec_fetch_site_cross_site_is_refused(client: Any) -> None:
    r = await client.post("/api/jobs", json={"workflow": WORKFLOW}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status == 403


async def test_same_origin_and_originless_writes_pass(client: Any, tmp_path: Path) -> None:
    for headers in ({"Origin": own_origin(client)}, {"Origin": f"http://localhost:{client.server.port}", "Host": f"localhost:{client.server.port}"},
                    {}, {"Sec-Fetch-Site": "same-origin", "Origin": own_origin(client)}):
        r = await client.post("/api/jobs", json={"workflow": WORKFLOW}, headers=headers)
        assert r.status == 201, (headers, await r.text())
    r = await client.put("/api/workflows/x.json", json=WORKFLOW, headers={"Origin": own_origin(client)})
    assert r.status == 201
    r = await client.post("/upload/image", data=_form(), headers={"Origin": own_origin(client)})
    assert r.status == 200


async def test_reads_from_other_origins_are_not_blocked_but_websockets_are(client: Any) -> None:
    """A cross-origin GET is harmless (the browser hides the answer); a websocket is not, so it is refused."""
    r = await client.get("/api/jobs", headers={"Origin": "http://evil.example"})
    assert r.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/ws?clientId=x", headers={"Origin": "http://evil.example"})
    assert err.value.status == 403
    ws = await client.ws_connect("/ws?clientId=x", headers={"Origin": own_origin(client)})
    msg = await ws.receive_json(timeout=5)
    assert msg["type"] == "status"
    await ws.close()


async def test_dns_rebinding_host_is_refused_without_a_token(client: Any) -> None:
    port = client.server.port
    r = await client.get("/api/jobs", headers={"Host": f"attacker.example:{port}"})
    assert r.status == 403 and (await r.json())["error"]["type"] == "host_refused"
    # the page is same-origin with itself after rebinding, so the Origin check alone would pass it
    r = await client.post("/api/jobs", json={"workflow": WORKFLOW},
                          headers={"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"})
    assert r.status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert (await client.get("/api/jobs", headers={"Host": host})).status == 200, host


async def test_token_is_required_on_every_route(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _client(aiohttp_client, tmp_path, token=TOKEN)
    routes = [("GET", "/"), ("GET", "/api/jobs"), ("GET", "/api/nodes"), ("GET", "/object_info"),
              ("GET", "/api/workflows"), ("GET", "/api/openapi.json"), ("GET", "/view?filename=a.png"),
              ("GET", "/history"), ("GET", "/system_stats"), ("GET", "/api/jobs/nope"),
              ("POST", "/api/jobs"), ("POST", "/prompt"), ("GET", "/no/such/route")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            r = await client.request(method, path, headers=headers, json={"workflow": WORKFLOW})
            assert r.status == 401, (method, path, headers, r.status)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/api/jobs", headers=auth)).status == 200
    assert (await client.get("/api/jobs/nope", headers=auth)).status == 404
    r = await client.post("/api/jobs", json={"workflow": WORKFLOW}, headers=auth)
    assert r.status == 201
    # with a token the Host check is the token's job: a LAN name works
    r = await client.get("/api/jobs", headers={**auth, "Host": f"kiln.lan:{client.server.port}"})
    assert r.status == 200
    # the Origin check still applies to token holders
    r = await client.post("/api/jobs", json={"workflow": WORKFLOW}, headers={**auth, "Origin": "http://evil.example"})
    assert r.status == 403


async def test_token_in_query_and_cookie_for_browsers(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _client(aiohttp_client, tmp_path, token=TOKEN)
    # the editor is opened as /?token=...; the answer sets an HttpOnly, SameSite=Strict cookie
    r = await client.get(f"/?token={TOKEN}")
    assert r.status == 200
    cookie = r.cookies["kiln_token"]
    assert cookie.value == TOKEN and cookie["httponly"] and cookie["samesite"] == "Strict"
    # the test client's cookie jar now carries it, as a browser would
    assert (await client.get("/api/jobs")).status == 200
    r = await client.post("/api/jobs", json={"workflow": WORKFLOW}, headers={"Origin": own_origin(client)})
    assert r.status == 201
    client.session.cookie_jar.clear()
    assert (await client.get("/api/jobs")).status == 401
    # a token in the query string is not accepted for writes (it would end up in logs and histories)
    r = await client.post(f"/api/jobs?token={TOKEN}", json={"workflow": WORKFLOW})
    assert r.status == 401
    client.session.cookie_jar.clear()
    # websockets: browsers cannot set headers there, so ?token= works
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/ws?clientId=a")
    assert err.value.status == 401
    ws = await client.ws_connect(f"/ws?clientId=a&token={TOKEN}")
    assert (await ws.receive_json(timeout=5))["type"] == "status"
    await ws.close()


def test_check_bind() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        check_bind(host, None)
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "10.0.0.1", "example.com", "kiln.local"):
        with pytest.raises(BindRefused, match="token"):
            check_bind(host, None)
        with pytest.raises(BindRefused):
            check_bind(host, "")
        check_bind(host, TOKEN)


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_TOKEN", raising=False)
    assert resolve_token(None) is None and resolve_token("") is None
    monkeypatch.setenv("KILN_TOKEN", " env-token ")
    assert resolve_token(None) == "env-token"
    assert resolve_token("cli") == "cli"


def test_origin_matching() -> None:
    assert origin_matches("http://127.0.0.1:8188", "127.0.0.1:8188", "http")
    assert origin_matches("http://LOCALHOST:8188", "localhost:8188", "http")
    assert origin_matches("http://example.com", "example.com", "http")
    assert origin_matches("http://[::1]:8188", "[::1]:8188", "http")
    assert not origin_matches("http://127.0.0.1:8189", "127.0.0.1:8188", "http")
    assert not origin_matches("null", "127.0.0.1:8188", "http")
    assert not origin_matches("file://", "127.0.0.1:8188", "http")
    assert not origin_matches("http://127.0.0.1:8188.evil.example", "127.0.0.1:8188", "http")


def test_serving_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    """``kiln serve --host 0.0.0.0`` without a token exits with an error instead of listening."""
    code = ("import sys; sys.path.insert(0, 'tests'); import stub_nodes; "
            "from engine.server.app import run_server; "
            f"run_server('0.0.0.0', 0, data_dir={str(tmp_path / 'd')!r}, registry=stub_nodes.make_registry())")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "token" in proc.stderr.lower()
