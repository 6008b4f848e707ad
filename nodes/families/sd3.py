"""Stable Diffusion 3.5 (Large, Large Turbo, Medium): an MMDiT on 16-channel latents.

What differs from the other families, and where it lives:

* **Network.** diffusers' ``SD3Transformer2DModel`` patches the latent itself and
  takes the 0..1000 timestep, so :class:`SD3Network` only renames arguments into
  the UNet calling convention the denoiser uses (FLUX's wrapper also packs tokens
  and builds position ids; SD3 needs neither). Medium's extra self-attention
  layers (``dual_attention_layers``) and 3.5's q/k norms are in the config the
  loader reads from the shapes (nodes.checkpoint.sd3_load).
* **Text.** As diffusers' ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L's and
  OpenCLIP bigG's penultimate hidden states (no final norm) side by side, zero-padded
  to T5's width, then T5-XXL's last hidden state (256 tokens) after them along the
  token axis; the pooled text is both CLIPs' projected pooled outputs side by side.
  An encoder the CLIP lacks gives zeros, ComfyUI's rule (sd3_clip.SD3ClipModel):
  CLIP-L 768 wide, bigG 1280, no T5 tokens at all without T5.
* **Model sampling.** Flow matching with a fixed shift of 3.0 (diffusers' SD3
  scheduler config: no resolution-dependent shift), on the scheduler's own step
  spacing (``kiln_train_grid``, nodes.samplers.flow), which SD3's pipelines use.
* **Latents.** 16 channels, ``(raw - 0.0609) * 1.5305`` in model space; the preview
  table is ComfyUI's for the SD3 VAE.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import (ConditioningError, FlowFamily, LatentFormat, Shapes, TextEncoderSpec,
                                 WrappedTransformer)
from nodes.families.input_checks import check_text_width

#: Original (Stability) layout: the MMDiT's joint blocks exist in no other family.
JOINT_BLOCKS = "joint_blocks."
#: diffusers' layout of the same transformer: FLUX has single blocks beside these, SD3 has none.
DIFFUSERS_MARKER = "transformer_blocks.0.norm1_context.linear.weight"
UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "first_stage_model."
#: T5 tokens the transformer sees (diffusers' default max_sequence_length for SD3).
T5_TOKENS = 256
#: The released widths ComfyUI fills with zeros for a missing encoder (CLIP-L, bigG, T5-XXL).
MISSING_WIDTHS = {"text_encoder": 768, "text_encoder_2": 1280, "text_encoder_3": 4096}
#: diffusers' SD3 scheduler config (FlowMatchEulerDiscreteScheduler, shift 3).
DEFAULT_SHIFT = 3.0

SD3_LATENT = LatentFormat(
    channels=16, scale=1.5305, shift=0.0609,
    rgb=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
         (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
         (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
         (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
         (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
         (-0.1448, -0.1463, -0.1189)),
    rgb_bias=(0.2394, 0.2135, 0.1925),
)


def is_sd3_transformer(shapes: Shapes) -> bool:
    """Whether keys (with or without ``model.diffusion_model.``) hold an SD3 MMDiT, either layout."""
    return any(k.startswith(JOINT_BLOCKS) or k.startswith(UNET_PREFIX + JOINT_BLOCKS) for k in shapes) or (
        DIFFUSERS_MARKER in shapes and "pos_embed.pos_embed" in shapes
        and not any(k.startswith("single_transformer_blocks.") for k in shapes))


class SD3Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape
        patch = int(self.transformer.config.patch_size)
        if h % patch or w % patch:
            raise ConditioningError(f"an SD3 latent needs a size divisible by {patch}, got {h}x{w} (use multiples "
                                    f"of {8 * patch} pixels)", "latent_image")
        check_text_width("SD3", encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with SD3's CLIP: TripleCLIPLoader, or an SD3 checkpoint with its text "
                         "encoders")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        out = self.transformer(hidden_states=x, timestep=time.to(self.dtype),
                               encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]
        return (out,)


class SD3(FlowFamily):
    name = "sd3"
    latent = SD3_LATENT
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "openai", CLIP_L_PREFIX, layer=-2, norm_hidden=False,
                        pooled=True, projection_optional=True),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "openclip", CLIP_G_PREFIX, layer=-2, norm_hidden=False,
                        pooled=True, pad="!"),
        TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", T5_PREFIX),
    )
    clip_types = ("sd3",)
    #: Loaders may give any non-empty subset of the encoders (ComfyUI's rule: the rest give zeros).
    partial_text = True
    network_class = SD3Network
    #: The joint blocks are ComfyUI's "double" blocks of an MMDiT; SD3 has no single blocks.
    dit_block_lists = {"double": "transformer_blocks", "single": ""}
    #: SD3 ControlNets (nodes.control.sd3) read the hint as VAE latents.
    controlnet_latent_hint = True
    controlnet_shared_config = ("num_attention_heads", "attention_head_dim", "patch_size", "in_channels")
    #: SD3.5 Large's ControlNets embed the latent with the transformer's own patch embedder.
    controlnet_borrows_layers = True

    # -- detection (FlowFamily.claims: by the transformer's keys) -----------------------

    def claims_unet(self, shapes: Shapes) -> bool:
        return is_sd3_transformer(shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        return "transformer" in components and "text_encoder_3" in components

    # -- model sampling ------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None, *, shift: float = DEFAULT_SHIFT) -> dict[str, Any]:
        """diffusers' SD3 scheduler config: a fixed shift, no dynamic shifting, the scheduler's own grid."""
        from nodes.samplers.flow import TRAIN_GRID

        return {"_class_name": self.scheduler_class, "num_train_timesteps": 1000, "shift": float(shift),
                "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096, "prediction_type": "flow", TRAIN_GRID: True}

    # -- the network -------------------------------------------------------------------------

    def run_controlnet(self, network: Any, link: Any, x: "Any", t: Any, context: "Any", kwargs: dict,
                       model_config: Any, model: Any = None) -> dict[str, list]:
        """An SD3 ControlNet's per-block samples (nodes.control.sd3): the hint is VAE-encoded;
        ``model`` (the transformer) lends its patch embedder to ControlNets without one."""
        from nodes.control import sd3 as control

        return control.run(network, link, x, t, context, kwargs, model_config, self.latent, model)

    def controlnet_inputs(self, totals: dict[str, list]) -> dict[str, Any]:
        from nodes.control import sd3 as control

        return control.inputs(totals)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """Stability's module names (``joint_blocks.3.x_block.attn.qkv``), which kohya-style SD3 LoRAs use:
        a fused qkv spreads row-wise onto q, k and v; the last block's context modulation and the
        final modulation swap halves (nodes.checkpoint.sd3_keys)."""
        from nodes.checkpoint.sd3_keys import lora_modules

        return lora_modules({k: tuple(p.shape) for k, p in network.named_parameters()})

    def original_names(self, network: Any) -> dict[str, str]:
        """diffusers' own parameter names (the original layout's fused qkv has no one-to-one name)."""
        return {name: name for name, _ in network.named_parameters()}

    def merge_names(self, network: Any) -> dict[str, str]:
        """Each parameter under the original layout's block it belongs to (``joint_blocks.3.`` +
        diffusers' own rest): a fused qkv has no name of its own there, but its block is what
        ModelMergeSD3_2B and ModelMergeSD35_Large address (nodes.checkpoint.sd3_keys)."""
        from nodes.checkpoint.sd3_keys import merge_name

        return {name: merge_name(name) for name, _ in network.named_parameters()}

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        from nodes.families.input_checks import pooled_projections

        return {"pooled_projections": pooled_projections(
            extras, batch, device, dtype, "SD3 model needs conditioning with a pooled_output (encode the prompt "
            "with SD3's CLIP: TripleCLIPLoader, or an SD3 checkpoint)")}

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING as diffusers' encode_prompt makes it (see the module docstring); prompt weights
        as for SDXL's CLIPs (nodes.families.text) and FLUX's T5 (nodes.families.t5_weights).
        ``texts``: each encoder's own prompt by tokenizer name (CLIPTextEncodeSD3); an empty
        string there with ``texts["empty_padding"] == "none"`` leaves that encoder out (zeros)."""
        from nodes.families import sd3_text

        return sd3_text.encode(self, clip, text, report, texts)


FAMILY = SD3()
