"""SDXL base: CLIP-L and OpenCLIP bigG together, pooled text and size conditioning.

Recognised by the two ``conditioner.embedders.{0,1}`` encoders. Both encoders'
penultimate hidden states (without the final norm) are concatenated; the second
encoder's projected pooled output and six "time ids" (original size, crop
offset, target size) go to the UNet's added conditioning, which this module's
``network_kwargs`` builds so the sampling loop never knows about them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.families.base import ConditioningError, Family, LatentFormat, Shapes, TextEncoderSpec, has_prefix

if TYPE_CHECKING:
    import torch

TEXT1_PREFIX = "conditioner.embedders.0.transformer."
TEXT2_PREFIX = "conditioner.embedders.1.model."

SDXL_LATENT = LatentFormat(
    channels=4, scale=0.13025,
    rgb=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)

#: xinsir's ControlNet Union types by the index it was trained with (ComfyUI's comfy/cldm/control_types.py);
#: the first six are controlnet-union-sdxl-1.0's, ProMax adds tile and repaint.
UNION_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
               "segment", "tile", "repaint")


@dataclass(frozen=True)
class ChannelLatentFormat(LatentFormat):
    """A latent space normalised per channel: model space is ``(raw - mean) * scale / std``
    (Playground v2.5's; diffusers keeps the two lists as the VAE config's ``latents_mean`` and
    ``latents_std``, ComfyUI as its SDXL_Playground_2_5 latent format)."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def _stats(self, like: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        shape = (1, len(self.mean)) + (1,) * (like.ndim - 2)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        return mean, torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)

    def to_model(self, raw: "torch.Tensor") -> "torch.Tensor":
        mean, std = self._stats(raw)
        return (raw - mean) * self.scale / std

    def from_model(self, x: "torch.Tensor") -> "torch.Tensor":
        mean, std = self._stats(x)
        return x * std / self.scale + mean


#: Playground v2.5's latent space: the SDXL VAE's latents normalised per channel, scale 0.5.
PLAYGROUND_LATENT = ChannelLatentFormat(
    channels=4, scale=0.5, mean=(-1.6574, 1.886, -1.383, 2.5155), std=(8.4927, 5.9022, 6.5498, 5.2299),
    rgb=((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076)),
)


def time_ids(extra: dict, height: int, width: int) -> list[float]:
    """(original h, w) + (crop top, left) + (target h, w), diffusers' defaults unless the
    conditioning carries ComfyUI's CLIPTextEncodeSDXL keys."""
    return [float(extra.get("height", height)), float(extra.get("width", width)),
            float(extra.get("crop_h", 0)), float(extra.get("crop_w", 0)),
            float(extra.get("target_height", height)), float(extra.get("target_width", width))]


class SDXL(Family):
    name = "sdxl"
    latent = SDXL_LATENT
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "openai", TEXT1_PREFIX, layer=-2, norm_hidden=False),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "openclip", TEXT2_PREFIX, layer=-2, norm_hidden=False,
                        pooled=True, pad="!"),
    )
    sample_size = 128
    vae_sample_size = 1024
    scheduler_class = "EulerDiscreteScheduler"
    clip_types = ("sdxl",)
    controlnet_union_types = UNION_TYPES
    #: Time ids in the UNet's added conditioning (the refiner has 5).
    time_id_count = 6
    #: unCLIPConditioning's image embedding takes the place of the pooled text (ComfyUI's Revision;
    #: nodes.unclip makes it when sampling starts).
    unclip_replaces_pooled = True

    def claims(self, shapes: Shapes) -> bool:
        return has_prefix(shapes, TEXT1_PREFIX) and has_prefix(shapes, TEXT2_PREFIX)

    def claims_unet(self, shapes: Shapes) -> bool:
        return "model.diffusion_model.label_emb.0.0.weight" in shapes

    def pooled_dim(self, shapes: Shapes) -> int | None:
        """bigG's width: the context is CLIP-L (768) + bigG; in a UNet-only file no encoder says so.

        Models narrower than CLIP-L (the tiny test ones) use two equal encoders.
        """
        context = next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
        return context - 768 if context > 768 else context // 2

    def unet_defaults(self) -> dict[str, Any]:
        return dict(super().unet_defaults(), addition_embed_type="text_time", addition_embed_type_num_heads=64)

    def vae_defaults(self) -> dict[str, Any]:
        return dict(super().vae_defaults(), force_upcast=True)

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        return dict(super().scheduler_config(prediction_type), interpolation_type="linear",
                    use_karras_sigmas=False, sample_max_value=1.0)

    #: what a conditioning without a pooled output is told
    needs_pooled = "this SDXL model needs conditioning with a pooled_output (encode the prompt with an SDXL CLIP)"

    def time_ids(self, extra: dict, height: int, width: int) -> list[float]:
        """The micro-conditioning ids one conditioning entry gives the UNet's size embedding."""
        return time_ids(extra, height, width)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        pooled, ids = [], []
        for extra in extras:
            p = extra.get("pooled_output")
            if p is None:
                raise ConditioningError(self.needs_pooled, extra.get("_input", "positive"))
            pooled.append(p.reshape(1, -1).expand(batch, -1))
            ids += [self.time_ids(extra, *image_size)] * batch
        return {"added_cond_kwargs": {"text_embeds": torch.cat(pooled).to(device=device, dtype=dtype),
                                      "time_ids": torch.tensor(ids, device=device, dtype=dtype)}}


FAMILY = SDXL()
