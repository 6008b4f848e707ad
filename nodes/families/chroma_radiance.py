"""Chroma1-Radiance (lodestones): Chroma in pixel space (nodes.checkpoint.chroma_radiance_net).

* **Network.** :class:`RadianceNetwork` calls the module with the pixels, sigma (the UNet convention's
  t / 1000) and the prompt, and the same text mask rule as Chroma (nodes.families.chroma); the module
  returns the flow velocity, converting an x0 file's clean-image prediction as ComfyUI's x0 mode does.
* **Latent.** The "latent" is the image itself: 3 channels in [-1, 1], one pixel a cell (ComfyUI's
  ``latent_formats.ChromaRadiance``: scale 1, no shift, no downscale). EmptyChromaRadianceLatentImage makes
  it and VAELoader's ``pixel_space`` codes it (nodes.checkpoint.pixel_space). Other sizes than multiples
  of the patch (16 in the released files) are padded circularly and cropped back, as ComfyUI does.
* **Text, guidance, sampling.** Chroma's: T5-XXL through CLIPLoader type ``chroma`` (T5TokenizerOptions
  as for Chroma), real CFG; FLUX [dev]'s flow schedule at ComfyUI's fixed shift (mu 1.15 at every size:
  ComfyUI's ModelSamplingFlux default; the template fixes it with ModelSamplingAuraFlow shift 1).
"""
from __future__ import annotations

from typing import Any

from nodes.families import masked_t5
from nodes.families.base import LatentFormat, Shapes, WrappedTransformer
from nodes.families.chroma import MASK, Chroma
from nodes.families.input_checks import check_text_width

#: ComfyUI's ChromaRadiance latent format: the pixels themselves (previewed as they are).
RADIANCE_LATENT = LatentFormat(channels=3, scale=1.0, shift=0.0,
                               rgb=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), downscale=1)


class RadianceNetwork(WrappedTransformer):
    """The Radiance module behind the UNet calling convention."""

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False,
                 text_mask: Any = None, **kwargs: Any) -> tuple:
        """``text_mask``: [B, text tokens] or None, as Chroma's (nodes.families.chroma.ChromaNetwork)."""
        import torch

        b, _, h, w = x.shape
        check_text_width("Chroma1-Radiance", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with a T5-XXL: CLIPLoader type chroma")
        sigma = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        mask = masked_t5.joint_mask(text_mask, encoder_hidden_states.shape[1], self.transformer.tokens_for(h, w),
                                    "Chroma1-Radiance", self.device, self.dtype)
        out = self.transformer(x.to(self.device, self.dtype), sigma.to(self.dtype), encoder_hidden_states,
                               attention_mask=mask)
        return (out,)


class ChromaRadiance(Chroma):
    name = "chroma_radiance"
    latent = RADIANCE_LATENT
    network_class = RadianceNetwork
    dit_block_lists: dict = {}
    #: CLIPLoader type chroma gives Chroma's T5 handle, whose encoding is Radiance's too.
    clip_types = ()

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """FLUX [dev]'s flow schedule at ComfyUI's fixed shift: ComfyUI samples Radiance as a FLUX model
        (ModelSamplingFlux, mu = 1.15 at every size, its 1024 px value), and no diffusers pipeline exists
        to size it otherwise; ModelSamplingFlux and ModelSamplingAuraFlow change it as for FLUX."""
        from nodes.samplers import flow

        return {**super().scheduler_config(prediction_type), flow.SHIFT_SEQ_LEN: (flow.DEFAULT_SHIFT_SIZE // 16) ** 2}

    def claims_unet(self, shapes: Shapes) -> bool:
        """The NeRF head (nodes.checkpoint.chroma_radiance_load.has_transformer)."""
        from nodes.checkpoint.chroma_radiance_load import has_transformer

        return has_transformer(shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        """No diffusers pipeline exists for Radiance."""
        return False

    def dit_blocks(self, network: Any) -> dict[str, list]:
        """The trunk's blocks, ComfyUI's numbering (double, then single)."""
        trunk = getattr(network, "kiln_network", network).trunk
        return {"double": list(trunk.transformer_blocks), "single": list(trunk.single_transformer_blocks)}

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """None mapped: Radiance LoRAs are not supported (their names were not checked against a file)."""
        return {}

    def original_names(self, network: Any) -> dict[str, str]:
        """The file's names of the module's parameters (nodes.checkpoint.chroma_radiance_keys' table)."""
        from nodes.checkpoint import chroma_radiance_keys, flux_keys

        return flux_keys.original_names([n for n, _ in network.named_parameters()], chroma_radiance_keys.pairs)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """Chroma's text mask rows."""
        return masked_t5.mask_rows(extras, MASK, batch, "Chroma1-Radiance", device, dtype)


FAMILY = ChromaRadiance()
