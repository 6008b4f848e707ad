"""Which model a single-file checkpoint holds, and its architecture, from key names and tensor shapes.

Like ComfyUI's model detection, nothing here depends on a file name or a config
download: each family (:mod:`nodes.families`) recognises its own text-encoder
layout, and every size (channels, levels, layers per level, transformer depth,
cross-attention and text widths) comes from the shapes. What shapes cannot tell
(head counts, activations, norm groups, schedule) comes from the family. The
result is a set of diffusers/transformers config dicts, so a full-size SD 1.5 file
yields SD 1.5's config and a tiny test file the tiny one, through the same code.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from nodes import families
from nodes.checkpoint.clip_configs import TEXT_HEAD_WIDTH, text_config_defaults
from nodes.families.base import Detected, Family, Shapes, has_prefix
from nodes.families import inpaint
from nodes.families.base import indices as _indices

UNET = "model.diffusion_model."
VAE = "first_stage_model."


class UnsupportedCheckpoint(ValueError):
    """The file is readable but holds no model Kiln can run; the message says what it holds."""


def family_of(shapes: Shapes) -> Family:
    """The family whose layout the file has, with a clear error for what is not a supported model."""
    has = lambda prefix: has_prefix(shapes, prefix)  # noqa: E731
    if not has(UNET):
        if has("encoder.down.") or has(VAE):
            raise UnsupportedCheckpoint("this file holds only a VAE; put it in models/vae and load it with VAELoader")
        if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in shapes):
            raise UnsupportedCheckpoint("this file is a LoRA, not a checkpoint")
        raise UnsupportedCheckpoint("no Stable Diffusion UNet in this file (no 'model.diffusion_model.*' keys)")
    in_ch = shapes.get(UNET + "input_blocks.0.0.weight", (0, 4))[1]
    if in_ch != 4 and not inpaint.is_inpainting(in_ch, 4) and not inpaint.is_instruct_pix2pix(in_ch, 4):
        raise UnsupportedCheckpoint(f"the UNet takes {in_ch} input channels (a depth or other conditioned model); "
                                    "checkpoints with 4 (text/image-to-image), 8 (InstructPix2Pix) or 9 "
                                    "(inpainting) are supported")
    for family in families.ALL:
        if family.claims(shapes):
            return family
    raise UnsupportedCheckpoint("unknown model family: no text encoder this loader knows "
                                "(expected SD 1.x, SD 2.x, SDXL base or refiner keys)")


def unet_config(shapes: Shapes, family: Family, pooled_dim: int | None = None) -> dict[str, Any]:
    p = UNET
    blocks = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # input block indices of the resnets, per level
    for k in blocks[1:]:
        if p + f"input_blocks.{k}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(k)
    layers = len(levels[0])
    if any(len(lv) != layers for lv in levels):
        raise UnsupportedCheckpoint("UNet levels have different numbers of layers; not an SD UNet")
    channels = [shapes[p + f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] for lv in levels]

    def depth(prefix: str) -> int:
        return len(_indices(shapes, re.escape(p + prefix) + r"transformer_blocks\.(\d+)\."))

    down_attn = [depth(f"input_blocks.{lv[0]}.1.") > 0 for lv in levels]
    n = len(levels)
    up_attn = [depth(f"output_blocks.{i * (layers + 1)}.1.") > 0 for i in range(n)]
    attn_keys = sorted(k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    if not attn_keys:
        raise UnsupportedCheckpoint("the UNet has no cross-attention; not a text-conditioned SD model")
    proj_in = next(k for k in sorted(shapes) if k.startswith(p) and k.endswith(".proj_in.weight"))
    base = channels[0]
    config: dict[str, Any] = dict(
        family.unet_defaults(),
        in_channels=shapes[p + "input_blocks.0.0.weight"][1],
        out_channels=shapes[p + "out.2.weight"][0],
        layers_per_block=layers,
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        cross_attention_dim=shapes[attn_keys[0]][1],
        use_linear_projection=len(shapes[proj_in]) == 2,
        transformer_layers_per_block=tuple(max(1, depth(f"input_blocks.{lv[0]}.1.")) for lv in levels),
    )
    # diffusers' middle block takes the last level's depth; a last level without attention has none of
    # its own, so it takes the middle block's (SDXL refiner: depths 0, 4, 4, 0, middle block 4).
    mid = depth("middle_block.1.")
    if mid and not down_attn[-1]:
        config["transformer_layers_per_block"] = config["transformer_layers_per_block"][:-1] + (mid,)
    if mid not in (0, config["transformer_layers_per_block"][-1]):
        raise UnsupportedCheckpoint("the UNet's middle block depth does not match its last level")
    config["attention_head_dim"] = family.unet_heads(channels)
    time_dim = shapes[p + "time_embed.0.weight"][0]
    if time_dim != 4 * base:
        config["time_embedding_dim"] = time_dim
    if config.get("addition_embed_type") == "text_time":
        adm = shapes[p + "label_emb.0.0.weight"][1]
        ids = getattr(family, "time_id_count", 6)
        if pooled_dim is None or adm <= pooled_dim or (adm - pooled_dim) % ids:
            raise UnsupportedCheckpoint(f"cannot split the {family.name} size embedding "
                                        f"(model.diffusion_model.label_emb.0.0.weight, {adm} wide) into {ids} time "
                                        f"ids + pooled text ({pooled_dim} wide)")
        config.update(projection_class_embeddings_input_dim=adm, addition_time_embed_dim=(adm - pooled_dim) // ids)
    elif config.get("class_embed_type") == "projection":  # unCLIP: image embedding + noise level
        config["projection_class_embeddings_input_dim"] = shapes[p + "label_emb.0.0.weight"][1]
    elif p + "label_emb.0.0.weight" in shapes:
        raise UnsupportedCheckpoint("the UNet has a class/size embedding (unCLIP or upscaler); not supported")
    return config


def vae_config(shapes: Shapes, family: Family, prefix: str = VAE) -> dict[str, Any]:
    p = prefix
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels or p + "decoder.conv_in.weight" not in shapes:
        raise UnsupportedCheckpoint("no VAE in this file (no encoder/decoder weights)")
    layers = len(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    return dict(
        family.vae_defaults(),
        in_channels=shapes[p + "encoder.conv_in.weight"][1],
        out_channels=shapes[p + "decoder.conv_out.weight"][0],
        latent_channels=shapes[p + "decoder.conv_in.weight"][1],
        layers_per_block=layers,
        block_out_channels=tuple(shapes[p + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels),
        down_block_types=("DownEncoderBlock2D",) * len(levels),
        up_block_types=("UpDecoderBlock2D",) * len(levels),
    )


def openai_text_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    p = prefix + "text_model." if (prefix + "text_model.embeddings.token_embedding.weight") in shapes else prefix
    vocab, width = shapes[p + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    return dict(text_config_defaults("openai"), vocab_size=vocab, hidden_size=width,
                max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
                num_hidden_layers=len(layers), num_attention_heads=max(1, width // TEXT_HEAD_WIDTH),
                intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0], projection_dim=width)


def openclip_text_config(shapes: Shapes, prefix: str, drop_last: bool) -> dict[str, Any]:
    """OpenCLIP text tower; SD 2.x conditions on its penultimate layer, so the last is dropped."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    proj = shapes.get(prefix + "text_projection", (width, width))
    return dict(text_config_defaults("openclip"), vocab_size=vocab, hidden_size=width,
                max_position_embeddings=shapes[prefix + "positional_embedding"][0],
                num_hidden_layers=layers - (1 if drop_last else 0),
                num_attention_heads=max(1, width // TEXT_HEAD_WIDTH),
                intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                projection_dim=proj[1])


def prediction_type(shapes: Shapes, family: Family, unet: dict[str, Any],
                    std_of: Callable[[str], float | None] | None = None) -> tuple[str, str]:
    """epsilon or v_prediction, and why.

    1. A ``v_pred`` key marks v-prediction (ComfyUI's convention, also written by
       Kiln's own converter).
    2. SD 2.x without it: the 768-v and 512-base releases share every shape, so,
       like ComfyUI, look at the last output block's first transformer norm: the
       spread (std) of its bias is above 0.09 in v-models and below in epsilon ones.
    3. Otherwise epsilon (SD 1.x and SDXL base are epsilon models).
    The loader's ``prediction`` input overrides all of this.
    """
    if "v_pred" in shapes:
        return "v_prediction", "the checkpoint has a 'v_pred' key"
    if family.prediction_from_weights and std_of is not None:
        probe = std_probe_key(unet)
        std = std_of(probe) if probe in shapes else None
        if std is not None:
            kind = "v_prediction" if std > 0.09 else "epsilon"
            return kind, f"SD 2.x rule: std of {probe[len(UNET):]} is {std:.3f} ({'>' if std > 0.09 else '<='} 0.09)"
    return family.default_prediction, "the family's default"


def std_probe_key(unet: dict[str, Any]) -> str:
    """ComfyUI's SD 2.x probe (output_blocks.11 in full-size SD 2), generalised to any depth."""
    n, layers = len(unet["block_out_channels"]), unet["layers_per_block"]
    last = n * (layers + 1) - 1
    return UNET + f"output_blocks.{last}.1.transformer_blocks.0.norm1.bias"


def text_configs(shapes: Shapes, family: Family) -> dict[str, dict[str, Any]]:
    """CLIPTextConfig kwargs of each of the family's encoders, from the file's shapes."""
    out = {}
    for spec in family.text_encoders:
        if spec.kind == "openai":
            out[spec.module] = openai_text_config(shapes, spec.prefix)
        else:
            out[spec.module] = openclip_text_config(shapes, spec.prefix, drop_last=spec.dropped > 0)
    return out


#: The keys by which a file asks for continuous-time EDM sampling (ComfyUI's SDXL model_type).
EDM_VPRED_MAX, EDM_VPRED_MIN = "edm_vpred.sigma_max", "edm_vpred.sigma_min"


#: The keys of a Playground v2.5 file (its latent statistics; ComfyUI uses its own constants for them).
PLAYGROUND_KEYS = ("edm_mean", "edm_std")


def continuous_sampling(shapes: Shapes, family: Family,
                        value_of: Callable[[str], float] | None) -> tuple[dict[str, Any], str, Any] | None:
    """(EDM scheduler config, why, latent format or None) for a file that asks for continuous-time
    sampling, else None.

    ComfyUI's rules for SDXL-shaped files: ``edm_mean`` and ``edm_std`` (Playground v2.5) mean
    Karras et al.'s F-prediction at data spread 0.5 between sigma 0.002 and 80 in Playground's
    latent space; ``edm_vpred.sigma_max`` (CosXL, CosXL-Edit) means v-prediction on
    ModelSamplingContinuousEDM's levels (network time 0.25 log sigma, data spread 1) up to that
    sigma, down to ``edm_vpred.sigma_min`` or 0.002. ComfyUI reads these keys on SDXL only;
    another family's file with them is refused rather than sampled wrongly.
    """
    playground = all(k in shapes for k in PLAYGROUND_KEYS)
    if EDM_VPRED_MAX not in shapes and not playground:
        return None
    if family.name != "sdxl":
        marker = ", ".join(PLAYGROUND_KEYS) if playground else EDM_VPRED_MAX
        raise UnsupportedCheckpoint(f"the file asks for EDM sampling ({marker}) but is a {family.name} model; "
                                    "ComfyUI and Kiln read that on SDXL models only")
    from nodes.samplers.edm import edm_config

    if playground:
        from nodes.families.sdxl import PLAYGROUND_LATENT

        return (edm_config("edm", 0.002, 80.0, 0.5), "the checkpoint has 'edm_mean' and 'edm_std' (Playground "
                "v2.5): continuous-time EDM prediction, sigma 0.002 to 80, Playground's latent space",
                PLAYGROUND_LATENT)
    if value_of is None:
        raise UnsupportedCheckpoint(f"{EDM_VPRED_MAX} must be read to sample this EDM model")
    high = float(value_of(EDM_VPRED_MAX))
    low = float(value_of(EDM_VPRED_MIN)) if EDM_VPRED_MIN in shapes else 0.002
    if not 0.0 < low < high:
        raise UnsupportedCheckpoint(f"its EDM sigmas are out of order (sigma_min {low}, sigma_max {high})")
    return (edm_config("v_prediction", low, high, 1.0),
            f"the checkpoint has '{EDM_VPRED_MAX}' (CosXL): continuous-time v-prediction, sigma {low:g} to {high:g}",
            None)


def detect(shapes: Shapes, std_of: Callable[[str], float | None] | None = None,
           value_of: Callable[[str], float] | None = None) -> Detected:
    """Family, prediction type, component configs and the sampling the file asks for;
    ``std_of(key)`` reads a tensor's std, ``value_of(key)`` a one-value tensor (EDM sigmas)."""
    family = family_of(shapes)
    text = text_configs(shapes, family)
    pooled = next((text[s.module]["projection_dim"] for s in family.text_encoders if s.pooled), None)
    unet = unet_config(shapes, family, pooled)
    vae = vae_config(shapes, family)
    continuous = continuous_sampling(shapes, family, value_of)
    if continuous is not None:
        config, why, latent = continuous
        return Detected(family, config["prediction_type"], unet, vae, text, why, sampling=config, latent=latent)
    pred, why = prediction_type(shapes, family, unet, std_of)
    return Detected(family, pred, unet, vae, text, why)


def text_encoder_layout(shapes: Shapes) -> tuple[str, str] | None:
    """("transformers" | "openclip", key prefix) of a lone text-encoder file, or None.

    Accepts the layouts people have: transformers' (with or without the
    ``text_model.`` prefix that transformers 5 dropped) and OpenCLIP's original
    one, either under any prefix (ComfyUI-saved files carry one).
    """
    for k in sorted(shapes):
        if k.endswith("embeddings.token_embedding.weight"):
            prefix = k[: -len("embeddings.token_embedding.weight")]
            return "transformers", prefix[: -len("text_model.")] if prefix.endswith("text_model.") else prefix
        if k.endswith("token_embedding.weight"):
            prefix = k[: -len("token_embedding.weight")]
            if prefix + "transformer.resblocks.0.attn.in_proj_weight" in shapes:
                return "openclip", prefix
    return None


def text_kind(shapes: Shapes, layout: str, prefix: str) -> str:
    """Which CLIP a lone encoder is: "openai" (CLIP-L) or "openclip" (ViT-H / bigG).

    OpenCLIP's own layout says so; in transformers' layout the width (1024 and 1280
    are OpenCLIP's H and bigG) or a text projection (SDXL's second encoder) does.
    """
    if layout == "openclip":
        return "openclip"
    p = prefix + "text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else prefix
    width = shapes[p + "embeddings.token_embedding.weight"][1]
    projected = prefix + "text_projection.weight" in shapes and width != 768  # SD3's CLIP-L has one too
    return "openclip" if width in (1024, 1280) or projected else "openai"


def lone_text_config(shapes: Shapes, layout: str, prefix: str, kind: str, drop_last: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs of a lone encoder file in either layout, with ``kind``'s ids and activation."""
    if layout == "openclip":
        return openclip_text_config(shapes, prefix, drop_last=drop_last)
    config = dict(openai_text_config(shapes, prefix), **{k: v for k, v in text_config_defaults(kind).items()
                                                         if k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                  "hidden_act")})
    projection = shapes.get(prefix + "text_projection.weight")
    if projection is not None:
        config["projection_dim"] = projection[0]
    return config


def unet_layout_config(shapes: Shapes) -> dict[str, Any]:
    """The block structure of a diffusers-layout UNet file (what the layout converter needs)."""
    n = len(_indices(shapes, r"down_blocks\.(\d+)\."))
    return dict(layers_per_block=len(_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")),
                block_out_channels=tuple(range(n)),
                down_block_types=tuple("CrossAttnDownBlock2D" if has_prefix(shapes, f"down_blocks.{i}.attentions.")
                                       else "DownBlock2D" for i in range(n)),
                up_block_types=tuple("CrossAttnUpBlock2D" if has_prefix(shapes, f"up_blocks.{i}.attentions.")
                                     else "UpBlock2D" for i in range(n)))
