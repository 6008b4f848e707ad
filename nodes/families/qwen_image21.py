"""Qwen-Image 2.1 (Alibaba's single-stream, block-causal DiT): flow matching on the 64-channel latents
of its own 16x VAE, conditioned on Qwen3-VL 8B's last layer.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``QwenImage21Transformer2DModel`` reads the latent unpatched (one token per
  latent cell, rows then columns) after the text in one sequence: text causal, the image block
  bidirectional, text tokens modulated at t = 0. Its ``img_mask`` marks the image's slots at the
  encoder's granularity (one slot per 2x2 cells), so :class:`QwenImage21Network` builds it from the
  text length and the latent size, as QwenImage21Pipeline does for text-to-image.
* **Text.** As the pipeline encodes (and ComfyUI's ``comfy/text_encoders/qwen_image21.py``): the
  prompt in the t2i chat template (:data:`TEMPLATE`), Qwen3-VL's last decoder layer *before* the final
  RMSNorm (transformers 5 returns it normed as ``hidden_states[-1]``, so the norm is bypassed for the
  call, as the pipeline does), the system turn (everything before the second ``<|im_start|>``)
  dropped. An empty prompt is encoded as " " (the pipeline's rule). No padding: one prompt's mask is
  all ones, so none reaches the transformer; a positive and negative of other lengths are evaluated
  apart (``repeats_text``), as the pipeline's separate calls are.
* **Guidance.** Plain real CFG (the pipeline's ``true_cfg_scale`` is KSampler's ``cfg``); the
  templates run cfg 1, where the negative is never evaluated.
* **Model sampling.** FlowMatchEuler with the exponential shift at a fixed mu of 0.69: ComfyUI's
  Qwen-Image 2.1 sampling setting, the release's size rule (mu 0.5 at 256 tokens to 0.9 at 8192)
  read at 1024x1024 (:data:`SCHEDULER`).
* **Latents.** 64 channels at 1/16 of the image, normalised per channel by the VAE's
  ``latents_mean``/``latents_std`` (:data:`QWEN21_LATENT`); the VAE is RGBA: it decodes RGBA IMAGEs
  (nodes.checkpoint.qwen_image21_load.RgbaFrameVAE), as ComfyUI's does.
* **Not yet.** Pictures in the prompt (the edit templates: Qwen3-VL's vision tower is not loaded) are
  refused by node and input; the prefix KV cache (QwenImage21Cache) is accepted and Kiln recomputes
  the text every step, which is ComfyUI's ``device off`` and equals its lossless cache.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, qwen_image
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.families.text import without_logits
from nodes.families.sdxl import ChannelLatentFormat
from nodes.runtime import precision

LABEL = "Qwen-Image 2.1"
UNET_PREFIX = flux.UNET_PREFIX
#: QwenImage21Pipeline's (and ComfyUI's) text-to-image template; the system turn is dropped after encoding.
SYSTEM = "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
TEMPLATE = SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
IM_START = 151644
#: Qwen3-VL 8B's width (the 4B, Krea 2's encoder, is 2560 wide).
EIGHT_B_WIDTH = 4096
MASK = qwen_image.MASK
#: ComfyUI's fixed shift (``sampling_settings`` shift 0.69 on its FLUX-style model sampling).
MU = 0.69
#: Its latent is read unpatched, one token per cell: a folder's size rule counts tokens so (``kiln_mu_rule``).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": MU, "max_shift": MU, "base_image_seq_len": 256,
             "max_image_seq_len": 8192, "time_shift_type": "exponential", "prediction_type": "flow",
             "kiln_mu_rule": "per_pixel"}
#: AutoencoderKLQwenImage21's per-channel latent statistics (the class's defaults, the release's).
LATENT_MEAN = (0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.651, 0.2732,
               0.7562, -0.6163, -1.0277, 3.8363, 2.021, 0.0472, 0.932, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
               -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636,
               3.0555, 0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.368, 0.4809, -0.4433,
               0.3764, 0.5729, -2.0595, 1.096, -1.326, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373,
               1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304)
LATENT_STD = (3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.791, 3.0785, 3.65, 3.9308, 3.0904, 2.8778,
              3.7675, 3.732, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
              3.9323, 3.4719, 3.7498, 4.283, 3.5694, 4.2467, 3.9037, 3.2947, 5.077, 3.5075, 3.27, 3.4767, 2.8063,
              5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.055,
              5.5614, 4.2963, 4.408, 3.4959, 3.8747, 3.7608, 3.5735, 3.149, 3.7662, 3.6746, 3.4563, 3.8161)
#: No published preview table: previews show the first channel (LatentFormat's fallback).
QWEN21_LATENT = ChannelLatentFormat(channels=64, scale=1.0, mean=LATENT_MEAN, std=LATENT_STD, downscale=16)
#: Where a picture in the prompt is refused (the vision tower is not loaded).
NO_PICTURES = ("Qwen-Image 2.1's Qwen3-VL is loaded without its vision tower: reference pictures (the edit "
               "and background-removal templates) are not supported yet; leave the images inputs empty")


class QwenImage21Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.context_in_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 text_mask: "Any" = None, **kwargs: Any) -> tuple:
        """``text_mask``: [B, text tokens] of 0/1 where some prompt of the call is padded, else None."""
        import torch

        b, c, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen3-VL 8B: CLIPLoader type qwen_image on qwen3vl_8b*.safetensors")
        tokens = encoder_hidden_states.shape[1]
        slots = torch.cat([torch.zeros(b, tokens, dtype=torch.bool), torch.ones(b, h * w // 4, dtype=torch.bool)], 1)
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        mask = None if text_mask is None else text_mask.to(self.device).bool()
        out = self.transformer(hidden_states=x.flatten(2).transpose(1, 2).to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states.to(self.dtype), timestep=time.to(self.dtype),
                               img_shapes=[[(1, h, w)]] * b, img_mask=slots.to(self.device),
                               encoder_hidden_states_mask=mask, return_dict=False, **kwargs)[0]
        return (out[:, -h * w:].transpose(1, 2).reshape(b, c, h, w),)  # the image's tokens come last


class QwenImage21(FlowFamily):
    name = "qwen_image21"
    inference_dtypes = precision.NO_FP16
    latent = QWEN21_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("qwen_image",)
    guidance_note = "Qwen-Image 2.1 has no distilled guidance (cfg 1, or real CFG with a negative prompt)"
    scheduler = SCHEDULER
    network_class = QwenImage21Network
    dit_block_lists = {"single": "transformer_blocks"}
    #: A Qwen3-VL file without its vision tower has a Qwen3's keys: under type qwen_image it is read as Qwen3-VL.
    text_kind_aliases = {"qwen3": "qwen3-vl"}

    def accepts_text_files(self, files: list) -> bool:
        """Qwen3-VL 8B, not Krea 2's 4B (2560 wide): 4096 wide, or a file holding its own ``lm_head`` (the
        8B's is untied; the 4B ties it to the embedding, so its files have none)."""
        from nodes.checkpoint.krea2_load import text_prefix
        from nodes.checkpoint.tensors import shapes_of

        for file in files:
            shapes = shapes_of(file.state)
            prefix = text_prefix(shapes)
            width = shapes.get(f"{prefix}embed_tokens.weight", (0, 0))[1] if prefix is not None else 0
            if width != EIGHT_B_WIDTH and not any(k.endswith("lm_head.weight") for k in shapes):
                return False
        return True

    # detection: by the transformer's keys (FlowFamily.claims and claims_folder)

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import qwen_image21_keys

        return qwen_image21_keys.is_transformer(shapes)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """ComfyUI's fused ``gate_up`` split row-wise onto the gate and up projections; every other module
        has its diffusers name (nodes.checkpoint.qwen_image21_keys.lora_modules)."""
        from nodes.checkpoint import qwen_image21_keys

        return qwen_image21_keys.lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import qwen_image21_keys

        return qwen_image21_keys.original_names([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        mask = qwen_image.text_mask(extras, batch, device)
        return {} if mask is None else {"text_mask": mask}

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, width]: Qwen3-VL's last layer before its final norm over the templated
        prompt, the system turn dropped (module docstring). ComfyUI's weight syntax is not read."""
        import torch

        text = (texts or {}).get("tokenizer", text) or " "
        ids = clip.tokenizers["tokenizer"]([TEMPLATE.format(text)], return_tensors="pt").input_ids
        with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
            device = next(qwen.parameters()).device
            states = last_layer_unnormed(qwen, ids.to(device))
        states = states[:, prompt_start(ids[0].tolist()):]
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {MASK: torch.ones(1, states.shape[1])}]]


def last_layer_unnormed(qwen: Any, ids: "Any", **inputs: Any) -> "Any":
    """The last decoder layer's output for ``ids`` without the model's final RMSNorm (:func:`states_unnormed`)."""
    return states_unnormed(qwen, ids, LABEL, "qwen3vl_8b*.safetensors with CLIPLoader type qwen_image", **inputs)[-1]


def states_unnormed(qwen: Any, ids: "Any", label: str = LABEL,
                    load: str = "qwen3vl_8b*.safetensors with CLIPLoader type ideogram4", **inputs: Any) -> tuple:
    """Qwen3-VL's ``hidden_states`` for ``ids`` (the embedding, then each decoder layer's output), the last
    one without the model's final RMSNorm: the norm's forward hands its input through for this call (a
    hook, so compiled modules run eagerly meanwhile). ``qwen``: the language model, or a Qwen3VLModel
    around it given pictures' ``inputs`` (JoyImage's edit prompts). ``label`` and ``load`` word the error
    for a text encoder that is no Qwen3-VL language model."""
    from nodes.runtime.compiled import eager_while_hooked

    norm = getattr(getattr(qwen, "language_model", qwen), "norm", None)
    if norm is None:
        raise ConditioningError(f"{label} reads Qwen3-VL's language model, which this text encoder is not "
                                f"(load {load})", "clip")
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with eager_while_hooked():
            out = qwen(input_ids=ids, output_hidden_states=True, use_cache=False, **inputs, **without_logits(qwen))
    finally:
        handle.remove()
    return out.hidden_states


def prompt_start(ids: list[int]) -> int:
    """Where the kept tokens start: at the second ``<|im_start|>`` (the system turn dropped)."""
    starts = [i for i, t in enumerate(ids) if t == IM_START]
    return starts[1] if len(starts) > 1 else 0


FAMILY = QwenImage21()
