"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream flow DiT on FLUX.1's latents,
conditioned on a hidden layer of Qwen3-4B.

What differs from FLUX, and where it lives:

* **Network.** diffusers' ``ZImageTransformer2DModel`` takes lists: one latent ``[C, 1, h, w]`` and
  one caption ``[tokens, 2560]`` per image, each of its own length (it pads them itself, with learnt
  pad tokens, and masks them). :class:`ZImageNetwork` gives each row its prompt's own tokens (the
  length rides on the conditioning, :data:`TOKENS`, so the padding a shared call adds never reaches
  the network; tokens ConditioningConcat appends do). Its time input is ``1 - sigma`` (1 = clean) and its output is the negative of the flow
  velocity Kiln's steppers take (ZImagePipeline negates it too).
* **Text.** The prompt in Qwen3's chat template for one user turn with the generation prompt
  (:data:`TEMPLATE`: what ZImagePipeline's ``apply_chat_template(..., enable_thinking=True)`` renders
  and ComfyUI's ``ZImageTokenizer`` writes), at most :data:`MAX_TOKENS` tokens (diffusers' cut), Qwen3
  run with no padding, the hidden state of layer -2 (the second to last layer's output, no final
  norm), every token kept: what ZImagePipeline keeps after dropping its padding. ComfyUI reads no
  weight syntax for Z-Image, so ``(word:1.2)`` goes to the encoder as written, as there.
* **Guidance.** Real CFG (KSampler's cfg): diffusers' ``guidance_scale`` g is Kiln's cfg g + 1
  (``pos + g * (pos - neg)``). Turbo samples at cfg 1 (one pass; diffusers' guidance_scale 0).
* **Model sampling.** Flow matching with a fixed shift, 3 (the release's scheduler config and
  ComfyUI's ModelSamplingAuraFlow in its template); the grid is FLUX's, ``linspace(1, 1/N, N)``
  shifted, as ZImagePipeline's.
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

#: One user turn and the assistant's opening, as Qwen3's chat template renders it (no think block).
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: diffusers' max_sequence_length: the templated prompt is cut there.
MAX_TOKENS = 512
#: Qwen3's hidden_states index Z-Image conditions on.
LAYER = -2
#: The conditioning key holding the prompt's token count.
TOKENS = "z_image_tokens"
#: Where an all-in-one file would keep Qwen3 (ComfyUI's checkpoint layout); Kiln reads split files.
QWEN3_PREFIX = "text_encoders.qwen3_4b.transformer."
SHIFT = 3.0
#: The release's FlowMatchEulerDiscreteScheduler: a fixed shift of 3.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}


class ZImageNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        """The caption width the transformer reads (Qwen3-4B's 2560 in the release)."""
        return int(self.transformer.config.cap_feat_dim)

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False,
                 text_tokens: "list[int] | None" = None, controlnet_block_samples: "dict | None" = None,
                 **kwargs: Any) -> tuple:
        """``text_tokens``: each row's prompt length (the first that many tokens of its context); None:
        every row's whole context. ``controlnet_block_samples``: a Fun ControlNet's samples by the main
        layer they follow (nodes.control.z_image)."""
        import torch

        b, _, h, w = x.shape
        check_even_latent("Z-Image", h, w)
        check_text_width("Z-Image", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen3-4B: CLIPLoader type lumina2")
        sigma = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        latents = list(x.unsqueeze(2).unbind(0))
        out = self.transformer(latents, 1.0 - sigma, captions(encoder_hidden_states, text_tokens), return_dict=False,
                               controlnet_block_samples=controlnet_block_samples)[0]
        return (-torch.stack(out).squeeze(2),)


def captions(context: Any, text_tokens: "list[int] | None") -> list:
    """Each row's caption tokens (see :func:`own_tokens`): what the transformer and its ControlNet read."""
    return [own_tokens(context[i], n) for i, n in enumerate(text_tokens or [None] * context.shape[0])]


def own_tokens(row: Any, count: "int | None") -> Any:
    """The caption tokens of one row [tokens, width]: its first ``count`` when the rest only repeats them
    (the denoiser tiles a shorter prompt to share a call), else all of them (ConditioningConcat appended
    another prompt's tokens after the encoded ones, and those count, as in ComfyUI)."""
    import torch

    total = row.shape[0]
    if count is None or count >= total or total % count:
        return row
    head = row[:count]
    return head if torch.equal(row, head.repeat(total // count, 1)) else row


class ZImage(FlowFamily):
    name = "z-image"
    inference_dtypes = precision.NO_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3", QWEN3_PREFIX),)
    clip_types = ("lumina2",)
    guidance_note = ("Z-Image has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative "
                     "prompt; Turbo samples at cfg 1)")
    scheduler = SCHEDULER
    #: Unlike the other transformers, a repeated prompt shares a call exactly: each row's token count
    #: (:meth:`network_kwargs`) keeps the repeat out of the caption it reads, as diffusers' lists do.
    repeats_text = True
    network_class = ZImageNetwork
    dit_blocks_unreached = "Z-Image (ComfyUI's NextDiT, as Lumina 2)"
    # Fun ControlNets (nodes.control.z_image): latent hints, the transformer's embedders and refiners
    controlnet_latent_hint = True
    controlnet_borrows_layers = True
    controlnet_shared_config = ("dim", "n_heads", "n_kv_heads")

    # -- detection: by the transformer's keys (FlowFamily.claims and claims_folder) ----------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.z_image_load import has_z_image_transformer

        return has_z_image_transformer(shapes)

    # -- the network -------------------------------------------------------------------------

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (``layers.3.attention.qkv``), which Z-Image LoRAs use; the
        fused qkv splits row-wise onto to_q, to_k, to_v (nodes.checkpoint.z_image_keys)."""
        from nodes.checkpoint.z_image_keys import lora_modules

        return lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def run_controlnet(self, network: Any, link: Any, x: Any, t: Any, context: Any, kwargs: dict,
                       model_config: Any, model: Any = None) -> dict[str, list]:
        """A Fun ControlNet's samples (nodes.control.z_image); ``model``: the transformer it borrows from."""
        from nodes.control import z_image as control

        return control.run(network, link, x, t, context, kwargs, model_config, self.latent, model)

    def controlnet_inputs(self, totals: dict[str, list]) -> dict[str, Any]:
        from nodes.control import z_image as control

        return control.inputs(totals)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint.z_image_keys import original_names

        return original_names([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """Each row's prompt length; none when no conditioning carries one (then all its tokens count)."""
        counts = [extra.get(TOKENS) for extra in extras]
        if all(c is None for c in counts):
            return {}
        if any(c is None for c in counts):
            raise ConditioningError("a Z-Image prompt without its token count shares a call with one that has it "
                                    "(encode both with this model's CLIP)", "negative")
        return {"text_tokens": [int(c) for c in counts for _ in range(batch)]}

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Qwen3's layer -2 states of the templated prompt (see the module docstring)."""
        import torch

        from nodes.checkpoint.qwen3_text import hidden_states

        prompt = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]
        ids = tok([TEMPLATE.format(prompt)], truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids
        with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
            states = hidden_states(qwen, ids, torch.ones_like(ids), LAYER)
        count = int(ids.shape[1])
        if report is not None:
            report.tokens = max(report.tokens, count)
            report.windows = 1
        return [[states.to("cpu", torch.float32), {TOKENS: count}]]


FAMILY = ZImage()
