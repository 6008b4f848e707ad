"""ERNIE-Image (Baidu's 8B single-stream DiT, base and Turbo): flow matching on FLUX.2's 128-channel patch
latents, conditioned on one hidden layer of Ministral 3 3B.

What it shares and what differs, and where it lives:

* **Latents.** FLUX.2's (:data:`nodes.families.flux2.FLUX2_LATENT`): its VAE (``flux2-vae.safetensors``)
  patchifies and normalises by its batch-norm statistics inside Kiln's VAE module, as ComfyUI's does and
  as ErnieImagePipeline does around its VAE; EmptyFlux2LatentImage makes the latent. (The pipeline
  normalises with eps 1e-5, the VAE config says 1e-4; on the statistics' scale the two differ by
  far less than a pixel level.)
* **Network.** diffusers' ``ErnieImageTransformer2DModel`` reads the latent as it is (patch size 1: a
  token per latent pixel), the timestep in training units (sigma x 1000, ComfyUI's multiplier) and the
  text states with their lengths; image tokens sit at (text length, row, column), text token i at
  (i, 0, 0). The pipeline pads a positive and negative of other lengths to one and masks the padding,
  which gives what separate calls give: Kiln evaluates prompts of other lengths apart
  (``repeats_text`` False), each call unpadded. :class:`ErnieImageNetwork` wraps it.
* **Text.** As ErnieImagePipeline.encode_prompt: ``<s>`` and the prompt's Tekken tokens, no template, no
  padding; Ministral 3's second-to-last hidden state (``hidden_states[-2]``: before the last layer and
  the final norm), [1, tokens, 3072]. ComfyUI's tokenizer (start token 1, no end token, weights off)
  gives the same ids.
* **Guidance.** Real CFG with a negative (the pipeline's guidance_scale is KSampler's cfg, 4 in both);
  Turbo runs cfg 1 in its template.
* **Model sampling.** FlowMatchEuler with a constant shift of 3 (ComfyUI's ERNIE-Image sampling
  settings); ComfyUI's simple schedule on it is the pipeline's ``linspace(1, 0, steps + 1)`` shifted.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, flux2
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.runtime import precision

UNET_PREFIX = flux.UNET_PREFIX
LABEL = "ERNIE-Image"
#: Ministral 3's hidden state the pipeline conditions on (``hidden_states`` index).
TEXT_LAYER = -2
SHIFT = 3.0
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}


class ErnieImageNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.text_in_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        import torch

        b = x.shape[0]
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Ministral 3: CLIPLoader type flux2, ministral-3-3b.safetensors")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        text = encoder_hidden_states.to(self.device, self.dtype)
        if text.shape[0] != b:
            text = text.expand(b, -1, -1)
        lengths = torch.full((b,), text.shape[1], dtype=torch.long, device=self.device)
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=time.to(self.dtype), text_bth=text,
                               text_lens=lengths, return_dict=False, **kwargs)[0]
        return (out,)


class ErnieImage(FlowFamily):
    name = "ernie_image"
    inference_dtypes = precision.NO_FP16
    latent = flux2.FLUX2_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "ministral3", ""),)
    clip_types = ("flux2",)
    guidance_note = "ERNIE-Image has no distilled guidance (real CFG with a negative prompt; Turbo runs cfg 1)"
    scheduler = SCHEDULER
    network_class = ErnieImageNetwork
    dit_blocks_unreached = "ERNIE-Image (ComfyUI's ErnieImageModel)"

    # -- detection: by the transformer's keys (FlowFamily.claims) ------------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import ernie_image_keys

        return ernie_image_keys.is_original(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        """ComfyUI's names are the module's own (nodes.checkpoint.ernie_image_keys)."""
        return {name: name for name, _ in network.named_parameters()}

    # -- text ------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, width]: Ministral 3's second-to-last hidden state over ``<s>`` and the
        prompt's tokens (see the module docstring). Prompt weights are not applied (ComfyUI's ERNIE
        tokenizer disables them)."""
        import torch

        tok = clip.tokenizers["tokenizer"]
        prompt = (texts or {}).get("tokenizer", text)
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
        with torch.inference_mode(), clip.encoder("text_encoder") as model:
            if int(model.config.num_hidden_layers) < 2:
                raise ConditioningError("ERNIE-Image reads Ministral 3's second-to-last layer but this text encoder "
                                        "has one layer (load ministral-3-3b.safetensors with CLIPLoader type flux2)",
                                        "clip")
            device = model.embed_tokens.weight.device
            out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False)
            states = out.hidden_states[TEXT_LAYER]
        if report is not None:
            report.tokens = max(report.tokens, len(ids))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {}]]


FAMILY = ErnieImage()
