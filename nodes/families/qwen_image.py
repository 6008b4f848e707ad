"""Qwen-Image (Alibaba's 20B MMDiT, Qwen-Image and Qwen-Image-2512): a flow-matching transformer on
the 16-channel latents of a Wan-2.1-style VAE, conditioned on Qwen2.5-VL's language model.

What it shares with FLUX and what differs, and where it lives:

* **Network.** diffusers' ``QwenImageTransformer2DModel`` takes FLUX's packed 2x2 patch tokens
  (:func:`nodes.families.flux.pack`) and the flow time (0..1); its rotary positions come from the
  image's (frames, rows, columns) and the text length, so :class:`QwenImageNetwork` hands it
  ``img_shapes`` and the text mask instead of position ids.
* **Text.** As ``QwenImagePipeline`` encodes: the prompt inside the pipeline's chat template, the
  language model's last hidden state, the template's first :data:`TEMPLATE_TOKENS` tokens dropped
  (ComfyUI drops the same tokens: up to and including ``<|im_start|>user\\n``). One prompt has no
  padding, so its mask is all ones and, as diffusers does, none is passed (the mask rides on the
  conditioning, :data:`MASK`; a zero in it reaches the transformer). A positive and negative of
  different lengths are evaluated in separate calls, as diffusers does: text tokens have rotary
  positions, so ComfyUI's repeating of a shorter prompt would change the image
  (``Family.repeats_text``).
* **Guidance.** Real CFG (KSampler's ``cfg`` with a negative prompt). diffusers' true CFG rescales
  the guided velocity of each packed token to the norm of the conditional one
  (:meth:`QwenImage.combine_guidance`); Kiln does the same, so its images equal the pipeline's.
  ComfyUI applies plain CFG (its CFGNorm node is a different, x0-space rule).
* **Model sampling.** The released FlowMatchEulerDiscreteScheduler config (:data:`SCHEDULER`:
  exponential dynamic shift by image size with a terminal stretch to 0.02), so KSampler's grid is
  the pipeline's; ComfyUI's templates fix the shift with ModelSamplingAuraFlow (3.1), which Kiln's
  node does the same way (it drops the size shift and the terminal stretch).
* **Latents.** 16 channels normalised per channel by the VAE's ``latents_mean``/``latents_std``
  (:data:`QWEN_LATENT`); the VAE is a causal 3-D one run on single frames
  (:class:`nodes.checkpoint.qwen_image_vae.FrameVAE`).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, flux_references
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.families.sdxl import ChannelLatentFormat
from nodes.runtime import precision

#: Only Qwen-Image's transformer has the text RMS norm before txt_in (ComfyUI's detection key).
MARKER = "txt_norm.weight"
UNET_PREFIX = flux.UNET_PREFIX
#: QwenImagePipeline's prompt template and the count of its leading tokens dropped after encoding.
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34
#: Prompt tokens kept after the template's (the pipeline's tokenizer_max_length / max_sequence_length).
MAX_TOKENS = 1024
#: The conditioning key of the text mask ([1, tokens], 1 = attended).
MASK = "qwen_text_mask"

#: The Qwen-Image VAE's per-channel latent statistics (AutoencoderKLQwenImage's defaults, the release's).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
               -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
              1.6382, 1.1253, 2.8251, 1.9160)
#: Model-space latent -> RGB (ComfyUI's published Wan 2.1 table, which its Qwen-Image latent format uses).
QWEN_LATENT = ChannelLatentFormat(
    channels=16, scale=1.0, mean=LATENT_MEAN, std=LATENT_STD,
    rgb=((-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
         (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
         (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
         (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861)),
    rgb_bias=(-0.1835, -0.0868, -0.3360),
)
#: The released scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
             "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
             "invert_sigmas": False, "stochastic_sampling": False, "prediction_type": "flow"}


class QwenImageNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 text_mask: "Any" = None, reference_latents: "flux_references.References | None" = None,
                 **kwargs: Any) -> tuple:
        """``text_mask``: [B, text tokens] of 0/1 (see :meth:`QwenImage.network_kwargs`), or None.
        ``reference_latents``: pictures the Edit models read (qwen_image_edit.reference_tokens)."""
        import torch

        from nodes.families import qwen_image_edit

        b, _, h, w = x.shape
        check_even_latent("Qwen-Image", h, w)
        check_text_width("Qwen-Image", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen2.5-VL: CLIPLoader type qwen_image")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        mask = None if text_mask is None else text_mask.to(self.device)
        tokens, shapes = flux.pack(x), [(1, h // 2, w // 2)]
        if reference_latents is not None:
            ref_tokens, ref_shapes = qwen_image_edit.reference_tokens(reference_latents)
            tokens, shapes = torch.cat([tokens, ref_tokens.to(tokens.dtype)], dim=1), shapes + ref_shapes
            kwargs = qwen_image_edit.control_over_image_tokens(kwargs, ref_tokens.shape[1])
        zero = reference_latents is not None and reference_latents.method == qwen_image_edit.TIME_ZERO
        with qwen_image_edit.references_at_time_zero(self.transformer, zero):
            out = self.transformer(hidden_states=tokens, timestep=time.to(self.dtype),
                                   encoder_hidden_states=encoder_hidden_states, encoder_hidden_states_mask=mask,
                                   img_shapes=[shapes] * b, return_dict=False, **kwargs)[0]
        return (flux.unpack(out[:, :(h // 2) * (w // 2)], h, w),)


def text_mask(extras: list[dict], batch: int, device: Any) -> "Any":
    """The call's text mask [rows, tokens] (1 attended) from each conditioning's :data:`MASK`
    (``batch`` rows each, in order), or None when every row attends to all its tokens. One rule for
    the families whose prompts carry a mask (Qwen-Image, Krea 2)."""
    import torch

    masks = [extra.get(MASK) for extra in extras]
    if all(m is None or bool(m.all()) for m in masks):
        return None
    tokens = next(m for m in masks if m is not None).shape[-1]
    rows = [(torch.ones(1, tokens) if m is None else m.reshape(1, -1)).expand(batch, -1) for m in masks]
    return torch.cat(rows).to(device=device)


def renormed(guided: "Any", cond: "Any") -> "Any":
    """``guided`` with each packed token's velocity rescaled to the norm of ``cond``'s (diffusers'
    true CFG for Qwen-Image: the norm over a token's 16 channels x 2x2 patch)."""
    import torch

    def token_norm(v: "Any") -> "Any":
        b, c, h, w = v.shape
        squares = v.float().pow(2).sum(dim=1, keepdim=True)
        sums = torch.nn.functional.avg_pool2d(squares, 2) * 4
        return sums.sqrt().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    return (guided.float() * (token_norm(cond) / token_norm(guided))).to(guided.dtype)


class QwenImage(FlowFamily):
    name = "qwen_image"
    inference_dtypes = precision.NO_FP16
    latent = QWEN_LATENT
    #: Its ControlNets (nodes.control.qwen_image) read the hint as VAE latents; the Fun ones run on the
    #: transformer's own embedders.
    controlnet_latent_hint = True
    controlnet_borrows_layers = True
    controlnet_shared_config = ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "in_channels")
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen2.5-vl", ""),)
    clip_types = ("qwen_image",)
    guidance_note = ("Qwen-Image has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative "
                     "prompt)")
    scheduler = SCHEDULER
    network_class = QwenImageNetwork
    dit_block_lists = {"double": "transformer_blocks"}
    takes_references = True  # Qwen-Image-Edit (nodes.families.qwen_image_edit)

    # -- detection: by the transformer's keys (FlowFamily.claims); a folder by its transformer's class
    # (nodes.checkpoint.qwen_image_load), not by components (FlowFamily.claims_folder) -----------

    def claims_unet(self, shapes: Shapes) -> bool:
        return MARKER in shapes or UNET_PREFIX + MARKER in shapes

    # -- model sampling -------------------------------------------------------------------------

    def combine_guidance(self, guided: "Any", cond: "Any") -> "Any":
        return renormed(guided, cond)

    # -- the network ----------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        """ComfyUI's Qwen-Image keys are diffusers' own names."""
        return {name: name for name, _ in network.named_parameters()}

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The rows' text masks when some prompt in the call has padding; none when all attend to
        all their tokens (diffusers passes none then). The Edit models' reference latents."""
        import torch

        from nodes.families import qwen_image_edit

        kwargs = qwen_image_edit.network_kwargs(extras, batch, self.latent, device, dtype)
        mask = text_mask(extras, batch, device)
        return kwargs if mask is None else kwargs | {"text_mask": mask.to(torch.long)}

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    # -- text -----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: the language model's last hidden state of the templated prompt, the
        template's leading tokens dropped (see the module docstring). ComfyUI's weight syntax is
        not read (ComfyUI tokenizes Qwen-Image prompts with weights disabled): the text is encoded
        as written."""
        import torch

        text = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]
        templated = text if text.startswith("<|im_start|>") else TEMPLATE.format(text)
        got = tok([templated], max_length=MAX_TOKENS + TEMPLATE_TOKENS, truncation=True, return_tensors="pt")
        with torch.inference_mode(), clip.encoder("text_encoder") as lm:
            states = lm(input_ids=got.input_ids.to(lm.device),
                        attention_mask=got.attention_mask.to(lm.device)).last_hidden_state
        states = states[:, TEMPLATE_TOKENS:][:, :MAX_TOKENS]
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        mask = torch.ones(1, states.shape[1], dtype=torch.float32)
        return [[states.to("cpu", torch.float32), {MASK: mask}]]

    # -- ControlNets (nodes.control.qwen_image) -----------------------------------------------------

    def run_controlnet(self, network: Any, link: Any, x: "Any", t: Any, context: "Any", kwargs: dict,
                       model_config: Any, model: Any = None) -> dict[str, list]:
        """A Qwen-Image ControlNet's per-block samples (nodes.control.qwen_image)."""
        from nodes.control import qwen_image as control

        return control.run(network, link, x, t, context, kwargs, model_config, self.latent, model)

    def controlnet_reads_positive_prompt(self, config: Any) -> bool:
        """InstantX's do (QwenImageControlNetPipeline adds the prompt's samples to both passes); the
        Fun ones run on each side's own prompt."""
        from nodes.control import qwen_image as control

        return not control.is_fun(config)

    def controlnet_inputs(self, totals: dict[str, list]) -> dict[str, Any]:
        from nodes.control import qwen_image as control

        return control.inputs(totals)


FAMILY = QwenImage()
