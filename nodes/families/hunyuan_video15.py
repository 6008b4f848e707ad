"""HunyuanVideo 1.5 (Tencent's 8.3B video DiT) making pictures, one frame at a time; xgen-universe's Capybara is
a checkpoint of it (ComfyUI's Image_capybara_v0_1 templates load capybara_v0.1.safetensors through UNETLoader).

What it shares with HunyuanImage 2.1 (nodes.families.hunyuan_image, whose family this one extends) and what
differs, from diffusers' ``HunyuanVideo15Pipeline`` and ComfyUI's HunyuanVideo15 model:

* **Network.** diffusers' ``HunyuanVideo15Transformer3DModel`` (54 double-stream blocks, no single ones,
  1x1x1 patches, 3-D rotary positions) reads 65 channels: the noisy latent, a conditioning latent (zeros
  for text to image) and a one-channel mask (zeros), on one frame. Its context is the Qwen tokens through
  the token refiner, the ByT5 glyph tokens and SigLIP image tokens (the image-to-video input; text to image
  passes all-zero image states, which the transformer masks out), each with its ``cond_type_embed`` row;
  valid tokens go first and masked ones never reach a valid token. :class:`HunyuanVideo15Network` hands it
  only valid tokens (no image tokens, no masked padding): the same valid tokens see the same valid tokens,
  so the result is the pipeline's. The time is ``sigma * 1000``, as the pipeline passes its timesteps.
* **Text.** As ``HunyuanVideo15Pipeline.encode_prompt``: the prompt (an empty one as ``" "``) as the user
  turn under the pipeline's system message in Qwen2.5's chat layout with the assistant turn opened
  (:data:`TEMPLATE`), Qwen2.5-VL's ``hidden_states[-3]``, the first :data:`TEMPLATE_TOKENS` (108) tokens
  dropped, at most 1000 prompt tokens, the padding the pipeline masks left out. Glyph text: the prompt's
  double-quoted spans (ASCII and Chinese quotes, repeats dropped), ``Text "..."`` joined with ``". "``
  (:func:`glyph_text`), 256 ByT5 bytes with the padding left out; none without quotes.
* **A picture to edit** (HunyuanVideo15ImageToVideo, nodes.hunyuan_video15_nodes; the Capybara image-edit
  template): ComfyUI's model puts the picture's latent (model space: x 1.03682) and ``1 - concat_mask`` (1 on the
  picture's frame) in the conditioning channels and CLIPVisionEncode's SigLIP ``last_hidden_state`` in the image
  states; ``HunyuanVideo15ImageToVideoPipeline`` does the same (its VAE mean x ``scaling_factor``, mask 1 on the
  first frame, SiglipVisionModel's ``last_hidden_state``): :meth:`HunyuanVideo15.extra_channels`,
  :meth:`HunyuanVideo15.network_kwargs`.
* **Guidance.** Real CFG (the pipeline's ClassifierFreeGuidance; the CFGGuider's ``cfg``); no distilled
  guidance input.
* **Model sampling.** FlowMatchEuler on the pipeline's grid (``linspace(1, 0, N + 1)[:-1]``, shifted): the
  shift is ComfyUI's default for HunyuanVideo15, :data:`SHIFT`; the templates set theirs with
  ModelSamplingSD3.
* **Latents.** 32 channels, 16 pixels a cell, one frame; model = raw * 1.03682 (the VAE's
  ``scaling_factor``, ComfyUI's latent format), as the pipeline decodes ``latents / scaling_factor``.
* **dtypes.** ComfyUI's ``supported_inference_dtypes`` for HunyuanVideo15: fp16, bf16, fp32.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.families.base import ConditioningError, LatentFormat, Shapes, TextEncoderSpec
from nodes.families.hunyuan_image import BYT5, HunyuanImage, HunyuanImageNetwork
from nodes.families.input_checks import check_text_width
from nodes.runtime import precision

LABEL = "HunyuanVideo 1.5"
#: HunyuanVideo15Pipeline's system message (``system_message``, its line breaks' indentation included).
SYSTEM = ("You are a helpful assistant. Describe the video by detailing the following aspects:         "
          "1. The main content and theme of the video.         "
          "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
          "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
          "4. background environment, light, style and atmosphere.         "
          "5. camera angles, movements, and transitions used in the video.")
#: The chat the pipeline builds (system, user, the assistant's turn opened) in Qwen2.5's layout.
TEMPLATE = ("<|im_start|>system\n" + SYSTEM.replace("{", "{{").replace("}", "}}")
            + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
#: Tokens dropped from the front (``prompt_template_encode_start_idx``), prompt tokens kept
#: (``tokenizer_max_length``) and ByT5 bytes (``tokenizer_2_max_length``).
TEMPLATE_TOKENS, MAX_TOKENS, BYT5_TOKENS = 108, 1000, 256
#: ComfyUI's default flow shift for HunyuanVideo15 (its model sampling; ModelSamplingSD3 sets another).
SHIFT = 7.0
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "prediction_type": "flow"}
HUNYUAN_VIDEO15_LATENT = LatentFormat(channels=32, scale=1.03682, shift=0.0, downscale=16)
#: Conditioning keys HunyuanVideo15ImageToVideo sets: the picture's raw latent [1, 32, h, w], ComfyUI's
#: ``concat_mask`` [1, 1, h, w] (0 where the picture is given) and the CLIP vision output.
CONCAT_LATENT, CONCAT_MASK, CLIP_VISION = "hv15_concat_latent", "hv15_concat_mask", "hv15_clip_vision"


def glyph_text(prompt: str) -> str | None:
    """HunyuanVideo15Pipeline's glyph text: the double-quoted spans (``"..."`` and ``“...”``) in order, repeats
    dropped when there are several, as ``Text "span"`` joined with ``". "`` and ending ``". "``; None
    without quotes."""
    found = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", prompt)]
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    return ". ".join(f'Text "{text}"' for text in found) + ". " if found else None


class HunyuanVideo15Network(HunyuanImageNetwork):
    """The transformer behind the UNet calling convention, on one frame (see the module docstring)."""

    @property
    def reads_next_sigma(self) -> bool:
        return False

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 byt5: "Any" = None, byt5_mask: "Any" = None, image_embeds: "Any" = None, **kwargs: Any) -> tuple:
        """``x`` [B, 32, h, w], or [B, 65, h, w] with the conditioning latent and mask channel appended
        (:meth:`HunyuanVideo15.extra_channels`; absent: zeros, text to image); ``byt5``/``byt5_mask`` as
        HunyuanImage's (None: no row has glyph text); ``image_embeds`` [B, tokens, width]: the SigLIP states
        (None: none). Other keywords (the distilled guidance HunyuanImage's rows carry) are not read."""
        import torch

        b, _, h, w = x.shape
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL 7B and ByT5: DualCLIPLoader type hunyuan_video_15")
        config = self.transformer.config
        cond = torch.zeros(b, config.in_channels - x.shape[1], h, w)
        hidden = torch.cat([x.to(self.device, self.dtype), cond.to(self.device, self.dtype)], dim=1).unsqueeze(2)
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        states = encoder_hidden_states.to(self.device, self.dtype)
        if byt5 is None:  # no glyph tokens at all: none valid
            byt5 = torch.zeros(b, 0, config.text_embed_2_dim)
            byt5_mask = torch.zeros(b, 0, dtype=torch.long)
        out = self.transformer(
            hidden_states=hidden, timestep=time.to(self.dtype), encoder_hidden_states=states,
            encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long, device=self.device),
            encoder_hidden_states_2=byt5.to(self.device, self.dtype),
            encoder_attention_mask_2=byt5_mask.to(self.device),
            image_embeds=(torch.zeros(b, 0, config.image_embed_dim) if image_embeds is None else image_embeds).to(
                self.device, self.dtype),
            return_dict=False)
        return (out[0][:, :, 0],)


class HunyuanVideo15(HunyuanImage):
    name = "hunyuan_video15"
    label, clip_type = LABEL, "hunyuan_video_15"
    template, template_tokens, max_tokens, byt5_tokens = TEMPLATE, TEMPLATE_TOKENS, MAX_TOKENS, BYT5_TOKENS
    reads_glyphs, encodes_for_refiner = True, False
    inference_dtypes = precision.DEFAULT_PREFERENCE
    latent = HUNYUAN_VIDEO15_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),
                     TextEncoderSpec("text_encoder_2", "tokenizer_2", "byt5", ""))
    clip_types = ("hunyuan_video_15",)
    scheduler = SCHEDULER
    network_class = HunyuanVideo15Network
    dit_block_lists = {"double": "transformer_blocks"}

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import hunyuan_video15_load

        return hunyuan_video15_load.has_transformer(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import hunyuan_video15_keys

        return hunyuan_video15_keys.original_names([name for name, _ in network.named_parameters()])

    def glyphs(self, prompt: str) -> str | None:
        return glyph_text(prompt)

    def prompt_text(self, prompt: str) -> str:
        """The pipeline's user turn: an empty prompt is a space."""
        return prompt if prompt else " "

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The rows' ByT5 states (HunyuanImage's rule), without its distilled guidance; the SigLIP
        ``last_hidden_state`` of HunyuanVideo15ImageToVideo's clip_vision_output, on every row or none."""
        import torch

        kwargs = super().network_kwargs(extras, batch, image_size, device, dtype)
        kwargs.pop("guidance", None)
        outputs = [e.get(CLIP_VISION) for e in extras]
        if all(o is None for o in outputs):
            return kwargs
        if any(o is None for o in outputs):
            raise ConditioningError("both prompts need HunyuanVideo15ImageToVideo's clip_vision_output (connect "
                                    "both through it)", "negative")
        states = [o.last_hidden_state.float() for o in outputs]
        if len({s.shape[1:] for s in states}) > 1:
            raise ConditioningError("the prompts carry CLIP vision states of other sizes; give both the same "
                                    "clip_vision_output", "negative")
        kwargs["image_embeds"] = torch.cat([s[:1].expand(batch, -1, -1) for s in states]).to(device, dtype)
        return kwargs

    def extra_channels(self, x: "Any", conditioning_extras: list[dict]) -> "Any":
        """The noisy latent, then per conditioning the picture's latent in model space and ``1 -
        concat_mask`` (HunyuanVideo15ImageToVideo's; zeros for a conditioning without them), when any
        conditioning has a picture; else the latent alone (the network adds the zeros)."""
        import torch

        if all(e.get(CONCAT_LATENT) is None for e in conditioning_extras):
            return x
        rows = x.shape[0] // max(len(conditioning_extras), 1)
        blocks = []
        for extra in conditioning_extras:
            image, mask = extra.get(CONCAT_LATENT), extra.get(CONCAT_MASK)
            if image is None:
                blocks.append(torch.zeros(1, x.shape[1] + 1, *x.shape[-2:]))
                continue
            if tuple(image.shape[-2:]) != tuple(x.shape[-2:]):
                raise ConditioningError(f"HunyuanVideo15ImageToVideo's picture latent {tuple(image.shape)} does not "
                                        f"fit the latent being sampled {tuple(x.shape)}: use that node's latent",
                                        "positive")
            latent = self.latent.to_model(image[:1].to(torch.float32))
            keep = torch.zeros(1, 1, *x.shape[-2:]) if mask is None else 1.0 - mask[:1].to(torch.float32)
            blocks.append(torch.cat([latent, keep], dim=1))
        return torch.cat([x, torch.cat([b.expand(rows, -1, -1, -1) for b in blocks]).to(x.device, x.dtype)], dim=1)


FAMILY = HunyuanVideo15()
__all__ = ["FAMILY", "BYT5", "glyph_text"]
