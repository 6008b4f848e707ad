"""Which networks the UNet patches can act on.

FreeU, Deep Shrink, HyperTile, ToMe and hypernetworks walk a diffusers UNet's encoder and decoder
blocks (``conv_in``, ``down_blocks``, ``up_blocks``). A flow transformer (FLUX, SD3, Qwen-Image...)
has none of them, so each patch refuses it up front, naming the ``model`` input, instead of failing
mid-run on a missing attribute. One check for all of them, so they cannot disagree on what a UNet is.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError

#: the attributes every UNet patch reaches for
UNET_PARTS = ("conv_in", "down_blocks", "up_blocks")


def unet_of(network: Any, patch: str) -> Any:
    """The diffusers UNet a (possibly wrapped) network is; ConditioningError naming ``model``
    otherwise. ``patch`` is the node's name, for the message."""
    unet = getattr(network, "kiln_network", network)
    if not all(hasattr(unet, part) for part in UNET_PARTS):
        raise ConditioningError(f"{patch} works on UNets (SD1, SD2, SDXL); a flow transformer such as FLUX has no "
                                "UNet encoder and decoder blocks", "model")
    return unet
