"""Kandinsky 5.0 Image Lite (Kandinsky Lab's 6B text-to-image DiT): flow matching on FLUX's 16-channel
VAE latents, conditioned on Qwen2.5-VL 7B's last hidden state and CLIP-L's pooled output.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``Kandinsky5Transformer3DModel`` reads channels-last latents with a frame axis
  [B, 1, h, w, C] in 1x2x2 patches, the flow time in 1000ths (``sigma * 1000``, ComfyUI's multiplier),
  the Qwen states (run through its own text blocks with 1-D rotary positions 0..tokens-1) and the
  pooled CLIP vector (added to the time embedding); :class:`Kandinsky5Network` moves the axes.
* **Text.** As Kandinsky5T2IPipeline.encode_prompt: the prompt cleaned (HTML entities, runs of
  whitespace, ends stripped: :func:`clean`), put in the pipeline's system template (:data:`TEMPLATE`),
  Qwen2.5-VL's last hidden state (after the final norm) with the template's first 40 tokens (up to and
  including ``<|im_start|>user\\n``) dropped and the closing ``<|im_end|>`` kept; CLIP-L's pooled
  output (no projection) of the prompt padded to 77 tokens. A prompt past 512 tokens is cut as the pipeline
  cuts it (:func:`prompt_ids`). ComfyUI's Kandinsky 5 image tokenizer reads
  the same template with one letter off ("promt"); Kiln follows the pipeline. A positive and a negative
  of other lengths are evaluated apart (text tokens have rotary positions and attend to each other).
* **Guidance.** Real CFG (KSampler's ``cfg`` = the pipeline's ``guidance_scale``).
* **Model sampling.** A constant shift of 3 (ComfyUI's Kandinsky 5 image sampling settings; the
  template's ModelSamplingSD3 sets the same) on the scheduler's own spacing, as the pipeline samples.
* **Latents.** FLUX's VAE (``ae.safetensors``) and scale, without FLUX's shift: raw = model / 0.3611, as
  Kandinsky Lab's own code (``generation_utils.generate_sample``) and the diffusers pipelines (t2i and i2i)
  decode and encode, so that is the space the model was trained in. ComfyUI uses its FLUX latent format
  (with the 0.1159 shift); from an empty latent its samples are the same, and only its decoded pictures
  carry that constant latent offset.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from nodes.families import flux
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width, pooled_projections
from nodes.runtime import precision

LABEL = "Kandinsky 5"
#: Kandinsky5T2IPipeline's template and the tokens it drops from the front (its ``prompt_template_encode_start_idx``).
TEMPLATE = ("<|im_start|>system\nYou are a prompt engineer. Describe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
            "<|im_start|>user\n{}<|im_end|>")
TEMPLATE_TOKENS = 40
#: Tokens the pipeline keeps after the template's front (its default max_sequence_length).
MAX_TOKENS = 512
CLIP_TOKENS = 77
SHIFT = 3.0
#: The scheduler: FlowMatchEuler at a fixed shift of 3 on its own spacing (``set_timesteps(N)``, which
#: Kandinsky5T2IPipeline samples: ``kiln_train_grid``, nodes.samplers.flow).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "prediction_type": "flow", "kiln_train_grid": True}


def clean(text: str) -> str:
    """The pipeline's prompt cleaning (its ``prompt_clean`` without ftfy's mojibake repair): HTML entities
    unescaped twice, runs of whitespace made one space, the ends stripped."""
    import html
    import re

    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class Kandinsky5Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.in_text_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 pooled_projections: "Any" = None, **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL 7B and CLIP-L: DualCLIPLoader type kandinsky5_image")
        if pooled_projections is None:
            raise ConditioningError("Kandinsky 5 needs CLIP-L's pooled output with the prompt (DualCLIPLoader type "
                                    "kandinsky5_image with qwen_2.5_vl_7b and clip_l)", "positive")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        device = self.device
        rope = [torch.arange(1, device=device), torch.arange(h // 2, device=device),
                torch.arange(w // 2, device=device)]
        out = self.transformer(hidden_states=x.permute(0, 2, 3, 1).unsqueeze(1).to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                               pooled_projections=pooled_projections.to(self.dtype), timestep=time.to(self.dtype),
                               visual_rope_pos=rope,
                               text_rope_pos=torch.arange(encoder_hidden_states.shape[1], device=device),
                               return_dict=False, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return (out[:, 0].permute(0, 3, 1, 2),)


#: FLUX's latent space without its shift (module docstring: Latents); the preview table reads model-space
#: latents, which are the same.
KANDINSKY5_LATENT = dataclasses.replace(flux.FLUX_LATENT, shift=0.0)


class Kandinsky5(FlowFamily):
    name = "kandinsky5"
    inference_dtypes = precision.NO_FP16
    latent = KANDINSKY5_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),
                     TextEncoderSpec("text_encoder_2", "tokenizer_2", "openai", flux.CLIP_L_PREFIX))
    clip_types = ("kandinsky5_image",)
    guidance_note = "Kandinsky 5 has no distilled guidance (it runs real CFG with a negative prompt)"
    scheduler = SCHEDULER
    network_class = Kandinsky5Network
    dit_block_lists = {"double": "visual_transformer_blocks", "single": ""}

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import kandinsky5_keys

        return kandinsky5_keys.is_original(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import kandinsky5_keys

        return kandinsky5_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        from nodes.checkpoint import kandinsky5_keys

        return kandinsky5_keys.lora_modules([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        return {"pooled_projections": pooled_projections(
            extras, batch, device, dtype, "Kandinsky 5 model needs conditioning with CLIP-L's pooled output (encode "
            "the prompt with DualCLIPLoader type kandinsky5_image)")}

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, Qwen width] with ``pooled_output`` [1, CLIP width] (module docstring).
        ComfyUI's weight syntax is not read (its Kandinsky 5 tokenizer reads Qwen prompts without weights)."""
        import torch

        texts = texts or {}
        qwen_text, clip_text = (clean(texts.get(name, text)) for name in ("tokenizer", "tokenizer_2"))
        qwen_tok, clip_tok = clip.tokenizers["tokenizer"], clip.tokenizers["tokenizer_2"]
        ids = prompt_ids(qwen_tok, qwen_text)
        clip_ids = clip_tok([clip_text], padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
        with torch.inference_mode():
            with clip.encoder("text_encoder") as lm:
                states = lm(input_ids=ids.to(lm.device)).last_hidden_state[:, TEMPLATE_TOKENS:]
            with clip.encoder("text_encoder_2") as te:
                pooled = te(clip_ids.to(te.device), output_hidden_states=False).pooler_output
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {"pooled_output": pooled.to("cpu", torch.float32)}]]


def prompt_ids(tok: Any, prompt: str) -> "Any":
    """Token ids [1, n] of the templated prompt, cut as Kandinsky5T2IPipeline cuts a long one: when the
    whole exceeds ``TEMPLATE_TOKENS + MAX_TOKENS`` tokens, as many characters as the text of the prompt's
    tokens past ``MAX_TOKENS - 2`` (its last token left out) come off the end of the templated text, closing
    ``<|im_end|>`` included; then the tokens are cut to that length."""
    limit = TEMPLATE_TOKENS + MAX_TOKENS
    text = TEMPLATE.format(prompt)
    whole = tok([text]).input_ids[0]
    if len(whole) > limit:
        removed = tok.decode(whole[TEMPLATE_TOKENS:-2][MAX_TOKENS - 2:])
        if removed:
            text = text[:-len(removed)]
    return tok([text], max_length=limit, truncation=True, return_tensors="pt").input_ids


FAMILY = Kandinsky5()
