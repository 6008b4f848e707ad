"""Lumina Image 2.0 (Alpha-VLLM) and its fine-tunes (Neta Lumina, NetaYume Lumina): a NextDiT flow
transformer on FLUX.1's latents, conditioned on a hidden layer of Gemma 2 2B.

What differs from FLUX, and where it lives:

* **Network.** diffusers' ``Lumina2Transformer2DModel`` takes the caption with an attention mask and gives
  the caption tokens rotary positions 0, 1, ... (the picture's start after them), so a prompt repeated is
  not the prompt once: prompts of other lengths are evaluated in calls of their own (``repeats_text``
  off), each with its own tokens all kept. Its time input is ``1 - sigma`` (1 = clean) and its output the
  negative of the flow velocity Kiln's steppers take (Lumina2Pipeline negates it too). A caption longer
  than diffusers' rotary table (300 positions) gets a longer table (:func:`room_for_caption`), as ComfyUI
  computes positions unbounded.
* **Text.** Gemma 2 2B on the prompt as written (ComfyUI's CLIPTextEncode; Lumina2Pipeline and
  ComfyUI's templates put a system prompt and `` <Prompt Start> `` before the user's words: the
  StringConcatenate of the NetaYume template, or CLIPTextEncodeLumina2), BOS first, no padding, the
  hidden state of layer -2 (the second to last layer's output, no final norm): what Lumina2Pipeline
  keeps where its mask is set, and ComfyUI's ``layer_idx=-2``. ComfyUI cuts nothing; diffusers cuts at
  256 tokens (its max_sequence_length). ComfyUI reads its weight syntax for Lumina 2 (its Gemma tokenizer
  leaves weights on): each piece of one weight is tokenized on its own and a weighted token's state is
  moved from the empty prompt's by its weight (:func:`weighted_ids`, :func:`apply_weights`); Kiln does the
  same. A prompt without that syntax is encoded exactly as diffusers encodes it.
* **Guidance.** Real CFG (KSampler's cfg is Lumina2Pipeline's guidance_scale with
  ``cfg_normalization=False``, ``cfg_trunc_ratio=1``); ComfyUI's RenormCFG node (nodes.guidance_patches)
  gives the release's truncated, renormalised guidance.
* **Model sampling.** Flow matching with a fixed shift, 6 (ComfyUI's Lumina2 sampling settings); the
  NetaYume template sets 4 with ModelSamplingAuraFlow.
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

#: Gemma's hidden_states index Lumina 2 conditions on.
LAYER = -2
#: Where an all-in-one checkpoint keeps Gemma 2 (ComfyUI's layout), and its tokenizer beside it.
GEMMA_PREFIX = "text_encoders.gemma2_2b.transformer."
TEXT_ENCODERS_PREFIX = "text_encoders."
SHIFT = 6.0
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}
#: ComfyUI's CLIPTextEncodeLumina2 system prompts (its ``system_prompt`` choices).
SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of "
                "image-text alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
                 "image-text alignment based on textual prompts.",
}
#: What goes between the system prompt and the user's words (Lumina2Pipeline's and ComfyUI's).
PROMPT_START = " <Prompt Start> "


class Lumina2Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        """The caption width the transformer reads (Gemma 2 2B's 2304 in the release)."""
        return int(self.transformer.config.cap_feat_dim)

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False, **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        check_even_latent("Lumina 2", h, w)
        check_text_width("Lumina 2", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Gemma 2 2B: CLIPLoader type lumina2")
        sigma = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        context = encoder_hidden_states.to(self.device, self.dtype)
        room_for_caption(self.transformer.rope_embedder, context.shape[1])
        mask = torch.ones(context.shape[:2], dtype=torch.long, device=self.device)
        out = self.transformer(x.to(self.dtype), 1.0 - sigma, context, mask, return_dict=False)[0]
        return (-out,)


def room_for_caption(rope: Any, tokens: int) -> None:
    """Make diffusers' rotary table (``Lumina2RotaryPosEmbed``) long enough for a ``tokens``-long caption.

    The caption takes positions 0 .. tokens-1 on the first axis and the picture the next one, but diffusers
    tabulates only ``axes_lens[0]`` (300) positions, so a longer prompt would fail there; ComfyUI computes
    the positions unbounded. The first axis's table is computed again, longer, by diffusers' own rule
    (``get_1d_rotary_pos_embed``): its first rows are the same numbers, so nothing shorter changes."""
    import torch
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    if tokens + 1 <= rope.freqs_cis[0].shape[0]:
        return
    length = -(-(tokens + 1) // 256) * 256
    freqs_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
    rope.freqs_cis = [get_1d_rotary_pos_embed(rope.axes_dim[0], length, theta=rope.theta, freqs_dtype=freqs_dtype),
                      *rope.freqs_cis[1:]]
    rope.axes_lens = (length, *tuple(rope.axes_lens)[1:])


class Lumina2(FlowFamily):
    name = "lumina2"
    inference_dtypes = precision.NO_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "gemma2", GEMMA_PREFIX),)
    clip_types = ("lumina2",)
    guidance_note = ("Lumina 2 has no distilled guidance (its guidance is real CFG: KSampler's cfg with a "
                     "negative prompt)")
    scheduler = SCHEDULER
    network_class = Lumina2Network
    dit_blocks_unreached = "Lumina 2 (ComfyUI's NextDiT, as Z-Image)"

    # -- detection: by the transformer's keys (FlowFamily.claims) ----------------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.lumina2_load import has_transformer

        return has_transformer(shapes)

    # -- the network -------------------------------------------------------------------------

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (``layers.3.attention.qkv``), which ComfyUI-style LoRAs use; the
        fused qkv splits row-wise onto to_q, to_k, to_v (nodes.checkpoint.lumina2_keys)."""
        from nodes.checkpoint.lumina2_keys import lora_modules

        return lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint.lumina2_keys import original_names

        return original_names([name for name, _ in network.named_parameters()])

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Gemma 2's layer -2 states of the prompt as written, ComfyUI's weight syntax read as
        ComfyUI reads it for Lumina 2 (:func:`weighted_ids`, :func:`apply_weights`; see the module docstring)."""
        import torch

        from nodes.checkpoint.qwen3_text import hidden_states
        from nodes.prompt_syntax import parse

        parsed = parse((texts or {}).get("tokenizer", text))
        ids, weights, skipped = weighted_ids(clip.tokenizers["tokenizer"], parsed)
        rows = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones_like(rows)
        if parsed.weighted:  # the empty prompt beside it: BOS, then padding the encoder does not attend to
            rows = torch.cat([rows, torch.tensor([[ids[0]] + [PAD] * (len(ids) - 1)])])
            mask = torch.cat([mask, torch.tensor([[1] + [0] * (len(ids) - 1)])])
        with torch.inference_mode(), clip.encoder("text_encoder") as gemma:
            states = hidden_states(gemma, rows, mask, LAYER).to("cpu", torch.float32)
        if parsed.weighted:
            states = apply_weights(states[:1], states[1:], weights)
        if report is not None:
            report.tokens = max(report.tokens, len(ids))
            report.windows = 1
            notes = parsed.problems + [f"embedding:{name} left out: Kiln does not load textual-inversion embeddings"
                                       for name in skipped]
            report.problems += [n for n in notes if n not in report.problems]
        return [[states, {}]]


#: Gemma's padding id (the empty prompt's filler, never attended to)
PAD = 0


def weighted_ids(tok: Any, parsed: Any) -> tuple[list[int], list[float], list[str]]:
    """(token ids, a weight each, embedding names left out) of a parsed prompt as ComfyUI's Lumina 2 tokenizer
    makes them: BOS, then each piece of one weight (nodes.families.text.prompt_pieces) tokenized on its own
    without its BOS. A prompt without weight syntax is one piece: the whole text tokenized once, as diffusers
    tokenizes it."""
    from nodes.families.text import prompt_pieces

    pieces, skipped = prompt_pieces(parsed)
    ids = list(tok("")["input_ids"][:1])  # BOS
    weights = [1.0]
    for piece, weight in pieces:
        got = tok(piece)["input_ids"][1:]
        ids += got
        weights += [weight] * len(got)
    return ids, weights, skipped


def apply_weights(states: Any, empty: Any, weights: list[float]) -> Any:
    """ComfyUI's rule for weighted tokens: a token of weight w becomes ``empty + (h - empty) * w``, ``empty``
    the state at the same position of the empty prompt (BOS then unattended padding); weight-1 tokens keep
    their exact values. ``states``, ``empty``: [1, tokens, width]."""
    import torch

    w = torch.tensor(weights, dtype=states.dtype).reshape(1, -1, 1)
    return torch.where(w != 1.0, (states - empty) * w + empty, states)


FAMILY = Lumina2()
