"""LongCat-Image (Meituan's 6B DiT, text to image and Edit): FLUX.1's transformer on FLUX's VAE latents,
conditioned on Qwen2.5-VL 7B's last hidden state.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``LongCatImageTransformer2DModel`` is FLUX.1's double/single-stream DiT without
  the pooled-text and guidance embedders: it reads FLUX's packed 2x2 patch tokens
  (:func:`nodes.families.flux.pack`), the flow time (0..1) and 3-axis rotary ids. Text token i sits at
  (0, i, i); image patch (r, c) at (1, n + r, n + c), n the prompt's token count (512: the pipeline
  pads every prompt to it; ComfyUI shifts by the conditioning's length, which is the same).
* **Text.** As LongCatImagePipeline.encode_prompt encodes: the prompt's tokens (a quoted span, in ' " ‘’
  or “”, one character at a time, so the model reads each glyph it must draw), cut at 512 and padded to
  512 with attention off on the padding, between the captioning template's prefix and suffix; the
  conditioning is the last hidden state of those 512 positions (padding included, as the pipeline keeps
  it; an empty prompt is 512 padding tokens, as the pipeline's empty negative is, where ComfyUI encodes a
  space). The pipeline's optional prompt rewriting (the LLM writes a longer prompt first) is not done, as
  ComfyUI does not do it. A prompt that starts with ``<|im_start|>`` is its own template: the states
  after its user turn's opening up to its last ``<|im_end|>`` are kept, unpadded.
* **Guidance.** Real CFG (KSampler's ``cfg``: the pipeline's ``guidance_scale``). FluxGuidance on the
  conditioning does nothing (no guidance embedder, as in ComfyUI). The pipeline's ``enable_cfg_renorm``
  rescales the guided velocity per token; ComfyUI's template uses the CFGNorm node instead (which
  rescales the guided denoised image per pixel), so Kiln leaves guidance plain and CFGNorm to its node.
* **Model sampling.** The release's scheduler: FLUX.1 [dev]'s (the shift by image size, base 0.5, max
  1.15 over 256..4096 tokens).
* **Latents.** FLUX's (:data:`nodes.families.flux.FLUX_LATENT`), its VAE FLUX's ``ae.safetensors``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from nodes.families import flux, flux_references
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

LABEL = "LongCat-Image"
PREFIX = ("<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image "
          "content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
EDIT_PREFIX = ("<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the "
               "input image(s). Then, based on the user's editing instructions, clearly and precisely determine how "
               "to modify the given image(s), ensuring that only the specified parts are altered and all other "
               "aspects remain consistent with the original(s).<|im_end|>\n<|im_start|>user\n<|vision_start|>"
               "<|image_pad|><|vision_end|>")
VISION_START = 151652
#: The Edit pipeline's picture area (its output and reference size; the vision tower reads half each side).
EDIT_AREA = 1024 * 1024
#: Prompt tokens the pipeline keeps and pads to (its tokenizer_max_length).
MAX_TOKENS = 512
#: ``<|im_start|>``, ``user``, ``\n`` and ``<|im_end|>``: where a raw template's prompt starts and ends.
USER_TURN = (151644, 872, 198)
IM_END = 151645
#: The quote pairs whose spans are tokenized a character at a time (the pipeline's split_quotation).
QUOTES = (("'", "'"), ('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d"))
_QUOTED = re.compile("|".join(f"{re.escape(a)}[^{re.escape(a + b)}]*?{re.escape(b)}" for a, b in QUOTES))
#: An apostrophe inside a word (don't) opens no quote.
_IN_WORD = re.compile(r"[a-zA-Z]+'[a-zA-Z]+")
_HIDDEN = "\x00"
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential", "prediction_type": "flow"}


def text_ids(tokens: int, device: Any, dtype: Any) -> "Any":
    """Rotary ids [tokens, 3] of the text: (0, i, i)."""
    import torch

    ids = torch.zeros(tokens, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(tokens, dtype=torch.float32)
    return ids.to(device=device, dtype=dtype)


def shifted(ids: "Any", tokens: int) -> "Any":
    """Image ids (index, row, column) moved past the text: index + 1, row and column + ``tokens``."""
    import torch

    return ids + torch.tensor([1.0, tokens, tokens], device=ids.device, dtype=ids.dtype)


class LongCatNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 reference_latents: "flux_references.References | None" = None, **kwargs: Any) -> tuple:
        """``reference_latents``: the Edit model's input picture (its tokens follow the image's, at index 2
        with the ``index`` method, the pipeline's layout; their outputs are dropped)."""
        import torch

        b, _, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL 7B: CLIPLoader type longcat_image")
        n = encoder_hidden_states.shape[1]
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        tokens, ids = flux.pack(x), flux.image_ids(h, w, self.device, torch.float32)
        if reference_latents is not None:
            ref_tokens, ref_ids = flux_references.tokens(reference_latents, (h, w), flux.pack)
            tokens, ids = torch.cat([tokens, ref_tokens.to(tokens.dtype)], dim=1), torch.cat([ids, ref_ids.float()])
        if kwargs:  # a patch or control made for another model (the transformer's forward takes none)
            raise ConditioningError(f"{LABEL}'s transformer takes no {', '.join(sorted(kwargs))}", "positive")
        out = self.transformer(hidden_states=tokens.to(self.dtype), timestep=time.to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                               img_ids=shifted(ids, n), txt_ids=text_ids(n, self.device, torch.float32),
                               return_dict=False)[0]
        return (flux.unpack(out[:, :(h // 2) * (w // 2)], h, w),)


class LongCat(FlowFamily):
    name = "longcat_image"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),)
    clip_types = ("longcat_image",)
    guidance_note = ("LongCat-Image has no distilled guidance (its guidance is real CFG: KSampler's cfg with a "
                     "negative prompt)")
    scheduler = SCHEDULER
    network_class = LongCatNetwork
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
    takes_references = True  # LongCat-Image-Edit reads its input picture's latent

    # -- detection: by the transformer's keys (FlowFamily.claims) ----------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import longcat_keys

        return longcat_keys.is_original(shapes) or longcat_keys.is_diffusers(shapes)

    # -- the network -----------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import longcat_keys

        return longcat_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's names (FLUX's, ComfyUI's LoRAs use them; fused qkv split row-wise)."""
        from nodes.checkpoint import longcat_keys

        return longcat_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The Edit model's reference latents. Conditioning another Qwen family encoded (Qwen-Image's, Krea 2's:
        they mark their prompts with a text mask) has LongCat's width but not its template, padding or
        positions: refused, naming the input it came on."""
        from nodes.families import qwen_image

        for extra in extras:
            if qwen_image.MASK in extra:
                raise ConditioningError("this conditioning was encoded for another model (Qwen-Image's or Krea 2's "
                                        "template); LongCat-Image reads its own: CLIPLoader type longcat_image",
                                        extra.get("_input", "positive"))
        refs = flux_references.for_call(extras, batch, self.latent, device, dtype)
        return {} if refs is None else {"reference_latents": refs}

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    # -- text ------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, 512, width]: Qwen2.5-VL's last hidden state of the prompt's padded block (module
        docstring). ComfyUI's weight syntax is not read (ComfyUI's LongCat tokenizer reads the text as written)."""
        text = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]

        def build(lm: Any) -> tuple[dict[str, Any], slice]:
            ids, mask, keep = prompt_inputs(tok, text)
            return {"input_ids": ids, "attention_mask": mask}, keep

        return conditioning(clip, build, report)


def conditioning(clip: Any, build: Callable[[Any], tuple[dict[str, Any], slice]], report: Any = None,
                 parts: tuple[str, ...] = ()) -> list:
    """The CONDITIONING from ``build(encoder) -> (its inputs, the positions kept)``: the encoder's last
    hidden state there (``parts``: the vision tower, for a picture: the first such use loads it)."""
    import torch

    with torch.inference_mode(), clip.encoder("text_encoder", parts) as lm:
        device = next(lm.parameters()).device
        inputs, keep = build(lm)
        states = lm(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).last_hidden_state
    states = states[:, keep]
    if report is not None:
        report.tokens = max(report.tokens, int(states.shape[1]))
        report.windows = 1
    return [[states.to("cpu", torch.float32), {}]]


def edit_sizes(width: int, height: int, area: int | None = None) -> tuple[int, int]:
    """LongCatImageEditPipeline's output (and reference) size for a ``width`` x ``height`` picture: about
    ``area`` pixels (:data:`EDIT_AREA`) at its ratio, each side rounded up to a multiple of 16."""
    import math

    ratio = width / height
    w = math.sqrt((area or EDIT_AREA) * ratio)
    h = w / ratio
    return int(math.ceil(w / 16) * 16), int(math.ceil(h / 16) * 16)


def edit_pictures(picture: Any) -> tuple[Any, Any]:
    """(the picture the VAE encodes, the one the vision tower reads) of a PIL ``picture``, as the Edit
    pipeline sizes them: :func:`edit_sizes`, then half of each side, both with Lanczos."""
    from PIL import Image

    w, h = edit_sizes(picture.width, picture.height)
    full = picture.resize((w, h), resample=Image.LANCZOS)
    return full, full.resize((w // 2, h // 2), resample=Image.LANCZOS)


def encode_picture(clip: Any, prompt: str, picture: Any) -> list:
    """CONDITIONING of the Edit model: the editing template with the PIL ``picture`` (already sized:
    :func:`edit_pictures`) read by Qwen2.5-VL's vision tower, then the padded prompt; the states from the
    picture's ``<|vision_start|>`` on are kept (LongCatImageEditPipeline's encoding)."""
    from nodes.checkpoint.qwen_vision import TOWER
    from nodes.families import qwen_image_edit

    tok = clip.tokenizers["tokenizer"]

    def build(vl: Any) -> tuple[dict[str, Any], slice]:
        if getattr(vl, "visual", None) is None:
            raise ConditioningError("this Qwen2.5-VL text encoder has no vision tower (its file has no visual.* "
                                    "weights); LongCat-Image-Edit reads the picture with it: load the full "
                                    "qwen_2.5_vl_7b*.safetensors", "clip")
        vision = qwen_image_edit.vision_inputs([picture])
        prefix = qwen_image_edit.expand_pads(EDIT_PREFIX, vision["image_grid_thw"],
                                             vl.config.vision_config.spatial_merge_size)
        ids, mask, keep = prompt_inputs(tok, prompt, prefix)
        return {"input_ids": ids, "attention_mask": mask, **vision}, keep

    return conditioning(clip, build, parts=(TOWER,))


def split_quoted(text: str) -> list[tuple[str, bool]]:
    """``text`` in order as (piece, quoted) pairs: a quoted span keeps its quote marks; an apostrophe
    between letters (don't) opens none."""
    hidden = _IN_WORD.sub(lambda m: m.group(0).replace("'", _HIDDEN), text)
    out, at = [], 0
    for m in _QUOTED.finditer(hidden):
        if m.start() > at:
            out.append((hidden[at:m.start()], False))
        out.append((m.group(0), True))
        at = m.end()
    if at < len(hidden):
        out.append((hidden[at:], False))
    return [(piece.replace(_HIDDEN, "'"), quoted) for piece, quoted in out]


def prompt_tokens(tok: Any, text: str) -> list[int]:
    """The prompt's token ids: quoted spans a character at a time, cut at :data:`MAX_TOKENS`."""
    ids: list[int] = []
    for piece, quoted in split_quoted(text):
        for part in (piece if quoted else [piece]):
            ids += tok(part, add_special_tokens=False)["input_ids"]
    return ids[:MAX_TOKENS]


def prompt_inputs(tok: Any, text: str, prefix: str = PREFIX) -> tuple["Any", "Any", slice]:
    """(input_ids [1, n], attention_mask [1, n], the positions kept) for ``text``: ``prefix``, the prompt's
    tokens padded to 512 (attention off on the padding), the suffix; or a raw template as written. The
    positions kept: from the prefix's ``<|vision_start|>`` if it has one (the Edit template keeps the
    picture's states), else after the prefix, to the suffix."""
    import torch

    if text.startswith("<|im_start|>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), raw_span(ids)
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    tail = tok(SUFFIX, add_special_tokens=False)["input_ids"]
    body = prompt_tokens(tok, text)
    pad = MAX_TOKENS - len(body)
    ids = head + body + [tok.pad_token_id] * pad + tail
    mask = [1] * (len(head) + len(body)) + [0] * pad + [1] * len(tail)
    start = head.index(VISION_START) if VISION_START in head else len(head)
    return torch.tensor([ids]), torch.tensor([mask]), slice(start, len(head) + MAX_TOKENS)


def raw_span(ids: list[int]) -> slice:
    """A raw template's prompt: after its last ``<|im_start|>user\\n`` up to its last ``<|im_end|>``."""
    starts = [i + 3 for i in range(len(ids) - 2) if tuple(ids[i:i + 3]) == USER_TURN]
    if not starts:
        raise ConditioningError("a prompt that brings its own chat template must have a user turn "
                                "('<|im_start|>user\\n'): LongCat-Image conditions on what follows it", "text")
    ends = [i for i in range(starts[-1], len(ids)) if ids[i] == IM_END]
    return slice(starts[-1], ends[-1] if ends else len(ids))


FAMILY = LongCat()
