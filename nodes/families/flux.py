"""FLUX.1 ([dev] and [schnell]): a rectified-flow transformer on 16-channel latents.

What differs from the SD families, and where it lives:

* **Network.** diffusers' ``FluxTransformer2DModel`` works on the latent cut into
  2x2 patches (``[B, h/2 * w/2, 64]`` tokens) with 3-axis position ids, and takes
  the flow time (0..1) rather than a 0..1000 timestep. :class:`FluxNetwork` wraps
  it in the UNet calling convention the denoiser uses (``net(x, t,
  encoder_hidden_states=..., **kwargs)`` on ``[B, 16, h, w]``), so guidance,
  conditioning rules and the sampling loop stay the same for every family.
* **Distilled guidance.** [dev] has a guidance embedder: the guidance value is a
  network input (``guidance``), carried on the conditioning as ComfyUI does
  (``CLIPTextEncodeFlux``/``FluxGuidance`` set ``extra["guidance"]``). [schnell]
  has none and ignores it. Classifier-free guidance (a second, negative pass)
  stays KSampler's ``cfg``; FLUX workflows use cfg 1 (one pass).
* **Text.** CLIP-L's pooled output (``pooled_projections``) and T5-XXL's last
  hidden state (the token sequence), padded to 512 tokens as diffusers'
  FluxPipeline does; see :meth:`Flux.encode_text`.
* **Model sampling.** Flow matching: the state at flow time t is
  ``(1 - t) * x0 + t * noise`` and the network predicts the velocity
  ``noise - x0``; the grid is shifted by the image size (diffusers'
  ``use_dynamic_shifting``). The scheduler config below says so, and
  :mod:`nodes.samplers.flow` plans on it; the loop never names the family.
* **Latents.** 16 channels, ``(raw - 0.1159) * 0.3611`` in model space.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from nodes.families import attention_bias as attention_bias_rule
from nodes.families import flux_references
from nodes.families import sdxl as sdxl_family
from nodes.families.base import (ConditioningError, FlowFamily, LatentFormat, Shapes, TextEncoderSpec,
                                 WrappedTransformer)
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision
from nodes.runtime.compiled import eager_while_hooked

#: Original (BFL) key layout: these two only exist in a FLUX transformer.
DOUBLE_BLOCKS = "double_blocks."
SINGLE_BLOCKS = "single_blocks."
#: diffusers' layout of the same transformer.
DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_mlp.weight")
#: Where all-in-one single files keep the parts (ComfyUI's checkpoint save layout).
UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
#: T5 tokens the transformer sees (diffusers' default max_sequence_length).
T5_TOKENS = 512
#: The released [dev]/[schnell] default guidance (ComfyUI's CLIPTextEncodeFlux default).
DEFAULT_GUIDANCE = 3.5

#: 16-channel latent -> RGB factors (ComfyUI's published table for the FLUX VAE, model-space latents).
FLUX_LATENT = LatentFormat(
    channels=16, scale=0.3611, shift=0.1159,
    rgb=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
         (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
         (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
         (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
         (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
         (-0.1262, -0.0982, -0.0778)),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
)


def pack(x: "Any") -> "Any":
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches as tokens (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: "Any", h: int, w: int) -> "Any":
    """The inverse of :func:`pack` for a latent of ``h`` x ``w``."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> "Any":
    """Position ids [(h/2)(w/2), 3] of the patches: (0, row, column)."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _pad_control(kwargs: dict, tokens: int) -> None:
    """ControlNet samples cover the image's tokens; reference tokens after them get none."""
    import torch

    for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
        samples = kwargs.get(key)
        if samples and samples[0].shape[1] < tokens:
            kwargs[key] = [torch.nn.functional.pad(s, (0, 0, 0, tokens - s.shape[1])) for s in samples]


class FluxNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    checks_width_in_call = True

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 reference_latents: "flux_references.References | None" = None,
                 attention_bias: "list[attention_bias_rule.TextBias] | None" = None,
                 guidance_off: "Any" = None, **kwargs: Any) -> tuple:
        """``reference_latents``: images the network reads beside ``x`` (FLUX.1 Kontext); their
        tokens follow the image's and their outputs are dropped. ``attention_bias``: one
        :class:`~nodes.families.attention_bias.TextBias` per row (StyleModelApply's attn_bias).
        ``guidance_off``: rows [B] whose distilled guidance is disabled (FluxDisableGuidance)."""
        import torch

        b, _, h, w = x.shape
        check_even_latent("FLUX", h, w)
        # after the family's pooled-output check (network_kwargs), so a prompt without one is named for that first
        check_text_width("FLUX", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with FLUX's CLIP-L and T5-XXL: DualCLIPLoader type flux")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=self.device, dtype=self.dtype)
        tokens, ids = pack(x), image_ids(h, w, self.device, self.dtype)
        if reference_latents is not None:
            ref_tokens, ref_ids = flux_references.tokens(reference_latents, (h, w), pack)
            tokens, ids = torch.cat([tokens, ref_tokens], dim=1), torch.cat([ids, ref_ids])
        _pad_control(kwargs, tokens.shape[1])
        if attention_bias is not None:
            if attention_bias[0].tokens != encoder_hidden_states.shape[1]:
                raise ConditioningError(f"the style model's attention bias covers {attention_bias[0].tokens} prompt "
                                        f"tokens but the prompt has {encoder_hidden_states.shape[1]} (was it "
                                        "concatenated after StyleModelApply? apply the style model last)", "positive")
            mask = attention_bias_rule.joint_mask(attention_bias, tokens.shape[1], self.dtype, self.device)
            kwargs["joint_attention_kwargs"] = {"attention_mask": mask}
        with without_guidance(self.transformer, guidance_off):
            out = self.transformer(hidden_states=tokens, timestep=time.to(self.dtype),
                                   encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
                                   img_ids=ids, return_dict=False, **kwargs)[0]
        return (unpack(out[:, :(h // 2) * (w // 2)], h, w),)


@contextlib.contextmanager
def without_guidance(transformer: Any, rows_off: Any) -> Iterator[None]:
    """While the block runs, the guidance embedding adds nothing for ``rows_off`` (ComfyUI's
    FluxDisableGuidance leaves it out of the model's conditioning vector). diffusers always adds
    it, so its output is zeroed for those rows by a forward hook, removed afterwards. FLUX
    ControlNets have the same embedder and take the same rows off (nodes.control.flux)."""
    embedder = getattr(getattr(transformer, "time_text_embed", None), "guidance_embedder", None)
    if rows_off is None or embedder is None or not bool(rows_off.any()):
        yield
        return
    keep = (~rows_off)[:, None]
    hook = embedder.register_forward_hook(
        lambda module, args, out: out * keep.to(out.device, out.dtype))
    try:
        with eager_while_hooked():
            yield
    finally:
        hook.remove()


class Flux(FlowFamily):
    name = "flux"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = FLUX_LATENT
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "openai", CLIP_L_PREFIX),  # pooler_output, no projection
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", T5_PREFIX),
    )
    clip_types = ("flux",)
    network_class = FluxNetwork
    dit_block_lists = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
    takes_references = True
    controlnet_latent_hint = True
    #: ComfyUI numbers a FLUX union ControlNet's types by the SDXL union's names (one list for both);
    #: InstantX's and Shakker-Labs' releases trained other meanings at those indices.
    controlnet_union_types = sdxl_family.UNION_TYPES
    controlnet_shared_config = ("num_attention_heads", "attention_head_dim", "joint_attention_dim",
                                "pooled_projection_dim", "in_channels")

    # -- detection (FlowFamily.claims: by the transformer's keys) -------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        return any(k.startswith(DOUBLE_BLOCKS) or k.startswith(UNET_PREFIX + DOUBLE_BLOCKS) for k in shapes) or \
            all(k in shapes for k in DIFFUSERS_MARKERS)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return "transformer" in components

    # -- model sampling --------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None, *, guidance: bool = True) -> dict[str, Any]:
        """diffusers' FlowMatchEulerDiscreteScheduler config of the releases: [dev] (guidance)
        shifts with the image size; [schnell] is unshifted."""
        if guidance:
            return {"_class_name": self.scheduler_class, "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                    "base_image_seq_len": 256, "max_image_seq_len": 4096, "prediction_type": "flow"}
        return {"_class_name": self.scheduler_class, "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096, "prediction_type": "flow"}

    # -- the network -------------------------------------------------------------------

    @property
    def controlnet_group(self) -> str:
        """[dev] and [schnell] are one transformer: their ControlNets are the same (InstantX's, Shakker-Labs')."""
        return "flux"

    def run_controlnet(self, network: Any, link: Any, x: "Any", t: Any, context: "Any", kwargs: dict,
                       model_config: Any) -> dict[str, list]:
        """A FLUX ControlNet's per-block samples (nodes.control.flux): the hint is VAE-encoded."""
        from nodes.control import flux as control

        return control.run(network, link, x, t, context, kwargs, model_config, self.latent)

    def controlnet_inputs(self, totals: dict[str, list]) -> dict[str, Any]:
        from nodes.control import flux as control

        return control.inputs(totals)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original (BFL) layout's names, ComfyUI's and kohya's FLUX LoRAs use them: the
        loader's key map, read for LoRAs (fused qkv / linear1 split row-wise onto q, k, v, mlp)."""
        from nodes.checkpoint.flux_keys import lora_modules

        return lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def original_names(self, network: Any) -> dict[str, str]:
        """The original (BFL) layout's names (``double_blocks.3.img_attn.qkv.weight``); the parts of
        a fused BFL tensor (q, k, v) each take its name."""
        from nodes.checkpoint.flux_keys import original_names

        return original_names([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        pooled, guidance, off = [], [], []
        for extra in extras:
            p = extra.get("pooled_output")
            if p is None:
                raise ConditioningError("this FLUX model needs conditioning with a pooled_output (encode the prompt "
                                        "with a FLUX CLIP: DualCLIPLoader type flux)", extra.get("_input", "positive"))
            pooled.append(p.reshape(1, -1).expand(batch, -1))
            value = extra.get("guidance", DEFAULT_GUIDANCE)  # None: FluxDisableGuidance
            guidance += [0.0 if value is None else float(value)] * batch
            off += [value is None] * batch
        kwargs = {"pooled_projections": torch.cat(pooled).to(device=device, dtype=dtype)}
        kwargs["guidance"] = torch.tensor(guidance, device=device, dtype=torch.float32)
        if any(off):
            kwargs["guidance_off"] = torch.tensor(off, device=device)
        references = flux_references.for_call(extras, batch, self.latent, device, dtype)
        if references is not None:
            kwargs["reference_latents"] = references
        biases = [extra.get(attention_bias_rule.KEY) for extra in extras]
        if any(b is not None for b in biases):
            tokens = next(b for b in biases if b is not None).tokens
            kwargs["attention_bias"] = [b if b is not None else attention_bias_rule.none(tokens)
                                        for b in biases for _ in range(batch)]
        return kwargs

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    # -- text ----------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: T5's last hidden state (512 tokens) with CLIP-L's pooled output.

        As diffusers' FluxPipeline: CLIP-L sees 77 tokens padded, its pooler output
        is the pooled text; T5 sees the prompt padded (or cut) to 512 tokens. After
        T5TokenizerOptions (``clip.t5_padding``) T5's length is ComfyUI's instead
        (:func:`t5_length`), never cut.
        ComfyUI's weight syntax is read as for SD prompts: weights apply to T5's
        tokens (:mod:`nodes.families.t5_weights`) and, as in ComfyUI, not to the pooled
        output, which CLIP-L gives for the prompt without its syntax. An unweighted
        prompt is encoded exactly as diffusers encodes it.
        """
        import torch

        from nodes.families import t5_weights
        from nodes.prompt_syntax import parse

        texts = texts or {}
        clip_parsed, t5_parsed = (parse(texts.get(name, text)) for name in ("tokenizer", "tokenizer_2"))
        if report is not None:
            report.problems += [p for p in clip_parsed.problems + t5_parsed.problems if p not in report.problems]
        clip_text, t5_text = ("".join(seg.text for seg in p.segments) for p in (clip_parsed, t5_parsed))
        clip_tok, t5_tok = clip.tokenizers["tokenizer"], clip.tokenizers["tokenizer_2"]
        with torch.inference_mode():
            ids = clip_tok([clip_text], padding="max_length", max_length=clip_tok.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
            with clip.encoder("text_encoder") as te:
                pooled = te(ids.to(te.device), output_hidden_states=False).pooler_output
            padding = clip.t5_padding
            with clip.encoder("text_encoder_2") as t5:
                if t5_parsed.weighted:
                    length = T5_TOKENS if padding is None else \
                        t5_length(t5_weights.tokenize(t5_tok, t5_parsed, 1).count + 1, padding)
                    tokens = t5_weights.tokenize(t5_tok, t5_parsed, length)
                    states, count = t5_weights.encode(t5, tokens), tokens.count
                else:
                    length = T5_TOKENS if padding is None else t5_length(len(t5_tok(t5_text).input_ids), padding)
                    t5_ids = t5_tok([t5_text], padding="max_length", max_length=length, truncation=padding is None,
                                    return_tensors="pt").input_ids
                    states = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
                    count = int((t5_ids != t5_tok.pad_token_id).sum()) - 1
        if report is not None:
            report.tokens = max(report.tokens, count)
            report.windows = 1
        return [[states.to("cpu", torch.float32), {"pooled_output": pooled.to("cpu", torch.float32)}]]


def t5_length(tokens: int, padding: tuple[int, int]) -> int:
    """ComfyUI's T5 sequence length for a prompt of ``tokens`` tokens (its end token included)
    under T5TokenizerOptions' (min_padding, min_length): min_padding pad tokens after the end
    token, then more up to min_length."""
    min_padding, min_length = padding
    return max(tokens + min_padding, min_length)


class FluxSchnell(Flux):
    """[schnell]: the same transformer without the guidance embedder, unshifted schedule."""

    name = "flux-schnell"
    clip_types = ()  # the text encoders are [dev]'s: DualCLIPLoader type flux loads them for both
    guidance_note = ("FLUX.1 [schnell] has no guidance embedder (it is distilled to sample in few steps without "
                     "guidance)")

    def claims_unet(self, shapes: Shapes) -> bool:
        return super().claims_unet(shapes) and not any("guidance_in" in k or "guidance_embedder" in k for k in shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return False  # a folder's transformer config says which (see nodes.checkpoint.flux_load)

    def scheduler_config(self, prediction_type: str | None = None, *, guidance: bool = False) -> dict[str, Any]:
        return super().scheduler_config(prediction_type, guidance=False)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        kwargs = super().network_kwargs(extras, batch, image_size, device, dtype)
        kwargs.pop("guidance")
        kwargs.pop("guidance_off", None)
        return kwargs



FAMILY = Flux()
SCHNELL = FluxSchnell()
#: Detection order: [schnell] (no guidance embedder) before [dev].
FAMILIES = (SCHNELL, FAMILY)
