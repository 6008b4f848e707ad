"""Wan 2.1 image-to-video as ChronoEdit-14B runs it: NVIDIA's image editor that generates a few frames
from the input picture and keeps the last one.

What it is made of, and where it lives:

* **Text.** UMT5-XXL (CLIPLoader type ``wan``: nodes.checkpoint.umt5_text; its tokenizer is the
  SentencePiece model the file carries). As ChronoEditPipeline encodes: the prompt's tokens and the end
  token (cut to :data:`TEXT_TOKENS`), UMT5's last hidden state, zeros after the prompt up to 512 tokens
  (ComfyUI's Wan encoder gives the same: a minimum length of 512, padding masked and zeroed). The
  transformer reads exactly 512 text tokens beside the picture's. ComfyUI's weight syntax is read as
  for FLUX's T5 (nodes.families.t5_weights). As in ComfyUI the prompt is not cleaned first (the
  pipeline's ``prompt_clean``: ftfy's repair, HTML entities, whitespace runs; SentencePiece's own
  normaliser already folds whitespace runs), so only a prompt with HTML entities or mojibake encodes
  otherwise.
* **Latents.** The Wan 2.1 VAE's (Qwen-Image's statistics: :data:`nodes.families.qwen_image.QWEN_LATENT`),
  video-shaped [B, 16, frames, h, w] (WanImageToVideo's: ``(length - 1) / 4 + 1`` frames); the sampler sees
  them folded to an image latent (nodes.latent_layers, as Qwen-Image-Layered's) and the frame count reaches
  :class:`WanNetwork`.
* **The picture.** WanImageToVideo (nodes.wan_nodes) puts ComfyUI's ``concat_latent_image`` (the VAE's
  latent of the picture followed by grey frames) and ``concat_mask`` (0 on the picture's frames) on both
  prompts; :meth:`Wan21.extra_channels` appends, as ComfyUI's WAN21.concat_cond does, four channels of
  ``1 - mask`` and the normalised latent to the noisy one (36 channels: ChronoEditPipeline's
  ``cat([latents, mask, condition])``). Its ``clip_vision_output`` (CLIPVisionEncode, crop none) gives the
  transformer the picture's CLIP ViT-H penultimate states (the pipeline's ``hidden_states[-2]``).
* **Positions.** ComfyUI's: frames at 0, 1, ... unless ScaleROPE moves them (nodes.checkpoint.wan_rope;
  ChronoEdit's template sets scale_t 7, the pipeline's edit-pair positions 0 and 7).
* **Guidance.** Real CFG with the negative prompt (the pipeline's ``guidance_scale`` is KSampler's cfg).
"""
from __future__ import annotations

from typing import Any

from nodes.families import qwen_image
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width, frame_height
from nodes.latent_layers import FRAMES

LABEL = "Wan 2.1 (ChronoEdit)"
#: Text tokens the transformer reads (ChronoEditPipeline's max_sequence_length; the network splits its
#: context at 512 from the end to find the picture's tokens).
TEXT_TOKENS = 512
#: ComfyUI's Wan 2.1 model sampling (supported_models.WAN21_T2V: shift 8; the template sets 5 with
#: ModelSamplingSD3) on the grid ChronoEditPipeline steps on: the scheduler's own spacing,
#: ``set_timesteps(steps)`` (nodes.samplers.flow.TRAIN_GRID, as SD3's). ComfyUI's simple grid is
#: ``linspace(1, 1 / steps)`` before the shift, a little coarser at the low-noise end.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 8.0,
             "use_dynamic_shifting": False, "prediction_type": "flow", "kiln_train_grid": True}
#: ComfyUI's conditioning keys (WanImageToVideo's).
CONCAT_LATENT, CONCAT_MASK, CLIP_VISION = "concat_latent_image", "concat_mask", "clip_vision_output"
#: The mask channels the image-to-video transformer reads before the picture's latent.
MASK_CHANNELS = 4


class WanNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention: ``x`` is the folded latent with its extra
    channels [B, 36, frames * h, w], ``frames`` its frame count, ``image_embeds`` the CLIP vision states."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.text_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 frames: int = 0, image_embeds: "Any" = None, **kwargs: Any) -> tuple:
        import torch

        b, c, fh, w = x.shape
        h = frame_height(LABEL, fh, w, frames, "a video latent [B, 16, frames, h, w]", "WanImageToVideo's latent")
        config = self.transformer.config
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with UMT5-XXL: CLIPLoader type wan")
        if encoder_hidden_states.shape[1] != TEXT_TOKENS:
            raise ConditioningError(f"{LABEL} reads {TEXT_TOKENS} text tokens, got {encoder_hidden_states.shape[1]}: "
                                    "encode the prompt with CLIPLoader type wan", "positive")
        if image_embeds is None and config.image_dim is not None:
            raise ConditioningError(f"{LABEL} image-to-video reads the picture through CLIP vision: give "
                                    "WanImageToVideo a clip_vision_output (CLIPVisionEncode of the start image)",
                                    "positive")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        video = x.reshape(b, c, frames, h, w).to(self.dtype)
        image = None if image_embeds is None else image_embeds.to(self.device, self.dtype)
        out = self.transformer(hidden_states=video, timestep=time, encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_image=image, return_dict=False, **kwargs)[0]
        return (out.reshape(b, out.shape[1], fh, w),)


class Wan21(FlowFamily):
    name = "wan21"
    latent = qwen_image.QWEN_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "umt5", ""),)
    clip_types = ("wan",)
    guidance_note = "Wan 2.1 has no distilled guidance (ChronoEdit runs real CFG with a negative prompt)"
    scheduler = SCHEDULER
    network_class = WanNetwork
    dit_block_lists = {"double": "blocks"}  # ComfyUI numbers Wan's blocks as double blocks
    layered_latents = True  # video latents [B, C, frames, h, w], folded for the sampler
    #: The node that makes its latents (nodes.latent_layers names it when another latent comes).
    frames_from = "WanImageToVideo"
    #: A one-block UMT5 (no second bias to tell it from T5 by) is still UMT5 under type wan.
    text_kind_aliases = {"t5": "umt5"}

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import wan_load

        return wan_load.has_transformer(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import wan_keys

        return wan_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        from nodes.checkpoint import wan_keys

        return wan_keys.lora_modules([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The frame count and the CLIP vision states of each conditioning (``batch`` rows each)."""
        import torch

        frames = {int(e.get(FRAMES) or 0) for e in extras}
        outputs = [e.get(CLIP_VISION) for e in extras]
        kwargs: dict[str, Any] = {"frames": max(frames) if frames else 0}
        if all(o is None for o in outputs):
            return kwargs
        if any(o is None for o in outputs):
            raise ConditioningError("both prompts need WanImageToVideo's clip_vision_output (connect both "
                                    "through it)", "negative")
        states = [_penultimate(o) for o in outputs]
        if len({s.shape[1:] for s in states}) > 1:
            raise ConditioningError("the prompts carry CLIP vision states of other sizes; give both the same "
                                    "clip_vision_output", "negative")
        kwargs["image_embeds"] = torch.cat([s[:1].expand(batch, -1, -1) for s in states]).to(device, dtype)
        return kwargs

    def extra_channels(self, x: "Any", conditioning_extras: list[dict]) -> "Any":
        """The noisy latent, then per conditioning ``1 - concat_mask`` as four channels and the normalised
        ``concat_latent_image`` (zeros for both without WanImageToVideo's picture, as ComfyUI), folded as
        the latent is."""
        import torch

        rows = x.shape[0] // max(len(conditioning_extras), 1)
        blocks = [self._condition(x, extra).expand(rows, -1, -1, -1) for extra in conditioning_extras]
        return torch.cat([x, torch.cat(blocks).to(x.device, x.dtype)], dim=1)

    def _condition(self, x: "Any", extra: dict) -> "Any":
        import torch

        from nodes.latent_layers import fold

        image, mask = extra.get(CONCAT_LATENT), extra.get(CONCAT_MASK)
        _, c, fh, w = x.shape
        if image is None:
            return torch.zeros(1, MASK_CHANNELS + c, fh, w)
        latent, frames = fold(image.to(torch.float32))
        if latent.shape[-2:] != (fh, w) or frames == 0:
            raise ConditioningError(f"WanImageToVideo's picture latent {tuple(image.shape)} does not fit the latent "
                                    f"being sampled (folded {fh}x{w}): use that node's latent", "positive")
        latent = self.latent.to_model(latent[:1])
        keep = torch.zeros(1, 1, fh, w) if mask is None else fold(1.0 - mask.to(torch.float32).mean(1, keepdim=True))[0]
        return torch.cat([keep[:1].expand(1, MASK_CHANNELS, -1, -1), latent], dim=1)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, 512, width]: UMT5's last hidden state of the prompt and its end token, zeros
        after (the module docstring)."""
        return [[encode_prompt(clip, (texts or {}).get("tokenizer", text), report), {}]]


def _penultimate(output: Any) -> "Any":
    """CLIPVisionEncode's penultimate hidden states [n, tokens, width] (ComfyUI's clip_fea)."""
    states = getattr(output, "penultimate_hidden_states", None)
    if states is None:
        raise ConditioningError("clip_vision_output carries no penultimate hidden states (CLIPVisionEncode's "
                                "output is expected)", "clip_vision_output")
    return states.float()


def encode_prompt(clip: Any, text: str, report: Any = None) -> "Any":
    """[1, :data:`TEXT_TOKENS`, width] float32 on the CPU (see the module docstring)."""
    import torch

    from nodes.families import t5_weights
    from nodes.prompt_syntax import parse

    parsed = parse(text)
    if report is not None:
        report.problems += [p for p in parsed.problems if p not in report.problems]
    tok = clip.tokenizers["tokenizer"]
    with torch.inference_mode(), clip.encoder("text_encoder") as umt5:
        if parsed.weighted:
            tokens = t5_weights.tokenize(tok, parsed, TEXT_TOKENS)
            kept = min(tokens.count, TEXT_TOKENS - 1) + 1
            states = t5_weights.encode(umt5, tokens, masked=True)[:, :kept]
        else:
            ids = tok("".join(seg.text for seg in parsed.segments)).input_ids
            ids = ids[:TEXT_TOKENS - 1] + [tok.eos_token_id] if len(ids) > TEXT_TOKENS else ids
            device = next(umt5.parameters()).device
            states = umt5(torch.tensor([ids], device=device)).last_hidden_state.to("cpu", torch.float32)
            kept = len(ids)
    if report is not None:
        report.tokens = max(report.tokens, kept - 1)
        report.windows = 1
    out = torch.zeros(1, TEXT_TOKENS, states.shape[-1])
    out[:, :kept] = states.to("cpu", torch.float32)
    return out


FAMILY = Wan21()
