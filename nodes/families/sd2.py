"""Stable Diffusion 2.x: an OpenCLIP ViT-H text encoder, conditioned on its penultimate layer.

Recognised by ``cond_stage_model.model.*`` keys. The 512-base (epsilon) and
768-v (v-prediction) releases share every shape; the prediction type comes from a
``v_pred`` key or ComfyUI's weight-statistics rule (see nodes.checkpoint.detect).
The encoder is built without OpenCLIP's last block, as diffusers does, so its
output with the final norm is the penultimate layer SD 2 was trained on.
"""
from __future__ import annotations

from nodes.families.base import Family, Shapes, TextEncoderSpec, has_prefix
from nodes.families.sd1 import SD_LATENT

TEXT_PREFIX = "cond_stage_model.model."


class SD2(Family):
    name = "sd2"
    latent = SD_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "openclip", TEXT_PREFIX, layer=-2, dropped=1,
                                     pad="!"),)
    sample_size = 96
    clip_types = ("stable_diffusion",)
    #: 512-base and 768-v share every shape: detection looks at weight statistics.
    prediction_from_weights = True

    def claims(self, shapes: Shapes) -> bool:
        return has_prefix(shapes, TEXT_PREFIX)

    def claims_unet(self, shapes: Shapes) -> bool:
        """ViT-H's 1024-wide context, or linear transformer projections (SD 1.x uses 1x1 convolutions)."""
        if "model.diffusion_model.label_emb.0.0.weight" in shapes:
            return False
        context = [v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
        proj = [v for k, v in shapes.items() if k.endswith(".proj_in.weight")]
        return (bool(context) and context[0] == 1024) or (bool(proj) and len(proj[0]) == 2)


FAMILY = SD2()
