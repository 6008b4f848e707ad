"""FLUX.3 [klein] (base): a per-mode then joint transformer on FLUX.2's 128-channel patch latents, Qwen3-VL text.

What it shares with FLUX.2 (nodes.families.flux2) and what differs, and where it lives:

* **Latents.** FLUX.2's exactly: the FLUX.2 VAE (VAELoader, nodes.checkpoint.flux2_vae) patchifies and
  normalises by its batch-norm statistics, LATENT sockets carry ``[B, 128, H/16, W/16]``
  (EmptyFlux2LatentImage), a token per latent pixel (:func:`nodes.families.flux2.tokens_of`).
* **Network.** diffusers' ``Flux3Transformer2DModel``: the image, the reference images and the text
  each run their own blocks, then joint single blocks. Position ids are 4-axis (t, h, w, l) as in
  FLUX.2, but the image's rows and columns are scaled by 0.5 (the modular pipeline's
  ``image_rope_scale``), text advances along l, and reference image k sits at l = -(k + 1) (no time
  offset). References (ReferenceLatent, ReferenceMultiLatent) are the transformer's
  ``image_cond_hidden_states``, run at timestep 0. :class:`Flux3Network` wraps it.
* **Text.** Qwen3-VL 4B's language model (CLIPLoader type ``flux3``), as the modular pipeline's text
  encoder step encodes: the prompt in Qwen3-VL's chat template (one user turn, the generation prompt),
  right-padded to a multiple of 80 tokens, the padding masked and given position 1, and the hidden
  states after layers 4, 8, ..., 32 stacked per token. The transformer reads every token, padding
  included (no text mask), so a positive and negative of other padded lengths are evaluated apart.
* **Guidance.** Real classifier-free guidance (KSampler's cfg; the pipeline's guider, negative "" by
  default); no guidance embedder (a FluxGuidance value is ignored with a note).
* **Model sampling.** Flow matching with a constant shift of 6.93 whatever the size (the pipeline's
  ``Flux3SetTimestepsStep``): KSampler's ``simple``/``normal`` grid is the pipeline's linspace(1, 1/N, N).

The step-distilled (flow-map) FLUX.3 is nodes.families.flux3_distilled, on the same network.
"""
from __future__ import annotations

import math
from typing import Any

from nodes.families import flux2, flux_references
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.runtime import precision

UNET_PREFIX = flux2.UNET_PREFIX
LABEL = "FLUX.3"
#: Qwen3-VL ``hidden_states`` indices (0 is the embedding) stacked per token (``text_encoder_out_layers``).
TEXT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)
#: Qwen3-VL's chat template for one text-only user turn with the generation prompt, as ``apply_chat_template``
#: writes it (no default system turn, unlike Qwen2-VL's); FIBO 2's and Ideogram 4's prompts use the same turn.
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: The prompt is right-padded to a multiple of this many tokens, and cut at :data:`MAX_TOKENS`.
PAD_MULTIPLE = 80
MAX_TOKENS = 8192
#: Where the padding sits in Qwen3-VL's positions (the pipeline's ``masked_fill(mask == 0, 1)``).
PAD_POSITION = 1
#: The image's rows and columns in the rotary ids are scaled by this (``image_rope_scale``).
IMAGE_ROPE_SCALE = 0.5
#: The constant timestep shift of FLUX.3's sampling recipe.
SHIFT = 6.93
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "prediction_type": "flow"}
ENCODE_WITH = "encode the prompt with Qwen3-VL 4B: CLIPLoader type flux3"


def image_ids(h: int, w: int, layer: int, device: Any, dtype: Any) -> "Any":
    """Rotary ids [h * w, 4] of a latent's tokens: (0, row / 2, column / 2, ``layer``)."""
    import torch

    ids = torch.zeros(h, w, 4)
    ids[..., 1] += torch.arange(h)[:, None] * IMAGE_ROPE_SCALE
    ids[..., 2] += torch.arange(w)[None, :] * IMAGE_ROPE_SCALE
    ids[..., 3] = layer
    return ids.reshape(-1, 4).to(device=device, dtype=dtype)


class Flux3Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def reads_next_sigma(self) -> bool:
        """The step-distilled (flow-map) model also reads the noise level each step jumps to."""
        return bool(getattr(self.transformer.config, "flow_map", False))

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 reference_latents: "flux_references.References | None" = None, sigma_next: float | None = None,
                 **kwargs: Any) -> tuple:
        """``reference_latents``: the images the network reads beside ``x`` (its image_cond mode).
        ``sigma_next``: where the step heads (the flow map's target timestep, the pipeline's next timestep
        over 1000, 0 at the last step); a call with no schedule known jumps to 0, as a last step does."""
        import torch

        b, _, h, w = x.shape
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width, ENCODE_WITH)
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        text = encoder_hidden_states.to(self.device, self.dtype)
        extra: dict[str, Any] = {}
        if self.reads_next_sigma:
            extra["target_timestep"] = torch.full((b,), float(sigma_next or 0.0), device=self.device).to(self.dtype)
        if reference_latents is not None:
            latents = reference_latents.latents
            extra["image_cond_hidden_states"] = torch.cat(
                [flux2.tokens_of(ref.to(self.device, self.dtype)) for ref in latents], dim=1)
            extra["image_cond_ids"] = torch.cat([image_ids(ref.shape[-2], ref.shape[-1], -(k + 1), self.device,
                                                           torch.float32) for k, ref in enumerate(latents)])
        out = self.transformer(hidden_states=flux2.tokens_of(x).to(self.dtype), encoder_hidden_states=text,
                               timestep=time.to(self.dtype), img_ids=image_ids(h, w, 0, self.device, torch.float32),
                               txt_ids=flux2.text_ids(text.shape[1], self.device, torch.float32), return_dict=False,
                               **extra, **kwargs)[0]
        return (out.permute(0, 2, 1).reshape(b, -1, h, w),)


def padded_length(real: int) -> int:
    """Tokens the pipeline encodes for a prompt of ``real`` tokens: the next multiple of 80, at most 8192."""
    return min(math.ceil(real / PAD_MULTIPLE) * PAD_MULTIPLE, MAX_TOKENS)


class Flux3(FlowFamily):
    name = "flux3"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = flux2.FLUX2_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("flux3",)
    #: A Qwen3-VL file without its vision tower has a Qwen3's keys: under type flux3 it is read as Qwen3-VL.
    text_kind_aliases = {"qwen3": "qwen3-vl"}
    guidance_note = "FLUX.3 has no distilled guidance (the base model runs real CFG, the distilled one cfg 1)"
    scheduler = SCHEDULER
    network_class = Flux3Network
    takes_references = True

    # -- detection: by the transformer's keys, the flow-map embedder telling the distilled one -------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import flux3_keys

        return (flux3_keys.is_original(shapes) or flux3_keys.is_diffusers(shapes)) \
            and not flux3_keys.is_distilled(shapes)

    # -- the network -------------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import flux3_keys

        return flux3_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        from nodes.checkpoint import flux3_keys

        return flux3_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The reference images of the call (ReferenceLatent / ReferenceMultiLatent), placed along the
        l axis; another placement method (FluxKontextMultiReferenceLatentMethod) is refused."""
        return flux_references.indexed_call(extras, batch, self.latent, device, dtype,
                                            "FLUX.3 places reference k at l = -(k+1) (the modular pipeline's layout)")

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    # -- text ---------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, padded tokens, 8 x width] (module docstring). Prompt weights are not applied."""
        import torch

        tok = clip.tokenizers["tokenizer"]
        prompt = TEMPLATE.format((texts or {}).get("tokenizer", text))
        real = len(tok(prompt, truncation=True, max_length=MAX_TOKENS)["input_ids"])
        got = tok([prompt], padding="max_length", padding_side="right", truncation=True,
                  max_length=padded_length(real), return_tensors="pt")
        mask = got["attention_mask"]
        positions = torch.arange(mask.shape[1])[None].masked_fill(mask == 0, PAD_POSITION)
        states = flux2.stacked_states(clip, got["input_ids"], mask, TEXT_LAYERS, "FLUX.3 reads Qwen3-VL's",
                                      "load qwen3vl_4b*.safetensors with CLIPLoader type flux3", positions)
        if report is not None:
            report.tokens = max(report.tokens, real)
            report.windows = 1
        return [[states.to("cpu", torch.float32), {}]]


FAMILY = Flux3()
