"""SDXL ControlNet Union (xinsir's controlnet-union-sdxl-1.0 and its ProMax release): one
ControlNet for several hint kinds, told which kind by a control type.

The weights are diffusers' ``ControlNetUnionModel`` layout: an SDXL ControlNet plus
``task_embedding`` (a vector per control type), ``transformer_layes`` (a small transformer
mixing the hint's pooled features with the latent's), ``spatial_ch_projs`` (per-channel
offsets it adds to the encoded hint) and ``control_add_embedding`` (the control type's
one-hot, sinusoidally embedded, added to the time embedding). Its ControlNet part is read
from the shapes by the ordinary rule (nodes.control.load); the union part's sizes too,
except the transformer's head count, which no shape holds: 8, xinsir's and ComfyUI's.

With a type set, the network runs as diffusers' union pipelines run it (``control_type``
one-hot over the batch, ``control_type_idx`` the type), which is xinsir's reference code:
the transformer sees the hint's token and the latent's. ComfyUI's port leaves the latent's
token out, so its typed results drift from the reference; Kiln keeps the reference.
With no type ("auto", ComfyUI's default) the one-hot is all zeros and the encoded hint is
added without the transformer's offsets, as ComfyUI runs it (diffusers has no such mode).
"""
from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

#: Keys only a union ControlNet has (the rest is an SDXL ControlNet in diffusers' layout).
UNION_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
#: Attention heads of the union transformer; no weight's shape says it.
HEADS = 8


def is_union(state: Any) -> bool:
    """Whether a diffusers-layout ControlNet's keys hold a union ControlNet."""
    return "task_embedding" in state and "controlnet_cond_embedding.conv_in.weight" in state


def split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plain ControlNet's tensors, the union part's)."""
    union = {k: v for k, v in state.items() if k.startswith(UNION_PREFIXES)}
    return {k: v for k, v in state.items() if k not in union}, union


def union_config(plain: dict[str, Any], union_shapes: dict[str, tuple], name: str,
                 heads: int | None = None) -> dict[str, Any]:
    """``ControlNetUnionModel`` arguments: the plain ControlNet's config (``plain``) and the union sizes
    (``heads``: the transformer's head count where a folder's config.json gives it)."""
    import inspect

    from diffusers import ControlNetUnionModel

    from nodes.checkpoint.load import CheckpointError

    try:
        types, width = union_shapes["task_embedding"]
        layers = {int(k.split(".")[1]) for k in union_shapes if k.startswith("transformer_layes.")}
        proj = union_shapes["spatial_ch_projs.weight"][0]
        embed_in = union_shapes["control_add_embedding.linear_1.weight"][1]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{name}: an incomplete union ControlNet ({exc} is missing)") from None
    if embed_in % types:
        raise CheckpointError(f"{name}: the union's type embedding takes {embed_in} inputs, not a multiple of its "
                              f"{types} control types")
    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    config = {k: v for k, v in plain.items() if k in accepted}
    config.update(num_control_type=types, num_trans_channel=width, num_trans_head=int(heads or HEADS),
                  num_trans_layer=max(layers) + 1 if layers else 0, num_proj_channel=proj,
                  addition_time_embed_dim=embed_in // types)
    return config


def load(state: dict[str, Any], name: str, dtype: Any, plain_config: Any,
         heads: int | None = None) -> tuple[Any, Any]:
    """(family, the ControlNetUnionModel) of a diffusers-layout file; ``plain_config`` reads the
    ControlNet part's tensors into (family, config) by nodes.control.load's rule."""
    from diffusers import ControlNetUnionModel

    from nodes.checkpoint.load import _assign, _empty

    plain, union = split(state)
    family, config = plain_config(plain)
    config = union_config(config, {k: tuple(v.shape) for k, v in union.items()}, name, heads)
    return family, _assign(_empty(ControlNetUnionModel, config), state, f"{family.name} union ControlNet", dtype)


def modes(config: Any) -> int | None:
    """How many control types a loaded ControlNet's config says it knows (None: not a union)."""
    n = config.get("num_control_type") if hasattr(config, "get") else None
    return int(n) if n else None


#: Held around every union call: "auto" silences the shared module's offsets while it runs.
_UNION_CALLS = threading.Lock()


@contextlib.contextmanager
def _without_offsets(network: Any, auto: bool) -> Iterator[None]:
    """ComfyUI's "auto": the encoded hint goes in without the transformer's per-channel offsets."""
    with _UNION_CALLS:
        if not auto:
            yield
            return
        hook = network.spatial_ch_projs.register_forward_hook(lambda _m, _i, out: out * 0.0)
        try:
            yield
        finally:
            hook.remove()


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", extra: dict,
        hint: "torch.Tensor") -> tuple:
    """(down residuals, mid residual) of a union ControlNet for rows ``x``, times the link's strength."""
    import torch

    from nodes.families.base import ConditioningError

    dtype = network.dtype
    mode = link.net.mode
    count = int(network.config.num_control_type)
    if mode is not None and mode >= count:
        raise ConditioningError(f"the union ControlNet {link.net.name!r} knows {count} control types; type number "
                                f"{mode} was set", "positive")
    control_type = torch.zeros(x.shape[0], count, device=x.device, dtype=dtype)
    if mode is not None:
        control_type[:, mode] = 1.0
    with _without_offsets(network, mode is None):
        return network(x.to(dtype), t, encoder_hidden_states=context.to(dtype), controlnet_cond=[hint],
                       control_type=control_type, control_type_idx=[0 if mode is None else int(mode)],
                       conditioning_scale=float(link.strength), return_dict=False, **extra)
