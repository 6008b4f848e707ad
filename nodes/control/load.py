"""Reading a ControlNet file into diffusers' ControlNetModel, offline, whatever its layout.

Three layouts exist in the wild: the original one (lllyasviel's ``control_v11p_sd15_*.pth``,
keys ``control_model.input_blocks...``, ``input_hint_block``, ``zero_convs``,
``middle_block_out``; ComfyUI's fp16 repacks drop the ``control_model.`` prefix), the
diffusers one as a single file (``controlnet_cond_embedding``, ``down_blocks``,
``controlnet_down_blocks``...) and a diffusers folder (``config.json`` + weights).

A folder is read with ``ControlNetModel.from_pretrained`` (its config is local). A
single file of either layout is brought to the original layout, where the
architecture is read from shapes by the same rule as checkpoints
(:func:`nodes.checkpoint.detect.unet_config`, the family by
:func:`nodes.families.for_unet`), then converted with diffusers' own
``convert_controlnet_checkpoint`` (what ``from_single_file`` uses, which would need a
hub config). A "diff" ControlNet (a ``difference`` key: weights stored as the
difference to the base UNet) needs the model it was made against: DiffControlNetLoader
adds that UNet's weights, as ComfyUI does. FLUX.1 ControlNets (diffusers' layout, one
file or a folder whose config names FluxControlNetModel) are recognised by
nodes/control/flux_load.py; SD3 ones (diffusers' SD3ControlNetModel) by nodes/control/sd3.py;
SDXL union ones (xinsir's, diffusers' ControlNetUnionModel) by nodes/control/sdxl_union.py;
Qwen-Image ones (InstantX's, diffusers' QwenImageControlNetModel, and alibaba-pai's Fun Union) by
nodes/control/qwen_image.py, before FLUX's, whose markers InstantX's share.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes import families
from nodes.checkpoint import detect as det
from nodes.checkpoint.load import CheckpointError, _assign, _empty, read_state_dict
from nodes.checkpoint.to_original import unet_to_original
from nodes.control import flux_load, sdxl_union
from nodes.control import qwen_image as qwen_control
from nodes.control import sd3 as sd3_control
from nodes.families.base import Family, has_prefix
from nodes.runtime.precision import resolve

PREFIX = "control_model."
#: diffusers' hint encoder: conv_in, 6 blocks, conv_out -> the original Sequential's conv indices.
HINT_CONVS = 8


@dataclass
class LoadedControlNet:
    """What the model manager stores: the ControlNetModel it places, and what it is."""

    family: Family
    network: Any
    info: dict[str, Any] = field(default_factory=dict)

    def kiln_modules(self) -> dict[str, Any]:
        return {"": self.network}


def _hint_pairs() -> list[tuple[str, str]]:
    pairs = [("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
             ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (HINT_CONVS - 1)}.")]
    pairs += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * (i + 1)}.")
              for i in range(HINT_CONVS - 2)]
    return pairs


def diffusers_to_original(state: dict[str, Any], name: str) -> dict[str, Any]:
    """A diffusers-layout ControlNet's tensors under original-layout names (no prefix)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    own: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    hint = dict(_hint_pairs())
    for key, value in state.items():
        m = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)
        if m:
            own[f"zero_convs.{m.group(1)}.0.{m.group(2)}"] = value
        elif key.startswith("controlnet_mid_block."):
            own["middle_block_out.0." + key[len("controlnet_mid_block."):]] = value
        elif key.startswith("controlnet_cond_embedding."):
            prefix = next((a for a in hint if key.startswith(a)), None)
            if prefix is None:
                raise CheckpointError(f"{name}: a hint encoder layer Kiln does not know ({key})")
            own[hint[prefix] + key[len(prefix):]] = value
        else:
            rest[key] = value
    try:
        unet = unet_to_original(rest, det.unet_layout_config(shapes))
    except KeyError as exc:
        raise CheckpointError(f"{name}: a diffusers-layout ControlNet with a key Kiln does not know ({exc})") from None
    own.update({k[len(det.UNET):]: v for k, v in unet.items()})
    return own


def original_state(state: dict[str, Any], name: str) -> tuple[dict[str, Any], bool]:
    """(tensors under original-layout names without prefix, whether it is a diff ControlNet)."""
    diff = "difference" in state
    state = {k: v for k, v in state.items() if k != "difference"}
    if has_prefix(state, PREFIX):
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, diff
    if "input_hint_block.0.weight" in state:
        return state, diff
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return diffusers_to_original(state, name), diff
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if has_prefix(shapes, det.UNET) or has_prefix(shapes, "input_blocks.") or "conv_in.weight" in shapes:
        what = "a diffusion model (UNet), not a ControlNet: it has no hint encoder"
    elif any(k.startswith(("lora_", "lora_unet_")) or ".lora_" in k for k in shapes):
        what = "a LoRA, not a ControlNet"
    else:
        what = "no ControlNet (no input_hint_block / controlnet_cond_embedding weights); " \
               "T2I-Adapters and control-LoRAs are not supported"
    raise CheckpointError(f"{name} holds {what}")


def controlnet_config(shapes: dict[str, tuple], name: str) -> tuple[Family, dict[str, Any]]:
    """The family and ControlNetModel config of an original-layout ControlNet (no prefix)."""
    from diffusers import ControlNetModel

    prefixed = {det.UNET + k: v for k, v in shapes.items()}
    try:
        family = families.for_unet(prefixed)
        # unet_config reads a full UNet; a ControlNet has no decoder, whose output width it asks for.
        prefixed.setdefault(det.UNET + "out.2.weight", (shapes["input_blocks.0.0.weight"][1],))
        unet = det.unet_config(prefixed, family, family.pooled_dim(prefixed))
    except (det.UnsupportedCheckpoint, KeyError, StopIteration, IndexError) as exc:
        raise CheckpointError(f"{name}: not a ControlNet of a known family ({exc})") from None
    hint = [shapes.get(f"input_hint_block.{2 * i}.weight") for i in range(HINT_CONVS)]
    if any(h is None for h in hint) or f"input_hint_block.{2 * HINT_CONVS}.weight" in shapes:
        raise CheckpointError(f"{name}: the hint encoder is not the standard 8-convolution one")
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in unet.items() if k in accepted}
    config.update(conditioning_channels=hint[0][1],
                  conditioning_embedding_out_channels=tuple(hint[i][0] for i in (0, 2, 4, 6)))
    return family, config


def family_dtype(dtype: Any, family: str) -> Any:
    """``dtype``, or the model manager's rule (nodes.runtime.precision) resolved for the family ``family``'s
    ControlNets, which compute beside its denoiser and hold in the same dtypes."""
    return resolve(dtype, families.by_name(family))


def load_controlnet(path: Path, dtype: Any, base_unet: Any = None) -> LoadedControlNet:
    """The ControlNet in ``path`` (file or diffusers folder) in ``dtype`` (or the manager's rule resolved for
    its family), eval mode.

    ``base_unet``: the diffusers UNet a diff ControlNet's weights are added to.
    """
    if path.is_dir():
        return _load_folder(path, dtype)
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as sfu

    state = read_state_dict(path)
    if qwen_control.is_fun_controlnet(state):
        from nodes.control import qwen_fun

        network, info = qwen_fun.load(state, path.name, family_dtype(dtype, "qwen_image"))
        return LoadedControlNet(families.by_name("qwen_image"), network, info)
    if qwen_control.is_qwen_controlnet(state):
        network, info = qwen_control.load(state, path.name, family_dtype(dtype, "qwen_image"))
        return LoadedControlNet(families.by_name("qwen_image"), network, {**info, "format": "single file, "
                                                                           + info["format"]})
    if flux_load.is_flux_controlnet(state):
        network, info = flux_load.load(state, path.name, family_dtype(dtype, "flux"))
        return LoadedControlNet(families.by_name("flux"), network, info)
    dtype = resolve(dtype, None)  # SD3's and the SD UNets' ControlNets: the default dtypes
    if sd3_control.is_sd3_controlnet(state):
        network, info = sd3_control.load(state, path.name, dtype)
        return LoadedControlNet(families.by_name("sd3"), network, info)
    if sdxl_union.is_union(state):
        return _load_union(state, path.name, dtype)
    state, diff = original_state(state, path.name)
    if diff and base_unet is None:
        raise CheckpointError(f"{path.name} is a diff ControlNet (its weights are differences to a base model): "
                              "load it with DiffControlNetLoader, which takes the model")
    family, config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, path.name)
    network = _empty(ControlNetModel, config)
    try:
        converted = sfu.convert_controlnet_checkpoint(state, dict(network.config))
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{path.name}: the {family.name} ControlNet is incomplete: {exc} is missing") from None
    for new, old in (("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")):
        for kind in ("weight", "bias"):  # diffusers' converter leaves SDXL's size embedding out
            if old + kind in state:
                converted[new + kind] = state[old + kind]
    converted = {k: v for k, v in converted.items() if v is not None}
    info = {"format": "diff" if diff else "single file"}
    if diff:
        converted = add_base(converted, base_unet, path.name)
    return LoadedControlNet(family, _assign(network, converted, f"{family.name} ControlNet", dtype), info)


def _load_union(state: dict[str, Any], name: str, dtype: Any, heads: int | None = None) -> LoadedControlNet:
    """A union ControlNet (nodes.control.sdxl_union) in diffusers' layout; its ControlNet part's
    family and config by the same rule as any diffusers-layout ControlNet."""
    def plain_config(plain: dict[str, Any]) -> tuple[Family, dict[str, Any]]:
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_original(plain, name).items()}
        return controlnet_config(shapes, name)

    family, network = sdxl_union.load(state, name, dtype, plain_config, heads)
    return LoadedControlNet(family, network, {"format": f"union of {network.config.num_control_type} types"})


def add_base(state: dict[str, Any], base_unet: Any, name: str) -> dict[str, Any]:
    """A diff ControlNet's weights plus the base UNet's same-named ones (the shared blocks)."""
    base = base_unet.state_dict()
    out = {}
    for key, value in state.items():
        if key in base:
            if tuple(base[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{name}: the diff ControlNet's {key} has shape {tuple(value.shape)}, the "
                                      f"model's {tuple(base[key].shape)}: it was made for another model")
            value = value.float() + base[key].to("cpu", value.dtype if value.is_floating_point() else None).float()
        out[key] = value
    return out


def _load_folder(path: Path, dtype: Any) -> LoadedControlNet:
    from diffusers import ControlNetModel, FluxControlNetModel

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.load import quiet_progress

    quiet_progress()
    if _folder_class(path) == qwen_control.CLASS_NAME:  # InstantX's release: read by shapes, as its file
        from nodes.checkpoint.folders import folder_state

        found = folder_state(path, None)
        if found is None:
            raise CheckpointError(f"{path.name}: a Qwen-Image ControlNet folder without .safetensors weights")
        network, info = qwen_control.load(dict(found[1]), path.name, family_dtype(dtype, "qwen_image"))
        return LoadedControlNet(families.by_name("qwen_image"), network, {**info, "format": "diffusers folder, "
                                                                           + info["format"]})
    if flux_load.is_flux_folder(path):
        from nodes.checkpoint.folders import folder_state

        found = folder_state(path, None)
        if found is not None and flux_load.is_flux_controlnet(found[1]) and flux_load.is_inpainting(found[1]):
            # diffusers' class cannot hold it
            network, info = flux_load.load(dict(found[1]), path.name, family_dtype(dtype, "flux"))
            return LoadedControlNet(families.by_name("flux"), network, {**info, "format": "diffusers folder, " +
                                                                        info["format"].split(", ", 1)[1]})
        try:
            network = folder_component(path, FluxControlNetModel, family_dtype(dtype, "flux"))
            network.eval().requires_grad_(False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path.name}: not a readable diffusers FLUX ControlNet folder ({exc})") from None
        return LoadedControlNet(families.by_name("flux"), network, {"format": "diffusers folder"})
    dtype = resolve(dtype, None)  # SD3's and the SD UNets' ControlNets: the default dtypes
    if _folder_class(path) == "SD3ControlNetModel":
        from diffusers import SD3ControlNetModel

        try:
            network = folder_component(path, SD3ControlNetModel, dtype).eval().requires_grad_(False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path.name}: not a readable diffusers SD3 ControlNet folder ({exc})") from None
        return LoadedControlNet(families.by_name("sd3"), network, {"format": "diffusers folder"})
    from nodes.checkpoint.folders import folder_state

    found = folder_state(path, None)
    if _is_union_folder(path) or (found is not None and sdxl_union.is_union(found[1])):
        if found is None:
            raise CheckpointError(f"{path.name}: a union ControlNet folder without .safetensors weights")
        return _load_union(dict(found[1]), path.name, dtype, _folder_config(path).get("num_trans_head"))
    try:
        network = folder_component(path, ControlNetModel, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path.name}: not a readable diffusers ControlNet folder ({exc})") from None
    network.eval().requires_grad_(False)
    shapes = {det.UNET + k: v for k, v in diffusers_to_original(
        {k: v for k, v in network.state_dict().items()}, path.name).items()}
    family = families.for_unet({k: tuple(v.shape) for k, v in shapes.items()})
    return LoadedControlNet(family, network, {"format": "diffusers"})


def _folder_config(path: Path) -> dict[str, Any]:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _folder_class(path: Path) -> str | None:
    return _folder_config(path).get("_class_name")


def _is_union_folder(path: Path) -> bool:
    """Whether a diffusers folder's config.json is a union ControlNet's (its class, or its type count);
    a config naming plain ControlNetModel over union weights is recognised by the weights."""
    config = _folder_config(path)
    return config.get("_class_name") == "ControlNetUnionModel" or "num_control_type" in config
