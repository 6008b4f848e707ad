"""FLUX.2 [klein] (4B, 9B): a rectified-flow transformer on 128-channel patch latents, Qwen3 text.

What differs from FLUX.1 (nodes.families.flux), and where it lives:

* **Latents.** The FLUX.2 VAE makes 32 channels at 1/8 of the image; its 2x2 patches, stacked as
  128 channels at 1/16 and normalised by the VAE's batch-norm statistics, are the latent both
  references work in: diffusers' Flux2 pipelines patchify and normalise outside the VAE, ComfyUI
  inside it (``batch_norm_latent``), and EmptyFlux2LatentImage makes ``[B, 128, H/16, W/16]``.
  Kiln does as ComfyUI: the VAE module (:mod:`nodes.checkpoint.flux2_vae`) patchifies and
  normalises, so LATENT sockets carry that 128-channel latent and the family's scale is 1.
* **Network.** diffusers' ``Flux2Transformer2DModel`` takes each latent pixel as a token (no
  2x2 packing here: the latent already is patches) with 4-axis position ids (time, row,
  column, layer): the image at time 0, text tokens along the layer axis, the k-th reference
  image (ReferenceLatent) at time ``10 + 10 k`` as Flux2KleinPipeline places them.
  :class:`Flux2Network` wraps it in the UNet calling convention.
* **Text.** Qwen3 (4B for klein 4B, 8B for 9B) as Flux2KleinPipeline encodes it: the prompt in
  Qwen3's chat template with thinking turned off, padded to 512 tokens, run with the padding
  masked, and the hidden states after layers 9, 18 and 27 stacked per token ([1, 512, 3 x width]).
  The transformer attends to all 512 (no text mask).
* **Guidance.** [klein] has no guidance embedder: the distilled models run cfg 1, the base ones
  real classifier-free guidance (KSampler's/CFGGuider's cfg, negative "" in diffusers). A
  FluxGuidance value is ignored with a note.
* **Model sampling.** Flow matching with FLUX.2's empirical shift, which depends on the token
  count and the step count (nodes.samplers.flow.empirical_mu; the config's ``kiln_mu_rule``).

FLUX.2 [dev] (a guidance embedder, Mistral Small 3 text) is a subclass, nodes.families.flux2_dev, on
the same :class:`Flux2Network`: it passes a guidance value when the transformer has the embedder, and
puts zero tokens before prompts shorter than 512 (:func:`pad_text`, as ComfyUI's FLUX.2 model does).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, flux_references, reference_kv
from nodes.families.base import ConditioningError, FlowFamily, LatentFormat, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.families.text import without_logits
from nodes.samplers.flow import MU_RULE
from nodes.runtime import precision

UNET_PREFIX = flux.UNET_PREFIX
#: Only a FLUX.2 transformer has these (FLUX.1 modulates inside each block): original and diffusers layout.
MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")
#: FLUX.2 [dev] has a guidance embedder (and a Mistral text encoder); [klein] has none.
DEV_MARKERS = ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight")
#: Tokens the transformer sees (Flux2KleinPipeline's max_sequence_length).
TEXT_TOKENS = 512
#: Qwen3 hidden states stacked per token (``output.hidden_states`` indices: 0 is the embedding).
TEXT_LAYERS = (9, 18, 27)
#: Qwen3's chat template for one user turn with the generation prompt and thinking disabled.
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: Reference image k sits at time index REF_TIME * (k + 1) (Flux2KleinPipeline's ``_prepare_image_ids``).
REF_TIME = 10
#: The VAE's spatial factor on the 128-channel latent: 8 in the VAE, 2 more in the patches.
DOWNSCALE = 16

FLUX2_LATENT = LatentFormat(channels=128, scale=1.0, shift=0.0)
#: The released klein scheduler config, with FLUX.2's empirical shift (``kiln_mu_rule``).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential", "prediction_type": "flow",
             MU_RULE: "flux2"}


def has_any(shapes: Shapes, keys: tuple[str, ...]) -> bool:
    """Whether one of ``keys`` is in ``shapes``, with or without ComfyUI's prefix."""
    return any(k in shapes or UNET_PREFIX + k in shapes for k in keys)


def tokens_of(x: "Any") -> "Any":
    """[B, C, h, w] -> [B, h * w, C] (Flux2KleinPipeline's ``_pack_latents``: a token per latent pixel)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def position_ids(h: int, w: int, time: int, device: Any, dtype: Any) -> "Any":
    """Ids [h * w, 4] of a latent's tokens: (time, row, column, 0)."""
    import torch

    ids = torch.zeros(h, w, 4)
    ids[..., 0] = time
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 4).to(device=device, dtype=dtype)


def text_ids(length: int, device: Any, dtype: Any) -> "Any":
    """Ids [length, 4] of the text tokens: (0, 0, 0, position)."""
    import torch

    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids.to(device=device, dtype=dtype)


def pad_text(states: "Any") -> "Any":
    """Prompt states shorter than :data:`TEXT_TOKENS` with zero tokens put before them, as ComfyUI's FLUX.2
    model does (its ``extra_conds``): [klein]'s Qwen3 prompts already are 512 tokens, [dev]'s Mistral ones
    are as long as the prompt."""
    import torch

    short = TEXT_TOKENS - states.shape[1]
    if short <= 0:
        return states
    return torch.cat([states.new_zeros(states.shape[0], short, states.shape[2]), states], dim=1)


class Flux2Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 reference_latents: "flux_references.References | None" = None, **kwargs: Any) -> tuple:
        """``reference_latents``: images the network reads beside ``x`` (the klein edit templates);
        their tokens follow the image's and their outputs are dropped."""
        import torch

        b, c, h, w = x.shape
        check_text_width("FLUX.2", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with its text encoder: CLIPLoader type flux2 (Qwen3 for [klein], "
                         "Mistral Small 3 for [dev])")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        tokens, ids = tokens_of(x).to(self.dtype), position_ids(h, w, 0, self.device, self.dtype)
        guidance = kwargs.pop("guidance", None)
        if getattr(self.transformer.time_guidance_embed, "guidance_embedder", None) is None:
            guidance = None  # [klein]: no embedder (the family notes a FluxGuidance value as ignored)
        encoder_hidden_states = pad_text(encoder_hidden_states)
        common = dict(timestep=time.to(self.dtype), guidance=guidance,
                      encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                      txt_ids=text_ids(encoder_hidden_states.shape[1], self.device, self.dtype), **kwargs)
        if reference_latents is not None:
            cache = reference_kv.run_cache(self.transformer)
            if cache is not None:  # FluxKVCache: the references' keys and values computed once per run
                out = reference_kv.call(self.transformer, cache, reference_latents, tokens, ids,
                                        lambda: self.reference_inputs(reference_latents), **common)
                return (out.permute(0, 2, 1).reshape(b, -1, h, w),)
            ref_tokens, ref_ids = self.reference_inputs(reference_latents)
            tokens, ids = torch.cat([tokens, ref_tokens], dim=1), torch.cat([ids, ref_ids])
        out = self.transformer(hidden_states=tokens, img_ids=ids, return_dict=False, **common)[0]
        return (out[:, :h * w].permute(0, 2, 1).reshape(b, -1, h, w),)

    def reference_inputs(self, references: "flux_references.References") -> tuple["Any", "Any"]:
        """The references' tokens and position ids, each image at its own time offset after the image's."""
        import torch

        latents = references.latents
        tokens = torch.cat([tokens_of(ref.to(self.dtype)) for ref in latents], dim=1)
        ids = torch.cat([position_ids(ref.shape[-2], ref.shape[-1], REF_TIME * (k + 1), self.device, self.dtype)
                         for k, ref in enumerate(latents)])
        return tokens, ids


def stacked_states(clip: Any, ids: "Any", mask: "Any", layers: tuple[int, ...], reader: str, hint: str,
                   positions: "Any" = None) -> "Any":
    """The text encoder's hidden states after ``layers`` (``output.hidden_states`` indices) for token ``ids``
    [1, n] under ``mask``, stacked per token: [1, n, len(layers) x width]. ``positions``: the tokens' position
    ids [1, n] where the caller's rule sets them (FLUX.3 gives padding position 1), else the encoder's own.
    An encoder with fewer layers is a ConditioningError on the clip saying who reads them (``reader``) and what
    to load (``hint``)."""
    import torch

    with torch.inference_mode(), clip.encoder("text_encoder") as model:
        count = int(model.config.num_hidden_layers)
        if count < max(layers):
            raise ConditioningError(f"{reader} layers {layers} but this text encoder has {count} ({hint})", "clip")
        device = next(model.parameters()).device
        given = {} if positions is None else {"position_ids": positions.to(device)}
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False, **given, **without_logits(model))
        return torch.stack([out.hidden_states[k] for k in layers], dim=2).reshape(1, ids.shape[1], -1)


class Flux2(FlowFamily):
    name = "flux2"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = FLUX2_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3", UNET_PREFIX),)
    clip_types = ("flux2",)
    guidance_note = ("FLUX.2 [klein] has no distilled guidance (the distilled models run cfg 1, the base ones real "
                     "CFG with a negative prompt)")
    scheduler = SCHEDULER
    network_class = Flux2Network
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
    takes_references = True

    # -- detection: by the transformer's keys (FlowFamily.claims); a folder by its transformer's class
    # (nodes.checkpoint.flux2_load.is_flux2_folder), not by components (FlowFamily.claims_folder) ----

    def claims_unet(self, shapes: Shapes) -> bool:
        """The shared double-stream modulation, in either layout, with or without the prefix; [klein] has no
        guidance embedder ([dev], nodes.families.flux2_dev, has)."""
        return has_any(shapes, MARKERS) and not has_any(shapes, DEV_MARKERS)

    # -- the network -------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import flux2_keys, flux_keys

        return flux_keys.original_names([name for name, _ in network.named_parameters()], flux2_keys.pairs)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (ComfyUI's FLUX.2 LoRAs): fused qkv split row-wise."""
        from nodes.checkpoint import flux2_keys, flux_keys

        return flux_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()}, flux2_keys.pairs)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        return flux_references.indexed_call(extras, batch, self.latent, device, dtype,
                                            "FLUX.2 [klein] places reference k at time index 10(k+1) (ComfyUI's "
                                            "index method, Flux2KleinPipeline's layout)")

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Qwen3's hidden states after layers 9, 18 and 27, stacked per token (see the
        module docstring). Prompt weights are not applied (ComfyUI's klein tokenizer disables them)."""
        import torch

        tok = clip.tokenizers["tokenizer"]
        prompt = TEMPLATE.format((texts or {}).get("tokenizer", text))
        got = tok([prompt], padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
        states = stacked_states(clip, got.input_ids, got.attention_mask, TEXT_LAYERS, "FLUX.2 [klein] reads Qwen3's",
                                "load qwen_3_4b / qwen_3_8b with CLIPLoader type flux2")
        if report is not None:
            report.tokens = max(report.tokens, int(got.attention_mask.sum()))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {}]]


FAMILY = Flux2()
