"""AuraFlow transformer weights: the original (fal / ComfyUI) key layout <-> diffusers' AuraFlowTransformer2DModel.

fal's ``aura_flow_0.3.safetensors`` (ComfyUI's CheckpointLoaderSimple file, under ``model.diffusion_model.``)
and Pony V7's single files hold the names of fal's own MMDiT code: ``double_layers.N`` (joint blocks:
``attn.w1q/w1k/w1v/w1o`` the text side, ``w2*`` the image side, ``mlpC`` / ``mlpX`` their feed-forwards
``c_fc1``, ``c_fc2``, ``c_proj``, ``modC.1`` / ``modX.1`` their modulations), ``single_layers.N``
(``attn.w1*``, ``mlp.*``, ``modCX.1``), ``init_x_linear`` (the patch projection), ``positional_encoding``
(the learned position table), ``cond_seq_linear``, ``t_embedder.mlp.0/2``, ``register_tokens``,
``final_linear`` and ``modF.1``. diffusers' names differ one to one (its single-file converter
``convert_auraflow_transformer_checkpoint_to_diffusers`` states the same facts); the one tensor that
changes is the final modulation ``modF.1``, whose halves are (shift, scale) in the original and
(scale, shift) in diffusers. tests/test_auraflow_loading.py checks this table against diffusers' converter.

Nothing else is fused, so the table is FLUX's walker (nodes.checkpoint.flux_keys) on AuraFlow's pairs.
The width of a head is not in the weights (its q/k norms have no parameters): every release (AuraFlow
v0.1-v0.3, Pony V7) uses 256, as ComfyUI's model assumes (12 heads of 3072).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch, has_keys, strip  # noqa: F401 (the key modules' interface)

#: Every released AuraFlow transformer has heads 256 wide (the weights do not say it).
HEAD_WIDTH = 256
#: Every release patches the latent 2x2.
PATCH = 2
#: diffusers' default sample size (latent pixels): only the pipeline's default image size.
SAMPLE_SIZE = 64
ORIGINAL_MARKERS = ("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight")
DIFFUSERS_MARKERS = ("joint_transformer_blocks.0.attn.add_q_proj.weight", "register_tokens")

#: (original, diffusers) names of whole tensors outside the blocks.
_TOP = [
    ("register_tokens", "register_tokens"),
    ("positional_encoding", "pos_embed.pos_embed"),
    ("init_x_linear.weight", "pos_embed.proj.weight"), ("init_x_linear.bias", "pos_embed.proj.bias"),
    ("cond_seq_linear.weight", "context_embedder.weight"),
    ("t_embedder.mlp.0.weight", "time_step_proj.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "time_step_proj.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "time_step_proj.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "time_step_proj.linear_2.bias"),
    ("final_linear.weight", "proj_out.weight"),
]
_FFN = [("c_fc1", "linear_1"), ("c_fc2", "linear_2"), ("c_proj", "out_projection")]
#: In a joint block: (original module, diffusers module).
_DOUBLE = ([("modX.1", "norm1.linear"), ("modC.1", "norm1_context.linear"),
            ("attn.w2q", "attn.to_q"), ("attn.w2k", "attn.to_k"), ("attn.w2v", "attn.to_v"),
            ("attn.w2o", "attn.to_out.0"), ("attn.w1q", "attn.add_q_proj"), ("attn.w1k", "attn.add_k_proj"),
            ("attn.w1v", "attn.add_v_proj"), ("attn.w1o", "attn.to_add_out")]
           + [(f"mlpX.{o}", f"ff.{d}") for o, d in _FFN] + [(f"mlpC.{o}", f"ff_context.{d}") for o, d in _FFN])
#: In a single block.
_SINGLE = ([("modCX.1", "norm1.linear"), ("attn.w1q", "attn.to_q"), ("attn.w1k", "attn.to_k"),
            ("attn.w1v", "attn.to_v"), ("attn.w1o", "attn.to_out.0")]
           + [(f"mlp.{o}", f"ff.{d}") for o, d in _FFN])
_FINAL_MOD = ("modF.1.weight", "norm_out.linear.weight")


def is_original(keys: Any) -> bool:
    return has_keys(keys, *ORIGINAL_MARKERS)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, *DIFFUSERS_MARKERS)


def _blocks(keys: Any, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(original names, diffusers names, how) for every tensor, in either direction (the blocks counted in
    whichever key set is given): the shape nodes.checkpoint.flux_keys' walkers take."""
    rows = [([o], [d], "rename") for o, d in _TOP]
    rows.append(([_FINAL_MOD[0]], [_FINAL_MOD[1]], "swap"))
    doubles = _blocks(original_keys, "double_layers.") or _blocks(diffusers_keys, "joint_transformer_blocks.")
    singles = _blocks(original_keys, "single_layers.") or _blocks(diffusers_keys, "single_transformer_blocks.")
    rows += [([f"double_layers.{i}.{o}.weight"], [f"joint_transformer_blocks.{i}.{d}.weight"], "rename")
             for i in doubles for o, d in _DOUBLE]
    rows += [([f"single_layers.{i}.{o}.weight"], [f"single_transformer_blocks.{i}.{d}.weight"], "rename")
             for i in singles for o, d in _SINGLE]
    return rows


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """AuraFlowTransformer2DModel arguments from original-layout shapes: width from the patch projection,
    heads of :data:`HEAD_WIDTH`, 2x2 patches, depth from the blocks, the position table's length."""
    s = strip(dict(shapes))
    try:
        width, patch_in = s["init_x_linear.weight"]
        caption, text = s["cond_seq_linear.weight"]
        positions = s["positional_encoding"][1]
        final = s["final_linear.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    if width % HEAD_WIDTH:
        raise KeyMismatch(f"a width of {width} is not a whole number of {HEAD_WIDTH}-wide heads (every AuraFlow's)")
    return dict(sample_size=SAMPLE_SIZE, patch_size=PATCH, in_channels=patch_in // (PATCH * PATCH),
                num_mmdit_layers=len(_blocks(s, "double_layers.")),
                num_single_dit_layers=len(_blocks(s, "single_layers.")),
                attention_head_dim=HEAD_WIDTH, num_attention_heads=width // HEAD_WIDTH, joint_attention_dim=text,
                caption_projection_dim=caption, out_channels=final // (PATCH * PATCH), pos_embed_max_size=positions)


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for an original-layout key set; :class:`KeyMismatch` names
    missing and left-over keys, so a damaged or foreign file is named, not half loaded."""
    return flux_keys.plan_from(pairs, set(strip({k: None for k in keys})))


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (the final modulation's halves swapped)."""
    state = strip(dict(state))
    foreign = sorted(k for k in state if k.startswith(("joint_transformer_blocks.", "single_transformer_blocks.",
                                                        "pos_embed.", "time_step_proj.")))
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in an "
                          "original-layout file)")
    out: dict[str, Any] = {}
    for key, diff, how in plan(state.keys()):
        out.update(flux_keys.convert(state[key], diff, how, 0))
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors from an AuraFlowTransformer2DModel state dict: what fal's and ComfyUI's files hold."""
    return flux_keys.to_original(dict(state), pairs)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Original module name -> the diffusers weight it covers (the final modulation with its halves swapped),
    for LoRAs written against the original names (nodes.checkpoint.flux_keys.lora_modules)."""
    return flux_keys.lora_modules(shapes, pairs)


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the same tensor."""
    return flux_keys.original_names(diffusers_names, pairs)
