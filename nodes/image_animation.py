"""SaveAnimatedWEBP and SaveAnimatedPNG: a batch of images saved as one animation, with
ComfyUI's names, inputs and file names (``prefix_00001_.webp``).

They save as SaveImage does (nodes/image.py): the prefix's rules, atomic numbered files, the
server's safety guard before a byte is written, and the workflow embedded where each format
keeps metadata: an animated PNG in text chunks as SaveImage's PNGs, a WEBP in EXIF fields the
way ComfyUI writes them (``prompt:<json>`` in Model, the other entries ``<key>:<json>`` from
Make downwards), so ComfyUI's frontend reads the graph back from either.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from engine import types as T
from engine.node import Input, Result, define_node
from nodes import image_io as io_
from nodes.image import guarded, metadata, report, save_folder, save_validate, stamp

#: ComfyUI's names for Pillow's WEBP encoder effort (0 fastest .. 6 slowest, smallest).
WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}
#: EXIF tags ComfyUI's WEBP writer uses: Model for the prompt, then Make and below for the rest.
EXIF_PROMPT, EXIF_FIRST_EXTRA = 0x0110, 0x010F


def _prefix() -> Input:
    return Input("filename_prefix", T.STRING, default="Kiln", comfy_default="ComfyUI",
                 tooltip="File name start; may include a subfolder, always inside the output folder")


def _fps() -> Input:
    return Input("fps", T.FLOAT, default=6.0, min=0.01, max=1000.0, step=0.01)


def _save_animation(ctx, images, prefix: str, fps: float, suffix: str,
                    write: Callable[[list, dict[str, Any], Any], None]) -> Result:
    """Guard, then write every frame into one numbered file through ``write(frames, chunks, file)``."""
    frames, verdict = guarded(ctx, images)
    folder, subfolder, base = save_folder(ctx.env, ctx.env.paths.output, prefix, "output")
    ui: dict[str, Any] = {"images": [], "animated": (frames.shape[0] != 1,)}
    if frames.shape[0]:
        entry: dict[str, Any] = {"filename": "", "subfolder": subfolder, "type": "output"}
        blurred = verdict is not None and any(verdict.flags[k] for k in verdict.kept)  # a frame in the file
        chunks = stamp(ctx, entry, metadata(ctx), verdict, blurred)
        pictures = [io_.to_pil(frames[j]) for j in range(frames.shape[0])]
        entry["filename"] = io_.write_numbered_atomic(folder, base, suffix, lambda f: write(pictures, chunks, f))
        ui["images"].append(entry)
    report(ctx, ui, verdict)
    return Result(outputs=(), ui=ui)


def _duration(fps: float) -> int:
    return int(1000.0 / float(fps))


@define_node(
    "SaveAnimatedWEBP",
    category="image/animation",
    output_node=True,
    inputs=[Input("images", T.IMAGE), _prefix(), _fps(),
            Input("lossless", T.BOOLEAN, default=True),
            Input("quality", T.INT, default=80, min=0, max=100),
            Input("method", T.COMBO, choices=list(WEBP_METHODS),
                  tooltip="Encoder effort: slowest makes the smallest file")],
    validate=save_validate,
)
def save_animated_webp(ctx, images, filename_prefix: str, fps: float, lossless: bool, quality: int, method: str):
    """The batch as one animated WEBP, ``fps`` frames a second (each frame shown int(1000 / fps) ms)."""
    def write(pictures: list, chunks: dict[str, Any], f: Any) -> None:
        exif = pictures[0].getexif()
        tag = EXIF_FIRST_EXTRA
        for key, value in chunks.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if key == "prompt":
                exif[EXIF_PROMPT] = f"prompt:{text}"
            else:
                exif[tag] = f"{key}:{text}"
                tag -= 1
        pictures[0].save(f, format="WEBP", save_all=True, append_images=pictures[1:], duration=_duration(fps),
                         exif=exif, lossless=bool(lossless), quality=int(quality), method=WEBP_METHODS[method])

    return _save_animation(ctx, images, filename_prefix, fps, ".webp", write)


@define_node(
    "SaveAnimatedPNG",
    category="image/animation",
    output_node=True,
    inputs=[Input("images", T.IMAGE), _prefix(), _fps(),
            Input("compress_level", T.INT, default=4, min=0, max=9)],
    validate=save_validate,
)
def save_animated_png(ctx, images, filename_prefix: str, fps: float, compress_level: int):
    """The batch as one animated PNG (APNG), the workflow in its text chunks as SaveImage's."""
    def write(pictures: list, chunks: dict[str, Any], f: Any) -> None:
        pictures[0].save(f, format="PNG", save_all=True, append_images=pictures[1:], duration=_duration(fps),
                         pnginfo=io_.png_text(chunks), compress_level=int(compress_level))

    return _save_animation(ctx, images, filename_prefix, fps, ".png", write)
