"""HunyuanImage 2.1's refiner: a text-guided pass that sharpens a picture (the base model's, or any) at the
same size, as diffusers' ``HunyuanImageRefinerPipeline`` runs it and ComfyUI's ``HunyuanImage21Refiner``.

It is the text-to-image family (nodes.families.hunyuan_image) with these differences, and only these:

* **Network.** The same ``HunyuanImageTransformer2DModel`` with 3-D (1x1x1) patches over a one-frame video
  latent and a frame axis in its rotary positions: :class:`RefinerNetwork` hands it the latent with a frame
  axis of 1 and takes it off the output. Its input is the noisy latent then the picture's (128 channels).
  Guidance-distilled: no CFG (KSampler cfg 1), the guidance embedder reads the conditioning's ``guidance``
  (FluxGuidance; default :data:`~nodes.families.hunyuan_image.DEFAULT_GUIDANCE`) in 1000ths as the
  pipeline's ``distilled_guidance_scale``. The pipeline passes no ``timestep_r`` (ComfyUI disables it), so
  none is passed even where the file has a MeanFlow embedder.
* **Text.** Qwen2.5-VL only (ByT5 is not read), in the refiner's own template (:data:`TEMPLATE`), 36
  template tokens dropped, at most 256 prompt tokens; the same hidden layer. The CLIP (DualCLIPLoader type
  hunyuan_image) is the base model's, so the base family encodes each prompt in both templates and
  HunyuanRefinerLatent puts the refiner's states (``hunyuan_refiner_text``) in place of the base ones, as
  the pipeline conditions. ComfyUI hands the refiner the base template's states instead.
* **Latents.** The refiner's VAE (``AutoencoderKLHunyuanImageRefiner``: 32 channels, 16x, a causal video
  VAE) codes a picture as one frame. The pipeline samples in a 64-channel space: the frame repeated in front
  and the two frames' channels stacked ([raw, raw]), times 1.03682; it decodes the second half. Kiln's
  LATENT for the refiner is that stacked layout unscaled, [B, 64, h, w] (VAELoader's refiner VAE encodes
  to it and decodes from it: nodes.checkpoint.hunyuan_refiner_vae), so sampling, noise and previews see
  the pipeline's space with the plain scale :data:`REFINER_LATENT`. ComfyUI's LATENT is the 5-D raw
  [B, 32, 1, h, w] instead; the numbers reaching the model are the same.
* **The picture.** ``HunyuanRefinerLatent`` (nodes.hunyuan_image_nodes) puts ComfyUI's
  ``concat_latent_image`` and ``noise_augmentation`` on both prompts; :meth:`HunyuanImageRefiner.
  extra_channels` appends ``a * noise + (1 - a) * picture`` in model space (the pipeline's ``cond_latents``
  at its fixed ``strength`` a = 0.25), the noise drawn from a CPU generator seeded :data:`AUGMENT_SEED`.
* **Model sampling.** FlowMatchEuler at a shift of :data:`SHIFT` (4, the refiner's release and ComfyUI's
  sampling setting) on the pipeline's grid.
"""
from __future__ import annotations

from typing import Any

from nodes.families import hunyuan_image as base
from nodes.families.base import ConditioningError, LatentFormat, Shapes

LABEL = "HunyuanImage 2.1 refiner"
#: HunyuanImageRefinerPipeline's template, the tokens it drops and the prompt tokens it keeps.
TEMPLATE, TEMPLATE_TOKENS, MAX_TOKENS = base.REFINER_TEMPLATE, base.REFINER_TEMPLATE_TOKENS, base.REFINER_MAX_TOKENS
SHIFT = 4.0
SCHEDULER = dict(base.SCHEDULER, shift=SHIFT)
#: The stacked two-frame layout (module docstring): 64 channels, 16 pixels a cell, the VAE's scaling factor.
REFINER_LATENT = LatentFormat(channels=64, scale=1.03682, shift=0.0, downscale=16)
#: ComfyUI's conditioning keys (HunyuanRefinerLatent's).
CONCAT_LATENT, AUGMENTATION = "concat_latent_image", "noise_augmentation"
#: The seed of the picture's augmentation noise (one generator per prompt, drawn per sampling).
AUGMENT_SEED = 0


class RefinerNetwork(base.HunyuanImageNetwork):
    """The 3-D patch transformer behind the UNet calling convention: ``x`` [B, 128, h, w] (noisy latent and
    picture), a frame axis of one added for the transformer and taken off its output."""

    @property
    def reads_next_sigma(self) -> bool:
        """No ``timestep_r``: the refiner pipeline passes none (ComfyUI disables it)."""
        return False

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        (out,) = super().__call__(x.unsqueeze(2), t, encoder_hidden_states, return_dict, **kwargs)
        return (out.squeeze(2),)


def augmented(picture: "Any", amount: float) -> "Any":
    """``amount * noise + (1 - amount) * picture``, the noise from a CPU generator seeded
    :data:`AUGMENT_SEED` (the pipeline's ``prepare_latents`` blend; its draw when handed that generator)."""
    import torch

    noise = torch.randn(picture.shape, generator=torch.Generator("cpu").manual_seed(AUGMENT_SEED))
    return amount * noise + (1.0 - amount) * picture


class HunyuanImageRefiner(base.HunyuanImage):
    name = "hunyuan_image_refiner"
    latent = REFINER_LATENT
    #: The CLIP is the base model's (DualCLIPLoader type hunyuan_image): the refiner claims no CLIP type.
    clip_types = ()
    scheduler = SCHEDULER
    network_class = RefinerNetwork
    template, template_tokens, max_tokens, reads_glyphs = TEMPLATE, TEMPLATE_TOKENS, MAX_TOKENS, False
    encodes_for_refiner = False

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import hunyuan_image_load

        return hunyuan_image_load.has_transformer(shapes) and hunyuan_image_load.is_refiner(shapes)

    def extra_channels(self, x: "Any", conditioning_extras: list[dict]) -> "Any":
        """The noisy latent, then per conditioning its picture (HunyuanRefinerLatent's), in model space and
        noise-augmented (:func:`augmented`), repeated over the conditioning's rows."""
        import torch

        rows = x.shape[0] // max(len(conditioning_extras), 1)
        blocks = []
        for extra in conditioning_extras:
            picture = extra.get(CONCAT_LATENT)
            if picture is None:
                raise ConditioningError(f"the {LABEL} refines a picture: connect both prompts and the latent through "
                                        "HunyuanRefinerLatent", "positive")
            picture = picture.to(torch.float32)
            if picture.ndim != 4 or tuple(picture.shape[1:]) != tuple(x.shape[1:]):
                raise ConditioningError(f"HunyuanRefinerLatent's picture latent {tuple(picture.shape)} does not fit "
                                        f"the latent being sampled {tuple(x.shape)}: encode the picture with the "
                                        "refiner's VAE and sample HunyuanRefinerLatent's latent", "positive")
            cond = augmented(self.latent.to_model(picture), float(extra.get(AUGMENTATION, 0.25)))
            if cond.shape[0] != rows:
                cond = cond.repeat(-(-rows // cond.shape[0]), 1, 1, 1)[:rows]
            blocks.append(cond)
        return torch.cat([x, torch.cat(blocks).to(x.device, x.dtype)], dim=1)


FAMILY = HunyuanImageRefiner()
