"""AuraFlow (fal's v0.1-v0.3) and Pony Diffusion V7, built on it: a rectified-flow MMDiT on SDXL's
4-channel latents, conditioned on Pile-T5-XL.

What differs from the other flow families, and where it lives:

* **Network.** diffusers' ``AuraFlowTransformer2DModel`` takes the flow time in 0..1 (the pipeline passes
  ``t / 1000``; ComfyUI's ``multiplier`` 1.0), patches 2x2 and adds a learned position table cut from the
  middle of its square grid; :class:`AuraFlowNetwork` refuses a latent whose patches do not fit that grid
  (ComfyUI stretches the table; Kiln runs diffusers' model, which cannot) or whose sides are odd. Its
  output is the flow velocity Kiln's steppers take, as SD3's is.
* **Text.** Pile-T5-XL (UMT5's architecture, 2048 wide, the Llama SentencePiece vocabulary; pad 1, end 2)
  as diffusers' ``AuraFlowPipeline.encode_prompt`` encodes it: the prompt's tokens and the end token, cut
  at :data:`T5_TOKENS` keeping the end token, T5 run on them, the states padded with zeros to 256 tokens
  (the pipeline pads, masks the padding in T5 and multiplies it to zero; the transformer then attends to
  the zeros unmasked, so the padding is part of the conditioning). ComfyUI's ``AuraT5`` gives the same
  (padded to at least 256, masked, zeroed) for prompts of up to 256 tokens; a longer one is cut here, as
  in diffusers, where ComfyUI keeps it whole. Prompt weights (``(word:1.2)``) are read as ComfyUI reads
  them for AuraT5 (:func:`weighted_states`); a prompt without them is encoded exactly as diffusers does.
* **Guidance.** Real CFG with diffusers' formula (``uncond + g * (cond - uncond)``): KSampler's cfg is the
  pipeline's ``guidance_scale`` (3.5 by default there).
* **Model sampling.** Flow matching with a fixed shift of 1.73 (the release's scheduler config and
  ComfyUI's ``ModelSamplingAuraFlow`` default) on the scheduler's own grid, as the pipeline samples.
* **Latents.** SDXL's VAE and latent format (scale 0.13025); ``inference_dtypes`` are ComfyUI's default
  (fp16 first: its AuraFlow entry names none of its own).
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.families.sdxl import SDXL_LATENT

#: The tokens diffusers' pipeline pads (and cuts) the prompt to: max_sequence_length, and ComfyUI's min_length.
T5_TOKENS = 256
#: Where ComfyUI's all-in-one checkpoint keeps Pile-T5-XL (its clip name ``pile_t5xl``).
PILE_T5_PREFIX = "text_encoders.pile_t5xl.transformer."
SHIFT = 1.73


def _scheduler() -> dict[str, Any]:
    from nodes.samplers.flow import TRAIN_GRID

    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
            "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "prediction_type": "flow", TRAIN_GRID: True}


class AuraFlowNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False, **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        net = self.transformer
        patch = int(net.config.patch_size)
        side = int(round(int(net.config.pos_embed_max_size) ** 0.5))
        if h % patch or w % patch:
            raise ConditioningError(f"an AuraFlow latent needs a size divisible by {patch}, got {h}x{w} (use multiples "
                                    f"of {8 * patch} pixels)", "latent_image")
        if h // patch > side or w // patch > side:
            raise ConditioningError(f"an AuraFlow latent of {h}x{w} has more patches a side than the model's "
                                    f"{side}x{side} position table (at most {side * patch * 8} pixels a side)",
                                    "latent_image")
        check_text_width("AuraFlow", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Pile-T5-XL: an AuraFlow checkpoint, or its text encoder through "
                         "CLIPLoader")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        out = net(hidden_states=x.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                  timestep=time.to(self.dtype), return_dict=False)[0]
        return (out,)


class AuraFlow(FlowFamily):
    name = "auraflow"
    label = "AuraFlow"
    latent = SDXL_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "pile_t5", PILE_T5_PREFIX),)
    #: ComfyUI has no CLIPLoader type for it: the file decides (nodes.checkpoint.split.family_for_texts).
    clip_types = ()
    scheduler = _scheduler()
    network_class = AuraFlowNetwork
    sample_size = 64
    dit_blocks_unreached = "AuraFlow (ComfyUI's MMDiT for it takes no block replacements)"
    guidance_note = ("AuraFlow has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative "
                     "prompt)")

    # -- detection: by the transformer's keys (FlowFamily.claims; folders by their transformer class) --

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import auraflow_keys

        return auraflow_keys.is_original(shapes) or auraflow_keys.is_diffusers(shapes)

    # -- the network ------------------------------------------------------------------------------

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (``double_layers.3.attn.w2q``), which ComfyUI's AuraFlow LoRAs
        may use; the final modulation's halves swap (nodes.checkpoint.auraflow_keys)."""
        from nodes.checkpoint import auraflow_keys

        return auraflow_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import auraflow_keys

        return auraflow_keys.original_names([name for name, _ in network.named_parameters()])

    # -- text ---------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Pile-T5-XL's last hidden state of the prompt, zero-padded to 256 tokens (see the
        module docstring); a weighted prompt through :func:`weighted_states`."""
        import torch

        from nodes.prompt_syntax import parse

        parsed = parse((texts or {}).get("tokenizer", text))
        if report is not None:
            report.problems += [p for p in parsed.problems if p not in report.problems]
        tok = clip.tokenizers["tokenizer"]
        with torch.inference_mode(), clip.encoder("text_encoder") as t5:
            if parsed.weighted:
                states, count = weighted_states(t5, tok, parsed)
            else:
                ids = [int(i) for i in tok("".join(seg.text for seg in parsed.segments)).input_ids]
                if len(ids) > T5_TOKENS:  # diffusers' truncation: the end token stays last
                    ids = ids[: T5_TOKENS - 1] + ids[-1:]
                states = t5(torch.tensor([ids], device=t5.device), output_hidden_states=False)[0]
                states, count = states.to("cpu", torch.float32), len(ids) - 1
        padded = torch.zeros(1, max(T5_TOKENS, states.shape[1]), states.shape[-1])
        padded[:, : states.shape[1]] = states
        if report is not None:
            report.tokens = max(report.tokens, count)
            report.windows = 1
        return [[padded, {}]]


def weighted_states(t5: Any, tok: Any, parsed: Any) -> tuple[Any, int]:
    """([1, tokens, width] states, prompt tokens) of a weighted prompt as ComfyUI's AuraT5 makes them: each word
    of a piece tokenized on its own (nodes.families.t5_weights.tokenize, cut at 256 with the end token), and a
    token of weight w moved to ``empty + (h - empty) * w``, where ``empty`` is the empty prompt's state at that
    position: its end token's state first, zeros after it (ComfyUI zeroes the masked padding before weighting)."""
    import torch

    from nodes.families import t5_weights

    tokens = t5_weights.tokenize(tok, parsed, T5_TOKENS)
    kept = min(tokens.count + 1, T5_TOKENS)
    h = t5(torch.tensor([tokens.ids[:kept]], device=t5.device), output_hidden_states=False)[0].to("cpu", torch.float32)
    end = t5(torch.tensor([tokens.empty[:1]], device=t5.device), output_hidden_states=False)[0].to("cpu", torch.float32)
    empty = torch.zeros_like(h)
    empty[:, :1] = end
    w = torch.tensor(tokens.weights[:kept], dtype=torch.float32).reshape(1, -1, 1)
    return torch.where(w != 1.0, (h - empty) * w + empty, h), min(tokens.count, T5_TOKENS - 1)

FAMILY = AuraFlow()
