"""alibaba-pai's Fun ControlNet Union for Qwen-Image-2512 (VideoX-Fun's control blocks), by ComfyUI's rule.

There is no diffusers class or pipeline for it; what Kiln does is what ComfyUI's
``QwenImageFunControlNetModel`` does (comfy/ldm/qwen_image/controlnet.py, 2026):

* The file holds ``control_img_in`` (packed hint tokens -> the transformer's width) and a few
  ``control_blocks.*``: Qwen-Image transformer blocks (diffusers' names), the first with a
  ``before_proj``, each with an ``after_proj``.
* It borrows the model's own layers: the latent tokens through the model's ``img_in``, the prompt
  through its ``txt_norm`` and ``txt_in``, the time through its ``time_text_embed``, the rotary
  positions from its ``pos_embed`` (image shape and text length). The blocks attend to the whole
  prompt (no text mask, as VideoX-Fun).
* The hint is the VAE latent in model space (as the InstantX ones read it), 2x2-packed; the 2602
  release's input is 33 channels (hint 16, mask 1, inpaint latent 16): without an inpainting input
  the last 17 are zeros, ComfyUI's fallback.
* Block 0 reads ``before_proj(control_img_in(hint)) + img_in(latent)``; each block's output goes
  on to the next and through ``after_proj`` becomes a sample. Sample k, times the strength, is added
  after the transformer's block ``k * N // n`` (N the transformer's blocks, n the ControlNet's):
  ComfyUI's fixed layers 0, 12, 24, 36, 48 for the released 60 and 5.
* Each side of guidance runs it with its own prompt (it is not diffusers' InstantX pipeline).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from nodes.checkpoint.load import CheckpointError

#: The latent's channels and the 2602 release's mask + inpaint-latent channels after them.
LATENT, EXTRA = 16, 17
PATCH = 4


class FunControlBlock(QwenImageTransformerBlock):
    """A Qwen-Image block with the Fun ControlNet's projections around it."""

    def __init__(self, dim: int, heads: int, head_dim: int, first: bool) -> None:
        super().__init__(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
        if first:
            self.before_proj = torch.nn.Linear(dim, dim)
        self.after_proj = torch.nn.Linear(dim, dim)


class QwenFunControlNet(torch.nn.Module):
    """The Fun ControlNet's own layers; :meth:`samples` runs them with the model's (see the module)."""

    def __init__(self, in_features: int, inner: int, heads: int, head_dim: int, blocks: int) -> None:
        super().__init__()
        self.config = {"kiln_qwen_fun": True, "in_features": in_features, "num_attention_heads": heads,
                       "attention_head_dim": head_dim, "num_control_blocks": blocks, "inner_dim": inner}
        self.control_img_in = torch.nn.Linear(in_features, inner)
        self.control_blocks = torch.nn.ModuleList(FunControlBlock(inner, heads, head_dim, i == 0)
                                                  for i in range(blocks))

    @property
    def dtype(self) -> torch.dtype:
        return self.control_img_in.weight.dtype

    def samples(self, model: Any, latent: torch.Tensor, hint: torch.Tensor, context: torch.Tensor,
                time: torch.Tensor, img_shapes: list) -> list[torch.Tensor]:
        """One sample per control block for packed ``latent`` and ``hint`` tokens, prompt ``context``
        and flow ``time`` (0..1), the model's layers embedding them."""
        hidden = model.img_in(latent).to(self.dtype)
        text = model.txt_in(model.txt_norm(context)).to(self.dtype)
        temb = model.time_text_embed(time.to(hidden.dtype), hidden).to(self.dtype)
        rotary = model.pos_embed(img_shapes, max_txt_seq_len=context.shape[1], device=hidden.device)
        state = self.control_blocks[0].before_proj(self.control_img_in(hint)) + hidden
        out = []
        for block in self.control_blocks:
            text, state = block(hidden_states=state, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                temb=temb, image_rotary_emb=rotary)
            out.append(block.after_proj(state))
        return out


def _count(shapes: Any, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[QwenFunControlNet, dict[str, Any]]:
    """(the Fun ControlNet, what it is for the loader's message), its sizes read from the shapes."""
    from nodes.checkpoint.load import _assign, _empty
    from nodes.checkpoint.tensors import plain

    state = plain(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        inner, in_features = shapes["control_img_in.weight"]
        head = shapes["control_blocks.0.attn.norm_q.weight"][0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a complete Qwen-Image Fun ControlNet ({exc} is missing)") from None
    if in_features not in (PATCH * LATENT, PATCH * (LATENT + EXTRA)):
        raise CheckpointError(f"{name}: its hint input takes {in_features} features, not the latent's "
                              f"{PATCH * LATENT} or the 2602 release's {PATCH * (LATENT + EXTRA)}")
    blocks = _count(shapes, "control_blocks.")
    network = _empty(lambda **kw: QwenFunControlNet(**kw), dict(in_features=in_features, inner=inner,
                                                                heads=inner // head, head_dim=head, blocks=blocks))
    network = _assign(network, dict(state), "Qwen-Image Fun ControlNet", dtype)
    return network, {"format": f"single file, Fun ControlNet Union, {blocks} control blocks"}


def hint_tokens(link: Any, rows: int, h: int, w: int, latent: Any, in_features: int, device: Any,
                dtype: Any) -> torch.Tensor:
    """The hint's packed model-space latent [rows, (h/2)(w/2), in_features], zeros for the
    mask and inpaint channels the ControlNet reads besides it; encoded once per size."""
    from nodes.control.apply import latent_hint, to_rows
    from nodes.families.flux import pack

    key = ("qwen-fun-packed", h, w)
    if key not in link.cache:
        hint = latent_hint(link, h, w, latent.to_model, "Qwen-Image")
        extra = in_features // PATCH - hint.shape[1]
        if extra:
            hint = torch.cat([hint, hint.new_zeros(hint.shape[0], extra, h, w)], dim=1)
        link.cache[key] = pack(hint)
    return to_rows(link.cache[key], rows).to(device, dtype)


def run(network: QwenFunControlNet, link: Any, x: torch.Tensor, t: Any, context: torch.Tensor,
        model_config: Any, latent: Any, model: Any) -> list[torch.Tensor]:
    """One per transformer block, float32: the Fun ControlNet's samples times the strength at its
    blocks' places, zeros elsewhere."""
    from nodes.families.base import ConditioningError
    from nodes.families.flux import pack
    from nodes.runtime.fp8 import compute_dtype

    if model is None or getattr(model, "img_in", None) is None:
        raise ConditioningError(f"the Qwen-Image Fun ControlNet {link.net.name!r} runs on the model's own "
                                "layers, and this model has none", "positive")
    b, _, h, w = x.shape
    dtype, device = compute_dtype(model), x.device  # an fp8-held model computes in its compute dtype
    time = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(b) / 1000.0
    hint = hint_tokens(link, b, h, w, latent, network.config["in_features"], device, network.dtype)
    got = network.samples(model, pack(x).to(dtype), hint, context.to(dtype), time.to(dtype),
                          [[(1, h // 2, w // 2)]] * b)
    blocks = int(model_config["num_layers"])
    zeros = torch.zeros_like(got[0], dtype=torch.float32)
    out = [zeros] * blocks
    for k, sample in enumerate(got):
        out[k * blocks // len(got)] = sample.to(torch.float32) * float(link.strength)
    return out
