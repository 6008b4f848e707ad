"""Stable Diffusion 2.1 unCLIP (Stability's "image variations" models, ComfyUI's SD21UnclipL/H):
SD 2.x's text side and v-prediction, plus an image embedding fed to the UNet's class embedding.

Recognised by SD 2.x's OpenCLIP text keys together with a UNet class embedding
(``model.diffusion_model.label_emb.0.0.weight``, ComfyUI's "adm"), whose input is an image
embedding and its noise-level embedding side by side (1536 wide for the ViT-L release, 2048 for
ViT-H). The file also carries the image encoder (``embedder.model.visual.``, read by
nodes.clip_vit) and the noise augmentor's schedule (``noise_augmentor.``, nodes.unclip).

The ADM vector of each conditioning entry is worked out before sampling (nodes.unclip.prepare,
which needs the model's augmentor and the sampler's seed) and kept on the entry's extras; this
module only hands it to the UNet as diffusers' ``class_labels``.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError, Shapes, has_prefix
from nodes.families.sd2 import SD2, TEXT_PREFIX

ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"
#: Where the ADM vector of a conditioning entry waits for the UNet (set by nodes.unclip.prepare).
ADM_EXTRA = "unclip_adm"


class SD2UnCLIP(SD2):
    name = "sd2_unclip"
    default_prediction = "v_prediction"
    #: a lone OpenCLIP text encoder (CLIPLoader) is SD 2.x's; this family only comes whole from its checkpoint
    clip_types = ()

    def claims(self, shapes: Shapes) -> bool:
        return has_prefix(shapes, TEXT_PREFIX) and ADM_KEY in shapes

    def claims_unet(self, shapes: Shapes) -> bool:
        return False  # UNet-only unCLIP files lack the augmentor and encoder this family needs

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return False  # diffusers' unCLIP folders are not read yet; plain SD 2.x folders are SD2's

    def unet_defaults(self) -> dict[str, Any]:
        return dict(super().unet_defaults(), class_embed_type="projection")

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        rows = []
        for extra in extras:
            adm = extra.get(ADM_EXTRA)
            if adm is None:
                raise ConditioningError("this unCLIP model's conditioning was not prepared with its image "
                                        "embedding (nodes.unclip.prepare)", extra.get("_input", "positive"))
            rows.append(adm.reshape(1, -1).expand(batch, -1))
        return {"class_labels": torch.cat(rows).to(device=device, dtype=dtype)}


FAMILY = SD2UnCLIP()
