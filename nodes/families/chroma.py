"""Chroma (lodestones' Chroma1-HD / Chroma1-Base): FLUX.1 [schnell]'s transformer with its
modulation replaced by a small "distilled guidance layer", T5-XXL only, real CFG.

What it shares with FLUX and what differs, and where it lives:

* **Network.** diffusers' ``ChromaTransformer2DModel`` takes FLUX's packed 2x2 patch tokens
  and position ids (:func:`nodes.families.flux.pack`, :func:`~nodes.families.flux.image_ids`)
  and the flow time; it has no pooled text and no guidance input (its approximator sees
  a guidance of 0, as ComfyUI feeds it). :class:`ChromaNetwork` adds the text attention mask.
* **Text.** T5-XXL's last hidden state alone. Two ways, as the two references do it:

  - diffusers' ``ChromaPipeline.encode_prompt`` (the default): the prompt padded to 512 tokens,
    T5 run *with* the tokenizer's attention mask, and a transformer mask that keeps the prompt,
    its end token and the first padding token (``index <= length``), extended by ones over the
    image tokens. diffusers hands that 0/1 mask to attention as a float, so it is an additive
    bias (+1 on kept pairs) rather than a hard mask (the padding stays visible, at 1/e of the
    weight); Kiln passes exactly the same tensor, which is what its parity test checks.
  - ComfyUI (``CLIPLoader`` type ``chroma``, the PixArt T5 tokenizer): no padding and no mask.
    Its templates add ``T5TokenizerOptions`` (min_padding 1 or 0, min_length 0): that many pad
    tokens after the end token. With ``clip.t5_padding`` set Kiln encodes that way (FLUX's
    :func:`~nodes.families.flux.t5_length`) and passes no mask. Without T5TokenizerOptions Kiln
    encodes as diffusers does, as it does for FLUX (where ComfyUI would not pad at all).
* **Model sampling.** ComfyUI builds Chroma as a FLUX model (``model_base.Chroma(Flux)``:
  ModelSamplingFlux, whose default shift is [dev]'s 1024 px one, mu = 1.15, at every size);
  diffusers' Chroma pipelines shift the grid by the image size with FLUX [dev]'s scheduler
  config. Kiln uses FLUX [dev]'s config, so KSampler gives the grid it gives [dev]: diffusers'
  for the size sampled (ComfyUI's at 1024 x 1024; ModelSamplingFlux fixes the size, and
  ModelSamplingAuraFlow, which the Chroma1-HD template uses with shift 1, a fixed shift).
* **Guidance.** Real classifier-free guidance (KSampler's ``cfg`` with a negative prompt); a
  distilled-guidance value from FluxGuidance is ignored with a note naming it.
* **Latents.** FLUX's 16-channel VAE and latent format.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, masked_t5
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

#: Only Chroma's transformer has the approximator; both key layouts name it so.
APPROXIMATOR = "distilled_guidance_layer."
UNET_PREFIX = flux.UNET_PREFIX
T5_PREFIX = flux.T5_PREFIX
#: T5 tokens diffusers' Chroma pipelines encode (max_sequence_length).
T5_TOKENS = 512
#: The conditioning key of the transformer's text mask ([1, tokens], 1 = attended).
MASK = "chroma_text_mask"


class ChromaNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 text_mask: "Any" = None, **kwargs: Any) -> tuple:
        """``text_mask``: [B, text tokens] (see :meth:`Chroma.network_kwargs`), or None for no mask."""
        import torch

        b, _, h, w = x.shape
        check_even_latent("Chroma", h, w)
        check_text_width("Chroma", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with a T5-XXL: CLIPLoader type chroma")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        tokens, ids = flux.pack(x), flux.image_ids(h, w, self.device, self.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=self.device, dtype=self.dtype)
        mask = masked_t5.joint_mask(text_mask, encoder_hidden_states.shape[1], tokens.shape[1], "Chroma",
                                    self.device, self.dtype)
        out = self.transformer(hidden_states=tokens, timestep=time.to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=ids,
                               attention_mask=mask, return_dict=False, **kwargs)[0]
        return (flux.unpack(out, h, w),)


class Chroma(FlowFamily):
    name = "chroma"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "t5", T5_PREFIX),)
    clip_types = ("chroma",)
    guidance_note = "Chroma has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative prompt)"
    network_class = ChromaNetwork
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}

    # -- detection ---------------------------------------------------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        """The approximator, in either layout (FLUX files have guidance_in / vector_in instead)."""
        return any(k.startswith(APPROXIMATOR) or k.startswith(UNET_PREFIX + APPROXIMATOR) for k in shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        """A transformer with one text encoder (FLUX has two, SD3 three)."""
        return "transformer" in components and "text_encoder" in components and "text_encoder_2" not in components

    # -- model sampling ------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """FLUX [dev]'s shifted flow schedule (see the module docstring)."""
        return flux.FAMILY.scheduler_config(prediction_type, guidance=True)

    # -- the network -------------------------------------------------------------------------

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names, which ComfyUI's and kohya's Chroma LoRAs use (FLUX's
        rule on Chroma's key map: fused qkv / linear1 split row-wise onto q, k, v, mlp)."""
        from nodes.checkpoint import chroma_keys, flux_keys

        return flux_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()},
                                      chroma_keys.pairs)

    def original_names(self, network: Any) -> dict[str, str]:
        """The original layout's names (``double_blocks.3.img_attn.qkv.weight``); a fused tensor's
        parts each take its name."""
        from nodes.checkpoint import chroma_keys, flux_keys

        return flux_keys.original_names([name for name, _ in network.named_parameters()], chroma_keys.pairs)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The text mask of every row (nodes.families.masked_t5.mask_rows)."""
        return masked_t5.mask_rows(extras, MASK, batch, "Chroma", device, dtype)

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: T5's last hidden state, with diffusers' text mask (one padding token kept, as
        ChromaPipeline does) unless T5TokenizerOptions asks for ComfyUI's encoding (see the module
        docstring and nodes.families.masked_t5)."""
        return masked_t5.encode(clip, (texts or {}).get("tokenizer", text), report, T5_TOKENS, MASK, padding_kept=1)


FAMILY = Chroma()
