"""Model families: one module per architecture, behind the interface in base.py.

To add a family: write ``nodes/families/<name>.py`` with a :class:`Family`
subclass and ``FAMILY = <instance>``, add the module name to :data:`MODULES`, and
add its parity test against diffusers' pipeline for that model. Nothing in the
sampling loop, AddNoise, previews or latent nodes changes.
"""
from __future__ import annotations

import importlib

from nodes.families.base import Family

#: Checked in this order when detecting a single file (most specific first).
#: Anima is last: it shares CLIPLoader type stable_diffusion with SD 1.x, whose errors name CLIP-L first.
#: A module may hold several families (``FAMILIES``, most specific first), e.g. FLUX [schnell] and [dev].
MODULES = ("sd3", "flux3_distilled", "flux3", "flux2", "flux2_dev", "ernie_image", "ideogram4", "omnigen2", "krea2",
           "fibo2", "joyimage", "kandinsky5", "hunyuan_video15", "hunyuan_image_refiner", "hunyuan_image",
           "qwen_image_layered", "qwen_image", "qwen_image21", "z_image", "ovis", "longcat", "hidream", "auraflow",
           "cosmos", "pixart", "chroma_radiance", "chroma", "flux", "wan", "lumina2", "sdxl_refiner", "sdxl", "sd2_unclip", "sd2", "sd1",
           "anima")


def _families_of(module: str) -> tuple[Family, ...]:
    mod = importlib.import_module(f"nodes.families.{module}")
    return tuple(getattr(mod, "FAMILIES", (mod.FAMILY,)))


ALL: tuple[Family, ...] = tuple(f for m in MODULES for f in _families_of(m))


def by_name(name: str) -> Family:
    for family in ALL:
        if family.name == name:
            return family
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in ALL)}")


def for_folder(components: set[str], text_act: str) -> Family:
    """The family of a diffusers folder from its component folders and text activation."""
    for family in ALL:
        if family.claims_folder(components, text_act):
            return family
    raise KeyError(f"no known family has the components {sorted(components)}")


def for_unet(shapes) -> Family:
    """The family of a UNet-only file (original layout keys) from its shapes."""
    for family in ALL:
        if family.claims_unet(shapes):
            return family
    raise KeyError("no known family has this UNet")
