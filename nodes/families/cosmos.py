"""Cosmos Predict2 text to image (NVIDIA, 2B and 14B): a DiT (diffusers' ``CosmosTransformer3DModel``) on
the Wan 2.1 VAE's 16-channel latents, T5-XXL v1.0 text through cross-attention.

What differs from the flow transformers (FLUX, Z-Image) and why:

* **Model sampling.** The network is a rectified flow (it reads the flow state at flow time t and
  predicts the velocity), but it was trained and is sampled on EDM noise levels sigma from 0.002 to
  80, with ``t = sigma / (sigma + 1)`` (diffusers' Cosmos2TextToImagePipeline: c_in = c_skip = 1 - t,
  c_out = -t; ComfyUI's ModelSamplingCosmosRFlow). So it samples through Kiln's continuous-time path
  (nodes.samplers.edm, its ``rflow`` rule), whose schedules are ComfyUI's over those levels: KSampler's
  ``euler`` with the ``karras`` schedule is the pipeline's FlowMatchEulerDiscreteScheduler with
  ``use_karras_sigmas`` (the same Karras levels, rho 7, 80 to 0.002). The pipeline's last step goes
  from 0.002 to 0.002 (its ``final_sigmas_type`` "sigma_min": the latent stays at level 0.002); ComfyUI's
  and Kiln's step to 0 (tests/test_cosmos.py measures what that changes).
* **Guidance.** Real CFG on the denoised latents: diffusers' ``guidance_scale`` g is KSampler's cfg g + 1.
* **Text.** T5-XXL v1.0 (t5-11b's encoder, ReLU feed-forward: ComfyUI's "oldt5"), the prompt padded to
  512 tokens, T5 run with the padding masked and the padding's states set to zero (the pipeline's
  ``_get_t5_prompt_embeds`` and ComfyUI's ``cosmos`` text encoder alike); the transformer attends to
  all 512 tokens, no mask.
* **Network call.** A one-frame video ``[B, 16, 1, h, w]``, the zero padding mask the pipeline passes
  concatenated as a 17th channel inside the model, the time as a [B] vector.
* **Latents.** The Wan 2.1 VAE's per-channel mean and std (ComfyUI's Wan21 latent format,
  :data:`nodes.families.qwen_image.QWEN_LATENT`; the pipeline's ``latents_mean`` / ``latents_std``).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, masked_t5
from nodes.families.base import Family, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.families.qwen_image import QWEN_LATENT
from nodes.runtime import precision

#: The pipeline's max_sequence_length and ComfyUI's CosmosT5Tokenizer min_length: every prompt is 512 tokens.
T5_TOKENS = 512
#: The conditioning key of the T5 mask (read by the encoding only: the transformer attends to every token).
MASK = "cosmos_text_mask"
#: The EDM levels Cosmos was trained on (the pipeline's sigma_min / sigma_max / sigma_data).
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 1.0


def ensure_mask_resize() -> None:
    """Give diffusers' Cosmos module the one torchvision call it makes when torchvision is not installed
    (Kiln does not require it): ``transforms.functional.resize(mask, size, NEAREST)`` on the padding mask,
    here ``torch.nn.functional.interpolate(mode="nearest")``. The mask Kiln and the pipeline pass is all
    zeros, which every nearest resize keeps zero, so the stand-in changes no number."""
    import types

    import torch
    from diffusers.models.transformers import transformer_cosmos

    if hasattr(transformer_cosmos, "transforms"):
        return

    def resize(mask: Any, size: list, interpolation: Any = None) -> Any:
        return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest")

    transformer_cosmos.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


class CosmosNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention: ``x`` is the flow state (nodes.samplers.edm's
    ``rflow`` input), ``t`` the flow time itself, the output the velocity."""

    label = "Cosmos Predict2"
    text_hint = "encode the prompt with T5-XXL v1.0: CLIPLoader type cosmos"

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.text_embed_dim)

    def context(self, encoder_hidden_states: Any, kwargs: dict) -> Any:
        """What the DiT's cross-attention reads: the prompt's states (Anima: its adapter's output,
        nodes.families.anima)."""
        return encoder_hidden_states

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any, return_dict: bool = False, **kwargs: Any) -> tuple:
        import torch

        ensure_mask_resize()
        b, _, h, w = x.shape
        check_even_latent(self.label, h, w)
        check_text_width(self.label, encoder_hidden_states.shape[-1], self.text_width, self.text_hint)
        context = self.context(encoder_hidden_states, kwargs)
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        padding = torch.zeros(1, 1, h, w, device=self.device, dtype=self.dtype)
        out = self.transformer(x.unsqueeze(2).to(self.dtype), timestep=time.to(self.dtype),
                               encoder_hidden_states=context.to(self.device, self.dtype), padding_mask=padding,
                               return_dict=False)[0]
        return (out.squeeze(2),)


class CosmosPredict2(Family):
    name = "cosmos_predict2"
    label = "Cosmos Predict2"
    #: ComfyUI's CosmosT2IPredict2 supported_inference_dtypes: bfloat16, float32.
    inference_dtypes = precision.NO_FP16
    latent = QWEN_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "t5", flux.T5_PREFIX),)
    clip_types = ("cosmos",)
    scheduler_class = "EDMEulerScheduler"
    #: Every prompt is 512 tokens (padded), so the positive and negative always share a call as they are.
    repeats_text = False
    sample_size = 128
    network_class = CosmosNetwork
    #: ComfyUI's MiniTrainDIT runs every block whatever the skip-layer nodes set: they skip nothing here either
    #: (nodes.model_patches), and :meth:`dit_blocks` says why (the flow families' rule, FlowFamily.dit_blocks).
    dit_blocks_unreached = "Cosmos Predict2 (ComfyUI's MiniTrainDIT)"
    dit_block_lists: dict[str, str] = {}
    dit_blocks = FlowFamily.dit_blocks

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.cosmos_load import has_transformer

        return has_transformer(shapes)

    def claims(self, shapes: Shapes) -> bool:
        return self.claims_unet(shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return False

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """Continuous-time sampling with the ``rflow`` rule (nodes.samplers.edm) on Cosmos' levels."""
        from nodes.samplers.edm import edm_config

        return edm_config("rflow", SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, time="rflow")

    def wrap_network(self, network: Any) -> Any:
        return network if isinstance(network, CosmosNetwork) else self.network_class(network)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (``blocks.3.self_attn.q_proj``), which ComfyUI's and kohya's LoRAs
        for Cosmos Predict2 and Anima use (nodes.checkpoint.cosmos_keys; Anima's adapter keeps its names)."""
        return {o[: -len(".weight")]: d for d, o in self.original_names(network).items()}

    def original_names(self, network: Any) -> dict[str, str]:
        """Each weight's name in the original layout (``blocks.3.self_attn.q_proj.weight``)."""
        from nodes.checkpoint.cosmos_keys import ADAPTER, to_original_name

        names = [n for n, _ in getattr(network, "kiln_network", network).named_parameters()]
        return {n: n if n.startswith(ADAPTER) else to_original_name(n) for n in names
                if n.startswith(ADAPTER) or to_original_name(n) is not None}

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: T5's last hidden state over 512 tokens, the padding masked in T5 and zeroed after
        (see the module docstring); under T5TokenizerOptions ComfyUI's unpadded encoding as for PixArt."""
        raw = (texts or {}).get("tokenizer", text)
        return zero_padding(masked_t5.encode(clip, raw, report, T5_TOKENS, MASK))


def zero_padding(conditioning: list) -> list:
    """Each entry's states with the masked tokens set to zero (the pipeline's and ComfyUI's
    ``zero_out_masked``); the mask itself is dropped, as the transformer reads none."""
    out = []
    for states, extra in conditioning:
        extra = dict(extra)
        mask = extra.pop(MASK, None)
        if mask is not None:
            states = states * mask.reshape(1, -1, 1).to(states.dtype)
        out.append([states, extra])
    return out


FAMILY = CosmosPredict2()
