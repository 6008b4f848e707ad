"""SDXL refiner: SDXL's second-stage model, OpenCLIP bigG alone and an aesthetic score.

Recognised by a lone ``conditioner.embedders.0.model.`` encoder (OpenCLIP's layout;
SDXL base has CLIP-L there and bigG at ``embedders.1``). Everything SDXL base does
applies (latent space, VAE, schedule, penultimate un-normed hidden states, pooled
projection), except the UNet's added conditioning: five time ids instead of six —
original size, crop offset and an *aesthetic score* where base has the target size
(sd_xl_refiner's ``adm_in_channels`` 2560 = 1280 pooled + 5 x 256).

The aesthetic score and original size come from CLIPTextEncodeSDXLRefiner's
``ascore``/``width``/``height``. A plain CLIPTextEncode works too, as in ComfyUI
(whose own "SDXL base + refiner" template uses it): the score is 6 on the positive
side and 2.5 on the negative (and on a prompt marked ``prompt_type: "negative"``, as
DualCFGGuider's cond2), ComfyUI's and diffusers' defaults; the original size
is the sampled image's (diffusers' default, and what Kiln's SDXL base does, where
ComfyUI assumes 768).
"""
from __future__ import annotations

from nodes.families.base import Shapes, TextEncoderSpec, has_prefix
from nodes.families.sdxl import SDXL

TEXT_PREFIX = "conditioner.embedders.0.model."
#: The scores diffusers' refiner pipeline and ComfyUI use when none is given.
POSITIVE_SCORE, NEGATIVE_SCORE = 6.0, 2.5


def refiner_time_ids(extra: dict, height: int, width: int) -> list[float]:
    """(original h, w) + (crop top, left) + aesthetic score."""
    # ComfyUI's prompt_type when a node set one (DualCFGGuider marks cond2 negative), else the side
    default = NEGATIVE_SCORE if extra.get("prompt_type", extra.get("_input")) == "negative" else POSITIVE_SCORE
    return [float(extra.get("height", height)), float(extra.get("width", width)),
            float(extra.get("crop_h", 0)), float(extra.get("crop_w", 0)),
            float(extra.get("aesthetic_score", default))]


class SDXLRefiner(SDXL):
    name = "sdxl-refiner"
    text_encoders = (
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "openclip", TEXT_PREFIX, layer=-2, norm_hidden=False,
                        pooled=True, pad="!"),
    )
    #: Time ids in the UNet's added conditioning (SDXL base has 6).
    time_id_count = 5
    clip_types = ()
    controlnet_union_types = ()

    def claims(self, shapes: Shapes) -> bool:
        return has_prefix(shapes, TEXT_PREFIX) and not has_prefix(shapes, "conditioner.embedders.1.")

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return {c for c in components if c.startswith("text_encoder")} == {"text_encoder_2"}

    def claims_unet(self, shapes: Shapes) -> bool:
        """A refiner UNet's size embedding is its context width (bigG pooled) plus five time ids;
        base's (2816 = 1280 + 6 x 256) never splits that way against its 2048-wide context."""
        adm = shapes.get("model.diffusion_model.label_emb.0.0.weight")
        if adm is None:
            return False
        context = next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
        extra = adm[1] - context
        return extra > 0 and extra % self.time_id_count == 0 and extra % 6 != 0

    def pooled_dim(self, shapes: Shapes) -> int | None:
        """bigG's width is the context width: bigG is the only encoder."""
        return next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))

    needs_pooled = ("the SDXL refiner needs conditioning with a pooled_output (encode the prompt with the "
                    "refiner's CLIP)")

    def time_ids(self, extra: dict, height: int, width: int) -> list[float]:
        return refiner_time_ids(extra, height, width)


FAMILY = SDXLRefiner()
