"""FLUX.2 [dev] (32B): FLUX.2 [klein]'s transformer with a guidance embedder, Mistral Small 3 text.

Everything [klein] does (nodes.families.flux2: the 128-channel patch latent, the 4-axis positions,
reference images at time 10(k+1), FLUX.2's empirical shift) holds; what differs lives here:

* **Guidance.** [dev] is guidance-distilled: the guidance value (FluxGuidance, ComfyUI's default 3.5
  when the conditioning has none) is a network input, as FLUX.1 [dev]'s; sampling runs at cfg 1.
  FluxDisableGuidance leaves the embedding out (every row, as ComfyUI passes no guidance then).
* **Text.** Mistral Small 3's language model (nodes.checkpoint.mistral_text; CLIPLoader type flux2 on
  a mistral_3_small_flux2 file), with the hidden states after layers 10, 20 and 30 stacked per token.
  The prompt is ComfyUI's (its Flux2Tokenizer): ``<s>`` then FLUX.2's system prompt and the prompt in
  Mistral's instruction format, unweighted, not padded, so the conditioning is as long as the prompt;
  the network puts zero tokens before it up to 512 (nodes.families.flux2.pad_text, ComfyUI's model).
  diffusers' Flux2Pipeline builds the same token ids through the chat template but pads them to 512
  and encodes the padding (masked) too: its prompt embeddings at the real tokens equal Kiln's, the
  512 - n before them differ (pad-token states there, zeros here). tests/test_flux2_dev.py compares
  the images with the pipeline given the prompt embeddings ComfyUI's rule gives.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint.tekken_tokenizer import instruction
from nodes.families import flux2
from nodes.families.base import ConditioningError, Shapes, TextEncoderSpec

#: Mistral Small 3 hidden states stacked per token (``output.hidden_states`` indices: 0 is the embedding).
TEXT_LAYERS = (10, 20, 30)
#: FLUX.2's system prompt (BFL's, as ComfyUI's Flux2Tokenizer and diffusers' SYSTEM_MESSAGE write it).
SYSTEM_PROMPT = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                 "object relationships, object\nattribution and actions without speculation.")
#: The text after ``<s>``: the system prompt and one instruction turn (Mistral's chat format).
TEMPLATE = instruction("{}", SYSTEM_PROMPT)
#: ComfyUI's guidance when the conditioning carries none (its FLUX model's ``extra_conds``).
DEFAULT_GUIDANCE = 3.5


class Flux2Dev(flux2.Flux2):
    name = "flux2_dev"
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "mistral3", flux2.UNET_PREFIX),)
    #: A Llama-layout file given to type flux2 is read as Mistral (ComfyUI's flux2 type has no Llama): one
    #: without the tokenizer is then refused for the tokenizer it lacks, not for its kind.
    text_kind_aliases = {"llama3": "mistral3"}
    guidance_note = ""

    def claims_unet(self, shapes: Shapes) -> bool:
        """FLUX.2's modulation and a guidance embedder, in either layout."""
        return flux2.has_any(shapes, flux2.MARKERS) and flux2.has_any(shapes, flux2.DEV_MARKERS)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """[klein]'s (reference images) and the guidance value of each conditioning, per row."""
        import torch

        kwargs = super().network_kwargs(extras, batch, image_size, device, dtype)
        values = [extra.get("guidance", DEFAULT_GUIDANCE) for extra in extras]  # None: FluxDisableGuidance
        if all(v is None for v in values):
            return kwargs
        if any(v is None for v in values):
            raise ConditioningError("FluxDisableGuidance on one side only: FLUX.2 [dev] takes its guidance embedding "
                                    "out for a whole network call; disable it on both prompts or neither",
                                    extras[0].get("_input", "positive"))
        kwargs["guidance"] = torch.tensor([float(v) for v in values for _ in range(batch)], device=device,
                                          dtype=torch.float32)
        return kwargs

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, n, 3 x width]: Mistral's hidden states after layers 10, 20 and 30 of ComfyUI's
        prompt (see the module docstring); prompt weights are not applied (ComfyUI disables them)."""
        import torch

        tok = clip.tokenizers["tokenizer"]
        prompt = TEMPLATE.format((texts or {}).get("tokenizer", text))
        ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
        states = flux2.stacked_states(clip, ids, torch.ones_like(ids), TEXT_LAYERS, "FLUX.2 [dev] reads Mistral's",
                                      "load mistral_3_small_flux2 with CLIPLoader type flux2")
        if report is not None:
            report.tokens = max(report.tokens, ids.shape[1])
            report.windows = 1
        return [[states.to("cpu", torch.float32), {}]]


FAMILY = Flux2Dev()
