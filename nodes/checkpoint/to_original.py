"""diffusers components -> one state dict in the original (LDM / ComfyUI) key layout.

Users' single-file checkpoints use the layout of the original Stable Diffusion
code (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``
or SDXL's ``conditioner.embedders.N.*``). diffusers ships the reverse direction
only, so this module writes that layout: the tests save tiny models with it and
load them back through the real loader (which reads with diffusers' own
converters, so the two directions are independent code), and ``make run`` uses
it for its demo checkpoint. General over level count, layers per level and
transformer depth.
"""
from __future__ import annotations

from typing import Any, Iterable

_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _prefix_map(state: dict[str, Any], pairs: Iterable[tuple[str, str]],
                what: str) -> list[tuple[str, str, str, Any]]:
    """(diffusers prefix, original prefix, rest of the key, value) for every entry."""
    pairs = sorted(pairs, key=lambda p: -len(p[0]))  # longest prefix first
    out = []
    for key, value in state.items():
        for a, b in pairs:
            if key.startswith(a):
                out.append((a, b, key[len(a):], value))
                break
        else:
            raise KeyError(f"{what}: no original-layout name for {key!r}")
    return out


def unet_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    L, n = config["layers_per_block"], len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("class_embedding.linear_1.", "label_emb.0.0."), ("class_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{2 if up_attn[i] else 1}."))
        for j in range(L + 1):
            k = i * (L + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
    out = {}
    for prefix, new, rest, value in _prefix_map(state, pairs, "unet"):
        if ".resnets." in prefix:
            rest = next((rb + rest[len(ra):] for ra, rb in _RESNET if rest.startswith(ra)), rest)
        out["model.diffusion_model." + new + rest] = value
    return out


def vae_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    L, n = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for p in ("encoder", "decoder"):
        pairs += [(f"{p}.conv_in.", f"{p}.conv_in."), (f"{p}.conv_out.", f"{p}.conv_out."),
                  (f"{p}.conv_norm_out.", f"{p}.norm_out."), (f"{p}.mid_block.attentions.0.", f"{p}.mid.attn_1.")]
        pairs += [(f"{p}.mid_block.resnets.{r}.", f"{p}.mid.block_{r + 1}.") for r in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(L)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(L + 1)]
        if i < n - 1:
            pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                      (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = {}
    for prefix, new, rest, value in _prefix_map(state, pairs, "vae"):
        if prefix.endswith("attentions.0."):
            rest = next((rb + rest[len(ra):] for ra, rb in _VAE_ATTN if rest.startswith(ra)), rest)
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new + rest.replace("conv_shortcut.", "nin_shortcut.")] = value
    return out


def _text_model_keys(state: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5.6 drops ``text_model.`` from CLIPTextModel keys; put it back."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in state.items()}


def openai_clip_to_original(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in _text_model_keys(state).items() if k != "text_model.embeddings.position_ids"}


def open_clip_to_original(state: dict[str, Any], prefix: str, projection: Any = None,
                          extra_layers: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """OpenCLIP's layout: fused q/k/v, ``resblocks``, projection as a [width, dim] matrix.

    ``extra_layers`` (diffusers-layout layer dicts) are appended after the model's
    own: SD 2.x checkpoints carry OpenCLIP's last block, which SD 2.x never uses
    (it conditions on the penultimate layer).
    """
    state = _text_model_keys(state)
    out: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        if key.startswith("text_model.encoder.layers."):
            idx, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            layers.setdefault(int(idx), {})[rest] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key != "text_model.embeddings.position_ids":
            raise KeyError(f"open_clip: no original-layout name for {key!r}")
    if projection is not None:
        out["text_projection"] = projection
    names = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
             "self_attn.out_proj.": "attn.out_proj."}
    all_layers = [layers[i] for i in sorted(layers)] + list(extra_layers)
    import torch

    for i, layer in enumerate(all_layers):
        base = f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[base + f"attn.in_proj_{part}"] = torch.cat(
                [layer[f"self_attn.{q}_proj.{part}"] for q in ("q", "k", "v")], dim=0)
        for key, value in layer.items():
            if key.startswith("self_attn.") and not key.startswith("self_attn.out_proj."):
                continue
            a = next(a for a in names if key.startswith(a))
            out[base + names[a] + key[len(a):]] = value
    return {prefix + k: v for k, v in out.items()}


def components_to_original(components: dict[str, Any], prediction_type: str = "epsilon",
                           seed: int = 1) -> dict[str, Any]:
    """One original-layout state dict for a pipeline's unet, vae and text encoder(s).

    SD 2.x is recognised by an OpenCLIP-style first encoder (gelu); its unused last
    OpenCLIP block and projection are filled with seeded random values, as a real
    file has them. Without a first encoder (SDXL's refiner) the second is written
    alone at ``conditioner.embedders.0.model.``. v-prediction is marked with ComfyUI's ``v_pred`` key.
    """
    import torch

    unet, vae, te = components["unet"], components["vae"], components.get("text_encoder")
    sd = {**unet_to_original(unet.state_dict(), dict(unet.config)), **vae_to_original(vae.state_dict(), dict(vae.config))}
    if te is None:  # SDXL refiner: OpenCLIP bigG alone, at embedders.0
        sd.update(open_clip_to_original(components["text_encoder_2"].state_dict(), "conditioner.embedders.0.model."))
    elif "text_encoder_2" in components:
        te2 = components["text_encoder_2"]
        sd.update(openai_clip_to_original(te.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_original(te2.state_dict(), "conditioner.embedders.1.model."))
    elif te.config.hidden_act == "quick_gelu":
        sd.update(openai_clip_to_original(te.state_dict(), "cond_stage_model.transformer."))
    else:
        gen = torch.Generator().manual_seed(seed)
        template = {k.split(".", 4)[4]: v for k, v in _text_model_keys(te.state_dict()).items()
                    if k.startswith("text_model.encoder.layers.0.")}
        extra = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in template.items()}
        width = te.config.hidden_size
        sd.update(open_clip_to_original(te.state_dict(), "cond_stage_model.model.", extra_layers=[extra],
                                        projection=torch.randn(width, width, generator=gen) * 0.02))
    if prediction_type == "v_prediction":
        sd["v_pred"] = torch.tensor([])
    return {k: v.detach().contiguous() for k, v in sd.items()}
