"""Bria FIBO 2 (Fibo 2.0 dev / edit turbo): an 8B flow-matching DiT on FLUX.2's VAE latents, reading
structured JSON captions through six bundles of Qwen3-VL 4B hidden layers.

What it shares and what differs, and where it lives:

* **Latents.** FLUX.2's (:data:`nodes.families.flux2.FLUX2_LATENT`): the VAE's 32 channels in 2x2
  patches, 128 channels at 1/16, normalised by the VAE's batch-norm statistics inside Kiln's FLUX.2
  VAE. BriaFibo2Pipeline normalises in the same patch space, so its 32-channel latent at 1/8 is the
  same numbers unpatched; :class:`Fibo2Network` unpatches for diffusers' transformer and patches its
  output back (the transformer's own 2x2 tokens are then the 128 channels of one latent pixel).
* **Network.** diffusers' ``BriaFibo2Transformer2DModel``: a noise refiner, a Perceiver that squeezes
  the first text bundle into 256..512 "gist" tokens (the count grows with the prompt's token count),
  then Z-Image-style blocks over gist + image tokens, five of which cross-attend to their own bundle.
  Kiln's CONDITIONING is 3-D: the six bundles flattened into the width (bundle-major), unflattened
  by the network. The gist count depends on the prompt's length and padding would change it, so a
  positive and negative of other lengths are evaluated apart (the pipeline runs them as two passes).
* **Text.** As BriaFibo2Pipeline encodes: a JSON caption cleaned the way training cleaned captions
  (empty values, ``aesthetic_score`` / ``preference_score`` dropped) and serialised compactly; the
  chat turn ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``; Qwen3-VL's hidden
  states, each tapped layer scaled to unit RMS per token in float32, three layers per bundle
  (:data:`BUNDLES`). A caption's ``text_render`` entries are encoded without the pictures of their
  text (the pipeline's ``render_text_images=False``): Kiln loads Qwen3-VL without its vision tower.
  The pipeline cleans the prompt but encodes its ``negative_prompt`` as written; CLIPTextEncode cannot
  tell a negative from a prompt and cleans any JSON caption, TextEncodeFibo2's negative is as written.
* **Guidance.** Real CFG (KSampler's ``cfg`` is the pipeline's ``guidance_scale``); the pipeline's
  default negative is the empty structured caption (:data:`NULL_CAPTION`), which TextEncodeFibo2 uses
  for an empty ``negative_prompt``. Edit turbo runs cfg 1.
* **Model sampling.** FlowMatchEuler over ``linspace(1, 1/N, N)`` shifted by ``mu`` linear in the
  token count (FLUX's 0.5..1.15 over 256..4096 tokens, Bria's FIBO scheduler config), where a token is
  one pixel of the 128-channel latent (:data:`SCHEDULER`, ``kiln_mu_rule`` "per_pixel").
* **Editing** reads the pictures with Qwen3-VL's vision tower (each is a vision marker in the prompt)
  besides their VAE latents; Kiln refuses pictures by input name (:data:`NO_PICTURES`).
"""
from __future__ import annotations

import json
import math
from typing import Any

from nodes.families import flux2
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.families.text import without_logits
from nodes.runtime import precision

LABEL = "FIBO 2"
#: Qwen3-VL ``hidden_states`` indices behind the transformer's six text inputs: the Perceiver's, then
#: one per injection block (BriaFibo2Pipeline's ``TEXT_ENCODER_OUT_LAYERS``).
BUNDLES = ((9, 20, 31), (5, 16, 27), (7, 18, 29), (9, 20, 31), (11, 22, 33), (13, 24, 35))
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 4096
#: The empty structured caption FIBO 2 was trained with as the unconditional prompt.
NULL_CAPTION = ('{"short_description":"","objects":[],"background_setting":"","lighting":{},"aesthetics":{},'
                '"photographic_characteristics":{},"style_medium":"","context":"","artistic_style":""}')
SCORES = ("aesthetic_score", "preference_score")
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential", "prediction_type": "flow",
             "kiln_mu_rule": "per_pixel"}
NO_PICTURES = ("FIBO 2 edits read each picture with Qwen3-VL's vision tower, which Kiln does not load (Qwen3-VL "
               "is read as a text model): editing is not supported yet; leave the images unlinked for "
               "text-to-image")


def _empty(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, (str, dict, list)) and not value)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _clean(v)) for k, v in value.items()) if not _empty(v)}
    if isinstance(value, list):
        return [v for v in map(_clean, value) if not _empty(v)]
    return value


def caption_text(prompt: str) -> str:
    """A generation prompt as the pipeline encodes it: a JSON object is a caption, cleaned as training
    cleaned captions and serialised compactly (an ``edit_instruction`` is dropped, a
    ``structured_caption`` key stands for the caption); anything else is encoded as written."""
    try:
        caption = json.loads(prompt)
    except json.JSONDecodeError:
        return prompt
    if not isinstance(caption, dict):
        return prompt
    caption.pop("edit_instruction", None)
    if "structured_caption" in caption:
        caption = caption.pop("structured_caption")
        if not isinstance(caption, dict):  # a short description stays in the prompt as written
            if isinstance(caption, str) and caption:
                return prompt
            return json.dumps(caption or {}, separators=(",", ":"), ensure_ascii=False)
    keys = set(caption)
    cleaned = {key: ({k: v for k, v in value.items() if k not in SCORES} if isinstance(value, dict) else value)
               for key, value in _clean(caption).items() if key not in SCORES}
    cleaned = {k: v for k, v in cleaned.items() if v != {}}
    if keys == {"short_description", "text_render"}:  # kept whole, the list even empty: "no text"
        cleaned = {"short_description": cleaned.get("short_description") or "",
                   "text_render": cleaned.get("text_render") or []}
    return json.dumps(cleaned, separators=(",", ":"), ensure_ascii=False)


def unpatch(x: "Any") -> "Any":
    """[B, 4C, h, w] (2x2 patches, channel-major) -> [B, C, 2h, 2w]."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def patch(x: "Any") -> "Any":
    """[B, C, 2h, 2w] -> [B, 4C, h, w], the inverse of :func:`unpatch`."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


class Fibo2Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def bundle_width(self) -> int:
        return int(self.transformer.config.cap_feat_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        check_text_width(LABEL, encoder_hidden_states.shape[-1], len(BUNDLES) * self.bundle_width,
                         "encode the prompt with Qwen3-VL 4B: CLIPLoader type fibo2")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        tokens = encoder_hidden_states.shape[1]
        text = encoder_hidden_states.reshape(b, tokens, len(BUNDLES), -1).transpose(1, 2).to(self.device, self.dtype)
        out = self.transformer(hidden_states=unpatch(x).to(self.dtype), timestep=time, encoder_hidden_states=text,
                               return_dict=False, **kwargs)[0]
        return (patch(out),)


class Fibo2(FlowFamily):
    name = "fibo2"
    inference_dtypes = precision.NO_FP16
    latent = flux2.FLUX2_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("fibo2",)
    guidance_note = "FIBO 2 has no distilled guidance (dev runs real CFG, edit turbo cfg 1)"
    scheduler = SCHEDULER
    network_class = Fibo2Network
    dit_block_lists = {"single": "layers"}
    #: A Qwen3-VL file without its vision tower has a Qwen3's keys: under type fibo2 it is read as Qwen3-VL.
    text_kind_aliases = {"qwen3": "qwen3-vl"}

    # detection: by the transformer's keys (FlowFamily.claims and claims_folder)

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import fibo2_keys

        return fibo2_keys.is_original(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        """FIBO 2's files hold diffusers' names: each parameter's own (LoRAs for it use them too, under
        ``diffusion_model.``, ``transformer.`` or kohya's underscores; nodes.lora_keys reads those)."""
        return {name: name for name, _ in network.named_parameters()}

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, 6 x 3 x width] of a generation prompt (a JSON caption cleaned first:
        :func:`caption_text`); :func:`encode_raw` for the rest."""
        text = (texts or {}).get("tokenizer", text)
        return encode_raw(clip, caption_text(text), report)


def encode_raw(clip: Any, text: str, report: Any = None) -> list:
    """CONDITIONING of ``text`` as written in the chat turn: the six bundles of RMS-normalised
    Qwen3-VL layers per token (module docstring), flattened bundle-major into the width."""
    import torch

    from nodes.runtime.fp8 import compute_dtype

    tok = clip.tokenizers["tokenizer"]
    ids = tok([TEMPLATE.format(text)], truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids
    deepest = max(max(b) for b in BUNDLES)
    with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
        layers = int(qwen.config.num_hidden_layers)
        if layers < deepest:
            raise ConditioningError(f"FIBO 2 reads Qwen3-VL's layers up to {deepest} but this text encoder has "
                                    f"{layers} (load qwen3vl_4b*.safetensors with CLIPLoader type fibo2)", "clip")
        device = next(qwen.parameters()).device
        out = qwen(input_ids=ids.to(device), output_hidden_states=True, use_cache=False, **without_logits(qwen))
        dtype = compute_dtype(qwen)
        normed = {}
        for k in sorted({k for b in BUNDLES for k in b}):
            s = out.hidden_states[k].float()
            normed[k] = (s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).to(dtype)
        states = torch.stack([torch.cat([normed[k] for k in b], dim=-1) for b in BUNDLES], dim=1)
    states = states.transpose(1, 2).reshape(1, ids.shape[1], -1)
    if report is not None:
        report.tokens = max(report.tokens, int(states.shape[1]))
        report.windows = 1
    return [[states.to("cpu", torch.float32), {}]]


FAMILY = Fibo2()
