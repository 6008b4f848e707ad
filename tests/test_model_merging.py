"""ComfyUI's model-merging nodes on tiny checkpoints loaded through the real loader.

The claims: while the merged model is in use each shared weight is ComfyUI's combination
(ratio * W1 + (1 - ratio) * W2, W1 + W2, m * (W1 - W2); per block for ModelMergeBlocks),
with LoRAs on either model taken in; afterwards both models are bit-identical to before;
ratio 1 samples exactly as model1 and ratio 0 exactly as model2; CLIP merges do the same
for the text encoders; models of two families are refused naming model2.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call, model_in_memory
from nodes import loaders
from nodes import model_merging as mm
from nodes import text
from nodes.runtime.patches import LoraEntry, LowRank
from nodes.sampling import ksampler

SECOND = "tiny-sd1-b.safetensors"


@pytest.fixture(scope="module")
def merge_env(tmp_path_factory):
    """Tiny SD1 twice (other random weights), a tiny SDXL and SD2-v, in one models folder."""
    from node_call import environment_over

    root = tmp_path_factory.mktemp("merge-models")
    tm.save_single_file("sd1", root / "checkpoints" / tm.checkpoint_name("sd1"))
    tm.save_single_file("sd1", root / "checkpoints" / SECOND, parts=tm.fresh_components("sd1", seed=1))
    tm.save_single_file("sdxl", root / "checkpoints" / tm.checkpoint_name("sdxl"))
    tm.save_single_file("sd2-v", root / "checkpoints" / tm.checkpoint_name("sd2-v"))
    yield from environment_over(root, tmp_path_factory.mktemp("merge-data"))


def _load(env, name):
    return call(loaders.checkpoint_loader, env, ckpt_name=name)


def _weights(model) -> dict[str, torch.Tensor]:
    with model.unet() as net:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _sample(env, model, clip, seed=3):
    pos = call(text.clip_text_encode, env, text="a red barn", clip=clip)[0]
    neg = call(text.clip_text_encode, env, text="blurry", clip=clip)[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return call(ksampler, env, model=model, seed=seed, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]["samples"]


def test_simple_merge_is_the_weighted_sum_and_both_models_are_restored(merge_env):
    m1, c1, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    w1, w2 = _weights(m1), _weights(m2)
    rec = Called()
    (merged,) = call(mm.model_merge_simple, merge_env, rec, model1=m1, model2=m2, ratio=0.3)
    assert any("weights merged" in m for m in rec.messages)
    got = _weights(merged)
    for name in w1:
        assert torch.allclose(got[name], 0.3 * w1[name] + 0.7 * w2[name], atol=1e-6), name
    assert all(torch.equal(_weights(m1)[k], w1[k]) for k in w1)  # restored bit for bit
    assert all(torch.equal(_weights(m2)[k], w2[k]) for k in w2)
    assert (got["conv_in.weight"] - w1["conv_in.weight"]).abs().max() > 1e-3  # not vacuous


def test_ratio_one_samples_as_model1_and_zero_as_model2(merge_env):
    m1, c1, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    one, two = _sample(merge_env, m1, c1), _sample(merge_env, m2, c1)
    assert torch.equal(_sample(merge_env, call(mm.model_merge_simple, merge_env, model1=m1, model2=m2, ratio=1.0)[0],
                               c1), one)
    assert torch.equal(_sample(merge_env, call(mm.model_merge_simple, merge_env, model1=m1, model2=m2, ratio=0.0)[0],
                               c1), two)
    half = _sample(merge_env, call(mm.model_merge_simple, merge_env, model1=m1, model2=m2, ratio=0.5)[0], c1)
    assert (half - one).abs().max() > 1e-3 and (half - two).abs().max() > 1e-3


def test_add_subtract_and_a_difference_added_back(merge_env):
    m1, _, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    w1, w2 = _weights(m1), _weights(m2)
    added = _weights(call(mm.model_merge_add, merge_env, model1=m1, model2=m2)[0])
    (difference,) = call(mm.model_merge_subtract, merge_env, model1=m1, model2=m2, multiplier=0.5)
    subtracted = _weights(difference)
    # A merged handle as the second model: model2 + 0.5 (model1 - model2).
    chained = _weights(call(mm.model_merge_add, merge_env, model1=m2, model2=difference)[0])
    for name in ("conv_in.weight", "mid_block.resnets.0.conv1.weight"):
        assert torch.allclose(added[name], w1[name] + w2[name], atol=1e-6)
        assert torch.allclose(subtracted[name], 0.5 * (w1[name] - w2[name]), atol=1e-6)
        assert torch.allclose(chained[name], w2[name] + 0.5 * (w1[name] - w2[name]), atol=1e-6)


def test_blocks_take_their_own_ratios(merge_env):
    m1, _, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    w1, w2 = _weights(m1), _weights(m2)
    got = _weights(call(mm.model_merge_blocks, merge_env, model1=m1, model2=m2, input=0.2, middle=0.5, out=0.9)[0])
    expected = {"down_blocks.0.resnets.0.conv1.weight": 0.2, "conv_in.weight": 0.2, "time_embedding.linear_1.weight": 0.2,
                "mid_block.resnets.0.conv1.weight": 0.5, "up_blocks.0.resnets.0.conv1.weight": 0.9,
                "conv_out.weight": 0.9}
    for name, r in expected.items():
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name


def _lora_on(model, scale: float = 1.0):
    """A one-module LoRA (built in memory) on conv_in-adjacent attention of ``model``."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with model.unet() as net:
        shape = tuple(net.get_parameter(name).shape)
    gen = torch.Generator().manual_seed(4)
    factors = LowRank(torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen), scale)
    entry = LoraEntry("test-lora", 1.0, {"unet": {name: factors}})
    return dataclasses.replace(model, loras=(*model.loras, entry)), name, factors.delta(shape, "cpu")


def test_loras_on_either_model_are_merged_and_a_model_merges_with_itself(merge_env):
    m1, _, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    w1, w2 = _weights(m1), _weights(m2)
    m2_lora, name, delta = _lora_on(m2)
    got = _weights(call(mm.model_merge_simple, merge_env, model1=m1, model2=m2_lora, ratio=0.25)[0])
    assert torch.allclose(got[name], 0.25 * w1[name] + 0.75 * (w2[name] + delta), atol=1e-5)
    m1_lora, _, delta1 = _lora_on(m1)
    got = _weights(call(mm.model_merge_simple, merge_env, model1=m1_lora, model2=m2, ratio=0.25)[0])
    assert torch.allclose(got[name], 0.25 * (w1[name] + delta1) + 0.75 * w2[name], atol=1e-5)
    # One checkpoint, merged with itself plus a LoRA: half the LoRA, then the weights restored.
    got = _weights(call(mm.model_merge_simple, merge_env, model1=m1, model2=m1_lora, ratio=0.5)[0])
    assert torch.allclose(got[name], w1[name] + 0.5 * delta1, atol=1e-5)
    assert torch.equal(_weights(m1)[name], w1[name])


def test_another_family_is_refused_naming_model2(merge_env):
    m1, c1, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    mx, cx, _ = _load(merge_env, tm.checkpoint_name("sdxl"))
    with pytest.raises(NodeError) as err:  # the tiny SD1 and SDXL share 126 weights by name and shape
        call(mm.model_merge_simple, merge_env, model1=m1, model2=mx, ratio=0.5)
    assert err.value.input_name == "model2" and "sdxl" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(mm.clip_merge_add, merge_env, clip1=c1, clip2=cx)
    assert err.value.input_name == "clip2"
    with pytest.raises(NodeError) as err:
        call(mm.model_merge_simple, merge_env, model1=m1, model2="not a model", ratio=0.5)
    assert err.value.input_name == "model2"
    with pytest.raises(NodeError) as err:
        call(mm.clip_merge_simple, merge_env, clip1=c1, clip2=m1, ratio=0.5)
    assert err.value.input_name == "clip2"


def test_clip_merges(merge_env):
    _, c1, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    _, c2, _ = _load(merge_env, SECOND)

    def encoder_weights(clip):
        with clip.encoder("text_encoder") as te:
            return {k: v.detach().clone() for k, v in te.state_dict().items()}

    def encode(clip):
        return call(text.clip_text_encode, merge_env, text="a cat", clip=clip)[0][0][0]

    e1, e2 = encoder_weights(c1), encoder_weights(c2)
    (half,) = call(mm.clip_merge_simple, merge_env, clip1=c1, clip2=c2, ratio=0.5)
    got = encoder_weights(half)
    name = next(k for k in e1 if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    assert torch.allclose(got[name], 0.5 * (e1[name] + e2[name]), atol=1e-6)
    assert torch.equal(encoder_weights(c1)[name], e1[name])
    assert torch.equal(encode(call(mm.clip_merge_simple, merge_env, clip1=c1, clip2=c2, ratio=1.0)[0]), encode(c1))
    assert (encode(half) - encode(c1)).abs().max() > 1e-3
    added = encoder_weights(call(mm.clip_merge_add, merge_env, clip1=c1, clip2=c2)[0])
    assert torch.allclose(added[name], e1[name] + e2[name], atol=1e-6)
    subtracted = encoder_weights(call(mm.clip_merge_subtract, merge_env, clip1=c1, clip2=c2, multiplier=2.0)[0])
    assert torch.allclose(subtracted[name], 2.0 * (e1[name] - e2[name]), atol=1e-6)


def test_the_table_leaves_unshared_and_reshaped_weights_to_model1():
    from nodes.runtime.merge import Blend, table

    patches, differing = table({"a": (2, 2), "b": (3,), "c": (4,), "d.position_ids": (1,)},
                               {"a": (2, 2), "b": (5,), "d.position_ids": (1,)}, lambda name: (0.25, 0.75),
                               skip=lambda name: name.endswith(mm.CLIP_KEPT))
    assert patches == {"a": Blend(0.25, 0.75)} and differing == ["b"]


def test_weights_not_whole_in_memory_are_refused_naming_the_model():
    """A network stored in fp8 (FLUX's fp8 files) cannot take a merge written into its weights."""
    import contextlib

    from nodes.families import sd1
    from nodes.handles import ModelHandle
    from nodes.runtime.merge import not_whole

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    narrow = torch.nn.Sequential(torch.nn.Linear(4, 4))
    narrow[0].weight.data = narrow[0].weight.data.to(torch.float8_e4m3fn)
    assert not_whole(net, ["0.weight"]) == "" and "fp8" in not_whole(narrow, ["0.weight"])

    def handle(module):
        return ModelHandle(sd1.FAMILY, scheduler_config={}, latent=sd1.FAMILY.latent,
                           _use_unet=lambda: contextlib.nullcontext(module), _peek=lambda: module)

    for first, second in ((handle(narrow), handle(net)), (handle(net), handle(narrow))):
        (merged,) = call(mm.model_merge_simple, None, model1=first, model2=second, ratio=0.5)
        with pytest.raises(NodeError) as err:
            with merged.unet():
                pass
        assert err.value.input_name == "model" and "fp8" in str(err.value)


# -- CheckpointSave -----------------------------------------------------------------------------

def _saved_and_loaded(env, model, clip, vae, prefix="checkpoints/merged"):
    """Save through CheckpointSave, move the file into the models folder, load it back."""
    import shutil

    from nodes import model_saving as checkpoint_save

    rec = Called()
    call(checkpoint_save.checkpoint_save, env, rec, model=model, clip=clip, vae=vae, filename_prefix=prefix)
    saved = rec.ui["checkpoints"][0]
    source = env.paths.output.root / saved["subfolder"] / saved["filename"]
    target = env.paths.models.root / "checkpoints" / saved["filename"]
    shutil.move(str(source), str(target))
    return call(loaders.checkpoint_loader, env, ckpt_name=saved["filename"]), rec


def test_a_saved_merge_loads_back_as_the_merged_model(merge_env):
    m1, c1, v1 = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, c2, _ = _load(merge_env, SECOND)
    (merged,) = call(mm.model_merge_simple, merge_env, model1=m1, model2=m2, ratio=0.4)
    (clip,) = call(mm.clip_merge_simple, merge_env, clip1=c1, clip2=c2, ratio=0.4)
    (model, clip_back, vae), rec = _saved_and_loaded(merge_env, merged, clip, v1)
    assert rec.messages and "tensors" in rec.messages[-1]
    want, got = _weights(merged), _weights(model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(_sample(merge_env, model, clip_back), _sample(merge_env, merged, clip))
    pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.encode(pixels), v1.encode(pixels))


@pytest.mark.parametrize("variant", ["sdxl", "sd2-v"])
def test_other_families_round_trip(merge_env, variant):
    """SDXL's two encoders; SD2's OpenCLIP (its unused last block written anew) and v-prediction."""
    model, clip, vae = _load(merge_env, tm.checkpoint_name(variant))
    (back, clip_back, _), _ = _saved_and_loaded(merge_env, model, clip, vae, prefix=f"checkpoints/{variant}")
    assert back.prediction_type == model.prediction_type
    want, got = _weights(model), _weights(back)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(call(text.clip_text_encode, merge_env, text="a cat", clip=clip_back)[0][0][0],
                       call(text.clip_text_encode, merge_env, text="a cat", clip=clip)[0][0][0])


def _saved(env, spec, folder: str, key: str, **inputs) -> list[str]:
    """Run a save node, move its file(s) into models/<folder>; their names."""
    import shutil

    rec = Called()
    call(spec, env, rec, **inputs)
    names = []
    for saved in rec.ui[key]:
        target = env.paths.models.root / folder / saved["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(env.paths.output.root / saved["subfolder"] / saved["filename"]), str(target))
        names.append(saved["filename"])
    return names


def test_model_clip_and_vae_saves_load_back_through_the_split_loaders(merge_env):
    from nodes import model_saving, split_loaders

    m1, c1, v1 = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, c2, _ = _load(merge_env, SECOND)
    (merged,) = call(mm.model_merge_simple, merge_env, model1=m1, model2=m2, ratio=0.6)
    (unet_name,) = _saved(merge_env, model_saving.model_save, "diffusion_models", "diffusion_models", model=merged,
                          filename_prefix="diffusion_models/merged")
    (back,) = call(split_loaders.unet_loader, merge_env, unet_name=unet_name)
    want, got = _weights(merged), _weights(back)
    assert all(torch.equal(want[k], got[k]) for k in want)
    (clip_merged,) = call(mm.clip_merge_simple, merge_env, clip1=c1, clip2=c2, ratio=0.6)
    (clip_name,) = _saved(merge_env, model_saving.clip_save, "text_encoders", "clip", clip=clip_merged,
                          filename_prefix="clip/merged")
    assert clip_name.startswith("merged_clip_l_")
    (clip_back,) = call(split_loaders.clip_loader, merge_env, clip_name=clip_name, type="stable_diffusion")
    assert torch.equal(call(text.clip_text_encode, merge_env, text="a cat", clip=clip_back)[0][0][0],
                       call(text.clip_text_encode, merge_env, text="a cat", clip=clip_merged)[0][0][0])
    (vae_name,) = _saved(merge_env, model_saving.vae_save, "vae", "vae", vae=v1, filename_prefix="vae/saved")
    (vae_back,) = call(loaders.vae_loader, merge_env, vae_name=vae_name)
    pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae_back.encode(pixels), v1.encode(pixels))


def test_a_flux_transformer_saves_in_bfl_layout_and_loads_back(merge_env):
    import tiny_flux

    from nodes import model_saving, split_loaders
    from nodes.families import flux

    net = tiny_flux.build("dev", seed=2)["transformer"]
    (name,) = _saved(merge_env, model_saving.model_save, "diffusion_models", "diffusion_models",
                     model=model_in_memory(flux.FAMILY, net), filename_prefix="diffusion_models/flux")
    from safetensors import safe_open

    with safe_open(str(merge_env.paths.models.root / "diffusion_models" / name), "pt") as f:
        assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in f.keys()
    (back,) = call(split_loaders.unet_loader, merge_env, unet_name=name)
    got = _weights(back)
    assert all(torch.equal(v, got[k]) for k, v in net.state_dict().items())


def test_checkpoint_save_refuses_what_it_cannot_write(merge_env):
    from nodes import model_saving as checkpoint_save
    from nodes.families import flux
    from nodes.handles import ModelHandle

    model, clip, vae = _load(merge_env, tm.checkpoint_name("sd1"))
    flux_model = ModelHandle(flux.FAMILY, scheduler_config={}, latent=flux.FAMILY.latent)
    with pytest.raises(NodeError) as err:
        call(checkpoint_save.checkpoint_save, merge_env, model=flux_model, clip=clip, vae=vae, filename_prefix="x")
    assert err.value.input_name == "model"
    _, clip_xl, _ = _load(merge_env, tm.checkpoint_name("sdxl"))
    with pytest.raises(NodeError) as err:
        call(checkpoint_save.checkpoint_save, merge_env, model=model, clip=clip_xl, vae=vae, filename_prefix="x")
    assert err.value.input_name == "clip"
    problems = checkpoint_save.checkpoint_save.validate(merge_env, {"filename_prefix": "../../escape"})
    assert problems and problems[0][0] == "filename_prefix"


# -- per-block merges on the original layout's names ------------------------------------------------

def test_model_merge_sd1_takes_each_block_s_ratio_by_its_original_name(merge_env):
    m1, _, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    m2, _, _ = _load(merge_env, SECOND)
    w1, w2 = _weights(m1), _weights(m2)
    names = m1.family.original_names(m1.peek())
    # diffusers' names -> ComfyUI's blocks (the original layout's), as the per-block inputs address them
    assert names["conv_in.weight"] == "input_blocks.0.0.weight"
    assert names["down_blocks.0.resnets.0.conv1.weight"].startswith("input_blocks.1.0.")
    assert names["mid_block.attentions.0.proj_in.weight"].startswith("middle_block.1.")
    assert names["up_blocks.0.resnets.0.conv1.weight"].startswith("output_blocks.0.0.")
    assert names["conv_out.weight"] == "out.2.weight" and names["time_embedding.linear_1.weight"] == "time_embed.0.weight"
    ratios = {block: 1.0 for block in mm.SD1_BLOCKS}
    ratios.update({"time_embed.": 0.3, "input_blocks.1.": 0.2, "middle_block.1.": 0.6, "output_blocks.0.": 0.9,
                   "out.": 0.1})
    (merged,) = call(mm.model_merge_sd1, merge_env, model1=m1, model2=m2, **ratios)
    got = _weights(merged)
    for name, r in {"time_embedding.linear_1.weight": 0.3, "down_blocks.0.resnets.0.conv1.weight": 0.2,
                    "mid_block.attentions.0.proj_in.weight": 0.6, "mid_block.resnets.0.conv1.weight": 1.0,
                    "up_blocks.0.resnets.0.conv1.weight": 0.9, "conv_out.weight": 0.1, "conv_in.weight": 1.0}.items():
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name
    with pytest.raises(NodeError) as err:
        call(mm.model_merge_sdxl, merge_env, model1=m1, model2=m2, **{b: 1.0 for b in mm.SDXL_BLOCKS})
    assert err.value.input_name == "model1"


def test_model_merge_flux1_on_the_bfl_names():
    import tiny_flux

    from nodes.families import flux

    a = tiny_flux.build("dev", seed=0)["transformer"]
    b = tiny_flux.build("dev", seed=1)["transformer"]
    m1, m2 = model_in_memory(flux.FAMILY, a), model_in_memory(flux.FAMILY, b)
    names = flux.FAMILY.original_names(a)
    assert names["transformer_blocks.0.attn.to_q.weight"] == "double_blocks.0.img_attn.qkv.weight"
    assert names["single_transformer_blocks.0.proj_out.weight"] == "single_blocks.0.linear2.weight"
    assert names["x_embedder.weight"] == "img_in.weight"
    w1 = {k: v.detach().clone() for k, v in a.state_dict().items()}
    w2 = {k: v.detach().clone() for k, v in b.state_dict().items()}
    ratios = {block: 1.0 for block in mm.FLUX_BLOCKS}
    ratios.update({"img_in.": 0.25, "double_blocks.0.": 0.5, "single_blocks.0.": 0.75})
    (merged,) = call(mm.model_merge_flux1, None, model1=m1, model2=m2, **ratios)
    with merged.unet() as net:
        got = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for name, r in {"x_embedder.weight": 0.25, "transformer_blocks.0.attn.to_q.weight": 0.5,
                    "transformer_blocks.0.attn.to_k.weight": 0.5, "single_transformer_blocks.0.proj_out.weight": 0.75,
                    "single_transformer_blocks.0.attn.to_q.weight": 0.75, "proj_out.weight": 1.0}.items():
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name
    assert all(torch.equal(a.state_dict()[k], w1[k]) for k in w1)  # restored


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_model_merge_sd3_takes_each_joint_block_s_ratio(variant):
    """ModelMergeSD3_2B / ModelMergeSD35_Large address Stability's blocks; diffusers' fused-qkv parts
    (to_q, to_k, to_v) and Medium's second attention follow their block, the embedders and the final
    layer their own input."""
    import tiny_sd3

    from nodes.families import sd3

    a = tiny_sd3.build(variant, seed=0)["transformer"]
    b = tiny_sd3.build(variant, seed=1)["transformer"]
    m1, m2 = model_in_memory(sd3.FAMILY, a), model_in_memory(sd3.FAMILY, b)
    w1 = {k: v.detach().clone() for k, v in a.named_parameters()}
    w2 = {k: v.detach().clone() for k, v in b.named_parameters()}
    node, blocks = ((mm.model_merge_sd35_large, mm.SD35_LARGE_BLOCKS) if variant == "large"
                    else (mm.model_merge_sd3_2b, mm.SD3_2B_BLOCKS))
    ratios = {block: 1.0 for block in blocks}
    ratios.update({"x_embedder.": 0.1, "t_embedder.": 0.2, "y_embedder.": 0.3, "context_embedder.": 0.4,
                   "joint_blocks.0.": 0.5, "final_layer.": 0.6})
    (merged,) = call(node, None, model1=m1, model2=m2, **ratios)
    with merged.unet() as net:
        got = {k: v.detach().clone() for k, v in net.named_parameters()}
    expected = {"pos_embed.proj.weight": 0.1, "time_text_embed.timestep_embedder.linear_1.weight": 0.2,
                "time_text_embed.text_embedder.linear_2.weight": 0.3, "context_embedder.weight": 0.4,
                "transformer_blocks.0.attn.to_q.weight": 0.5, "transformer_blocks.0.attn.add_k_proj.weight": 0.5,
                "transformer_blocks.0.norm1_context.linear.weight": 0.5, "transformer_blocks.1.attn.to_v.weight": 1.0,
                "norm_out.linear.weight": 0.6, "proj_out.weight": 0.6}
    if variant == "medium":
        expected["transformer_blocks.0.attn2.to_q.weight"] = 0.5
    for name, r in expected.items():
        assert not torch.allclose(w1[name], w2[name]), name  # each check can fail
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name
    assert all(torch.equal(p, w1[k]) for k, p in a.named_parameters())  # restored
    with pytest.raises(NodeError) as err:
        call(mm.model_merge_flux1, None, model1=m1, model2=m2, **{k: 1.0 for k in mm.FLUX_BLOCKS})
    assert err.value.input_name == "model1"


# -- LoraSave: a LoRA extracted from a difference --------------------------------------------------

def test_a_full_difference_lora_turns_the_base_into_the_finetune(merge_env):
    """ModelMergeSubtract(finetune, base) -> LoraSave(full_diff) -> LoraLoader(base) gives the finetune's
    weights (to half precision, as the file stores them), text encoders included."""
    from nodes import lora, lora_extract

    base, base_clip, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    tuned, tuned_clip, _ = _load(merge_env, SECOND)
    (model_diff,) = call(mm.model_merge_subtract, merge_env, model1=tuned, model2=base, multiplier=1.0)
    (clip_diff,) = call(mm.clip_merge_subtract, merge_env, clip1=tuned_clip, clip2=base_clip, multiplier=1.0)
    (name,) = _saved(merge_env, lora_extract.lora_save, "loras", "loras", filename_prefix="loras/full", rank=8,
                     lora_type="full_diff", bias_diff=True, model_diff=model_diff, text_encoder_diff=clip_diff)
    from safetensors import safe_open

    with safe_open(str(merge_env.paths.models.root / "loras" / name), "pt") as f:
        keys = set(f.keys())
    assert "diffusion_model.input_blocks.0.0.diff" in keys and "diffusion_model.input_blocks.0.0.diff_b" in keys
    assert any(k.startswith("text_encoders.clip_l.transformer.") for k in keys)
    rec = Called()
    model, clip = call(lora.lora_loader, merge_env, rec, model=base, clip=base_clip, lora_name=name,
                       strength_model=1.0, strength_clip=1.0)
    assert not any("not matched" in m for m in rec.messages), rec.messages
    want, got = _weights(tuned), _weights(model)
    assert all(torch.allclose(got[k], want[k], atol=2e-3) for k in want)

    def encoder(c):
        with c.encoder("text_encoder") as te:
            return {k: v.detach().clone() for k, v in te.named_parameters()}

    want_te, got_te = encoder(tuned_clip), encoder(clip)
    assert all(torch.allclose(got_te[k], want_te[k], atol=2e-3) for k in want_te)


def test_a_standard_lora_is_the_difference_s_best_low_rank_factors(merge_env):
    from nodes import lora, lora_extract

    base, _, _ = _load(merge_env, tm.checkpoint_name("sd1"))
    tuned, _, _ = _load(merge_env, SECOND)
    (model_diff,) = call(mm.model_merge_subtract, merge_env, model1=tuned, model2=base, multiplier=1.0)
    target = "down_blocks.0.attentions.0.proj_in.weight"
    w_base, w_tuned = _weights(base)[target], _weights(tuned)[target]
    errors = {}
    for rank in (1, 4, 64):
        (name,) = _saved(merge_env, lora_extract.lora_save, "loras", "loras", filename_prefix=f"loras/r{rank}",
                         rank=rank, lora_type="standard", bias_diff=False, model_diff=model_diff)
        (model,) = call(lora.lora_loader_model_only, merge_env, model=base, lora_name=name, strength_model=1.0)
        errors[rank] = float((_weights(model)[target] - w_tuned).norm() / (w_tuned - w_base).norm())
    assert errors[1] > errors[4] > errors[64] and errors[64] < 0.2, errors  # the 0.99 clamp costs some at full rank
    up, down = lora_extract.low_rank(w_tuned - w_base, 2)
    assert up.shape[1] == 2 and down.shape[0] == 2
    with pytest.raises(NodeError) as err:
        call(lora_extract.lora_save, merge_env, filename_prefix="loras/x", rank=4, lora_type="standard",
             bias_diff=True)
    assert err.value.input_name == "model_diff"
