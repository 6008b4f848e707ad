"""DiffSynth's blockwise ControlNets for Qwen-Image (``qwen_image_canny_diffsynth_controlnet.safetensors``
and its depth / inpaint siblings), which ComfyUI loads with ModelPatchLoader and applies with
QwenImageDiffsynthControlnet (nodes/model_patch_nodes.py). There is no diffusers class or pipeline for
them; Kiln does what ComfyUI's ``QwenImageBlockWiseControlNet`` and ``DiffSynthCnetPatch`` do:

* The file holds ``img_in`` (the packed hint -> the transformer's width) and one small block per
  transformer block (``controlnet_blocks.N``: RMS norms of the image stream and of the hint tokens,
  their sum through ``input_proj``, GELU, ``output_proj``).
* The hint is the control image VAE-encoded (the posterior mean) at the latent's size, in model space
  (the Qwen-Image latent format), 2x2-packed as the transformer packs latents and put through
  ``img_in``. An inpainting file (``img_in`` 4 inputs wider: one mask channel per packed pixel) reads
  the kept mask (1 - mask, bilinear at the latent's size; ones without a mask) after the latent.
* After transformer block i, the image stream's first hint-length tokens get
  ``block_i(tokens, hint) * strength`` added, on every row (both sides of guidance) and every step.

The hooks sit on the transformer's blocks while the sampling loop runs (:func:`applied`), as FreeU's do;
a compiled transformer runs eagerly meanwhile (dynamo does not guard on module hooks).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from nodes.checkpoint.load import CheckpointError
from nodes.families.base import ConditioningError
from nodes.runtime.compiled import eager_while_hooked

MARKER = "controlnet_blocks.0.y_rms.weight"
#: The hint's packed width without a mask: 16 latent channels x 2x2.
PACKED = 64


def is_blockwise(keys: Any) -> bool:
    return MARKER in set(keys)


class ControlBlock(torch.nn.Module):
    """One block's control: ``output_proj(gelu(input_proj(rms(x) + rms(hint))))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x_rms = torch.nn.RMSNorm(dim, eps=1e-6)
        self.y_rms = torch.nn.RMSNorm(dim, eps=1e-6)
        self.input_proj = torch.nn.Linear(dim, dim)
        self.output_proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return self.output_proj(torch.nn.functional.gelu(self.input_proj(self.x_rms(x) + self.y_rms(hint))))


class BlockwiseControlNet(torch.nn.Module):
    """The hint embedder and one :class:`ControlBlock` per transformer block."""

    def __init__(self, blocks: int, dim: int, in_features: int) -> None:
        super().__init__()
        self.img_in = torch.nn.Linear(in_features, dim)
        self.controlnet_blocks = torch.nn.ModuleList(ControlBlock(dim) for _ in range(blocks))
        self.config = {"kind": "diffsynth-blockwise", "num_layers": blocks, "dim": dim,
                       "mask_channels": (in_features - PACKED) // 4}

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the BlockwiseControlNet, what it is for the loader's message)."""
    try:
        dim, in_features = state["img_in.weight"].shape
    except KeyError:
        raise CheckpointError(f"{name}: not a complete DiffSynth blockwise ControlNet ('img_in.weight' is missing)") \
            from None
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("controlnet_blocks."))
    if in_features not in (PACKED, PACKED + 4):
        raise CheckpointError(f"{name}: its hint embedder reads {in_features} values per token, not a packed "
                              f"16-channel latent ({PACKED}) or that with a mask ({PACKED + 4})")
    network = BlockwiseControlNet(blocks, dim, in_features)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: its keys do not fit a DiffSynth blockwise ControlNet ({exc})") from None
    network.to(dtype)
    kind = "inpainting, " if in_features > PACKED else ""
    return network, {"format": f"DiffSynth blockwise ControlNet for Qwen-Image, {kind}{blocks} blocks"}


def hint_tokens(link: Any, network: BlockwiseControlNet, h: int, w: int, latent: Any) -> torch.Tensor:
    """The hint as ``img_in`` tokens [hint batch, (h/2)(w/2), dim] for an ``h`` x ``w`` latent."""
    from nodes.control.apply import latent_hint
    from nodes.families.flux import pack

    hint = latent_hint(link, h, w, latent.to_model, "Qwen-Image")
    channels = int(network.config["mask_channels"])
    if channels:
        kept = torch.ones(hint.shape[0], channels, h, w) if link.mask is None else \
            torch.nn.functional.interpolate(link.mask.to(torch.float32), size=(h, w), mode="bilinear")
        hint = torch.cat([hint, kept.expand(hint.shape[0], channels, h, w)], 1)
    with torch.inference_mode():
        return network.img_in(pack(hint).to(network.img_in.weight.device, network.dtype))


def _hook(control: BlockwiseControlNet, index: int, tokens: torch.Tensor, strength: float) -> Any:
    from nodes.control.apply import to_rows

    def after(module: Any, args: Any, output: Any) -> Any:
        text, image = output
        n = tokens.shape[1]
        hint = to_rows(tokens, image.shape[0]).to(image.device)
        own = image[:, :n]
        added = control.controlnet_blocks[index](own.to(control.dtype), hint) * strength
        return text, torch.cat([own + added.to(image.dtype), image[:, n:]], 1)

    return after


@contextlib.contextmanager
def applied(network: Any, chain: Any, family: Any, latent_shape: tuple) -> Iterator[None]:
    """Each blockwise ControlNet of ``chain`` (ControlLinks, applied first to last) hooked after the
    transformer's blocks for the block; nothing without one."""
    if chain is None:
        yield
        return
    h, w = latent_shape[-2:]
    blocks = family.dit_blocks(network)["double"]
    with contextlib.ExitStack() as stack:
        for link in chain.chain():
            control = stack.enter_context(link.net.use())
            if len(control.controlnet_blocks) != len(blocks):
                raise ConditioningError(f"the model patch {link.net.name!r} has {len(control.controlnet_blocks)} "
                                        f"blocks and this {family.name} model {len(blocks)}", "model")
            tokens = hint_tokens(link, control, h, w, family.latent)
            for i, block in enumerate(blocks):
                stack.callback(block.register_forward_hook(_hook(control, i, tokens, link.strength)).remove)
        stack.enter_context(eager_while_hooked())
        yield
