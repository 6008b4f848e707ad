"""File routes on a real server: /view, /upload/image, /upload/mask.

Every traversal form (``..``, absolute, percent-encoded once and twice, a
backslash, a symlink out of the root, a symlinked folder) is tried on every route
that takes a name, and the secret file outside the data folder must never come
back. Uploads are checked for the byte limit, non-images, decompression bombs,
de-duplication and overwrite.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from engine.server.state import ServerSettings

import stub_nodes

SECRET = b"TOP-SECRET-CONTENT"


def png(width: int = 16, height: int = 16, colour: tuple = (10, 200, 30), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), colour).save(out, "PNG")
    return out.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    import random

    rnd = random.Random(seed)
    im = Image.frombytes("RGB", (width, height), bytes(rnd.getrandbits(8) for _ in range(width * height * 3)))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height zeros: tiny on disk, huge once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "secret.png").write_bytes(png(colour=(1, 2, 3)))
    return tmp_path / "data"


async def _client(aiohttp_client: Any, data: Path, **settings: Any) -> Any:
    from engine.server.app import make_app

    app = make_app(data, data.parent / "models", data.parent / "workflows", registry=stub_nodes.make_registry(),
                   settings=ServerSettings(**settings))
    return await aiohttp_client(app)


@pytest.fixture
async def client(aiohttp_client: Any, data: Path) -> Any:
    return await _client(aiohttp_client, data)


async def upload(client: Any, body: bytes, filename: str = "a.png", route: str = "/upload/image",
                 **fields: str) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("image", body, filename=filename, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return await client.post(route, data=form)


async def assert_refused(response: aiohttp.ClientResponse, json_body: bool = True) -> None:
    body = await response.read()
    assert 400 <= response.status < 500, (response.status, body[:200])
    assert SECRET not in body
    if json_body:
        assert response.headers.get("Content-Type", "").startswith("application/json")


# -- /view -----------------------------------------------------------------------------------

async def test_view_serves_an_uploaded_image_inline(client: Any, data: Path) -> None:
    r = await upload(client, png())
    assert r.status == 200
    assert await r.json() == {"name": "a.png", "subfolder": "", "type": "input"}
    for prefix in ("", "/api"):
        r = await client.get(f"{prefix}/view", params={"filename": "a.png", "type": "input"})
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/png"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Content-Disposition"].startswith("inline")
        assert await r.read() == (data / "input" / "a.png").read_bytes()
    # ComfyUI's annotated form overrides the type parameter
    r = await client.get("/view", params={"filename": "a.png [input]", "type": "output"})
    assert r.status == 200


async def test_view_serves_other_files_as_attachments(client: Any, data: Path) -> None:
    out = data / "output"
    (out / "page.html").write_text("<script>alert(1)</script>")
    (out / "pic.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")
    (out / "notes.txt").write_text("hello")
    for name in ("page.html", "pic.svg", "notes.txt"):
        r = await client.get("/view", params={"filename": name})
        assert r.status == 200, name
        assert r.headers["Content-Type"] == "application/octet-stream", name
        assert r.headers["Content-Disposition"].startswith("attachment"), name
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_view_missing_and_bad_requests(client: Any) -> None:
    assert (await client.get("/view", params={"filename": "nope.png"})).status == 404
    assert (await client.get("/view")).status == 400
    assert (await client.get("/view", params={"filename": "a.png", "type": "models"})).status == 400
    assert (await client.get("/view", params={"filename": "", "subfolder": ""})).status == 400


async def test_view_preview_and_channel(client: Any, data: Path) -> None:
    await upload(client, png(mode="RGBA", colour=(200, 10, 10, 128)))
    r = await client.get("/view", params={"filename": "a.png", "type": "input", "preview": "webp;80"})
    assert r.status == 200 and r.headers["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(await r.read())).format == "WEBP"
    r = await client.get("/view", params={"filename": "a.png", "type": "input", "channel": "rgb"})
    assert Image.open(io.BytesIO(await r.read())).mode == "RGB"
    # a preview never decodes more than an upload may: a bomb or a broken file is served as it is
    for name, body in (("bomb.png", bomb_png(9000, 9000)), ("broken.png", png()[:50])):
        (data / "output" / name).write_bytes(body)
        r = await client.get("/view", params={"filename": name, "preview": "webp;80"})
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        assert await r.read() == body


TRAVERSALS = [
    {"filename": "../../secret.txt"},
    {"filename": "../secret.txt"},
    {"filename": "..\\..\\secret.txt"},
    {"filename": str(Path("/etc/passwd"))},
    {"filename": "SECRET_ABS"},  # replaced with the absolute path of the secret
    {"filename": "secret.txt", "subfolder": "../.."},
    {"filename": "secret.txt", "subfolder": "/tmp"},
    {"filename": "%2e%2e/%2e%2e/secret.txt"},
    {"filename": "..%2f..%2fsecret.txt"},
    {"filename": "%252e%252e%252f%252e%252e%252fsecret.txt"},
    {"filename": "secret.txt", "subfolder": "%2e%2e/%2e%2e"},
    {"filename": "../../secret.txt [input]"},
]


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_view_refuses_every_traversal(client: Any, data: Path, prefix: str) -> None:
    for attempt in TRAVERSALS:
        params = {k: (str(data.parent / "secret.txt") if v == "SECRET_ABS" else v) for k, v in attempt.items()}
        for kind in ("input", "output", "temp"):
            r = await client.get(f"{prefix}/view", params={**params, "type": kind})
            await assert_refused(r)
            assert r.status == 403, (params, r.status)  # refused by the resolver, not merely missing
    # raw, percent-encoded URLs as a hostile client would send them
    for raw in ("/view?filename=..%2F..%2Fsecret.txt&type=input",
                "/view?filename=%2E%2E%2F%2E%2E%2Fsecret.txt",
                "/view?filename=secret.txt&subfolder=%2E%2E%2F%2E%2E",
                "/view?filename=%252E%252E%252F%252E%252E%252Fsecret.txt"):
        r = await client.get(prefix + raw)
        await assert_refused(r)
        assert r.status == 403, raw


async def test_view_refuses_symlinks_out_of_the_root(client: Any, data: Path) -> None:
    inp = data / "input"
    os.symlink(data.parent / "secret.txt", inp / "link.txt")
    os.symlink(data.parent / "secret.png", inp / "link.png")
    os.symlink(data.parent, inp / "outside")
    for params in ({"filename": "link.txt"}, {"filename": "link.png"},
                   {"filename": "secret.txt", "subfolder": "outside"}, {"filename": "outside/secret.png"}):
        r = await client.get("/view", params={**params, "type": "input"})
        await assert_refused(r)
        assert r.status == 403
    # a symlink that stays inside the root is fine
    (inp / "real.png").write_bytes(png())
    os.symlink(inp / "real.png", inp / "alias.png")
    r = await client.get("/view", params={"filename": "alias.png", "type": "input"})
    assert r.status == 200 and await r.read() == png()


async def test_a_name_served_before_is_refused_once_its_folder_or_file_leads_out(client: Any, data: Path) -> None:
    """SafeRoot remembers names it resolved; swapping what a served name leads to must not be
    answered from that memory (a folder becomes a symlink out, a file becomes one, a file is replaced)."""
    inp = data / "input"
    (inp / "sub").mkdir()
    (inp / "sub" / "secret.png").write_bytes(png())
    (inp / "pic.png").write_bytes(png())
    for params in ({"filename": "secret.png", "subfolder": "sub"}, {"filename": "pic.png"}):
        for _ in range(2):  # the second answer comes from the remembered resolution
            r = await client.get("/view", params={**params, "type": "input"})
            assert r.status == 200 and await r.read() == png()
    os.rename(inp / "sub", inp / "was-sub")
    os.symlink(data.parent, inp / "sub")  # data.parent holds secret.png too
    os.remove(inp / "pic.png")
    os.symlink(data.parent / "secret.png", inp / "pic.png")
    for params in ({"filename": "secret.png", "subfolder": "sub"}, {"filename": "pic.png"}):
        r = await client.get("/view", params={**params, "type": "input"})
        await assert_refused(r)
        assert r.status == 403
    os.remove(inp / "pic.png")
    (inp / "pic.png").write_bytes(png(colour=(7, 7, 7)))  # replaced by another file: served as it is now
    r = await client.get("/view", params={"filename": "pic.png", "type": "input"})
    assert r.status == 200 and await r.read() == png(colour=(7, 7, 7))


# -- /upload/image ------------------------------------------------------------------------------

async def test_upload_deduplicates_by_content(client: Any, data: Path) -> None:
    first, second = png(colour=(1, 1, 1)), png(colour=(2, 2, 2))
    assert (await (await upload(client, first)).json())["name"] == "a.png"
    assert (data / "input" / "a.png").stat().st_mode & 0o777 == 0o644
    assert (await (await upload(client, first)).json())["name"] == "a.png"       # same bytes, same name
    # same bytes under another name: stored under the name asked for, sharing the bytes (a hard link)
    assert (await (await upload(client, first, "b.png")).json())["name"] == "b.png"
    assert (data / "input" / "b.png").read_bytes() == first
    assert os.path.samefile(data / "input" / "a.png", data / "input" / "b.png")
    # ComfyUI's collision rule: a different file gets "stem (n)"; a candidate with the same bytes is reused
    assert (await (await upload(client, second)).json())["name"] == "a (1).png"
    assert (await (await upload(client, second)).json())["name"] == "a (1).png"
    third = png(colour=(3, 3, 3))
    assert (await (await upload(client, third)).json())["name"] == "a (2).png"
    assert (data / "input" / "a.png").read_bytes() == first
    assert (data / "input" / "a (1).png").read_bytes() == second
    assert sorted(p.name for p in (data / "input").iterdir()) == ["a (1).png", "a (2).png", "a.png", "b.png"]


async def test_upload_overwrite_is_explicit(client: Any, data: Path) -> None:
    first, second = png(colour=(1, 1, 1)), png(colour=(2, 2, 2))
    await upload(client, first)
    r = await upload(client, second, overwrite="true")
    assert (await r.json())["name"] == "a.png"
    assert (data / "input" / "a.png").read_bytes() == second
    assert sorted(p.name for p in (data / "input").iterdir()) == ["a.png"]


async def test_upload_subfolder_type_and_extension(client: Any, data: Path) -> None:
    r = await upload(client, png(), "pic.png", subfolder="sets/one", type="temp")
    assert await r.json() == {"name": "pic.png", "subfolder": "sets/one", "type": "temp"}
    assert (data / "temp" / "sets" / "one" / "pic.png").is_file()
    # the stored extension follows the content, so a PNG cannot become a served .html page
    r = await upload(client, png(colour=(9, 9, 9)), "evil.html")
    assert (await r.json())["name"] == "evil.png"
    # an image extension is kept as asked even if the bytes are another format: the client's prompt names it
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4), (7, 7, 7)).save(jpeg, "JPEG")
    r = await upload(client, jpeg.getvalue(), "photo.png")
    assert (await r.json())["name"] == "photo.png"
    r = await upload(client, png(colour=(8, 8, 8)), "")
    name = (await r.json())["name"]
    assert name.startswith("upload_") and name.endswith(".png")
    assert (await upload(client, png(), type="models")).status == 400


async def test_upload_refuses_traversal(client: Any, data: Path) -> None:
    before = sorted(p.name for p in data.parent.iterdir())
    os.symlink(data.parent, data / "input" / "outside")
    for fields, filename in (({"subfolder": "../.."}, "x.png"), ({"subfolder": "/tmp"}, "x.png"),
                             ({"subfolder": "%2e%2e/%2e%2e"}, "x.png"), ({"subfolder": "outside"}, "x.png"),
                             ({}, "../../x.png"), ({}, "..\\x.png"), ({}, "/tmp/x.png"), ({}, ".hidden.png")):
        for route in ("/upload/image", "/api/upload/image"):
            r = await upload(client, png(), filename, route=route, **fields)
            await assert_refused(r)
    assert sorted(p.name for p in data.parent.iterdir()) == before
    assert not Path("/tmp/x.png").exists() or Path("/tmp/x.png").read_bytes() != png()


async def test_upload_size_limit(aiohttp_client: Any, data: Path) -> None:
    client = await _client(aiohttp_client, data, max_upload_bytes=20_000)
    big = noise_png(128, 128)
    assert len(big) > 20_000
    r = await upload(client, big)
    await assert_refused(r)
    assert r.status == 413
    assert not any((data / "input").iterdir())
    assert (await upload(client, png())).status == 200  # the server keeps serving


async def test_upload_refuses_non_images(client: Any, data: Path) -> None:
    for body, name in ((b"<html><script>alert(1)</script></html>", "a.png"), (b"\x00" * 100, "x.png"),
                       (png()[:40], "truncated.png"), (b"GIF89a" + b"\x00" * 10, "g.gif")):
        r = await upload(client, body, name)
        await assert_refused(r)
        assert r.status == 415, (name, await r.text())
    assert not any((data / "input").iterdir())
    form = aiohttp.FormData()
    form.add_field("subfolder", "x")
    await assert_refused(await client.post("/upload/image", data=form))  # no image field
    await assert_refused(await client.post("/upload/image", json={"image": "a.png"}))  # not multipart


async def test_upload_refuses_decompression_bombs(client: Any, data: Path) -> None:
    # over Kiln's limit (8192*8192) but under PIL's own bomb threshold: Kiln's header check refuses it
    bomb = bomb_png(9000, 9000)
    assert len(bomb) < 200_000
    r = await upload(client, bomb, "bomb.png")
    await assert_refused(r)
    assert r.status == 413 and "pixels" in (await r.json())["error"]["message"]
    # far over both limits
    r = await upload(client, bomb_png(20000, 20000), "bomb2.png")
    assert r.status == 413
    assert not any((data / "input").iterdir())


async def test_concurrent_uploads_never_share_a_name(client: Any, data: Path) -> None:
    bodies = [png(colour=(i, 0, 0)) for i in range(12)]
    responses = await asyncio.gather(*(upload(client, b, "same.png") for b in bodies))
    names = [(await r.json())["name"] for r in responses]
    assert len(set(names)) == 12
    stored = {(data / "input" / n).read_bytes() for n in names}
    assert stored == set(bodies)


# -- /upload/mask -------------------------------------------------------------------------------

async def test_upload_mask_writes_alpha_into_a_copy(client: Any, data: Path) -> None:
    await upload(client, png(32, 32, (50, 60, 70)), "photo.png")
    mask = png(32, 32, (0, 0, 0, 0), mode="RGBA")
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    r = await upload(client, mask, "clipspace-mask.png", route="/upload/mask", original_ref=ref)
    assert r.status == 200, await r.text()
    name = (await r.json())["name"]
    merged = Image.open(data / "input" / name)
    assert merged.mode == "RGBA" and merged.getpixel((3, 3)) == (50, 60, 70, 0)
    assert Image.open(data / "input" / "photo.png").mode == "RGB"  # the original is untouched
    for bad in ({"filename": "../../secret.png"}, {"filename": "secret.png", "subfolder": "../.."},
                {"filename": str(data.parent / "secret.png")}, {"filename": "%2e%2e/%2e%2e/secret.png"}):
        r = await upload(client, mask, "m.png", route="/api/upload/mask", original_ref=json.dumps(bad))
        await assert_refused(r)
    r = await upload(client, mask, "m.png", route="/upload/mask", original_ref=json.dumps({"filename": "nope.png"}))
    assert r.status == 404


async def test_upload_mask_as_comfyui_mask_editor_sends_it(client: Any, data: Path) -> None:
    """The wire form of ComfyUI's mask editor (and Kiln's): the picture with alpha = 255 - mask,
    named clipspace-mask-<ms>.png, type input, subfolder clipspace, original_ref the LoadImage file."""
    from PIL.PngImagePlugin import PngInfo

    base = Image.new("RGB", (24, 16), (50, 60, 70))
    base.putpixel((0, 0), (200, 10, 10))
    info = PngInfo()
    info.add_text("workflow", "{}")
    out = io.BytesIO()
    base.save(out, "PNG", pnginfo=info)
    await upload(client, out.getvalue(), "photo.png")
    sent = base.convert("RGBA")
    alpha = Image.new("L", (24, 16), 255)
    alpha.paste(0, (4, 2, 12, 10))  # painted region: transparent
    sent.putalpha(alpha)
    body = io.BytesIO()
    sent.save(body, "PNG")
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    r = await upload(client, body.getvalue(), "clipspace-mask-1733300000000.png", route="/upload/mask",
                     original_ref=ref, type="input", subfolder="clipspace")
    assert r.status == 200, await r.text()
    assert await r.json() == {"name": "clipspace-mask-1733300000000.png", "subfolder": "clipspace", "type": "input"}
    stored = Image.open(data / "input" / "clipspace" / "clipspace-mask-1733300000000.png")
    assert stored.mode == "RGBA" and stored.size == (24, 16)
    assert stored.text.get("workflow") == "{}", "the original's text chunks are kept"
    assert list(stored.getchannel("A").getdata()) == list(alpha.getdata())
    assert stored.convert("RGB").tobytes() == base.tobytes(), "colours come from the original"
    # the same file is served back with its alpha (what the painter reads when it reopens a mask)
    r = await client.get("/view", params={"filename": "clipspace-mask-1733300000000.png [input]",
                                          "subfolder": "clipspace", "channel": "a"})
    assert r.status == 200
    assert list(Image.open(io.BytesIO(await r.read())).getchannel("A").getdata()) == list(alpha.getdata())


async def test_model_and_static_names_refused(client: Any) -> None:
    """The other routes that take a file name from the URL use the same resolver."""
    for raw in ("/api/models/..%2F..", "/api/models/%2e%2e", "/api/models/%2Fetc",
                "/web/..%2F..%2Fsecret.txt"):
        await assert_refused(await client.get(raw))
    # the client itself normalises dot segments; whatever reaches the server is still refused
    await assert_refused(await client.get("/web/%2e%2e/%2e%2e/secret.txt"), json_body=False)
