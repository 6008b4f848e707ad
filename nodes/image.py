"""Image nodes: LoadImage, ImageResize, SaveImage, PreviewImage.

IMAGE values are float32 tensors [B,H,W,C] in 0..1 on the CPU and MASK values
[B,H,W], as in ComfyUI. torch is imported inside the functions: importing this
module (``kiln nodes``, server start-up) must stay cheap.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Mapping

from engine import types as T
from engine.context import Environment, NodeError
from engine.budget import Size
from engine.node import Input, Output, Result, define_node
from engine.paths import PathRefused, split_annotation
from nodes import image_io as io_

# -- LoadImage -------------------------------------------------------------------------


def _input_images(env: Environment) -> list[str]:
    return env.paths.input.list(io_.IMAGE_EXTENSIONS)


def _load_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    value = inputs.get("image")
    if io_.is_url(value):
        if not env.settings.allow_url_images:
            return [("image", "loading images from URLs is turned off here (the server enables it "
                              "with --allow-url-images)")]
        return []
    try:
        io_.locate_file(env, value)
    except NodeError as exc:
        return [("image", str(exc))]
    return []


def _load_fingerprint(env: Environment, inputs: Mapping[str, Any]) -> str:
    # The content, not the name or mtime: an edited file re-runs everything after it,
    # and a file merely touched or copied under another name does not.
    value = inputs.get("image")
    if io_.is_url(value):
        import hashlib

        return hashlib.sha256(io_.fetch_url(env, value)).hexdigest()
    return io_.file_sha256(io_.locate_file(env, value))


@define_node(
    "LoadImage",
    category="image",
    display_name="Load Image",
    inputs=[
        Input("image", T.COMBO, choices=_input_images, open_choices=True, extra={"image_upload": True},
              tooltip="A file in the input folder; the CLI also takes a path, and an http(s) URL "
                      "where URL images are enabled."),
        Input("background", T.COMBO, default="white", choices=["white", "black", "gray", "none"], optional=True,
              comfy_default="none", comfy_hidden=True,
              tooltip="Colour that transparent pixels are flattened onto; 'none' keeps the stored "
                      "colours as ComfyUI does (and is what ComfyUI's workflows get)."),
    ],
    outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK, tooltip="1 where the image was transparent")],
    validate=_load_validate,
    fingerprint=_load_fingerprint,
    size=Size(probe=io_.header_size, reads="image"),
)
def load_image(ctx, image: str, background: str = "white"):
    """Load an image from the input folder, a path (CLI) or an http(s) URL.

    The input is a combo of the input folder's images, but its choices are open
    (``open_choices``): as with ComfyUI's LoadImage, whose VALIDATE_INPUTS replaces
    the list check, this node's own validate hook decides what is acceptable, so a
    path or a URL passes where the environment allows it and nowhere else.
    The EXIF orientation is applied. Transparency is flattened onto a colour (white
    by default, so a logo on a transparent background does not turn into black
    garbage in image-to-image) and returned as MASK = 1 - alpha; an image without
    alpha gives a 64x64 zero mask as in ComfyUI. Only the first frame of an
    animated file is read.
    """
    import torch

    env = ctx.env
    if io_.is_url(image):
        im = io_.open_image(io_.fetch_url(env, image), image, env.settings.max_image_pixels)
    else:
        path = io_.locate_file(env, image)
        im = io_.open_image(path, f"'{image}'", env.settings.max_image_pixels)
    rgb, mask = io_.to_arrays(im, background)
    pixels = torch.from_numpy(rgb).unsqueeze(0)
    mask_t = torch.from_numpy(mask).unsqueeze(0) if mask is not None else torch.zeros((1, 64, 64))
    return pixels, mask_t


# -- LoadImageOutput ---------------------------------------------------------------------

def in_output(value: Any) -> Any:
    """A LoadImageOutput value as LoadImage reads it: a plain name is one in the output folder
    (ComfyUI's ``"name.png [output]"`` form; an explicit annotation is kept)."""
    if not isinstance(value, str) or io_.is_url(value):
        return value
    plain, kind = split_annotation(value, "output")
    return f"{plain} [{kind}]"


def _output_images(env: Environment) -> list[str]:
    return [f"{name} [output]" for name in env.paths.output.list(io_.IMAGE_EXTENSIONS)]


def _as_output(rule: Any) -> Any:
    """LoadImage's validate/fingerprint/probe rule for a value resolved in the output folder."""
    return lambda env, inputs, *rest: rule(env, {**inputs, "image": in_output(inputs.get("image"))}, *rest)


@define_node(
    "LoadImageOutput",
    category="image",
    display_name="Load Image (from Outputs)",
    inputs=[Input("image", T.COMBO, choices=_output_images, open_choices=True,
                  extra={"image_upload": True, "image_folder": "output"},
                  tooltip="An image in the output folder (a result to iterate on).")],
    outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK, tooltip="1 where the image was transparent")],
    validate=_as_output(_load_validate),
    fingerprint=_as_output(_load_fingerprint),
    size=Size(probe=_as_output(io_.header_size), reads="image"),
)
def load_image_output(ctx, image: str):
    """Load an image from the output folder (ComfyUI's node for feeding a result back in), as
    LoadImage loads one: EXIF orientation applied, transparency flattened onto white and
    returned as MASK."""
    return load_image.fn(ctx, in_output(image))


# -- ImageResize -----------------------------------------------------------------------

def round_to_multiple(value: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` (halves round up), at least one multiple.

    The one rounding rule for sizes: ImageResize and VAEEncode's ``resize`` both use it.
    """
    return max(multiple, (int(value) + multiple // 2) // multiple * multiple)


def _resize_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    # pad_color is text (a STRING link may feed it) read by the COLOR values' one rule, T.parse_color
    if T.parse_color(inputs.get("pad_color", "#000000")) is None:
        return [("pad_color", f"'{inputs.get('pad_color')}' is not a colour; write it as #rrggbb")]
    return []


def resize_pixels(image: Any, height: int, width: int) -> Any:
    """Bicubic, antialiased resize of an IMAGE to exactly height x width (VAEEncode's too)."""
    import torch.nn.functional as F

    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def target_size(src_w: int, src_h: int, width: int, height: int, multiple: int) -> tuple[int, int, int, int]:
    """(requested w, h, final w, h): 0 keeps the aspect ratio from the other side, both 0 the source size."""
    if width == 0 and height == 0:
        width, height = src_w, src_h
    elif width == 0:
        width = max(1, round(src_w * height / src_h))
    elif height == 0:
        height = max(1, round(src_h * width / src_w))
    return width, height, round_to_multiple(width, multiple), round_to_multiple(height, multiple)


@define_node(
    "ImageResize",
    category="image",
    display_name="Resize Image",
    inputs=[
        Input("image", T.IMAGE),
        Input("width", T.INT, default=512, min=0, max=16384, step=8, tooltip="0: follow the height's aspect ratio"),
        Input("height", T.INT, default=512, min=0, max=16384, step=8, tooltip="0: follow the width's aspect ratio"),
        Input("mode", T.COMBO, default="crop", choices=["stretch", "crop", "pad"],
              tooltip="stretch: distort to the size; crop: fill the size and cut the overflow (centred); "
                      "pad: fit inside and fill the rest with pad_color"),
        Input("multiple_of", T.COMBO, default="8", choices=["1", "8", "16", "64"],
              tooltip="Round the final size to the nearest multiple (SD needs 8, FLUX 16; some models prefer 64)"),
        Input("pad_color", T.STRING, default="#000000", tooltip="Fill colour for mode 'pad', #rrggbb"),
    ],
    outputs=[Output("IMAGE", T.IMAGE), Output("width", T.INT), Output("height", T.INT)],
    validate=_resize_validate,
    size=Size(width="width", height="height", like="image", work=3),  # resize, clamp, copy
)
def image_resize(ctx, image, width: int, height: int, mode: str, multiple_of: str, pad_color: str):
    """Resize to a target size by stretching, cropping or padding; the final size is always stated.

    The size is rounded to the nearest multiple of ``multiple_of`` (never silently
    cropped later by a VAE), and a message says what happened, e.g.
    "1000x750 -> 512x384 (crop)".
    """
    import torch

    if image.ndim != 4:
        raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(image.shape)}", "image")
    multiple = int(multiple_of)
    src_h, src_w = int(image.shape[1]), int(image.shape[2])
    want_w, want_h, out_w, out_h = target_size(src_w, src_h, width, height, multiple)
    if mode == "stretch":
        result = resize_pixels(image, out_h, out_w)
    elif mode == "crop":
        scale = max(out_w / src_w, out_h / src_h)
        sw, sh = max(out_w, round(src_w * scale)), max(out_h, round(src_h * scale))
        scaled = resize_pixels(image, sh, sw)
        top, left = (sh - out_h) // 2, (sw - out_w) // 2
        result = scaled[:, top:top + out_h, left:left + out_w, :].contiguous()
    elif mode == "pad":
        scale = min(out_w / src_w, out_h / src_h)
        sw, sh = min(out_w, max(1, round(src_w * scale))), min(out_h, max(1, round(src_h * scale)))
        scaled = resize_pixels(image, sh, sw)
        colour = T.parse_color(pad_color)
        if colour is None:
            raise NodeError(f"'{pad_color}' is not a colour; write it as #rrggbb", "pad_color")
        channels = image.shape[3]
        fill = torch.tensor(([c / 255.0 for c in colour] + [1.0] * channels)[:channels], dtype=image.dtype)
        result = fill.expand(image.shape[0], out_h, out_w, channels).clone()
        top, left = (out_h - sh) // 2, (out_w - sw) // 2
        result[:, top:top + sh, left:left + sw, :] = scaled
    else:
        raise NodeError(f"unknown mode '{mode}'", "mode")
    text = f"{src_w}x{src_h} -> {out_w}x{out_h} ({mode})"
    if (out_w, out_h) != (want_w, want_h):
        text += f"; {want_w}x{want_h} rounded to a multiple of {multiple}"
    ctx.message(text)
    return Result(outputs=(result, out_w, out_h), ui={"text": [text]})


# -- SaveImage / PreviewImage ----------------------------------------------------------

def _split_prefix(prefix: str) -> tuple[str, str]:
    prefix = prefix.replace("\\", "/").strip()
    subfolder, _, base = prefix.rpartition("/")
    return subfolder.rstrip("/"), base


def _prefix_problem(env: Environment, prefix: Any) -> str | None:
    if not isinstance(prefix, str):
        return "the file name prefix must be text"
    subfolder, base = _split_prefix(prefix)
    if not base or base in (".", ".."):
        return f"'{prefix}' has no file name part (write e.g. 'Kiln' or 'folder/Kiln')"
    try:
        env.paths.output.resolve(base, subfolder)
    except PathRefused as exc:
        return f"'{prefix}' is not allowed: {exc}; saved images stay inside the output folder"
    return None


def prefix_input(default: str, comfy: str) -> Input:
    """The ``filename_prefix`` input of a node saving files other than images (Kiln's default, and
    ComfyUI's for workflows in its format); :func:`save_validate` and :func:`save_folder` judge it."""
    return Input("filename_prefix", T.STRING, default=default, comfy_default=comfy,
                 tooltip="File name start; may include a subfolder, always inside the output folder")


def save_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    problem = _prefix_problem(env, inputs.get("filename_prefix"))
    return [("filename_prefix", problem)] if problem else []


def _named_params(job: Any) -> dict[str, Any]:
    """Current values of the workflow's named parameters, plus what the caller set."""
    doc = job.kiln_workflow or {}
    nodes = doc.get("nodes", {}) if isinstance(doc, dict) else {}
    values: dict[str, Any] = {}
    for name, target in (doc.get("params") or {}).items():
        node_id, _, input_name = str(target).rpartition(".")
        value = nodes.get(node_id, {}).get("inputs", {}).get(input_name)
        if value is not None and not (isinstance(value, list) and len(value) == 2):
            values[name] = value
    values.update(job.params or {})
    return values


def metadata(ctx) -> dict[str, Any]:
    """PNG text chunks: Kiln's format, ComfyUI's ``prompt`` (+ ``workflow``), parameters.

    Dropping such a PNG on Kiln's editor restores the graph from ``kiln_workflow``;
    ComfyUI reads ``prompt``/``workflow``. All of it is left out when the
    environment turns ``embed_workflow`` off.
    """
    if not ctx.env.settings.embed_workflow:
        return {}
    job = ctx.job
    chunks: dict[str, Any] = {}
    if job.kiln_workflow:
        chunks["kiln_workflow"] = job.kiln_workflow
    if job.workflow:
        chunks["prompt"] = job.workflow
    for key, value in (job.extra_pnginfo or {}).items():
        chunks[str(key)] = value
    params = _named_params(job)
    if params:
        chunks["parameters"] = json.dumps(params, default=str)
    return chunks


def metadata_strings(ctx) -> dict[str, str]:
    """The workflow chunks SaveImage embeds, as text values (safetensors metadata of saved latents
    and checkpoints)."""
    return {key: value if isinstance(value, str) else json.dumps(value, default=str)
            for key, value in metadata(ctx).items()}


def save_folder(env: Environment, root: Any, prefix: str, kind: str) -> tuple[Path, str, str]:
    """(folder, subfolder, base name) for files saved under ``prefix`` in ``root``, the folder created.

    The one rule for every node that saves files (images, latents): an output prefix is
    judged as validation judged it, and the containment is checked again once the
    folders exist, since a symlink made in between could lead out.
    """
    problem = _prefix_problem(env, prefix) if kind == "output" else None
    if problem:
        raise NodeError(problem, "filename_prefix")
    subfolder, base = _split_prefix(prefix)
    try:
        folder = root.resolve(subfolder) if subfolder else root.root
        folder.mkdir(parents=True, exist_ok=True)
        root.resolve(base, subfolder)  # re-check now that the folders exist (symlinks)
    except PathRefused as exc:
        raise NodeError(f"'{prefix}' is not allowed: {exc}", "filename_prefix") from None
    except OSError as exc:
        raise NodeError(f"cannot create the folder for '{prefix}': {exc.strerror or exc}", "filename_prefix") from None
    return Path(folder), subfolder, base


def guarded(ctx, images) -> tuple[Any, Any]:
    """(the images to write, the safety guard's verdict or None): the server's guard sees every
    batch before a byte is written (engine.guard), whichever node saves it."""
    if images.ndim != 4:
        raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(images.shape)}", "images")
    guard = ctx.env.output_guard
    verdict = guard.check_images(images) if guard is not None else None
    return (verdict.images if verdict is not None else images), verdict


def stamp(ctx, entry: dict[str, Any], chunks: dict[str, Any], verdict: Any, flagged: bool) -> dict[str, Any]:
    """The saved-file entry stamped with the guard's verdict (the executor withholds unstamped
    images while a guard is on), and the metadata chunks to embed with it."""
    if verdict is None:
        return chunks
    entry["filtered"] = flagged
    return {**chunks, "kiln_safety": {"filtered": flagged, **ctx.env.output_guard.describe()}}


def report(ctx, ui: dict[str, Any], verdict: Any) -> None:
    """Say what the guard did to the batch, and list the images it dropped."""
    if verdict is None or not verdict.count:
        return
    from nodes.safety.modes import summary

    dropped = [{"index": i, "filtered": True} for i in range(len(verdict.flags)) if i not in verdict.kept]
    if dropped:
        ui["dropped"] = dropped
    ctx.message(summary(verdict, ctx.env.output_guard.mode))


def save_batch(ctx, images, root, prefix: str, kind: str, compress_level: int) -> Result:
    """Write a batch as numbered PNGs through the guard, with the workflow chunks: the one image
    writer every saving or previewing node uses (SaveImage, PreviewImage, nodes.image_outputs)."""
    batch, verdict = guarded(ctx, images)
    folder, subfolder, base = save_folder(ctx.env, root, prefix, kind)
    chunks = metadata(ctx)
    saved = []
    for j in range(batch.shape[0]):
        entry: dict[str, Any] = {"filename": "", "subfolder": subfolder, "type": kind}
        info = stamp(ctx, entry, chunks, verdict, verdict is not None and verdict.flags[verdict.kept[j]])
        entry["filename"] = io_.write_png_atomic(io_.to_pil(batch[j]), folder, base, io_.png_text(info),
                                                 compress_level)
        saved.append(entry)
        ctx.progress(j + 1, batch.shape[0])
    ui: dict[str, Any] = {"images": saved}
    report(ctx, ui, verdict)
    # The images go on as saved (after the guard, if one is on), as ComfyUI's newer nodes pass them.
    return Result(outputs=(batch,), ui=ui)


@define_node(
    "SaveImage",
    category="image",
    display_name="Save Image",
    output_node=True,
    inputs=[
        Input("images", T.IMAGE),
        Input("filename_prefix", T.STRING, default="Kiln", comfy_default="ComfyUI",
              tooltip="File name start; may include a subfolder ('portraits/Kiln'), always inside the output folder"),
    ],
    # The images again, as ComfyUI's newer SaveImage/PreviewImage pass them on (templates link from it).
    outputs=[Output("images", T.IMAGE)],
    validate=save_validate,
)
def save_image(ctx, images, filename_prefix: str = "Kiln"):
    """Save PNGs as ``prefix_00001_.png`` in the output folder, with the workflow embedded.

    Files are written atomically and never overwrite each other. The PNG text
    chunks carry the workflow in Kiln's format (``kiln_workflow``) and in
    ComfyUI's (``prompt``, plus ``workflow`` when the client sent one), and the
    named parameters (``parameters``). On a server with a safety filter, every
    image is checked before it is written (see the README's safety section).
    """
    return save_batch(ctx, images, ctx.env.paths.output, filename_prefix, "output", compress_level=4)


@define_node(
    "PreviewImage",
    category="image",
    display_name="Preview Image",
    output_node=True,
    inputs=[Input("images", T.IMAGE)],
    outputs=[Output("images", T.IMAGE)],
)
def preview_image(ctx, images):
    """Show images without keeping them: written to the temp folder (``type: temp``)."""
    prefix = "KilnPreview_temp_" + secrets.token_hex(3)
    return save_batch(ctx, images, ctx.env.paths.temp, prefix, "temp", compress_level=1)
