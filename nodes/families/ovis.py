"""Ovis-Image (AIDC-AI's 7B text-to-image model): a FLUX-style double/single-stream flow DiT on FLUX.1's
latents, conditioned on the last hidden state of Ovis 2.5's Qwen3 language model.

What differs from FLUX, and where it lives:

* **Network.** diffusers' ``OvisImageTransformer2DModel`` reads FLUX's packed 2x2 patch tokens
  (:func:`nodes.families.flux.pack`), the flow time (0..1), and rotary ids: image patches at
  (0, row, column), text token i at (0, i, i) (OvisImagePipeline's ``text_ids``). No pooled text, no
  guidance embedder; the text goes through an RMSNorm before its projection. :class:`OvisNetwork`.
* **Text.** As OvisImagePipeline's ``encode_prompt``: the prompt after the pipeline's system line in
  one user turn of Qwen3's chat template with thinking off (:data:`TEMPLATE`), cut at
  :data:`PREFIX_TOKENS` + :data:`MAX_TOKENS` tokens, Qwen3's last hidden state (after its final norm),
  the first :data:`PREFIX_TOKENS` tokens dropped (the template's head and the system line up to its
  last word: the pipeline keeps the line's colon before the prompt, and so does Kiln). The pipeline
  pads every prompt to that length and zeroes the padding's states, which the transformer still reads
  (its text projection has a bias); Kiln runs Qwen3 on the real tokens alone (their states are the same:
  the padding is after them, under a causal mask) and appends the zero rows, so the conditioning is the
  pipeline's, :data:`MAX_TOKENS` tokens always.
* **Guidance.** Real CFG: the pipeline's ``guidance_scale`` is KSampler's cfg (``neg + g (pos - neg)``).
* **Model sampling.** Flow matching with a fixed shift of 3 (ComfyUI's template: ModelSamplingAuraFlow 3,
  euler / simple, as the pipeline's FlowMatchEuler with that shift and ``linspace(1, 1/N, N)``).
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

LABEL = "Ovis-Image"
#: OvisImagePipeline's system line, written before the prompt in the user turn.
SYSTEM = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
          "of the objects and background: ")
#: One user turn and the assistant's opening with thinking off, as Qwen3's chat template renders it.
TEMPLATE = "<|im_start|>user\n" + SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: The pipeline's ``user_prompt_begin_id``: the tokens dropped from the states (up to the system line's colon).
PREFIX_TOKENS = 28
#: The pipeline's ``max_sequence_length``: the text tokens the transformer always reads.
MAX_TOKENS = 256
SHIFT = 3.0
#: FlowMatchEuler with a fixed shift of 3 (the template's ModelSamplingAuraFlow).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}


def text_ids(tokens: int, device: Any) -> "Any":
    """Rotary ids [tokens, 3] of the text: token i at (0, i, i) (OvisImagePipeline's)."""
    import torch

    ids = torch.zeros(tokens, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(tokens, dtype=torch.float32)
    return ids.to(device)


class OvisNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Ovis 2.5 (ovis_2.5.safetensors): CLIPLoader type ovis")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        out = self.transformer(hidden_states=flux.pack(x).to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states.to(self.device, self.dtype),
                               timestep=time.to(self.dtype), img_ids=flux.image_ids(h, w, self.device, self.dtype),
                               txt_ids=text_ids(encoder_hidden_states.shape[1], self.device).to(self.dtype),
                               return_dict=False, **kwargs)[0]
        return (flux.unpack(out, h, w),)


class Ovis(FlowFamily):
    name = "ovis"
    inference_dtypes = precision.NO_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3", ""),)
    clip_types = ("ovis",)
    guidance_note = "Ovis-Image has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative)"
    scheduler = SCHEDULER
    network_class = OvisNetwork
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}

    # -- detection: by the transformer's keys (FlowFamily.claims) -------------------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.ovis_load import has_transformer

        return has_transformer(shapes)

    # -- the network -----------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import ovis_keys

        return ovis_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """ComfyUI's module names for LoRAs: an MLP's up / gate projection patches its half of diffusers'
        fused MLP input (nodes.checkpoint.ovis_keys.lora_modules)."""
        from nodes.checkpoint import ovis_keys

        return ovis_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """None; but a conditioning Z-Image's CLIP encoded is refused: ovis_2.5 is a Qwen3 file that loads under
        type lumina2 too, and its width then fits while its states (layer -2, no padding) are not Ovis's."""
        from nodes.families.z_image import TOKENS

        for extra in extras:
            if extra.get(TOKENS) is not None:
                raise ConditioningError("this conditioning was encoded by Z-Image's text encoding (CLIPLoader type "
                                        "lumina2); Ovis-Image reads Ovis 2.5's: load ovis_2.5.safetensors with "
                                        "CLIPLoader type ovis", extra.get("_input", "positive"))
        return {}

    # -- text ------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, 256, width]: Qwen3's last states of the templated prompt, the prefix dropped,
        zero rows after the prompt (module docstring). ComfyUI's weight syntax is not read."""
        import torch

        from nodes.checkpoint.qwen3_text import hidden_states

        prompt = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]
        ids = tok([TEMPLATE.format(prompt)], truncation=True, max_length=PREFIX_TOKENS + MAX_TOKENS,
                  add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
            states = hidden_states(qwen, ids, torch.ones_like(ids), -1)
        states = states[:, PREFIX_TOKENS:].to("cpu", torch.float32)
        count = int(states.shape[1])
        states = torch.nn.functional.pad(states, (0, 0, 0, MAX_TOKENS - count))
        if report is not None:
            report.tokens = max(report.tokens, count)
            report.windows = 1
        return [[states, {}]]


FAMILY = Ovis()
