"""Where LoadImage's bytes come from, how they are decoded, and how PNGs are written.

Kept apart from the node declarations in :mod:`nodes.image` so the rules that guard
the process (path containment, download caps, decompression-bomb checks, atomic
writes) read in one place. Nothing here imports torch; PIL and numpy are imported
inside functions so that listing nodes stays fast.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

from engine.context import Environment, NodeError
from engine.paths import PathRefused, split_annotation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Smallest side accepted. Below 8 pixels an image does not even fill one latent
#: cell of an SD VAE, so a 1-pixel file is almost certainly a mistake (a tracking
#: pixel saved by accident, a broken export) and is refused with a clear message.
MIN_SIDE = 8


# -- where the image is --------------------------------------------------------------

def is_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def locate_file(env: Environment, name: str, input_name: str = "image", what: str = "image") -> Path:
    """The file a LoadImage value names (or LoadLatent's: ``what`` names the kind in messages).

    A name is first looked up inside the input folder (through SafeRoot, so
    ``../`` and symlinks out are refused). Only when the environment allows it
    (the CLI, run by the owner of the files) is it then taken as a filesystem
    path, absolute or relative to the working directory.
    """
    if not isinstance(name, str) or not name.strip():
        raise NodeError(f"no {what} given", input_name)
    refused: str | None = None
    # ComfyUI's annotated form ("clipspace/clipspace-mask-1.png [input]", as its mask
    # editor writes it; "[output]" and "[temp]" name those folders), one rule with /view.
    plain, kind = split_annotation(name, "input")
    try:
        return getattr(env.paths, kind).resolve(plain, must_exist=True)
    except PathRefused as exc:
        refused = str(exc)
    except FileNotFoundError:
        pass
    if env.settings.allow_absolute_paths:
        path = Path(name).expanduser()
        try:
            if path.is_file():
                return path.resolve()
            if path.exists():
                raise NodeError(f"'{name}' is not a file", input_name)
        except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL
            raise NodeError(f"cannot open '{name}': {getattr(exc, 'strerror', None) or exc}", input_name) from None
        raise NodeError(f"no such {what} file: '{name}' (looked in the {kind} folder and at that path)", input_name)
    if refused:
        raise NodeError(f"refused '{name}': {refused}; only files inside the {kind} folder can be loaded here",
                        input_name)
    # Named relative to its folder: error messages never show the server's own paths.
    raise NodeError(f"no {what} named '{kind}/{plain}' in the {kind} folder", input_name)


# -- downloads -------------------------------------------------------------------------

# The fingerprint hook and the node run both need the bytes of a URL; this cache makes
# it one download per job. A failure is remembered too (briefly), so a slow or broken
# URL costs one deadline per job, not one for the fingerprint and another for the run.
_url_cache: "OrderedDict[str, tuple[float, bytes | str]]" = OrderedDict()
_url_lock = threading.Lock()
_URL_CACHE_ENTRIES = 4
_URL_CACHE_TTL_S = 120.0
_URL_FAILURE_TTL_S = 30.0


def fetch_url(env: Environment, url: str, input_name: str = "image") -> bytes:
    """Download an image within the settings' byte cap, total deadline and address rules (nodes.url_fetch)."""
    from nodes import url_fetch

    if not env.settings.allow_url_images:
        raise NodeError("loading images from URLs is turned off here (the server enables it with "
                        "--allow-url-images)", input_name)
    now = time.monotonic()
    with _url_lock:
        hit = _url_cache.get(url)
        if hit and now - hit[0] < (_URL_CACHE_TTL_S if isinstance(hit[1], bytes) else _URL_FAILURE_TTL_S):
            _url_cache.move_to_end(url)
            if isinstance(hit[1], str):
                raise NodeError(hit[1], input_name)
            return hit[1]
    try:
        data, content_type = url_fetch.fetch(url, max_bytes=int(env.settings.url_max_bytes),
                                             timeout_s=float(env.settings.url_timeout_s),
                                             allow=url_fetch.AllowList.parse(env.settings.url_allow_hosts))
        if content_type.lower().startswith("text/"):
            raise url_fetch.FetchRefused(f"it is {content_type.split(';')[0]}, not an image")
        result: bytes | str = data
    except url_fetch.FetchRefused as exc:
        result = f"fetching {url} failed: {exc}"
    with _url_lock:
        _url_cache[url] = (time.monotonic(), result)
        while len(_url_cache) > _URL_CACHE_ENTRIES:
            _url_cache.popitem(last=False)
    if isinstance(result, str):
        raise NodeError(result, input_name)
    return result


# -- content hashes (fingerprints) -----------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) so unchanged files hash once."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _hash_cache.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_hash_cache) > 1024:
            _hash_cache.clear()
        _hash_cache[key] = digest
    return digest


# -- decoding --------------------------------------------------------------------------

def open_image(source: Path | bytes, label: str, max_pixels: int, input_name: str = "image") -> Any:
    """Decode to a loaded PIL image with EXIF orientation applied.

    The size is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        im = Image.open(stream)
    except UnidentifiedImageError:
        raise NodeError(f"{label} is not an image (corrupt, empty, or a format Pillow cannot read)",
                        input_name) from None
    except Image.DecompressionBombError as exc:
        raise NodeError(f"{label} is too large to decode safely: {exc}", input_name) from None
    except OSError as exc:
        raise NodeError(f"cannot read {label}: {exc}", input_name) from None
    w, h = im.size
    if w * h > max_pixels:
        raise NodeError(f"{label} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                        f"(settings.max_image_pixels)", input_name)
    if w < MIN_SIDE or h < MIN_SIDE:
        raise NodeError(f"{label} is only {w}x{h} pixels; images need at least {MIN_SIDE}x{MIN_SIDE}", input_name)
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise NodeError(f"{label} is corrupt or truncated: {exc}", input_name) from None
    return im


def header_size(env: Environment, literals: Mapping[str, Any], input_name: str = "image") -> tuple[int, int, int] | None:
    """(width, height, 1) of the input file a LoadImage value names, read from its header.

    The resource budget's probe: validation learns how big the loaded image will be
    without decoding it. None for URLs (fetched only when the job runs) and for
    files that cannot be read (the node's own validation says why).
    """
    from PIL import Image

    value = literals.get(input_name)
    if not isinstance(value, str) or is_url(value):
        return None
    try:
        path = locate_file(env, value, input_name)
        st = os.stat(path)
        width, height = _image_size(str(path), st.st_mtime_ns, st.st_size, st.st_ino)
    except (NodeError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return int(width), int(height), 1


@functools.lru_cache(maxsize=256)
def _image_size(path: str, mtime_ns: int, size: int, inode: int) -> tuple[int, int]:
    """An image file's size from its header, remembered per file version (the stat is the key):
    a resubmitted job is validated twice (submission, worker) and would open the file each time."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}


def to_arrays(im: Any, background: str) -> tuple[Any, Any]:
    """(rgb float32 [H,W,3] 0..1, mask float32 [H,W] = 1 - alpha, or None without alpha)."""
    import numpy as np

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float32)
        scale = 65535.0 if im.mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0
        grey = np.clip(grey / scale, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2), None
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    if not has_alpha:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, None
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if background != "none":
        bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
        rgb = rgb * alpha[..., None] + bg * (1.0 - alpha[..., None])
    return np.ascontiguousarray(rgb, dtype=np.float32), (1.0 - alpha).astype(np.float32)


# -- writing ---------------------------------------------------------------------------

def to_pil(image: Any) -> Any:
    """One IMAGE item [H,W,C] (tensor or array, 0..1) to an 8-bit PIL image, rounding."""
    import numpy as np
    from PIL import Image

    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    channels = arr.shape[-1] if arr.ndim == 3 else 1
    if arr.ndim == 3 and channels == 1:
        arr = arr[..., 0]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise NodeError(f"cannot save an image with {channels} channels (expected 1, 3 or 4)", "images")
    return Image.fromarray(arr, mode)


def png_text(chunks: Mapping[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return info


def _next_counter(folder: Path, base: str, suffix: str) -> int:
    pattern = re.compile(re.escape(base) + r"_(\d{5,})_" + re.escape(suffix) + "$")
    highest = 0
    try:
        for entry in os.scandir(folder):
            m = pattern.match(entry.name)
            if m:
                highest = max(highest, int(m.group(1)))
    except FileNotFoundError:
        pass
    return highest + 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_png_atomic(image: Any, folder: Path, base: str, pnginfo: Any, compress_level: int) -> str:
    """Write ``base_NNNNN_.png`` into ``folder`` and return its name (see :func:`write_numbered_atomic`)."""
    return write_numbered_atomic(
        folder, base, ".png", lambda f: image.save(f, format="PNG", pnginfo=pnginfo, compress_level=compress_level))


def write_numbered_atomic(folder: Path, base: str, suffix: str, write: Callable[[BinaryIO], None]) -> str:
    """Write ``base_NNNNN_<suffix>`` into ``folder`` through ``write(file)`` and return its name.

    The file is written to a temporary file first and then published under its
    final name in one step, so no reader ever sees half a file. Publishing with
    ``os.link`` fails if the name exists, which keeps two concurrent saves from
    overwriting each other (they simply take the next counter); filesystems
    without hard links fall back to an exclusive placeholder plus ``os.replace``.
    Saved images and saved latents (``.latent``) share it, so both count up alike.
    """
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            write(f)

    return publish_numbered(folder, base, suffix, make)


def publish_numbered(folder: Path, base: str, suffix: str, make: Callable[[Path], None]) -> str:
    """:func:`write_numbered_atomic` for a writer that wants a path (``safetensors.torch.save_file``,
    which streams a checkpoint to disk instead of building its bytes in memory): ``make(path)``
    writes the temporary file, which is synced and published the same way."""
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=f"{suffix}.tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        make(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        counter = _next_counter(folder, base, suffix)
        for _ in range(10000):
            name = f"{base}_{counter:05d}_{suffix}"
            final = folder / name
            try:
                os.link(tmp, final)
                return name
            except FileExistsError:
                counter += 1
            except OSError:
                try:
                    os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    counter += 1
                    continue
                os.replace(tmp, final)
                return name
        raise NodeError(f"could not find a free file name for '{base}' in its folder", "filename_prefix")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
