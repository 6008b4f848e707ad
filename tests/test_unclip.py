"""CLIP ViT image encoders through CLIPVisionLoader / CLIPVisionEncode (the towers unCLIP uses).

A tiny transformers ``CLIPVisionModelWithProjection`` (16 heads as every released tower has,
weights perturbed so nothing is at its initial value) is saved as ComfyUI keeps clip_vision
files (``vision_model.*`` + ``visual_projection.weight``) and, renamed by the test's own map, in
OpenCLIP's layout (``visual.*``, the layout unCLIP checkpoints carry); both load through the
real node. The picture is the encoder's own size, so transformers' CLIPImageProcessor and
ComfyUI's rule see the same pixels (their resampling differs otherwise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.context import NodeError
from node_call import Called, call, environment_over
from nodes import style_model as sm
from nodes.vision_models import VisionOutput

PICTURE = 32
PATCH = 8
WIDTH = 64
PROJ = 48
LAYERS = 3
VISION, OPENCLIP = "tiny-clip-vit.safetensors", "tiny-clip-vit-openclip.safetensors"


def _clip_vit():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=16,
            image_size=PICTURE, patch_size=PATCH, projection_dim=PROJ, hidden_act="quick_gelu"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _openclip_layout(state: dict) -> dict:
    """transformers' names -> OpenCLIP's visual tower (fused q/k/v, [width, dim] projection)."""
    top = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"visual.proj": state["visual_projection.weight"].t().contiguous()}
    for i in range(LAYERS):
        base = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{base}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in block.items():
                out[f"visual.transformer.resblocks.{i}.{ours}.{kind}"] = state[f"{base}{theirs}.{kind}"]
    for theirs, ours in top.items():
        out["visual." + ours] = state["vision_model." + theirs]
    return out


@pytest.fixture(scope="module")
def vit():
    return _clip_vit()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, vit) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("unclip-models")
    (root / "clip_vision").mkdir()
    state = {k: v.contiguous() for k, v in vit.state_dict().items() if not k.endswith("position_ids")}
    assert "visual_projection.weight" in state and any(k.startswith("vision_model.") for k in state)
    save_file(state, str(root / "clip_vision" / VISION))
    save_file(_openclip_layout(state), str(root / "clip_vision" / OPENCLIP))
    return root


@pytest.fixture()
def env(models_root, tmp_path):
    yield from environment_over(models_root, tmp_path)


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (PICTURE, PICTURE, 3), dtype=np.uint8)


def _reference(vit, picture: np.ndarray):
    """transformers' encoder on transformers' own pixels."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": PICTURE}, crop_size={"height": PICTURE, "width": PICTURE})
    pixels = processor(images=Image.fromarray(picture), return_tensors="pt").pixel_values
    with torch.no_grad():
        return vit(pixel_values=pixels, output_hidden_states=True)


@pytest.mark.parametrize("name", [VISION, OPENCLIP])
def test_clip_vision_encode_equals_transformers(env, vit, name):
    record = Called()
    (vision,) = call(sm.clip_vision_loader, env, record, clip_name=name)
    assert any("CLIP ViT image encoder, 32 px" in m for m in record.messages), record.messages
    picture = _picture(0)
    image = torch.from_numpy(picture).float().div(255).unsqueeze(0)
    (out,) = call(sm.clip_vision_encode, env, clip_vision=vision, image=image, crop="center")
    assert isinstance(out, VisionOutput)
    ref = _reference(vit, picture)
    assert out.image_embeds.shape == (1, PROJ)
    assert out.last_hidden_state.shape == (1, (PICTURE // PATCH) ** 2 + 1, WIDTH)
    for ours, theirs in ((out.image_embeds, ref.image_embeds), (out.last_hidden_state, ref.last_hidden_state),
                         (out.penultimate_hidden_states, ref.hidden_states[-2])):
        assert (ours - theirs).abs().max() <= 1e-5
    assert (out["penultimate_hidden_states"] - out.last_hidden_state).abs().max() > 1e-2  # a different layer
    (other,) = call(sm.clip_vision_encode, env, clip_vision=vision,
                    image=torch.from_numpy(_picture(1)).float().div(255).unsqueeze(0), crop="center")
    assert (other.image_embeds - out.image_embeds).abs().max() > 1e-2


def test_the_activation_and_size_follow_the_shapes(env):
    (vision,) = call(sm.clip_vision_loader, env, clip_name=VISION)
    config = vision.loaded.model.config
    assert (config.hidden_act, config.image_size, config.patch_size, config.projection_dim) == \
        ("quick_gelu", PICTURE, PATCH, PROJ)
    assert vision.loaded.mean[0] == pytest.approx(0.48145466)


def test_an_incomplete_clip_vit_file_is_an_error_naming_the_input(env, models_root, vit):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in vit.state_dict().items() if k != "visual_projection.weight"}
    save_file(state, str(models_root / "clip_vision" / "no-proj.safetensors"))
    with pytest.raises(NodeError, match="visual_projection") as err:
        call(sm.clip_vision_loader, env, clip_name="no-proj.safetensors")
    assert err.value.input_name == "clip_name"
