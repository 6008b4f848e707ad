"""File routes: ``/view``, ``/upload/image`` and ``/upload/mask`` (ComfyUI's shapes).

Every name that arrives here goes through :meth:`engine.paths.SafeRoot.resolve`
(the one resolver), so a traversal attempt is refused the same way whether it is
``..``, an absolute path, a percent-encoded variant or a symlink leading out of
the folder. Files are served with content types a browser cannot be tricked
into running: the three image types the editor shows inline, everything else as
an ``application/octet-stream`` attachment, always with ``nosniff``.

Uploads are streamed with a byte limit, must decode as an image within a pixel
limit (no decompression bombs), keep the name the client asked for (ComfyUI's
numbered variant on a collision), share bytes with an identical file by a hard
link, and never replace a different file unless ``overwrite`` is asked for.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from engine.paths import FOLDER_TYPES, PathMalformed, PathRefused, SafeRoot, split_annotation
from engine.server.http import fail
from engine.server.state import STATE

#: Served inline; anything else is a download.
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
#: Image formats an upload may be in, and the extensions each may be stored under.
UPLOAD_FORMATS = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "GIF": (".gif",),
    "BMP": (".bmp",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg", ".mpo"),
}
MAX_FRAMES = 64
_UPLOAD_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("kiln_upload_lock", asyncio.Lock)


def _refused(exc: Exception) -> NoReturn:
    if isinstance(exc, PathMalformed):
        fail(400, "bad_path", str(exc))
    fail(403, "path_refused", str(exc))


def folder_root(app: web.Application, kind: str) -> SafeRoot:
    """The SafeRoot behind a ComfyUI folder ``type`` (output, input or temp)."""
    if kind not in FOLDER_TYPES:
        fail(400, "bad_type", f"type must be one of {', '.join(FOLDER_TYPES)}, not {kind!r}")
    return getattr(app[STATE].env.paths, kind)


def content_headers(path: Path) -> dict[str, str]:
    """Content type and disposition that keep a served file from running as a page."""
    name = path.name
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    encoded = quote(name, safe="")
    mime = INLINE_TYPES.get(path.suffix.lower())
    disposition = "inline" if mime else "attachment"
    return {
        "Content-Type": mime or "application/octet-stream",
        "Content-Disposition": f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "no-cache",
    }


async def view(request: web.Request) -> web.StreamResponse:
    """``GET /view?filename=&subfolder=&type=``: one file from output, input or temp."""
    query = request.query
    filename = query.get("filename", "")
    if not filename:
        fail(400, "missing_filename", "the 'filename' query parameter is required")
    filename, kind = split_annotation(filename, query.get("type", "output") or "output")
    root = folder_root(request.app, kind)
    try:
        path = root.resolve(filename, query.get("subfolder", ""))
    except PathRefused as exc:
        _refused(exc)
    if not path.is_file():
        fail(404, "not_found", f"no file {filename!r} in {kind}")
    preview = query.get("preview") or query.get("channel")
    if preview and path.suffix.lower() in INLINE_TYPES:
        max_pixels = request.app[STATE].settings.max_upload_pixels
        result = await asyncio.to_thread(_transcode, path, query.get("preview"), query.get("channel"), max_pixels)
        if result is not None:
            return web.Response(body=result[0], headers=result[1])
    return web.FileResponse(path, headers=content_headers(path))


def _transcode(path: Path, preview: str | None, channel: str | None,
               max_pixels: int) -> tuple[bytes, dict[str, str]] | None:
    """ComfyUI's ``preview=webp;90`` re-encoding and ``channel=rgb|a`` extraction.

    None (serve the file as it is) when the file does not decode or would decode
    to more pixels than an upload may have: a preview must never cost more than the file.
    """
    from PIL import Image

    try:
        im = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    with im:
        if im.size[0] * im.size[1] > max_pixels:
            return None
        try:
            im.load()
        except (OSError, ValueError, SyntaxError):
            return None
        if channel == "rgb":
            im = im.convert("RGB")
        elif channel == "a":
            alpha = im.getchannel("A") if "A" in im.getbands() else Image.new("L", im.size, 255)
            im = Image.new("RGBA", im.size, (0, 0, 0, 0))
            im.putalpha(alpha)
        fmt, quality = "PNG", 90
        if preview:
            kind, _, q = preview.partition(";")
            fmt = {"webp": "WEBP", "jpeg": "JPEG", "jpg": "JPEG"}.get(kind.lower(), "PNG")
            quality = int(q) if q.isdigit() and 1 <= int(q) <= 100 else 90
        if fmt == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        out = io.BytesIO()
        im.save(out, format=fmt, quality=quality)
    ext = {"PNG": ".png", "WEBP": ".webp", "JPEG": ".jpg"}[fmt]
    return out.getvalue(), content_headers(path.with_suffix(ext))


# -- uploads -------------------------------------------------------------------------

@dataclass
class UploadForm:
    data: bytes = b""
    filename: str = ""
    kind: str = "input"
    subfolder: str = ""
    overwrite: bool = False
    original_ref: dict[str, Any] | None = None


async def _read_form(request: web.Request, max_bytes: int) -> UploadForm:
    """Stream the multipart body, refusing it as soon as the image passes ``max_bytes``.

    aiohttp's own body limit is for JSON bodies; uploads are larger, so this
    reader counts bytes itself instead of buffering an unbounded body first.
    """
    length = request.content_length
    if length is not None and length > max_bytes + 64 * 1024:
        fail(413, "too_large", f"upload of {length} bytes exceeds the limit of {max_bytes} bytes",
             limit=max_bytes, size=length)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        fail(400, "bad_form", f"expected a multipart/form-data body: {exc}")
    form = UploadForm()
    seen_image = False
    while True:
        try:
            part = await reader.next()
        except HttpProcessingError as exc:  # a malformed part header (a NUL in a file name)
            fail(400, "bad_form", f"malformed multipart part: {exc.message}")
        if part is None:
            break
        if not hasattr(part, "read_chunk"):
            continue  # a nested multipart: ComfyUI clients never send one
        name = part.name
        limit = max_bytes if name == "image" else 64 * 1024
        chunks, size = [], 0
        while chunk := await part.read_chunk(256 * 1024):
            size += len(chunk)
            if size > limit:
                fail(413, "too_large", f"field {name!r} exceeds the limit of {limit} bytes", limit=limit, size=size)
            chunks.append(chunk)
        value = b"".join(chunks)
        if name == "image":
            seen_image = True
            form.data, form.filename = value, part.filename or ""
        elif name in ("type", "subfolder", "overwrite", "original_ref"):
            text = value.decode("utf-8", "replace")
            if name == "type":
                form.kind = text or "input"
            elif name == "subfolder":
                form.subfolder = text
            elif name == "overwrite":
                form.overwrite = text.strip().lower() in ("true", "1", "yes")
            else:
                try:
                    ref = json.loads(text)
                except json.JSONDecodeError:
                    ref = None
                if not isinstance(ref, dict):
                    fail(400, "bad_original_ref", "original_ref must be a JSON object")
                form.original_ref = ref
    if not seen_image:
        fail(400, "missing_image", "the multipart field 'image' (a file) is required")
    if not form.data:
        fail(400, "empty_image", "the uploaded image is empty")
    return form


def inspect_image(data: bytes, max_pixels: int) -> str:
    """Decode ``data`` fully and return its PIL format, or refuse it with a clear reason.

    The pixel count is checked from the header *before* decoding, so a small file
    that inflates to gigabytes (a decompression bomb) is refused without being
    expanded; PIL's own bomb check is kept as a second line.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            if fmt not in UPLOAD_FORMATS:
                fail(415, "unsupported_image", f"image format {fmt or 'unknown'} is not accepted")
            frames = getattr(im, "n_frames", 1)
            width, height = im.size
            if width * height * min(frames, MAX_FRAMES) > max_pixels or frames > MAX_FRAMES:
                fail(
                    413, "too_many_pixels",
                    f"image is {width}x{height} pixels ({frames} frame(s)); the limit is {max_pixels} pixels",
                    limit=max_pixels, size=width * height)
            im.load()
    except web.HTTPException:
        raise
    except Image.DecompressionBombError as exc:
        fail(413, "too_many_pixels", f"the image decodes to too many pixels: {exc}", limit=max_pixels)
    except UnidentifiedImageError as exc:
        fail(415, "not_an_image", f"the upload is not a readable image: {exc}")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        fail(415, "not_an_image", f"the upload does not decode as an image: {exc}")
    return fmt


#: Every extension an accepted image may be stored under.
IMAGE_EXTENSIONS = frozenset(ext for exts in UPLOAD_FORMATS.values() for ext in exts)


def stored_name(filename: str, fmt: str, digest: str) -> str:
    """The file name to store under: the client's, unless it would not be served as an image.

    A name with an image extension is kept exactly, even when the extension
    names another image format ("photo.png" holding JPEG bytes): the client's
    prompt will name that file, and loaders judge the content, not the name.
    Any other extension is replaced by the content's ("evil.html" -> "evil.png"),
    so an upload can never become a page the server would serve as such.
    """
    name = filename.replace("\\", "/")
    if any(ord(c) < 32 for c in name):
        fail(400, "bad_filename", "the file name may not contain NUL or other control characters")
    if "/" in name:
        fail(400, "bad_filename", f"the file name may not contain a path: {filename!r}; use 'subfolder'")
    if name.startswith("."):
        fail(400, "bad_filename", f"the file name may not start with '.': {filename!r}")
    stem, ext = os.path.splitext(name)
    if not stem:
        stem = f"upload_{digest[:12]}"
    if ext.lower() not in IMAGE_EXTENSIONS:
        ext = UPLOAD_FORMATS[fmt][0]
    return stem + ext


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _holds(path: Path, size: int, digest: str) -> bool:
    """Whether ``path`` is a regular file with exactly these bytes (only equal sizes are hashed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and _digest(path) == digest


def _same_bytes_in(folder: Path, size: int, digest: str) -> Path | None:
    """A file in ``folder`` holding exactly these bytes, to share them by a hard link."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return None
    for entry in entries:
        if not entry.name.startswith(".") and _holds(Path(entry.path), size, digest):
            return Path(entry.path)
    return None


def store_upload(root: SafeRoot, subfolder: str, name: str, data: bytes, overwrite: bool) -> str:
    """Write ``data`` as ``subfolder/name`` (or ComfyUI's next free variant of it); return the name used.

    ComfyUI's collision rule: try ``name``, then ``"stem (1).ext"``, ``"stem (2).ext"``, ...;
    the first candidate that is free is written, and a candidate that already
    holds exactly these bytes is answered without writing. The client therefore
    always gets back the name it asked for or a numbered variant of it, never
    another file's name. With ``overwrite`` the name itself is replaced.

    De-duplication shares bytes, not names: when another file in the folder
    already holds the same bytes, the new name is a hard link to it. Writes are
    atomic (temporary file, then link or rename): a reader never sees half a
    file and two uploads never claim one name.
    """
    target = root.resolve(name, subfolder)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    root.resolve(name, subfolder)  # again, now that the folders exist (a symlinked subfolder)
    digest = hashlib.sha256(data).hexdigest()
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # as any other file in the folder, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if overwrite:
            os.replace(tmp, target)
            return target.name
        twin = _same_bytes_in(folder, len(data), digest)
        stem, ext = os.path.splitext(target.name)
        n = 0
        while n < 10000:
            candidate = folder / (target.name if n == 0 else f"{stem} ({n}){ext}")
            if _holds(candidate, len(data), digest):
                return candidate.name
            if os.path.lexists(candidate):
                n += 1
                continue
            try:
                os.link(twin if twin is not None else tmp, candidate)
                return candidate.name
            except FileExistsError:
                continue  # taken meanwhile: judge it again
            except OSError:
                if twin is None:
                    raise
                twin = None  # the twin cannot be linked (another device): link the fresh copy
        fail(409, "name_taken", f"no free name left for {target.name!r}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _upload_response(name: str, subfolder: str, kind: str) -> web.Response:
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


async def upload_image(request: web.Request) -> web.Response:
    """``POST /upload/image`` (multipart: image, type, subfolder, overwrite)."""
    settings = request.app[STATE].settings
    form = await _read_form(request, settings.max_upload_bytes)
    root = folder_root(request.app, form.kind)
    fmt = await asyncio.to_thread(inspect_image, form.data, settings.max_upload_pixels)
    name = stored_name(form.filename, fmt, hashlib.sha256(form.data).hexdigest())
    async with request.app[_UPLOAD_LOCK]:
        try:
            final = await asyncio.to_thread(store_upload, root, form.subfolder, name, form.data, form.overwrite)
        except PathRefused as exc:
            _refused(exc)
    return _upload_response(final, form.subfolder, form.kind)


def _merge_mask(original: Path, mask_data: bytes) -> bytes:
    """The original image with the mask upload's alpha channel, as PNG (text chunks kept)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    with Image.open(original) as orig, Image.open(io.BytesIO(mask_data)) as mask:
        info = PngInfo()
        for key, value in getattr(orig, "text", {}).items():
            info.add_text(key, value)
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.size != orig.size:
            alpha = alpha.resize(orig.size)
        out_im = orig.convert("RGBA")
        out_im.putalpha(alpha)
        out = io.BytesIO()
        out_im.save(out, format="PNG", pnginfo=info, compress_level=4)
    return out.getvalue()


async def upload_mask(request: web.Request) -> web.Response:
    """``POST /upload/mask``: the uploaded alpha written into a copy of ``original_ref``."""
    settings = request.app[STATE].settings
    form = await _read_form(request, settings.max_upload_bytes)
    ref = form.original_ref
    if ref is None or not ref.get("filename"):
        fail(400, "bad_original_ref", "original_ref {filename, subfolder, type} is required")
    # ComfyUI's default folder for a ref without a type is "output" (its server.py); its
    # mask editor always sends one ("input" for a LoadImage picture).
    ref_name, ref_kind = split_annotation(str(ref["filename"]), str(ref.get("type") or "output"))
    ref_root = folder_root(request.app, ref_kind)
    try:
        original = ref_root.resolve(ref_name, str(ref.get("subfolder") or ""))
    except PathRefused as exc:
        _refused(exc)
    if not original.is_file():
        fail(404, "not_found", f"original image {ref_name!r} not found in {ref_kind}")
    await asyncio.to_thread(inspect_image, form.data, settings.max_upload_pixels)
    await asyncio.to_thread(inspect_image, original.read_bytes(), settings.max_upload_pixels)
    merged = await asyncio.to_thread(_merge_mask, original, form.data)
    root = folder_root(request.app, form.kind)
    name = stored_name(form.filename or "mask.png", "PNG", hashlib.sha256(merged).hexdigest())
    async with request.app[_UPLOAD_LOCK]:
        try:
            final = await asyncio.to_thread(store_upload, root, form.subfolder, name, merged, form.overwrite)
        except PathRefused as exc:
            _refused(exc)
    return _upload_response(final, form.subfolder, form.kind)


def add_routes(app: web.Application) -> None:
    """Register the file routes, each also under ``/api/`` as ComfyUI serves them."""
    app[_UPLOAD_LOCK] = asyncio.Lock()
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/view", view)
        app.router.add_post(f"{prefix}/upload/image", upload_image)
        app.router.add_post(f"{prefix}/upload/mask", upload_mask)
