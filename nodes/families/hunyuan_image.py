"""HunyuanImage 2.1 (Tencent's 17B text-to-image DiT): flow matching on a 64-channel, 32x-compressed VAE
latent, conditioned on Qwen2.5-VL 7B and, for quoted text, ByT5.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``HunyuanImageTransformer2DModel`` (HunyuanVideo's double and single stream
  blocks, 1x1 patches, 2-D rotary positions on the image tokens only) reads the latent as is, the flow time
  in 1000ths (``sigma * 1000``, what the pipeline passes), the Qwen states through its token refiner and the
  ByT5 states through its glyph projection; it puts the valid ByT5 tokens before the valid Qwen ones.
  :class:`HunyuanImageNetwork` hands it both with all-ones masks.
* **Text.** As ``HunyuanImagePipeline.encode_prompt``: the prompt in the pipeline's template
  (:data:`TEMPLATE`), Qwen2.5-VL's hidden state two layers before the last (``hidden_states[-3]``), the
  template's first 34 tokens dropped, at most 1000 prompt tokens. The pipeline pads to 1000 and masks the
  padding; a masked token changes nothing the image tokens see (the refiner pools and attends over the
  mask), so Kiln keeps only the prompt's tokens. The quoted parts of the prompt (single, double and
  Chinese quotes: :func:`glyph_text`) are written ``Text "..."``, joined with ``". "``, and encoded by ByT5
  (128 bytes, padded and masked, the valid tokens kept: :data:`BYT5`); a prompt without quotes has none,
  which the pipeline gives as all-masked zeros, so none is passed.
* **Guidance.** Real CFG: KSampler's ``cfg`` is the pipeline's classifier-free guidance scale (its default
  guider, AdaptiveProjectedMixGuidance, is plain CFG when its adaptive projection is off, as in the parity
  test). The guidance-distilled model's embedder reads the conditioning's ``guidance`` (FluxGuidance) in
  1000ths as the pipeline's ``distilled_guidance_scale``. Its MeanFlow second time input ``timestep_r`` is
  the step's end, the next timestep of the sampler's schedule (0 at the last step), as the pipeline passes
  it: the denoiser finds it on the plan's sigmas for any sampler node (``reads_next_sigma``,
  nodes.samplers.schedules.next_sigma).
* **Model sampling.** FlowMatchEuler at a constant shift of :data:`SHIFT` on the pipeline's grid
  (``linspace(1, 0, N + 1)[:-1]``, shifted: Kiln's default flow grid).
* **Latents.** 64 channels, 32 pixels a cell, model = raw * 0.75289 (the VAE's ``scaling_factor``; no
  shift), as the pipeline decodes (``latents / scaling_factor``).
"""
from __future__ import annotations

import re
from typing import Any

from nodes.families.base import ConditioningError, FlowFamily, LatentFormat, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.families.text import without_logits
from nodes.runtime import precision

LABEL = "HunyuanImage 2.1"
#: HunyuanImagePipeline's template and the tokens it drops from the front (``prompt_template_encode_start_idx``).
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>")
TEMPLATE_TOKENS = 34
#: Prompt tokens the pipeline keeps (``tokenizer_max_length``) and ByT5 bytes (``tokenizer_2_max_length``).
MAX_TOKENS = 1000
BYT5_TOKENS = 128
#: Qwen2.5-VL's hidden state the pipeline reads (``hidden_states[-(hidden_state_skip_layer + 1)]``).
TEXT_LAYER = -3
#: The conditioning key of the glyph text's ByT5 states ([1, tokens, 1472]; absent: no quoted text).
BYT5 = "hunyuan_byt5"
#: HunyuanImageRefinerPipeline's template, the tokens it drops and the prompt tokens it keeps: the refiner
#: (nodes.families.hunyuan_image_refiner) was trained on them, where ComfyUI hands it the base template's.
REFINER_TEMPLATE = ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, "
                    "size, texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
REFINER_TEMPLATE_TOKENS = 36
REFINER_MAX_TOKENS = 256
#: The conditioning key of the prompt's states in the refiner's template ([1, tokens, width]), which
#: HunyuanRefinerLatent puts in place of the base template's.
REFINER_TEXT = "hunyuan_refiner_text"
#: The flow shift of HunyuanImage 2.1's base model (its release's sampling default).
SHIFT = 5.0
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "prediction_type": "flow"}
#: The latent: 64 channels, the VAE's scaling factor, 32 pixels a cell.
HUNYUAN_IMAGE_LATENT = LatentFormat(channels=64, scale=0.75289, shift=0.0, downscale=32)
#: The default distilled guidance (the distilled model's release default, 3.25), for a prompt without one.
DEFAULT_GUIDANCE = 3.25


def glyph_text(prompt: str) -> str | None:
    """The pipeline's glyph text: every quoted span (single, then double, then Chinese single and double
    quotes) as ``Text "span"``, joined with ``". "`` and ending ``". "``; None without quotes."""
    found = []
    for pattern in (r"\'(.*?)\'", r"\"(.*?)\"", r"‘(.*?)’", r"“(.*?)”"):
        found.extend(re.findall(pattern, prompt))
    return ". ".join(f'Text "{text}"' for text in found) + ". " if found else None


class HunyuanImageNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.text_embed_dim)

    @property
    def reads_next_sigma(self) -> bool:
        """The distilled model's MeanFlow embedder (``time_r_in``) reads the step's end."""
        return bool(getattr(self.transformer.config, "use_meanflow", False))

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 byt5: "Any" = None, byt5_mask: "Any" = None, guidance: "Any" = None,
                 sigma_next: float | None = None, **kwargs: Any) -> tuple:
        """``byt5``/``byt5_mask``: [B, tokens, width] / [B, tokens] of the rows' glyph text (padding masked),
        or None when no row has one (:meth:`HunyuanImage.network_kwargs`). ``sigma_next``: the noise level
        the step heads for, the MeanFlow model's ``timestep_r`` in 1000ths as the pipeline passes the next
        timestep (0 at the last step); None (no schedule known, e.g. a direct call) passes none."""
        import torch

        b = x.shape[0]
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL 7B and ByT5: DualCLIPLoader type hunyuan_image")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        states = encoder_hidden_states.to(self.device, self.dtype)
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=self.device)
        extra: dict[str, Any] = {}
        if byt5 is not None and self.transformer.context_embedder_2 is not None:
            extra = {"encoder_hidden_states_2": byt5.to(self.device, self.dtype),
                     "encoder_attention_mask_2": byt5_mask.to(self.device)}
        if sigma_next is not None and self.reads_next_sigma:
            extra["timestep_r"] = torch.full((b,), float(sigma_next) * 1000.0, dtype=torch.float32,
                                             device=self.device).to(self.dtype)
        if self.transformer.config.guidance_embeds:
            extra["guidance"] = (guidance if guidance is not None else torch.full((b,), DEFAULT_GUIDANCE)) \
                .to(self.device, self.dtype) * 1000.0
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=time.to(self.dtype),
                               encoder_hidden_states=states, encoder_attention_mask=mask, return_dict=False,
                               **extra, **kwargs)
        return (out[0],)


def qwen_states(tok: Any, lm: Any, prompt: str, template: str, drop: int, max_tokens: int) -> "Any":
    """Qwen2.5-VL's (``lm``, open) hidden state :data:`TEXT_LAYER` of ``prompt`` in ``template``, the template's
    first ``drop`` tokens dropped, at most ``max_tokens`` prompt tokens kept ([1, tokens, width] float32 on the
    CPU): the pipelines' ``_get_qwen_prompt_embeds`` without the padding it masks."""
    import torch

    got = tok([template.format(prompt)], max_length=max_tokens + drop, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = lm(input_ids=got.input_ids.to(lm.device), attention_mask=got.attention_mask.to(lm.device),
                 output_hidden_states=True, **without_logits(lm))
        return out.hidden_states[TEXT_LAYER][:, drop:].to("cpu", torch.float32)


class HunyuanImage(FlowFamily):
    name = "hunyuan_image"
    #: The prompt template, the tokens it drops from the front and the prompt tokens kept (the refiner
    #: has its own: nodes.families.hunyuan_image_refiner); whether quoted text goes to ByT5.
    template, template_tokens, max_tokens, reads_glyphs = TEMPLATE, TEMPLATE_TOKENS, MAX_TOKENS, True
    #: Whether a prompt is also encoded in the refiner's template (:data:`REFINER_TEXT`): the CLIP of type
    #: hunyuan_image serves both models, and which one samples is not known when the prompt is encoded.
    encodes_for_refiner = True
    #: The ByT5 bytes the pipeline encodes (padded, masked) and the DualCLIPLoader type its messages name;
    #: HunyuanVideo 1.5 (nodes.families.hunyuan_video15) reads the same encoders with its own values.
    byt5_tokens, clip_type, label = BYT5_TOKENS, "hunyuan_image", LABEL
    inference_dtypes = precision.NO_FP16
    latent = HUNYUAN_IMAGE_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),
                     TextEncoderSpec("text_encoder_2", "tokenizer_2", "byt5", ""))
    clip_types = ("hunyuan_image",)
    scheduler = SCHEDULER
    network_class = HunyuanImageNetwork
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}

    def claims_unet(self, shapes: Shapes) -> bool:
        """The text-to-image transformer (2-D patches); the refiner's 3-D ones are its own family's."""
        from nodes.checkpoint import hunyuan_image_load

        return hunyuan_image_load.has_transformer(shapes) and not hunyuan_image_load.is_refiner(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import hunyuan_image_keys

        return hunyuan_image_keys.original_names([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The rows' ByT5 states, padded to the longest with the padding masked (the transformer moves masked
        tokens behind the valid ones and never attends to them); none when no row has quoted text. The
        distilled model's guidance values, one per row."""
        import torch

        kwargs: dict[str, Any] = {"guidance": torch.tensor(
            [float(extra.get("guidance") or DEFAULT_GUIDANCE) for extra in extras for _ in range(batch)])}
        states = [extra.get(BYT5) for extra in extras]
        if all(s is None for s in states):
            return kwargs
        width = next(s for s in states if s is not None).shape[-1]
        longest = max(1, *(0 if s is None else s.shape[1] for s in states))
        rows, masks = [], []
        for s in states:
            n = 0 if s is None else s.shape[1]
            row = torch.zeros(1, longest, width)
            if n:
                row[:, :n] = s.reshape(1, n, width)
            mask = torch.zeros(1, longest, dtype=torch.long)
            mask[:, :n] = 1
            rows.append(row.expand(batch, -1, -1))
            masks.append(mask.expand(batch, -1))
        return kwargs | {"byt5": torch.cat(rows).to(device=device, dtype=dtype),
                         "byt5_mask": torch.cat(masks).to(device=device)}

    def glyphs(self, prompt: str) -> str | None:
        """The prompt's glyph text for ByT5 (:func:`glyph_text`), None without quoted text."""
        return glyph_text(prompt)

    def prompt_text(self, prompt: str) -> str:
        """The prompt as the template takes it (as written here)."""
        return prompt

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, Qwen width] with the glyph text's ByT5 states under :data:`BYT5` (module
        docstring) and the refiner template's states under :data:`REFINER_TEXT` (a second pass of the
        encoder, so the refiner gets the text it was trained on). ComfyUI's weight syntax is not read: the
        text is encoded as written."""
        import torch

        texts = texts or {}
        prompt, glyph_source = texts.get("tokenizer", text), texts.get("tokenizer_2", text)
        tok = clip.tokenizers["tokenizer"]
        extra: dict[str, Any] = {}
        with clip.encoder("text_encoder") as lm:
            states = qwen_states(tok, lm, self.prompt_text(prompt), self.template, self.template_tokens,
                                 self.max_tokens)
            if self.encodes_for_refiner:
                extra[REFINER_TEXT] = qwen_states(tok, lm, prompt, REFINER_TEMPLATE, REFINER_TEMPLATE_TOKENS,
                                                  REFINER_MAX_TOKENS)
        with torch.inference_mode():
            glyph = self.glyphs(glyph_source) if self.reads_glyphs else None
            if glyph is not None:
                byt5_tok = clip.tokenizers.get("tokenizer_2")
                if byt5_tok is None:
                    raise ConditioningError(f"{self.label} needs ByT5 for the prompt's quoted text (DualCLIPLoader "
                                            f"type {self.clip_type} with qwen_2.5_vl_7b and byt5_small_glyphxl)",
                                            "clip")
                ids = byt5_tok(glyph, padding="max_length", max_length=self.byt5_tokens, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
                with clip.encoder("text_encoder_2") as te:
                    glyph_states = te(input_ids=ids.input_ids.to(te.device),
                                      attention_mask=ids.attention_mask.float().to(te.device))[0]
                valid = ids.attention_mask[0].bool()
                extra[BYT5] = glyph_states[:, valid.to(glyph_states.device)].to("cpu", torch.float32)
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), extra]]


FAMILY = HunyuanImage()
