"""A tiny random-weight FLUX.1 for tests: the real architectures at toy sizes, in the files users have.

API:
    components(variant="dev")      -> diffusers parts keyed as FluxPipeline names them (cached; do not mutate):
                                      transformer, vae, text_encoder (CLIP-L), tokenizer,
                                      text_encoder_2 (T5), tokenizer_2, scheduler.
                                      variant "schnell" has no guidance embedder and an unshifted schedule.
    pipeline(variant, cls=None)    -> FluxPipeline (or cls, e.g. FluxImg2ImgPipeline) over them.
    save_diffusers(variant, folder)   -> a diffusers FLUX folder.
    save_split(variant, models_root, fp8=False) -> the ComfyUI split files (see below).

The split files are written in the original (BFL) key layout by converting the
diffusers transformer back (:func:`transformer_to_bfl`: diffusers' single-file
converter run backwards, built from its documented key map), so the real
loaders' BFL -> diffusers conversion is what the tests exercise.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

VARIANTS = ("dev", "schnell")
#: Transformer: 2 heads of 32 (rope axes 4 + 14 + 14, the released 16 + 56 + 56 scaled), one double and one single block.
HEADS, HEAD_DIM, AXES = 2, 32, (4, 14, 14)
TEXT = 32  # CLIP-L width = pooled width; T5 width = joint attention width


def _perturb(module: Any, scale: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def build(variant: str = "dev", seed: int = 0) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from nodes.checkpoint import clip_configs
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer
    from nodes.families import flux

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny FLUX variant {variant!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT, pooled_projection_dim=TEXT,
            guidance_embeds=variant == "dev", axes_dims_rope=AXES)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                            block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False, sample_size=64, force_upcast=True)
        clip = CLIPTextModel(CLIPTextConfig(**clip_configs.text_config_defaults("openai"), hidden_size=TEXT,
                                            intermediate_size=2 * TEXT, num_hidden_layers=2, num_attention_heads=1,
                                            projection_dim=TEXT))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT, d_kv=8, d_ff=2 * TEXT, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
        for m in (transformer, vae, clip, t5):
            _perturb(m)
            m.eval()
    family = flux.FAMILY if variant == "dev" else flux.SCHNELL
    config = {k: v for k, v in family.scheduler_config().items() if k not in ("_class_name", "prediction_type")}
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "tokenizer": clip_tokenizer(),
            "text_encoder_2": t5, "tokenizer_2": t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components(variant: str = "dev") -> dict[str, Any]:
    return build(variant)


def pipeline(variant: str = "dev", cls: Any = None) -> Any:
    if cls is None:
        from diffusers import FluxPipeline as cls
    pipe = cls(**dict(components(variant)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers(variant: str, folder: str | Path) -> Path:
    folder = Path(folder)
    pipeline(variant).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _save(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def to_fp8(state: dict) -> dict:
    """Linear weights (2-D) as float8_e4m3fn, as the flux1-*-fp8 files store them."""
    import torch

    return {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.endswith(".weight") else v for k, v in state.items()}


def bfl_transformer(variant: str) -> dict:
    from nodes.checkpoint.flux_keys import diffusers_to_bfl

    return diffusers_to_bfl(components(variant)["transformer"].state_dict())


def clip_l_state(variant: str = "dev") -> dict:
    from nodes.checkpoint.to_original import openai_clip_to_original

    return openai_clip_to_original(components(variant)["text_encoder"].state_dict(), "")


def t5_state(variant: str = "dev") -> dict:
    state = dict(components(variant)["text_encoder_2"].state_dict())
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files keep one
    return state


def vae_state(variant: str = "dev") -> dict:
    from nodes.checkpoint.to_original import vae_to_original

    vae = components(variant)["vae"]
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    return {k[len("first_stage_model."):]: v for k, v in state.items()}


def make_models_folder(root: str | Path) -> Path:
    """ComfyUI's folders with the tiny FLUX in every layout the loaders read:

    diffusion_models/tiny-flux-{dev,schnell}.safetensors (BFL keys), tiny-flux-dev-fp8.safetensors
    (fp8 linear weights, ``model.diffusion_model.`` prefix), text_encoders/tiny-clip_l.safetensors and
    tiny-t5xxl.safetensors, vae/tiny-flux-ae.safetensors, checkpoints/tiny-flux-dev-aio.safetensors
    (all in one, ComfyUI's prefixes) and checkpoints/tiny-flux-{dev,schnell}-diffusers/.
    """
    root = Path(root)
    for variant in VARIANTS:
        _save(root / "diffusion_models" / f"tiny-flux-{variant}.safetensors", bfl_transformer(variant))
        save_diffusers(variant, root / "checkpoints" / f"tiny-flux-{variant}-diffusers")
    _save(root / "diffusion_models" / "tiny-flux-dev-fp8.safetensors",
          {"model.diffusion_model." + k: v for k, v in to_fp8(bfl_transformer("dev")).items()})
    _save(root / "text_encoders" / "tiny-clip_l.safetensors", clip_l_state())
    _save(root / "text_encoders" / "tiny-t5xxl.safetensors", t5_state())
    _save(root / "vae" / "tiny-flux-ae.safetensors", vae_state())
    aio = {"model.diffusion_model." + k: v for k, v in bfl_transformer("dev").items()}
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip_l_state().items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_state().items()})
    aio.update({"vae." + k: v for k, v in vae_state().items()})
    _save(root / "checkpoints" / "tiny-flux-dev-aio.safetensors", aio)
    _save(root / "checkpoints" / "tiny-flux-dev-transformer-only.safetensors",
          {"model.diffusion_model." + k: v for k, v in bfl_transformer("dev").items()})
    return root


def forward(net: Any) -> Any:
    """One call of a tiny FLUX transformer on fixed random inputs (16 image and 8 text tokens,
    seed 2): what tests compare between two ways of loading or holding the same weights."""
    import torch

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 64, generator=g)
    txt = torch.randn(1, 8, TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=txt, pooled_projections=torch.randn(1, TEXT, generator=g),
                   timestep=torch.tensor([0.7]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                   guidance=torch.tensor([3.5]), return_dict=False)[0]
