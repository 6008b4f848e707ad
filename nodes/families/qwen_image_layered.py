"""Qwen-Image-Layered: Qwen-Image's transformer taught to split a picture into RGBA layers.

What differs from Qwen-Image (nodes.families.qwen_image), and where it lives:

* **Network.** The same ``QwenImageTransformer2DModel`` with two switches diffusers names
  ``use_additional_t_cond`` (an embedding added to the time embedding: 0 = the picture is RGB, what
  QwenImageLayeredPipeline always passes) and ``use_layer3d_rope`` (the rotary frame index is the
  layer: 0 the composite, 1..N the layers, -1 the picture being decomposed). The file is told apart by
  ``time_text_embed.addition_t_embedding.weight`` (:data:`LAYERED_MARKER`).
* **Latents.** ComfyUI's ``EmptyQwenImageLayeredLatentImage`` makes [B, 16, layers + 1, h, w]; the
  sampler sees it folded to an image latent (nodes.latent_layers) and the frame count reaches
  :class:`QwenImageLayeredNetwork`, which packs each frame's 2x2 patches in frame order (diffusers'
  ``_pack_latents``) and appends the picture's tokens last, as the pipeline does.
* **The picture.** A ReferenceLatent on the conditioning (ComfyUI's templates: VAEEncode of the
  picture, ReferenceLatent on both prompts). Exactly one is required: the layer rope gives the last
  image entry frame -1, so without a picture a layer would be taken for it. Text to layers (the
  "Text to Layers" subgraph ComfyUI's image_qwen_image_layered.json ships switched off) is therefore
  refused: QwenImageLayeredPipeline has no such mode to match (it reads the picture's size first,
  sizes its shift on the picture's tokens and always gives the picture the last rope entry).
* **VAE.** An RGBA Wan-2.1-style VAE (4 pixel channels; nodes.checkpoint.qwen_image_vae): layers
  decode to RGBA images, an RGB picture is encoded opaque.
* **Guidance.** Plain CFG (:meth:`QwenImageLayered.combine_guidance`).
* **Sampling.** ComfyUI's templates fix the schedule with ModelSamplingAuraFlow (shift 1: linear
  sigmas), which equals the pipeline run with a shift-1, unshifted scheduler. Without it Kiln's
  default is the pipeline's grid, as for Qwen-Image: the released scheduler config with
  QwenImageLayeredPipeline's size shift, mu = sqrt(tokens / 256) counted on one frame
  (flow.MU_RULE "sqrt"; the pipeline counts the picture's tokens, the same number when the layers
  are the picture's size, as ComfyUI's templates make them). ComfyUI itself loads the layered
  file as its Qwen-Image model (supported_models.QwenImage: a fixed shift 1.15, no size shift).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, qwen_image
from nodes.families.base import ConditioningError
from nodes.families.input_checks import check_text_width, frame_height
from nodes.latent_layers import FRAMES
from nodes.samplers.flow import MU_RULE

NAME = "Qwen-Image-Layered"
#: Only Qwen-Image-Layered's transformer has the extra time embedding (is the picture RGB or RGBA); the
#: release always pairs it with the layer rope (diffusers' use_layer3d_rope; ComfyUI detects the same key).
LAYERED_MARKER = "time_text_embed.addition_t_embedding.weight"


class QwenImageLayeredNetwork(qwen_image.QwenImageNetwork):
    """The layered transformer behind the UNet calling convention: ``x`` is the folded latent
    [B, C, frames * h, w], ``frames`` its frame count (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 text_mask: "Any" = None, reference_latents: Any = None, frames: int = 0,
                 **kwargs: Any) -> tuple:
        import torch

        from nodes.families import qwen_image_edit

        b, c, fh, w = x.shape
        h = frame_height(NAME, fh, w, frames, "a layered latent [B, 16, layers + 1, h, w]",
                         "EmptyQwenImageLayeredLatentImage")
        check_text_width(NAME, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL: CLIPLoader type qwen_image")
        if reference_latents is None or len(reference_latents.latents) != 1:
            given = 0 if reference_latents is None else len(reference_latents.latents)
            raise ConditioningError(f"{NAME} decomposes one picture: give each prompt exactly one ReferenceLatent "
                                    f"(VAEEncode of the picture with the layered VAE); got {given} (text to layers "
                                    "without a picture is not supported)", "positive")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        mask = None if text_mask is None else text_mask.to(self.device)
        layers = x.reshape(b, c, frames, h, w)
        tokens = torch.cat([flux.pack(layers[:, :, f]) for f in range(frames)], dim=1)
        ref_tokens, ref_shapes = qwen_image_edit.reference_tokens(reference_latents)
        shapes = [(1, h // 2, w // 2)] * frames + ref_shapes
        tokens = torch.cat([tokens, ref_tokens.to(tokens.dtype)], dim=1)
        rgb = torch.zeros(b, dtype=torch.long, device=self.device)  # the pipeline's is_rgb: always 0
        out = self.transformer(hidden_states=tokens, timestep=time.to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states, encoder_hidden_states_mask=mask,
                               img_shapes=[shapes] * b, additional_t_cond=rgb, return_dict=False, **kwargs)[0]
        n = (h // 2) * (w // 2)
        per_frame = [flux.unpack(out[:, f * n:(f + 1) * n], h, w) for f in range(frames)]
        return (torch.stack(per_frame, dim=2).reshape(b, -1, fh, w),)


class QwenImageLayered(qwen_image.QwenImage):
    name = "qwen_image_layered"
    network_class = QwenImageLayeredNetwork
    layered_latents = True
    #: Qwen-Image's released config (as before; the layered release's own file was not at hand to compare)
    #: with the pipeline's size shift, mu = sqrt(one frame's tokens / 256) (see the module docstring).
    scheduler = {**qwen_image.SCHEDULER, MU_RULE: "sqrt"}
    #: Its prompts are Qwen-Image's (CLIPLoader type qwen_image gives Qwen-Image's CLIP, which the Edit nodes
    #: also take); the conditioning is the same.
    clip_types = ()
    controlnet_latent_hint = False
    controlnet_borrows_layers = False
    guidance_note = ("Qwen-Image-Layered has no distilled guidance (its guidance is real CFG: KSampler's cfg with a "
                     "negative prompt)")

    def claims_unet(self, shapes: Any) -> bool:
        return LAYERED_MARKER in shapes or qwen_image.UNET_PREFIX + LAYERED_MARKER in shapes

    def combine_guidance(self, guided: "Any", cond: "Any") -> "Any":
        """Plain CFG: QwenImageLayeredPipeline's ``cfg_normalize`` is off by default (and ComfyUI never
        renormalises), unlike Qwen-Image's pipeline."""
        return guided

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """Qwen-Image's (text mask, the picture as reference latent) and the latent's frame count."""
        kwargs = super().network_kwargs(extras, batch, image_size, device, dtype)
        return kwargs | {"frames": int(extras[0].get(FRAMES) or 0)}

    def run_controlnet(self, *args: Any, **kwargs: Any) -> dict[str, list]:
        raise ConditioningError(f"{NAME} has no ControlNets (Qwen-Image's do not know its layers)", "control_net")


FAMILY = QwenImageLayered()
