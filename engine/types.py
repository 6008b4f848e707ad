"""Socket types.

A type is a plain upper-case string, as in ComfyUI, so third-party nodes can invent
their own without registering anything. Only the few rules about which types may be
connected live here.
"""
from __future__ import annotations

IMAGE = "IMAGE"
MASK = "MASK"
LATENT = "LATENT"
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"
COMBO = "COMBO"
ANY = "*"
#: ComfyUI's custom-sampling values: a noise source, a sampler, a sigma list, a guider.
NOISE = "NOISE"
SAMPLER = "SAMPLER"
SIGMAS = "SIGMAS"
GUIDER = "GUIDER"
#: ComfyUI's latent-to-latent function (LatentOperationSharpen, ...): applied to a LATENT or,
#: by LatentApplyOperationCFG, to the guidance at every step. A value, not a widget.
LATENT_OPERATION = "LATENT_OPERATION"
#: ComfyUI's detection boxes (io.BoundingBox): per image a list of {"x", "y", "width", "height", "score"}
#: dicts in pixels (SAM3_Detect's output, and its optional boxes input).
BOUNDING_BOX = "BOUNDING_BOX"
#: ComfyUI's io.Color: a colour typed as "#rrggbb" (its frontend draws a colour picker), e.g.
#: Painter's ``bg_color``. A widget value; :func:`parse_color` is its one rule.
COLOR = "COLOR"

#: Types whose values can be typed into a widget rather than only linked.
WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO, COLOR})


def parse_color(value: object) -> tuple[int, int, int] | None:
    """A COLOR value's (r, g, b) in 0..255, or None when it is not "#rrggbb" (hex digits, any case).

    The one rule for COLOR values: validation rejects what it refuses and nodes read colours
    through it, so a value that validates is one a node can use. Stricter than ComfyUI, which
    reads a malformed colour as black; a typo should be reported, not painted.
    """
    if not isinstance(value, str) or len(value) != 7 or value[0] != "#":
        return None
    digits = value[1:]
    if any(c not in "0123456789abcdefABCDEF" for c in digits):
        return None
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def _alternatives(socket_type: str) -> set[str]:
    # ComfyUI lets a socket accept several types written "A,B".
    return {part.strip() for part in socket_type.split(",") if part.strip()}


def compatible(output_type: str, input_type: str) -> bool:
    """Can an output of ``output_type`` feed an input of ``input_type``?

    A combo input accepts a STRING output (a string node feeding a choice) because
    the value is checked against the choices at run time anyway.
    """
    if ANY in (output_type, input_type):
        return True
    if input_type == COMBO:
        return output_type in (COMBO, STRING)
    return bool(_alternatives(output_type) & _alternatives(input_type))
