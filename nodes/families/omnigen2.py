"""OmniGen2 (VectorSpaceLab): a Lumina-style DiT conditioned on Qwen2.5-VL 3B, on FLUX.1's latents, that
generates and edits (reference images enter as extra latent tokens).

What differs from its neighbours, and where it lives:

* **Network.** Kiln's own module (nodes.checkpoint.omnigen2_net; diffusers has no OmniGen2), its names
  ComfyUI's file's keys. It takes ``1 - sigma`` and returns ComfyUI's output (already the flow velocity).
  Prompts of other lengths are evaluated in calls of their own (``repeats_text`` off): the caption's
  length sets every position after it, and ComfyUI passes the caption's token count (``num_tokens``).
* **Text.** ComfyUI's CLIPLoader type ``omnigen2``: the prompt inside ComfyUI's template (a system turn
  and the user's turn, :data:`TEMPLATE`), no BOS, no padding, nothing dropped, Qwen2.5-VL's last hidden
  state (after the final norm; ComfyUI's ``layer="last"``). ComfyUI's weight syntax is not read: the
  prompt is encoded as written.
* **References.** ReferenceLatent's latents on the conditioning (up to five: ``image_index_embedding``
  has five rows), in order, each at its own Omni-RoPE offset (the network's rule; ComfyUI ignores
  ``reference_latents_method`` here, Kiln refuses another method than ``index`` rather than pretend).
* **Guidance.** DualCFGGuider (the templates: cfg 5 on the prompt, 2 on the pictures) or KSampler's CFG. Its
  regular style with cond1 = prompt + pictures, cond2 = negative + pictures is OmniGen2's own pipeline's
  text / image guidance.
* **Model sampling.** Flow matching with a fixed shift of 2.6 and ``multiplier`` 1 (ComfyUI's sampling
  settings for OmniGen2), BasicScheduler ``simple``.
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, flux_references
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.runtime import precision

SHIFT = 2.6
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}
#: ComfyUI's Omnigen2Tokenizer template (comfy/text_encoders/omnigen2.py).
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant that generates high-quality images based on user "
            "instructions.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n")


class OmniGen2Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        """The caption width the transformer reads (Qwen2.5-VL 3B's 2048 in the release)."""
        return int(self.transformer.config.text_feat_dim)

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False,
                 reference_latents: flux_references.References | None = None, **kwargs: Any) -> tuple:
        import torch

        check_text_width("OmniGen2", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL 3B: CLIPLoader type omnigen2")
        b = x.shape[0]
        sigma = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        refs = () if reference_latents is None else reference_latents.latents
        out = self.transformer(x.to(self.device), sigma, encoder_hidden_states.to(self.device), refs)
        return (out,)


class OmniGen2(FlowFamily):
    name = "omnigen2"
    inference_dtypes = precision.NO_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),)
    clip_types = ("omnigen2",)
    guidance_note = "OmniGen2 has no distilled guidance (its guidance is real CFG: DualCFGGuider or KSampler's cfg)"
    scheduler = SCHEDULER
    network_class = OmniGen2Network
    takes_references = True
    dit_blocks_unreached = "OmniGen2 (ComfyUI's Omnigen2 model)"

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.omnigen2_load import has_transformer

        return has_transformer(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        """The module's names are ComfyUI's keys."""
        return {name: name for name, _ in network.named_parameters()}

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The call's reference latents in model space (flux_references.indexed_call), none without."""
        return flux_references.indexed_call(extras, batch, self.latent, device, dtype,
                                            "OmniGen2 places reference k after reference k-1 (its Omni-RoPE)")

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Qwen2.5-VL's last hidden state of the prompt in ComfyUI's template, every token
        kept (see the module docstring)."""
        import torch

        text = (texts or {}).get("tokenizer", text)
        ids = torch.tensor([template_ids(clip.tokenizers["tokenizer"], text)])
        with torch.inference_mode(), clip.encoder("text_encoder") as lm:
            ids = ids.to(lm.device)
            states = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {}]]


def template_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids OmniGen2 encodes for ``text``: ComfyUI's template around it, no special tokens added."""
    return list(tokenizer(TEMPLATE.format(text), add_special_tokens=False).input_ids)


FAMILY = OmniGen2()
