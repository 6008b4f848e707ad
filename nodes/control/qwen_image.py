"""Qwen-Image ControlNets: InstantX's Union and Inpainting ones (diffusers' ``QwenImageControlNetModel``).

Such a ControlNet is a short Qwen-Image transformer (``img_in``, ``txt_norm``, ``txt_in``,
``time_text_embed``, a few ``transformer_blocks``) plus the hint's input layer
``controlnet_x_embedder`` (zero-initialised, added to the embedded latent) and one linear per
block (``controlnet_blocks.*``). InstantX ships it as a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``); ComfyUI's users have the same tensors as one
``Qwen-Image-InstantX-ControlNet-*.safetensors``. The config is read from the shapes by the
transformer's rule (nodes.checkpoint.qwen_image_load.transformer_config).

As ``QwenImageControlNetPipeline`` runs it, and Kiln does:

* the hint is VAE-encoded at the latent's size, normalised per channel into model space and
  packed into 2x2 patch tokens (:func:`nodes.families.flux.pack`); the Inpainting ControlNet
  (hint embedder 4 inputs wider) reads the latent of the image with the area to repaint blacked
  out and the kept mask appended before packing (nodes/control/inpaint.py);
* it runs on the same latent tokens, flow time, image shape and text mask as the transformer,
  and its per-block outputs times the strength are added after the transformer's blocks, spread
  by the transformer's rule (output i serves ceil(N / n) consecutive blocks);
* both sides of true CFG get the samples the ControlNet makes with the positive prompt (the
  pipeline calls it once, with the prompt): :meth:`QwenImage.controlnet_reads_positive_prompt`.
  ComfyUI runs it on each side with that side's prompt.

alibaba-pai's Fun ControlNet Union for Qwen-Image-2512 (``control_img_in``, ``control_blocks``) is
recognised here too and run by nodes/control/qwen_fun.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nodes.checkpoint.load import CheckpointError
from nodes.control.inpaint import MASK_CHANNELS, QWEN_PATCH as PATCH

if TYPE_CHECKING:
    import torch

SAMPLES = "controlnet_block_samples"
#: Only a Qwen-Image ControlNet has these together (ComfyUI's detection: the ControlNet blocks and
#: Qwen-Image's feed-forward name; FLUX's ControlNets have ``ff.net`` instead).
MARKERS = ("controlnet_blocks.0.weight", "transformer_blocks.0.img_mlp.net.0.proj.weight",
           "controlnet_x_embedder.weight")
#: The diffusers class a folder's config.json names.
CLASS_NAME = "QwenImageControlNetModel"


#: alibaba-pai's Fun ControlNet Union (nodes/control/qwen_fun.py; ComfyUI's detection keys).
FUN_MARKERS = ("control_img_in.weight", "control_blocks.0.after_proj.weight")
#: The config entry that marks a Fun ControlNet.
FUN = "kiln_qwen_fun"


def is_qwen_controlnet(shapes: Any) -> bool:
    return all(k in shapes for k in MARKERS)


def is_fun_controlnet(shapes: Any) -> bool:
    return all(k in shapes for k in FUN_MARKERS)


def is_fun(config: Any) -> bool:
    """Whether a loaded Qwen-Image ControlNet's config is a Fun ControlNet's."""
    return bool(config.get(FUN)) if hasattr(config, "get") else False


def controlnet_config(shapes: dict[str, tuple], name: str) -> dict[str, Any]:
    """``QwenImageControlNetModel`` arguments from a diffusers-layout file's shapes."""
    from nodes.checkpoint.qwen_image_load import transformer_config

    try:
        base = transformer_config({**shapes, "proj_out.weight": (PATCH * 16,)})
        hint = shapes["controlnet_x_embedder.weight"][1]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a complete Qwen-Image ControlNet ({exc} is missing)") from None
    extra = hint - base["in_channels"]
    if extra not in (0, PATCH * MASK_CHANNELS):
        raise CheckpointError(f"{name}: its hint input takes {hint} channels, not the latent's {base['in_channels']} "
                              f"or that plus a mask ({base['in_channels'] + PATCH * MASK_CHANNELS}, InstantX's "
                              "Inpainting ControlNet)")
    keep = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "axes_dims_rope")
    return {**{k: base[k] for k in keep}, "extra_condition_channels": extra}


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the QwenImageControlNetModel, what it is for the loader's message)."""
    from diffusers import QwenImageControlNetModel

    from nodes.checkpoint.load import _assign, _empty
    from nodes.checkpoint.tensors import plain

    state = plain(state)
    config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, name)
    network = _assign(_empty(QwenImageControlNetModel, config), dict(state), "Qwen-Image ControlNet", dtype)
    kind = "Inpainting (hint + mask)" if config["extra_condition_channels"] else "Union"
    return network, {"format": f"{config['num_layers']} blocks, {kind}"}


def hint_tokens(link: Any, rows: int, h: int, w: int, latent: Any, device: Any, dtype: Any) -> "torch.Tensor":
    """The hint as packed model-space latent tokens [rows, (h/2)(w/2), 64 or 68], encoded once per size.
    The kept mask goes to the latent's size by diffusers' rule (nearest, not ComfyUI's nearest-exact)."""
    from nodes.control.apply import latent_hint, to_rows
    from nodes.control.inpaint import extra_channels, with_mask
    from nodes.families.flux import pack

    key = ("qwen-packed", h, w)
    if key not in link.cache:
        hint = latent_hint(link, h, w, latent.to_model, "Qwen-Image")
        link.cache[key] = pack(with_mask(link, hint, extra_channels(link.net.config), method="nearest"))
    return to_rows(link.cache[key], rows).to(device, dtype)


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
        model_config: Any, latent: Any, model: Any = None) -> dict[str, list]:
    """One Qwen-Image ControlNet's block samples for rows ``x`` [B, 16, h, w], one per model block,
    float32 (a Fun ControlNet's by nodes/control/qwen_fun.py, with the model's layers)."""
    import torch

    from nodes.control.flux import spread
    from nodes.families.flux import pack

    if is_fun(link.net.config):
        from nodes.control import qwen_fun

        return {SAMPLES: qwen_fun.run(network, link, x, t, context, model_config, latent, model)}

    b, _, h, w = x.shape
    dtype, device = network.dtype, x.device
    time = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(b) / 1000.0
    mask = kwargs.get("text_mask")
    hint = hint_tokens(link, b, h, w, latent, device, dtype)
    samples = network(hidden_states=pack(x).to(dtype), controlnet_cond=hint, conditioning_scale=float(link.strength),
                      encoder_hidden_states=context.to(dtype),
                      encoder_hidden_states_mask=None if mask is None else mask.to(device),
                      timestep=time.to(dtype), img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)
    return {SAMPLES: [s.to(torch.float32) for s in spread(samples or [], int(model_config["num_layers"]))]}


def inputs(totals: dict[str, list]) -> dict[str, Any]:
    """The transformer's keyword: one summed sample per block."""
    return {SAMPLES: list(totals[SAMPLES])}
