"""ComfyUI's newer image output nodes that its current templates use: ImageCompare (two images
side by side in the editor) and SaveImageAdvanced (SaveImage with a format choice).

Both write through Kiln's one image writer (:func:`nodes.image.save_batch`), so the safety
guard sees every image before a byte is written and the workflow is embedded as SaveImage
embeds it (or not at all where the settings turn ``embed_workflow`` off, Kiln's counterpart of
ComfyUI's ``--disable-metadata``). ImageCompare follows ``comfy_extras/nodes_image_compare.py``;
SaveImageAdvanced follows the version in ``comfy_extras/nodes_images.py`` that passes the
images on and whose png option holds ``bit_depth`` and ``input_color_space``, the layout the
templates' editor files store ("ComfyUI", "png", "8-bit", "sRGB"). Of the avif option's inputs
only bit_depth and input_color_space are declared: Kiln refuses avif, naming ``format``.
"""
from __future__ import annotations

import secrets
from typing import Any, Mapping

from engine import types as T
from engine.context import Environment, NodeError
from engine.node import Input, Output, Result, define_node
from nodes.image import save_batch, save_validate

# -- ImageCompare -----------------------------------------------------------------------

SIDES = (("image_a", "a_images"), ("image_b", "b_images"))


@define_node(
    "ImageCompare",
    category="image",
    display_name="Image Compare",
    output_node=True,
    inputs=[Input("image_a", T.IMAGE, optional=True), Input("image_b", T.IMAGE, optional=True)],
    outputs=[],
)
def image_compare(ctx, image_a=None, image_b=None):
    """Show two images (before and after) on one node: each side is saved as a temporary preview
    and reported under ``a_images`` and ``b_images``, where ComfyUI's editor looks for them."""
    ui: dict[str, Any] = {key: [] for _, key in SIDES}
    dropped: list[dict[str, Any]] = []
    for name, key in SIDES:
        images = image_a if name == "image_a" else image_b
        if images is None or len(images) == 0:
            continue
        if getattr(images, "ndim", 0) != 4:
            raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(getattr(images, 'shape', ()))}", name)
        prefix = f"KilnCompare_{key[0]}_temp_" + secrets.token_hex(3)
        saved = save_batch(ctx, images, ctx.env.paths.temp, prefix, "temp", compress_level=1)
        ui[key] = saved.ui["images"]
        dropped += [{**entry, "side": key[0]} for entry in saved.ui.get("dropped", [])]
    if dropped:
        ui["dropped"] = dropped
    return Result(outputs=(), ui=ui)


# -- SaveImageAdvanced ------------------------------------------------------------------

#: ComfyUI's format choices and each one's sub-inputs' choices, in its order.
FORMATS: dict[str, dict[str, list[str]]] = {
    "png": {"bit_depth": ["8-bit", "16-bit"], "input_color_space": ["sRGB"]},
    "exr": {"bit_depth": ["32-bit float"], "input_color_space": ["sRGB", "HDR", "linear"]},
    "avif": {"bit_depth": ["auto", "8-bit YUV420", "10-bit YUV420"], "input_color_space": ["sRGB", "HDR", "HDR PQ"]},
}
#: What Kiln writes (Pillow's PNG writer has no 48-bit RGB, and Pillow writes no EXR).
WRITABLE = {"png": {"bit_depth": ["8-bit"], "input_color_space": ["sRGB"]}}


def _union(key: str) -> list[str]:
    return list(dict.fromkeys(c for option in FORMATS.values() for c in option[key]))


def format_problems(inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Which chosen option Kiln cannot honour, named by its input (``format`` or ``format.<sub>``)."""
    fmt = inputs.get("format", "png")
    if fmt not in WRITABLE:
        return [("format", f"Kiln cannot write {fmt} files; choose png")]
    problems = []
    for sub, allowed in WRITABLE[fmt].items():
        value = inputs.get(f"format.{sub}", allowed[0])
        if value in allowed:
            continue
        if value in FORMATS[fmt][sub]:
            problems.append((f"format.{sub}",
                             f"Kiln cannot write {fmt} with {sub} '{value}'; choose {', '.join(allowed)}"))
        else:
            problems.append((f"format.{sub}",
                             f"'{value}' is not a {sub} of {fmt}; choose {', '.join(FORMATS[fmt][sub])}"))
    return problems


def _advanced_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    return save_validate(env, inputs) + format_problems(inputs)


@define_node(
    "SaveImageAdvanced",
    category="image",
    display_name="Save Image (Advanced)",
    output_node=True,
    inputs=[
        Input("images", T.IMAGE),
        Input("filename_prefix", T.STRING, default="ComfyUI",
              tooltip="File name start; may include a subfolder, always inside the output folder"),
        Input("format", T.COMBO, default="png", choices=list(FORMATS), tooltip="The file format to save",
              dynamic={name: tuple(subs) for name, subs in FORMATS.items()}),
        # The format's sub-inputs (a DynamicCombo in ComfyUI), named as its API form names them, each
        # offering every option's choices; format_problems judges the pair.
        Input("format.bit_depth", T.COMBO, default="8-bit", choices=_union("bit_depth")),
        Input("format.input_color_space", T.COMBO, default="sRGB", choices=_union("input_color_space")),
    ],
    outputs=[Output("images", T.IMAGE)],
    validate=_advanced_validate,
)
def save_image_advanced(ctx, images, filename_prefix: str = "ComfyUI", format: str = "png", **options: Any):
    """Save the images as SaveImage does, in the format chosen on the node. Kiln writes 8-bit
    sRGB PNG; another choice (16-bit, EXR, AVIF) is refused naming its input rather than saved
    as something else."""
    problems = format_problems({"format": format, **options})
    if problems:
        raise NodeError(problems[0][1], problems[0][0])
    return save_batch(ctx, images, ctx.env.paths.output, filename_prefix, "output", compress_level=4)
