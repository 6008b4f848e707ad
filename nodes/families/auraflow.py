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
  in diffusers, where ComfyUI keeps it whole. Prompt weights (``(word:1.2)``) are not read: the prompt
  goes to the tokenizer as typed.
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
    guidance_note = "AuraFlow has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative prompt)"

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
        module docstring)."""
        import torch

        prompt = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]
        ids = [int(i) for i in tok(prompt).input_ids]
        if len(ids) > T5_TOKENS:  # diffusers' truncation: the end token stays last
            ids = ids[: T5_TOKENS - 1] + ids[-1:]
        with torch.inference_mode(), clip.encoder("text_encoder") as t5:
            states = t5(torch.tensor([ids], device=t5.device), output_hidden_states=False)[0]
        states = states.to("cpu", torch.float32)
        padded = torch.zeros(1, max(T5_TOKENS, states.shape[1]), states.shape[-1])
        padded[:, : states.shape[1]] = states
        if report is not None:
            report.tokens = max(report.tokens, len(ids) - 1)
            report.windows = 1
        return [[padded, {}]]


FAMILY = AuraFlow()
