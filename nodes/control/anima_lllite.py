"""Anima's ControlNet-LLLite (kohya-ss Anima-LLLite, ComfyUI's AnimaLLLiteApply), fed by ModelPatchLoader.

Why a model patch and not a ControlNet: an LLLite adds no residuals. A small conditioning encoder turns the
control picture (and, for the inpainting file, its mask) into one embedding per DiT token, and tiny modules add a
correction to the *inputs* of chosen linear layers of the DiT's blocks: the self-attention's q, k and v
projections, the cross-attention's q projection and the MLP's first layer (ComfyUI's attn1 / attn2 / mlp patches
of its MiniTrainDIT, whose x is the block's modulated input). Written from the facts of ComfyUI's
``comfy/ldm/anima/lllite.py`` (its v2 "named key" file):

* **Encoder** ``lllite_conditioning1``: conv 4x4 stride 4 to half the width, GroupNorm, SiLU; conv 3x3, GroupNorm,
  SiLU; conv 4x4 stride 4 to the full width, GroupNorm, SiLU (16x down: one vector per 2x2 latent patch); residual
  blocks (GroupNorm, SiLU, conv 3x3, twice); an optional ASPP (one branch per dilation, 1 a 1x1 conv, the rest 3x3
  dilated, each + GroupNorm + SiLU; a pooled global branch resized back bilinearly; joined and projected 1x1 +
  GroupNorm + SiLU); a 1x1 projection to the embedding width, flattened row-major, LayerNorm. GroupNorm groups: 8,
  halved until they divide the channels.
* **Module** ``lllite_dit_blocks_{i}_{target}``: c = emb + depth_embed; h = SiLU(down(x)); gamma, beta =
  cond_to_film(c); h = SiLU(mid([c, h]) * (1 + gamma) + beta); x + up(h) * strength.
* **Picture**: resized to the latent's size times 8 (bicubic, centre crop to the aspect), clamped to 0..1, to -1..1.
  A 4-channel encoder (inpainting) also reads the mask (nearest-exact, centre crop, 1 where >= 0.5; all 0 when none
  is given), as its 4th channel in -1..1; with the file's ``lllite.inpaint_masked_input`` the masked pixels of the
  picture are zeroed first.
* **When**: on network calls whose noise level lies in [sigma(end_percent), sigma(start_percent)]; strength 0
  changes nothing.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

from nodes.checkpoint.load import CheckpointError

CONDITIONING = "lllite_conditioning1."
MARKER = CONDITIONING + "conv1.weight"
KIND = "anima-lllite"
MODULE_NAME = re.compile(r"lllite_dit_blocks_(\d+)_(self_attn_[qkv]_proj|cross_attn_q_proj|mlp_layer1)")
#: Each target's module in the DiT's original layout (nodes.checkpoint.cosmos_keys), under ``blocks.{i}.``.
TARGETS = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
           "self_attn_v_proj": "self_attn.v_proj", "cross_attn_q_proj": "cross_attn.q_proj",
           "mlp_layer1": "mlp.layer1"}


def is_anima_lllite(state: dict[str, Any]) -> bool:
    return MARKER in state


def _modules() -> tuple[type, type, type]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    def norm(channels: int) -> nn.GroupNorm:
        groups = 8
        while groups > 1 and channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)

    class Residual(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.norm1, self.conv1 = norm(ch), nn.Conv2d(ch, ch, 3, padding=1)
            self.norm2, self.conv2 = norm(ch), nn.Conv2d(ch, ch, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))

    class Pyramid(nn.Module):
        def __init__(self, ch: int, dilations: tuple[int, ...]) -> None:
            super().__init__()
            self.branches = nn.ModuleList(nn.Sequential(
                nn.Conv2d(ch, ch, 1) if d == 1 else nn.Conv2d(ch, ch, 3, padding=d, dilation=d), norm(ch), nn.SiLU())
                for d in dilations)
            self.global_conv = nn.Sequential(nn.Conv2d(ch, ch, 1), norm(ch), nn.SiLU())
            self.proj = nn.Sequential(nn.Conv2d(ch * (len(dilations) + 1), ch, 1), norm(ch), nn.SiLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = self.global_conv(x.mean(dim=(2, 3), keepdim=True))
            pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
            return self.proj(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))

    class Encoder(nn.Module):
        def __init__(self, cin: int, width: int, emb: int, blocks: int, dilations: tuple[int, ...]) -> None:
            super().__init__()
            half = width // 2
            self.conv1, self.norm1 = nn.Conv2d(cin, half, 4, stride=4), norm(half)
            self.conv2, self.norm2 = nn.Conv2d(half, half, 3, padding=1), norm(half)
            self.conv3, self.norm3 = nn.Conv2d(half, width, 4, stride=4), norm(width)
            self.resblocks = nn.ModuleList(Residual(width) for _ in range(blocks))
            self.aspp = Pyramid(width, dilations) if dilations else None
            self.proj, self.out_norm = nn.Conv2d(width, emb, 1), nn.LayerNorm(emb)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.silu(self.norm1(self.conv1(x)))
            x = F.silu(self.norm2(self.conv2(x)))
            x = F.silu(self.norm3(self.conv3(x)))
            for block in self.resblocks:
                x = block(x)
            if self.aspp is not None:
                x = self.aspp(x)
            return self.out_norm(self.proj(x).flatten(2).transpose(1, 2))

    class Module(nn.Module):
        def __init__(self, dim: int, emb: int, hidden: int) -> None:
            super().__init__()
            self.down, self.mid = nn.Linear(dim, hidden), nn.Linear(hidden + emb, hidden)
            self.cond_to_film, self.up = nn.Linear(emb, 2 * hidden), nn.Linear(hidden, dim)
            self.depth_embed = nn.Parameter(torch.zeros(emb), requires_grad=False)

        def forward(self, x: torch.Tensor, emb: torch.Tensor, strength: float) -> torch.Tensor:
            c = emb + self.depth_embed.to(emb.dtype)
            gamma, beta = self.cond_to_film(c).chunk(2, dim=-1)
            h = self.mid(torch.cat([c, F.silu(self.down(x))], dim=-1))
            return x + self.up(F.silu(h * (1 + gamma) + beta)) * strength

    class LLLite(nn.Module):
        """The encoder (``lllite_conditioning1``) and every module under its file's name."""

        def __init__(self, encoder: Encoder, modules: dict[str, Module], config: dict[str, Any]) -> None:
            super().__init__()
            self.lllite_conditioning1 = encoder
            for name, module in modules.items():
                self.add_module(name, module)
            self.config = config

    return Encoder, Module, LLLite


def load(state: dict[str, Any], name: str, dtype: Any, metadata: dict[str, str] | None) -> tuple[Any, dict]:
    """(the LLLite network, what it is for the loader's message); sizes from the file's shapes, the ASPP's
    dilations and the inpainting rule from its metadata (ComfyUI's defaults where absent)."""
    metadata = metadata or {}
    version = metadata.get("lllite.version", "2")
    if version != "2":
        raise CheckpointError(f"{name}: Anima LLLite version {version!r}; Kiln reads version 2 (named keys)")
    Encoder, Module, LLLite = _modules()
    try:
        cin = state[MARKER].shape[1]
        width = state[CONDITIONING + "conv3.weight"].shape[0]
        emb = state[CONDITIONING + "proj.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{name}: not a complete Anima LLLite ({exc.args[0]} is missing)") from None
    blocks = {int(k.split(".")[2]) for k in state if k.startswith(CONDITIONING + "resblocks.")}
    has_aspp = any(k.startswith(CONDITIONING + "aspp.") for k in state)
    dilations = tuple(int(d) for d in metadata.get("lllite.aspp_dilations", "1,2,4,8").split(",") if d.strip()) \
        if has_aspp else ()
    modules, dim = {}, None
    for module in sorted({k.split(".", 1)[0] for k in state if k.startswith("lllite_dit_blocks_")}):
        if MODULE_NAME.fullmatch(module) is None:
            raise CheckpointError(f"{name}: {module} is not an Anima LLLite module Kiln knows (blocks' "
                                  f"{', '.join(TARGETS)})")
        hidden, width_in = state[module + ".down.weight"].shape
        if dim not in (None, width_in):
            raise CheckpointError(f"{name}: its modules read {dim} and {width_in} wide inputs")
        dim = width_in
        modules[module] = Module(width_in, emb, hidden)
    if not modules:
        raise CheckpointError(f"{name}: an Anima LLLite without lllite_dit_blocks_* modules")
    config = {"kind": KIND, "in_channels": int(cin), "model_dim": int(dim), "emb": int(emb),
              "blocks": 1 + max(int(MODULE_NAME.fullmatch(m).group(1)) for m in modules),
              "inpaint_masked_input": metadata.get("lllite.inpaint_masked_input", "false").lower() == "true"}
    network = LLLite(Encoder(cin, width, emb, max(blocks) + 1 if blocks else 0, dilations), modules, config)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: its keys do not fit an Anima LLLite ({exc})") from None
    network.to(dtype)
    what = "inpainting, picture and mask" if cin == 4 else f"{cin}-channel control picture"
    return network, {"format": f"Anima LLLite ({what}; {len(modules)} modules on {config['blocks']} blocks, "
                               f"width {dim})"}


@dataclass(frozen=True, eq=False)
class LLLiteControl:
    """One AnimaLLLiteApply: the LLLite (a model patch handle), its picture [B, H, W, 3] in 0..1, the mask
    [B, H, W] or None, the strength and the window of noise levels [sigma_end, sigma_start]."""

    patch: Any
    image: Any
    mask: Any
    strength: float
    sigma_start: float
    sigma_end: float


def control_input(control: LLLiteControl, height: int, width: int, inpaint_masked: bool, channels: int) -> Any:
    """The encoder's input [B, channels, height, width] in -1..1 (module docstring, *Picture*)."""
    import torch

    from nodes.resample import resize

    image = resize(control.image[..., :3].movedim(-1, 1).float(), width, height, "bicubic", "center").clamp(0, 1)
    image = image * 2.0 - 1.0
    if channels != 4:
        return image
    mask = control.mask
    if mask is None:
        mask = torch.zeros(image.shape[0], height, width)
    mask = resize(mask.reshape(-1, 1, *mask.shape[-2:]).float(), width, height, "nearest-exact", "center")
    if mask.shape[0] != image.shape[0]:
        rows = max(mask.shape[0], image.shape[0])
        if rows % mask.shape[0] or rows % image.shape[0]:
            raise ValueError(f"{mask.shape[0]} masks cannot go with {image.shape[0]} control pictures")
        mask, image = mask.repeat(rows // mask.shape[0], 1, 1, 1), image.repeat(rows // image.shape[0], 1, 1, 1)
    mask = (mask >= 0.5).to(image.dtype)
    if inpaint_masked:
        image = image * (1.0 - mask)
    return torch.cat([image, mask * 2.0 - 1.0], dim=1)


@contextlib.contextmanager
def applied(network: Any, controls: tuple, schedule: Any, family: Any) -> Iterator[None]:
    """While a sampling run goes on: each control's corrections on the DiT's linear inputs (module docstring), in
    the order they were applied; nothing without controls. Each network call encodes the picture at its latent's
    size once, where its noise level is inside the control's window."""
    if not controls:
        yield
        return
    from nodes.runtime.compiled import while_hooked

    transformer = getattr(network, "kiln_network", network)
    modules = family.lora_modules(transformer)  # original module name -> diffusers parameter name
    live: dict[int, Any] = {}  # control index -> its embedding for this call (absent: off)
    with contextlib.ExitStack() as stack:
        lllites = [stack.enter_context(control.patch.use()) for control in controls]

        def started(module: Any, args: tuple, kwargs: dict) -> None:
            x, t = kwargs.get("hidden_states", args[0] if args else None), kwargs.get("timestep")
            level = float(schedule.sigma(float(t.reshape(-1).float().max())))
            live.clear()
            for i, (control, lllite) in enumerate(zip(controls, lllites)):
                if control.strength == 0.0 or not control.sigma_end <= level <= control.sigma_start:
                    continue
                config, weight = lllite.config, lllite.lllite_conditioning1.conv1.weight
                pixels = control_input(control, x.shape[-2] * 8, x.shape[-1] * 8, config["inpaint_masked_input"],
                                       config["in_channels"])
                live[i] = lllite.lllite_conditioning1(pixels.to(weight.device, weight.dtype))

        def corrector(name: str) -> Any:
            def hook(module: Any, args: tuple) -> Any:
                x = args[0]
                for i, emb in live.items():
                    own = getattr(lllites[i], name, None)
                    if own is None:
                        continue
                    if x.shape[1] != emb.shape[1]:
                        raise ValueError(f"AnimaLLLiteApply: the DiT has {x.shape[1]} tokens and the control "
                                         f"picture {emb.shape[1]}")
                    if x.shape[0] != emb.shape[0]:
                        if x.shape[0] % emb.shape[0]:
                            raise ValueError(f"AnimaLLLiteApply: {emb.shape[0]} control pictures for "
                                             f"{x.shape[0]} rows")
                        emb = emb.repeat(x.shape[0] // emb.shape[0], 1, 1)
                    dtype = own.down.weight.dtype
                    x = own(x.to(dtype), emb.to(x.device, dtype), controls[i].strength).to(args[0].dtype)
                return (x, *args[1:])
            return hook

        handles = [transformer.register_forward_pre_hook(started, with_kwargs=True)]
        for block in range(max(lllite.config["blocks"] for lllite in lllites)):
            for target, original in TARGETS.items():
                parameter = modules.get(f"blocks.{block}.{original}")
                if parameter is not None:
                    linear = transformer.get_submodule(parameter[: -len(".weight")])
                    handles.append(linear.register_forward_pre_hook(corrector(f"lllite_dit_blocks_{block}_{target}")))
        with while_hooked(handles):
            yield
