"""SD3 / SD3.5 ControlNets in diffusers' ``SD3ControlNetModel`` layout (InstantX's releases).

Such a ControlNet is a short MMDiT: the latent and the hint latent are patch-embedded
(the hint through its own zero-initialised ``pos_embed_input``), run through a few joint
blocks with the prompt, and each block's output goes through a linear layer to become a
sample the transformer adds after its own blocks. As diffusers' StableDiffusion3ControlNetPipeline:

* the hint is VAE-encoded at the latent's size and scaled into model space; InstantX's
  ControlNets (``force_zeros_for_pooled_projection``) were trained without the VAE's shift,
  so theirs is ``raw * scale`` (ComfyUI's ``shift_factor = 0`` for these), the others'
  the family's full rule;
* InstantX's ControlNets see zeros for the pooled text, the others the prompt's;
* a ControlNet without a ``context_embedder`` (``joint_attention_dim`` None) reads no prompt.

The samples are spread over the transformer's blocks by diffusers' rule (block i takes
sample ``int(i / (N / n))``) before they are summed, so ControlNets of different depths
stack block by block; the transformer then gets one sample per block.

AliMama's inpainting ControlNet (``extra_conditioning_channels`` 1) reads the masked image's
latent and the kept mask (nodes/control/inpaint.py), pooled text as zeros. Its latent is
shifted and scaled by the VAE's full rule, as diffusers' StableDiffusion3ControlNetInpaintingPipeline
builds it; ComfyUI leaves the shift out for every SD3 ControlNet, a difference of ``shift * scale``
(about 0.09) on each hint latent value, which Kiln does not copy.

Stability's SD3.5 Large ControlNets (blur, canny, depth) have no patch embedder for the
latent and no prompt embedder: the latent goes in through the transformer's own
``pos_embed`` (diffusers' pipeline copies it into the ControlNet; Kiln calls the model's),
the blocks read no prompt, and the pooled text is the prompt's. Their attention has no
q/k norm, so the head width is SD3's 64 unless a folder's config.json says otherwise.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from nodes.checkpoint.load import CheckpointError
from nodes.control.inpaint import MASK_CHANNELS
from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch

SAMPLES = "block_controlnet_hidden_states"
#: Head width of SD3's MMDiT, used when no q/k norm's shape gives it (SD3 Medium era ControlNets).
HEAD_DIM = 64


def is_sd3_controlnet(shapes: Any) -> bool:
    """Whether diffusers-layout keys hold an SD3ControlNetModel (its hint patch embedder and blocks)."""
    return "pos_embed_input.proj.weight" in shapes and "controlnet_blocks.0.weight" in shapes \
        and "controlnet_x_embedder.weight" not in shapes


def _count(shapes: Any, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def controlnet_config(shapes: dict[str, tuple], name: str) -> dict[str, Any]:
    """``SD3ControlNetModel`` arguments from a diffusers-layout file's shapes."""
    if "transformer_blocks.0.adaLN_modulation.1.bias" in shapes:
        raise CheckpointError(f"{name}: an SD3.5 ControlNet in Stability's own layout (adaLN_modulation keys), which "
                              "Kiln does not read yet; its diffusers-layout release (SD3ControlNetModel) loads")
    own_embedder = "pos_embed.proj.weight" in shapes
    try:
        hidden, hint_channels, patch, _ = shapes["pos_embed_input.proj.weight"]
        in_channels = shapes["pos_embed.proj.weight"][1] if own_embedder else hint_channels
        positions = shapes["pos_embed.pos_embed"][1] if own_embedder else None
        norm = shapes.get("transformer_blocks.0.attn.norm_q.weight")
        head = norm[0] if norm else HEAD_DIM
        context = shapes.get("context_embedder.weight")
        config: dict[str, Any] = dict(
            sample_size=128, patch_size=patch, in_channels=in_channels, out_channels=in_channels,
            num_layers=_count(shapes, "transformer_blocks."), attention_head_dim=head,
            num_attention_heads=hidden // head, joint_attention_dim=context[1] if context else None,
            caption_projection_dim=context[0] if context else hidden,
            pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            pos_embed_max_size=round(positions ** 0.5) if positions else None,
            extra_conditioning_channels=hint_channels - in_channels,
            qk_norm="rms_norm" if norm else None, use_pos_embed=own_embedder,
            dual_attention_layers=tuple(i for i in range(_count(shapes, "transformer_blocks."))
                                        if f"transformer_blocks.{i}.attn2.to_q.weight" in shapes),
            # InstantX's (with a prompt embedder) were trained on zero pooled text and unshifted hint latents
            force_zeros_for_pooled_projection=context is not None)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: not a complete SD3 ControlNet ({exc} is missing)") from None
    if config["extra_conditioning_channels"] not in (0, MASK_CHANNELS):
        raise CheckpointError(f"{name}: its hint input takes {hint_channels} channels, not the latent's {in_channels} "
                              f"or that plus a mask ({in_channels + MASK_CHANNELS}, AliMama's inpainting ControlNet)")
    return config


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the SD3ControlNetModel, what it is for the loader's message)."""
    from diffusers import SD3ControlNetModel

    from nodes.checkpoint.load import _assign, _empty

    config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, name)
    network = _assign(_empty(SD3ControlNetModel, config), state, "SD3 ControlNet", dtype)
    kind = "InstantX-style" if config["force_zeros_for_pooled_projection"] else "pooled-text"
    return network, {"format": f"diffusers single file, {config['num_layers']} blocks, {kind}"}


def spread(samples: Any, blocks: int) -> list:
    """``samples`` over ``blocks`` transformer blocks, diffusers' SD3 rule."""
    if not samples:
        return []
    interval = blocks / len(samples)
    return [samples[int(i / interval)] for i in range(blocks)]


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
        model_config: Any, latent: Any, model: Any = None) -> dict[str, list]:
    """One SD3 ControlNet's samples for rows ``x`` [B, 16, h, w], one per transformer block, float32."""
    import torch

    from nodes.control.apply import latent_hint, to_rows
    from nodes.control.inpaint import with_mask

    b, _, h, w = x.shape
    dtype, device = network.dtype, x.device
    zeros = bool(network.config.force_zeros_for_pooled_projection)
    extra = int(network.config.extra_conditioning_channels or 0)
    shifted = extra or not zeros  # AliMama's inpainting ControlNet reads shifted latents (see the module's note)
    to_model = latent.to_model if shifted else (lambda raw: raw * latent.scale)
    hint = with_mask(link, latent_hint(link, h, w, to_model, "SD3" if shifted else "SD3 (InstantX)"), extra)
    pooled = kwargs["pooled_projections"].to(dtype)
    time = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(b)
    hidden = x.to(dtype)
    if network.pos_embed is None:  # SD3.5 Large's: the transformer's patch embedder
        if model is None or getattr(model, "pos_embed", None) is None:
            raise ConditioningError(f"the SD3 ControlNet {link.net.name!r} embeds the latent with the model's patch "
                                    "embedder, and this model has none", "positive")
        hidden = model.pos_embed(x.to(model.dtype)).to(dtype)
    samples = network(hidden_states=hidden, controlnet_cond=to_rows(hint, b).to(device, dtype),
                      conditioning_scale=float(link.strength), timestep=time.to(dtype),
                      encoder_hidden_states=context.to(dtype) if network.config.joint_attention_dim else None,
                      pooled_projections=torch.zeros_like(pooled) if zeros else pooled, return_dict=False)[0]
    return {SAMPLES: [s.to(torch.float32) for s in spread(samples, int(model_config["num_layers"]))]}


def inputs(totals: dict[str, list]) -> dict[str, Any]:
    """The transformer's keyword: one summed sample per joint block."""
    return {SAMPLES: list(totals[SAMPLES])}
