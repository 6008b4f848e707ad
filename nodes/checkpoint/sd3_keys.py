"""Stability's SD3 module names against diffusers' SD3Transformer2DModel parameters, for LoRAs.

The weights themselves are converted by diffusers' own single-file converter
(nodes.checkpoint.sd3_load); LoRA files written against the original layout
(kohya's SD3 trainer, ComfyUI) name original modules, so the LoRA matcher
(nodes.lora_keys) needs each original module's diffusers parameters and their rows:
a fused ``qkv`` stacks q, k and v; an adaLN modulation diffusers stores with its
halves swapped (the last joint block's context side, the final layer) takes them
in the other order.
"""
from __future__ import annotations

import re
from typing import Any

Rows = tuple[tuple[int, int], ...]

#: (original module, diffusers module(s), how): "" a rename, "fused" rows stacked, "swap" halves swapped.
_GLOBAL = (("context_embedder", ("context_embedder",), ""),
           ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), ""),
           ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), ""),
           ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), ""),
           ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), ""),
           ("final_layer.linear", ("proj_out",), ""),
           ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"))


def _block(i: int, last: bool) -> list[tuple[str, tuple[str, ...], str]]:
    o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    pairs = [(o + "x_block.attn.qkv", tuple(d + f"attn.to_{q}" for q in "qkv"), "fused"),
             (o + "context_block.attn.qkv", tuple(d + f"attn.add_{q}_proj" for q in "qkv"), "fused"),
             (o + "x_block.attn.proj", (d + "attn.to_out.0",), ""),
             (o + "x_block.mlp.fc1", (d + "ff.net.0.proj",), ""),
             (o + "x_block.mlp.fc2", (d + "ff.net.2",), ""),
             (o + "x_block.adaLN_modulation.1", (d + "norm1.linear",), ""),
             (o + "context_block.adaLN_modulation.1", (d + "norm1_context.linear",), "swap" if last else ""),
             (o + "x_block.attn2.qkv", tuple(d + f"attn2.to_{q}" for q in "qkv"), "fused"),
             (o + "x_block.attn2.proj", (d + "attn2.to_out.0",), "")]
    if not last:
        pairs += [(o + "context_block.attn.proj", (d + "attn.to_add_out",), ""),
                  (o + "context_block.mlp.fc1", (d + "ff_context.net.0.proj",), ""),
                  (o + "context_block.mlp.fc2", (d + "ff_context.net.2",), "")]
    return pairs


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Original module name -> a diffusers parameter name, or its parameters with their rows of it.
    ``shapes``: the diffusers model's parameter shapes (which blocks exist, and the row counts)."""
    blocks = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m})
    pairs = list(_GLOBAL) + [p for i in blocks for p in _block(i, i == blocks[-1])]
    out: dict[str, Any] = {}
    for original, parts, how in pairs:
        params = [p + ".weight" for p in parts]
        if any(p not in shapes or len(shapes[p]) != 2 for p in params):
            continue  # a layer this transformer lacks (attn2 outside Medium's dual layers)
        rows = [shapes[p][0] for p in params]
        if how == "swap":
            half = rows[0] // 2
            out[original] = ((params[0], ((half, 2 * half), (0, half))),)
        elif how == "fused":
            starts = [sum(rows[:i]) for i in range(len(rows))]
            out[original] = tuple((p, ((s, s + n),)) for p, s, n in zip(params, starts, rows))
        else:
            out[original] = params[0]
    return out


#: diffusers' top-level modules -> the original layout's, as far as a block prefix goes (the position
#: table is a buffer, not merged; ComfyUI's ``pos_embed.`` input matches no weight either).
_MERGE_PREFIXES = (("pos_embed.proj.", "x_embedder.proj."),
                   ("time_text_embed.timestep_embedder.", "t_embedder.mlp."),
                   ("time_text_embed.text_embedder.", "y_embedder.mlp."), ("context_embedder.", "context_embedder."),
                   ("norm_out.", "final_layer.adaLN_modulation."), ("proj_out.", "final_layer.linear."))


def merge_name(name: str) -> str:
    """``name`` (a diffusers SD3 parameter) with the original layout's block in front of diffusers'
    rest of the name: ``transformer_blocks.3.attn.to_q.weight`` -> ``joint_blocks.3.attn.to_q.weight``."""
    block = re.match(r"transformer_blocks\.(\d+)\.", name)
    if block:
        return f"joint_blocks.{block.group(1)}.{name[block.end():]}"
    for ours, theirs in _MERGE_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name
