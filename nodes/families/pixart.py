"""PixArt-α and PixArt-Σ: a DiT (diffusers' ``PixArtTransformer2DModel``) on SD-style 4-channel VAE
latents, T5-XXL text through cross-attention, noise prediction on a DDPM schedule.

Where it differs from the flow transformers (FLUX, Chroma) and from the SD UNets, and why:

* **Model sampling.** PixArt was trained as a DDPM: 1000 steps, betas linear from 0.0001 to 0.02
  (diffusers' ``linear``; ComfyUI's ``sqrt_linear`` with the same ends is the same betas), epsilon
  prediction, the ``linspace`` spacing of the released scheduler configs. So it samples through
  KSampler's discrete path, as SD 1.x does, not the flow one.
* **Learned sigma.** The released transformers output 8 channels: the noise and a variance the
  sampler does not use; :class:`PixArtNetwork` keeps the first half, as diffusers' pipelines do
  (only when the output has twice the latent's channels).
* **Latents.** α was trained on SD 1.x's VAE (scale 0.18215), Σ on SDXL's (0.13025).
* **Text.** T5-XXL's last hidden state, as diffusers' pipelines encode it: the prompt lower-cased and
  stripped (their ``_text_preprocessing`` without caption cleaning), padded to 120 tokens (α) or 300
  (Σ), T5 run with the tokenizer's mask, and the same mask on the transformer's cross-attention (a
  -10000 bias on padding). With ``T5TokenizerOptions`` (``clip.t5_padding``) Kiln encodes as ComfyUI
  does instead: the prompt as typed, unpadded up to the options' padding, no mask. ``CLIPLoader`` type
  ``pixart`` gives a CLIP of Σ's encoding; on an α model its 300 tokens are masked, so a prompt of
  up to 119 tokens conditions α exactly as 120 would (longer ones are not cut at α's 120).
* **Micro-conditioning.** α-1024 (its transformer has the size and aspect-ratio embedders) reads the
  image's pixel height and width and their ratio, as PixArtAlphaPipeline passes them; Σ reads none.
  Kiln does not snap sizes to the pipelines' aspect-ratio bins (``use_resolution_binning``): it samples
  the size asked for, as ComfyUI does.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, masked_t5
from nodes.families.base import ConditioningError, Family, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.families.sd1 import SD_LATENT
from nodes.families.sdxl import SDXL_LATENT

#: The conditioning key of the cross-attention text mask ([1, tokens], 1 = attended).
MASK = "pixart_text_mask"


class PixArtNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention: timesteps as given (DDPM's), the text mask,
    α-1024's size conditioning, the learned-sigma half dropped."""

    @property
    def text_width(self) -> int | None:
        """T5's width, which the caption projection reads (``cross_attention_dim`` is the transformer's)."""
        width = getattr(self.transformer.config, "caption_channels", None)
        return None if width is None else int(width)

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False,
                 text_mask: Any = None, **kwargs: Any) -> tuple:
        import torch

        b, c, h, w = x.shape
        check_text_width("PixArt", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with a T5-XXL: CLIPLoader type pixart")
        net = self.transformer
        patch = int(net.config.patch_size)
        if h % patch or w % patch:
            raise ConditioningError(f"a PixArt latent needs a size divisible by {patch}, got {h}x{w} (use multiples "
                                    f"of {8 * patch} pixels)", "latent_image")
        time = torch.as_tensor(t, device=self.device).reshape(-1).expand(b)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(net, "use_additional_conditions", False):
            height, width = h * 8, w * 8  # the image's pixels, as the pipeline passes height and width
            added = {"resolution": torch.tensor([[height, width]], dtype=self.dtype, device=self.device).expand(b, -1),
                     "aspect_ratio": torch.tensor([[float(height / width)]], dtype=self.dtype,
                                                  device=self.device).expand(b, -1)}
        mask = None
        if text_mask is not None:
            mask = masked_t5.fit_mask(text_mask, encoder_hidden_states.shape[1], "PixArt")
            mask = mask.to(self.device, self.dtype)
        out = net(x.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype), timestep=time,
                  added_cond_kwargs=added, encoder_attention_mask=mask, return_dict=False)[0]
        if out.shape[1] == 2 * c:  # learned sigma: keep the noise prediction
            out = out[:, :c]
        return (out,)


class PixArt(Family):
    """The shared rules; :data:`SIGMA` and :data:`ALPHA` differ in latent and T5 token count."""

    name = "pixart_sigma"
    label = "PixArt-Σ"
    latent = SDXL_LATENT
    variant = "sigma"
    #: T5 tokens diffusers' pipeline pads the prompt to (max_sequence_length).
    t5_tokens = 300
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "t5", flux.T5_PREFIX),)
    clip_types = ("pixart",)
    scheduler_class = "DPMSolverMultistepScheduler"
    #: Prompts of other lengths are evaluated apart (their masks differ); see FlowFamily.repeats_text.
    repeats_text = False
    sample_size = 128

    # -- detection -------------------------------------------------------------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        """A PixArt transformer (either layout) of this variant (nodes.checkpoint.pixart_keys.variant)."""
        from nodes.checkpoint import pixart_keys

        if pixart_keys.is_pixart(shapes):
            return pixart_keys.variant(shapes) == self.variant
        if pixart_keys.is_diffusers(shapes):
            micro = any(".resolution_embedder." in k for k in shapes)
            return (self.variant == "alpha") == micro
        return False

    def claims(self, shapes: Shapes) -> bool:
        return self.claims_unet(shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        """False: a PixArt folder is told by its transformer's class (nodes.checkpoint.pixart_load), and
        its one ``text_encoder`` would otherwise look like SD 1.x's."""
        return False

    # -- model sampling ------------------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """The released PixArt scheduler config (DDPM linear betas, epsilon, linspace spacing)."""
        return {"_class_name": self.scheduler_class, "num_train_timesteps": 1000, "beta_start": 0.0001,
                "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
                "prediction_type": prediction_type or "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
                "clip_sample": False, "set_alpha_to_one": False}

    # -- the network ------------------------------------------------------------------------------------

    def wrap_network(self, network: Any) -> Any:
        return network if isinstance(network, PixArtNetwork) else PixArtNetwork(network)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names, which ComfyUI's and kohya's PixArt LoRAs use (fused ``qkv`` and
        ``kv_linear`` split row-wise onto diffusers' q, k, v): FLUX's rule on PixArt's key map."""
        from nodes.checkpoint import flux_keys, pixart_keys

        return flux_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()}, pixart_keys.pairs)

    def original_names(self, network: Any) -> dict[str, str]:
        """The original layout's names (``blocks.3.attn.qkv.weight``); a fused tensor's parts each take its name."""
        from nodes.checkpoint import pixart_keys

        names = {name for name, _ in network.named_parameters()}
        return {d: o[0] for o, ds, _ in pixart_keys.pairs((), names) for d in ds if d in names}

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The text mask of every row (nodes.families.masked_t5.mask_rows, Chroma's rule)."""
        return masked_t5.mask_rows(extras, MASK, batch, "PixArt", device, dtype)

    # -- text ------------------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: T5's last hidden state with diffusers' mask (the prompt lower-cased and stripped
        first, as the pipelines' preprocessing does), or ComfyUI's unpadded encoding of the prompt as typed
        under T5TokenizerOptions (see the module docstring and nodes.families.masked_t5)."""
        raw = (texts or {}).get("tokenizer", text)
        if clip.t5_padding is None:
            raw = raw.lower().strip()
        return masked_t5.encode(clip, raw, report, self.t5_tokens, MASK)


class PixArtAlpha(PixArt):
    name = "pixart_alpha"
    label = "PixArt-α"
    latent = SD_LATENT
    variant = "alpha"
    t5_tokens = 120


SIGMA = PixArt()
ALPHA = PixArtAlpha()
#: Σ first: CLIPLoader type ``pixart`` gives Σ's encoding (see the module docstring).
FAMILIES = (SIGMA, ALPHA)
FAMILY = SIGMA
