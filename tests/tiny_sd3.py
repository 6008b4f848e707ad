"""A tiny random-weight SD3.5 for tests: the real architectures at toy sizes, in the files users have.

API:
    components(variant="large")  -> diffusers parts keyed as StableDiffusion3Pipeline names them (cached; do
                                    not mutate): transformer, vae, text_encoder (CLIP-L), text_encoder_2 (bigG),
                                    text_encoder_3 (T5), their tokenizers, scheduler. "large" has 3.5's q/k
                                    norms; "medium" also has 3.5 Medium's second self-attention in block 0.
    pipeline(variant, cls=None)  -> StableDiffusion3Pipeline (or cls, e.g. the img2img one) over them.
    make_models_folder(root)     -> ComfyUI's folders with the split files and single-file checkpoints.

The files are written in the original (Stability) key layout by converting the
diffusers transformer back (:func:`transformer_to_original`, diffusers' single-file
converter run backwards), so the real loaders' conversion is what the tests exercise.
CLIP-L 32 wide, bigG 48, T5 96: side by side the CLIPs are narrower than T5, as 768 + 1280 < 4096.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

VARIANTS = ("large", "medium")
CLIP_L, CLIP_G, T5 = 32, 48, 96
HEADS, HEAD_DIM, LAYERS = 2, 16, 2


def _perturb(module: Any, scale: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _clip(kind: str, width: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from nodes.checkpoint import clip_configs

    return CLIPTextModelWithProjection(CLIPTextConfig(**clip_configs.text_config_defaults(kind), hidden_size=width,
                                                      intermediate_size=2 * width, num_hidden_layers=3,
                                                      num_attention_heads=1, projection_dim=width))


def build(variant: str = "large", seed: int = 0) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny SD3 variant {variant!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=T5, caption_projection_dim=HEADS * HEAD_DIM,
            pooled_projection_dim=CLIP_L + CLIP_G, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
            dual_attention_layers=(0,) if variant == "medium" else ())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                            block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False, sample_size=64, force_upcast=True)
        clip_l, clip_g = _clip("openai", CLIP_L), _clip("openclip", CLIP_G)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=T5, d_kv=8, d_ff=2 * T5, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
        for m in (transformer, vae, clip_l, clip_g, t5):
            _perturb(m)
            m.eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "tokenizer": clip_tokenizer(),
            "text_encoder_2": clip_g, "tokenizer_2": clip_tokenizer("!"), "text_encoder_3": t5,
            "tokenizer_3": t5_tokenizer(), "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


@functools.lru_cache(maxsize=None)
def components(variant: str = "large") -> dict[str, Any]:
    return build(variant)


def pipeline(variant: str = "large", cls: Any = None) -> Any:
    if cls is None:
        from diffusers import StableDiffusion3Pipeline as cls
    pipe = cls(**dict(components(variant)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _swap(t: Any) -> Any:
    """diffusers' swap_scale_shift, its own inverse."""
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_original(state: dict, layers: int, dual: tuple[int, ...]) -> dict:
    """diffusers' SD3Transformer2DModel keys -> Stability's (``joint_blocks.*``, fused qkv)."""
    import torch

    s = dict(state)
    out = {"pos_embed": s.pop("pos_embed.pos_embed"), "x_embedder.proj.weight": s.pop("pos_embed.proj.weight"),
           "x_embedder.proj.bias": s.pop("pos_embed.proj.bias"),
           "context_embedder.weight": s.pop("context_embedder.weight"),
           "context_embedder.bias": s.pop("context_embedder.bias"),
           "final_layer.linear.weight": s.pop("proj_out.weight"), "final_layer.linear.bias": s.pop("proj_out.bias"),
           "final_layer.adaLN_modulation.1.weight": _swap(s.pop("norm_out.linear.weight")),
           "final_layer.adaLN_modulation.1.bias": _swap(s.pop("norm_out.linear.bias"))}
    for ours, theirs in (("time_text_embed.timestep_embedder", "t_embedder"),
                         ("time_text_embed.text_embedder", "y_embedder")):
        for a, b in (("linear_1", "mlp.0"), ("linear_2", "mlp.2")):
            for p in ("weight", "bias"):
                out[f"{theirs}.{b}.{p}"] = s.pop(f"{ours}.{a}.{p}")
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        for p in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{p}"] = torch.cat([s.pop(f"{d}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{p}"] = torch.cat([s.pop(f"{d}attn.add_{x}_proj.{p}") for x in "qkv"])
            out[f"{o}x_block.attn.proj.{p}"] = s.pop(f"{d}attn.to_out.0.{p}")
            out[f"{o}x_block.adaLN_modulation.1.{p}"] = s.pop(f"{d}norm1.linear.{p}")
            ctx = s.pop(f"{d}norm1_context.linear.{p}")
            out[f"{o}context_block.adaLN_modulation.1.{p}"] = _swap(ctx) if last else ctx
            out[f"{o}x_block.mlp.fc1.{p}"] = s.pop(f"{d}ff.net.0.proj.{p}")
            out[f"{o}x_block.mlp.fc2.{p}"] = s.pop(f"{d}ff.net.2.{p}")
            if not last:
                out[f"{o}context_block.attn.proj.{p}"] = s.pop(f"{d}attn.to_add_out.{p}")
                out[f"{o}context_block.mlp.fc1.{p}"] = s.pop(f"{d}ff_context.net.0.proj.{p}")
                out[f"{o}context_block.mlp.fc2.{p}"] = s.pop(f"{d}ff_context.net.2.{p}")
            if i in dual:
                out[f"{o}x_block.attn2.qkv.{p}"] = torch.cat([s.pop(f"{d}attn2.to_{x}.{p}") for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{p}"] = s.pop(f"{d}attn2.to_out.0.{p}")
        for a, b in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                     ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            if f"{d}attn.{a}.weight" in s:
                out[f"{o}{b}.weight"] = s.pop(f"{d}attn.{a}.weight")
        if i in dual:
            for a in ("q", "k"):
                if f"{d}attn2.norm_{a}.weight" in s:
                    out[f"{o}x_block.attn2.ln_{a}.weight"] = s.pop(f"{d}attn2.norm_{a}.weight")
    assert not s, f"unconverted keys: {sorted(s)[:5]}"
    return out


def original_transformer(variant: str) -> dict:
    t = components(variant)["transformer"]
    return transformer_to_original(t.state_dict(), t.config.num_layers, tuple(t.config.dual_attention_layers))


def clip_state(module: str, variant: str = "large") -> dict:
    """A CLIP in transformers' layout with its projection (ComfyUI's clip_l / clip_g files)."""
    from nodes.checkpoint.to_original import openai_clip_to_original

    state = components(variant)[module].state_dict()
    out = openai_clip_to_original(state, "")
    out["text_projection.weight"] = state["text_projection.weight"]
    return out


def t5_state(variant: str = "large") -> dict:
    state = dict(components(variant)["text_encoder_3"].state_dict())
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files keep one
    return state


def vae_state(variant: str = "large") -> dict:
    from nodes.checkpoint.to_original import vae_to_original

    vae = components(variant)["vae"]
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    return {k[len("first_stage_model."):]: v for k, v in state.items()}


def _save(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def single_file(variant: str, clips: bool = True, t5: bool = True) -> dict:
    """A Stability single-file checkpoint (sd3.5_*.safetensors): transformer and VAE, the encoders if asked."""
    state = {"model.diffusion_model." + k: v for k, v in original_transformer(variant).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_state(variant).items()})
    if clips:
        state.update({"text_encoders.clip_l.transformer." + k: v
                      for k, v in clip_state("text_encoder", variant).items()})
        state.update({"text_encoders.clip_g.transformer." + k: v
                      for k, v in clip_state("text_encoder_2", variant).items()})
    if t5:
        state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_state(variant).items()})
    return state


def make_models_folder(root: str | Path) -> Path:
    """diffusion_models/tiny-sd3-{large,medium}.safetensors (original keys, no prefix),
    text_encoders/tiny-sd3-clip_l, -clip_g, -t5xxl, vae/tiny-sd3-vae, and checkpoints/tiny-sd3-{variant}.safetensors
    (all in one), tiny-sd3-large-noclip.safetensors (no encoders), tiny-sd3-large-not5.safetensors (CLIPs only)."""
    root = Path(root)
    for variant in VARIANTS:
        _save(root / "diffusion_models" / f"tiny-sd3-{variant}.safetensors", original_transformer(variant))
        _save(root / "checkpoints" / f"tiny-sd3-{variant}.safetensors", single_file(variant))
    _save(root / "text_encoders" / "tiny-sd3-clip_l.safetensors", clip_state("text_encoder"))
    _save(root / "text_encoders" / "tiny-sd3-clip_g.safetensors", clip_state("text_encoder_2"))
    _save(root / "text_encoders" / "tiny-sd3-t5xxl.safetensors", t5_state())
    _save(root / "vae" / "tiny-sd3-vae.safetensors", vae_state())
    _save(root / "checkpoints" / "tiny-sd3-large-noclip.safetensors", single_file("large", clips=False, t5=False))
    _save(root / "checkpoints" / "tiny-sd3-large-not5.safetensors", single_file("large", t5=False))
    return root
