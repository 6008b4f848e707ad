"""SD3.5 on a tiny random model: Kiln's loaders and nodes against diffusers' SD3 pipelines.

Both sides get the same weights, seed, steps and strength (and the same init
latent: diffusers samples the VAE posterior, Kiln's VAEEncode takes the mean, so
the pipeline is handed the model-space latent as its 16-channel "image"). The
decoded images must agree within 1/255 per pixel, and each parity test checks
that strength or the prompt changes the result, so agreement is not vacuous. The
tiny SD3 is written in Stability's single-file layout and ComfyUI's split files
(tests/tiny_sd3.py) and loaded through the real loader nodes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
import tiny_sd3
from engine.context import NodeError
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from flow_family_files import env, models_root  # noqa: F401 (env is a fixture)
from node_call import Called, call
from nodes import families, loaders, sampling, sd3_nodes, split_loaders, text
from nodes.families import sd3
from nodes.flux_nodes import empty_sd3_latent_image
from nodes.handles import ClipHandle, ModelHandle
from nodes.latent import add_noise

PIXEL_TOL = 1 / 255 + 1e-6
SIZE = 64
PROMPT, NEGATIVE = "a red barn in a field", "blurry, dark"
SPLIT = dict(unet="tiny-sd3-large.safetensors", clip_l="tiny-sd3-clip_l.safetensors",
             clip_g="tiny-sd3-clip_g.safetensors", t5="tiny-sd3-t5xxl.safetensors", vae="tiny-sd3-vae.safetensors")


root = models_root(tiny_sd3.make_models_folder, "sd3-models")


def _model(variant: str) -> ModelHandle:
    parts = tiny_sd3.components(variant)
    return ModelHandle(sd3.FAMILY, scheduler_config=sd3.FAMILY.scheduler_config(), latent=sd3.SD3_LATENT,
                       _use_unet=lambda: contextlib.nullcontext(parts["transformer"]))


def _embeds(variant: str):
    with torch.no_grad():
        return tiny_sd3.pipeline(variant).encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE, device="cpu",
                                                        do_classifier_free_guidance=True)


def _init_raw() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.8 + 0.0609


def kiln_img2img(variant: str, strength: float, steps: int = 6, seed: int = 42, cfg: float = 4.0) -> torch.Tensor:
    pe, ne, pp, npl = _embeds(variant)
    model = _model(variant)
    (latent,) = add_noise(_ctx(), model, {"samples": _init_raw()}, strength=strength, seed=seed)
    (out,) = sampling.ksampler(_ctx(), model, seed, steps, cfg, "euler", "normal",
                               [[pe, {"pooled_output": pp}]], [[ne, {"pooled_output": npl}]], latent)
    return tiny_models.decode(tiny_sd3.components(variant)["vae"], out["samples"])


def diffusers_img2img(variant: str, strength: float, steps: int = 6, seed: int = 42, cfg: float = 4.0):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pe, ne, pp, npl = _embeds(variant)
    pipe = tiny_sd3.pipeline(variant, cls=StableDiffusion3Img2ImgPipeline)
    with torch.no_grad():
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                   negative_pooled_prompt_embeds=npl, image=sd3.SD3_LATENT.to_model(_init_raw()), strength=strength,
                   height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out.permute(0, 2, 3, 1)


def _ctx():
    """A NodeContext for calling node functions directly (test_flux's recorder)."""
    from test_flux import Recorder

    return Recorder().ctx


@pytest.mark.parametrize("variant", tiny_sd3.VARIANTS)
def test_img2img_equals_sd3_img2img_pipeline(variant):
    ours, theirs = kiln_img2img(variant, 0.6), diffusers_img2img(variant, 0.6)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln_img2img(variant, 0.9)).abs().max() > 0.02  # strength matters


def test_the_grid_is_the_sd3_pipelines():
    """diffusers' SD3 pipelines call set_timesteps(N): the shifted training range, evenly spaced, shifted again."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes.samplers import flow

    ours = flow.scheduler(sd3.FAMILY.scheduler_config(), "normal", 8, 8, 8)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(8)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)


# -- loading ------------------------------------------------------------------------------------


def _checkpoint(env, name="tiny-sd3-large.safetensors", record=None):
    return call(loaders.checkpoint_loader, env, record, ckpt_name=name)


def _split(env, order=("clip_g", "t5", "clip_l")):
    (model,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["unet"])
    (clip,) = call(sd3_nodes.triple_clip_loader, env, **{f"clip_name{i + 1}": SPLIT[k] for i, k in enumerate(order)})
    (vae,) = call(loaders.vae_loader, env, vae_name=SPLIT["vae"])
    return model, clip, vae


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_files_and_single_file_load_the_same_weights(env):
    model, clip, vae = _checkpoint(env)
    s_model, s_clip, s_vae = _split(env)
    parts = tiny_sd3.components("large")
    with model.unet() as a, s_model.unet() as b:
        assert _same(a, b) and _same(a, parts["transformer"])
    for module in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        with clip.encoder(module) as a, s_clip.encoder(module) as b:
            assert _same(a, b) and _same(a, parts[module]), module
    with vae.module() as a, s_vae.module() as b:
        assert _same(a, b) and _same(a, parts["vae"])
    assert model.family is s_model.family is sd3.FAMILY and clip.family is s_clip.family is sd3.FAMILY


def test_medium_config_comes_from_the_shapes(env):
    (model, _, _) = _checkpoint(env, "tiny-sd3-medium.safetensors")
    theirs = tiny_sd3.components("medium")["transformer"]
    with model.unet() as ours:
        assert ours.config.dual_attention_layers == (0,) and ours.config.qk_norm == "rms_norm"
        assert ours.config.pos_embed_max_size == 16 and _same(ours, theirs)


def _encode(env, clip, text_):
    return call(text.clip_text_encode, env, text=text_, clip=clip)[0]


def kiln_txt2img(env, prompt=PROMPT, seed=5, steps=4, cfg=4.5):
    model, clip, vae = _checkpoint(env)
    pos, neg = _encode(env, clip, prompt), _encode(env, clip, NEGATIVE)
    (latent,) = call(empty_sd3_latent_image, env, width=SIZE, height=SIZE, batch_size=1)
    (out,) = call(sampling.ksampler, env, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
    with vae.module() as v:
        return tiny_models.decode(v, out["samples"])


def test_txt2img_with_cfg_and_negative_equals_sd3_pipeline(env):
    ours = kiln_txt2img(env)
    with torch.no_grad():
        theirs = tiny_sd3.pipeline("large")(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                                            num_inference_steps=4, guidance_scale=4.5, output_type="pt",
                                            generator=torch.Generator().manual_seed(5)).images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln_txt2img(env, prompt="a blue boat at sea")).abs().max() > 0.003  # the prompt matters


def test_prompt_encoding_equals_encode_prompt(env):
    _, clip, _ = _checkpoint(env)
    cond = _encode(env, clip, PROMPT)
    pe, _, pp, _ = _embeds("large")
    assert cond[0][0].shape == (1, 77 + sd3.T5_TOKENS, tiny_sd3.T5)
    assert torch.equal(cond[0][0], pe) and torch.equal(cond[0][1]["pooled_output"], pp)


# -- nodes --------------------------------------------------------------------------------------


def test_model_sampling_sd3_changes_the_schedule(env):
    from nodes.samplers import flow

    model = _model("large")
    (same,) = call(sd3_nodes.model_sampling_sd3, env, model=model, shift=3.0)
    (other,) = call(sd3_nodes.model_sampling_sd3, env, model=model, shift=6.0)
    grid = [flow.scheduler(m.scheduler_config, "normal", 6, 8, 8).sigmas for m in (model, same, other)]
    assert torch.equal(grid[0], grid[1]) and (grid[0] - grid[2]).abs().max() > 0.05
    assert (grid[2][1:-1] > grid[0][1:-1]).all()  # a larger shift keeps more noise at each step
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.model_sampling_sd3, env, model=ModelHandle(families.by_name("sd1"), scheduler_config={},
                                                                   latent=None), shift=3.0)
    assert err.value.input_name == "model"


def test_model_sampling_aura_flow_is_a_fixed_shift_with_its_own_default(env):
    """ComfyUI's Qwen-Image, Z-Image and Chroma templates set the shift with ModelSamplingAuraFlow."""
    model = _model("large")
    (aura,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=2.5)
    (sd3,) = call(sd3_nodes.model_sampling_sd3, env, model=model, shift=2.5)
    assert aura.scheduler_config == sd3.scheduler_config and aura.scheduler_config["shift"] == 2.5
    assert sd3_nodes.model_sampling_aura_flow.input("shift").default == 1.73
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.model_sampling_aura_flow, env, model=ModelHandle(families.by_name("sd1"), scheduler_config={},
                                                                         latent=None), shift=1.73)
    assert err.value.input_name == "model" and "ModelSamplingAuraFlow" in str(err.value)


def test_clip_text_encode_sd3_sends_each_encoder_its_prompt(env):
    _, clip, _ = _checkpoint(env)
    (both,) = call(sd3_nodes.clip_text_encode_sd3, env, clip=clip, clip_l=PROMPT, clip_g=PROMPT, t5xxl=PROMPT,
                   empty_padding="none")
    assert torch.equal(both[0][0], _encode(env, clip, PROMPT)[0][0])
    (no_t5,) = call(sd3_nodes.clip_text_encode_sd3, env, clip=clip, clip_l=PROMPT, clip_g=PROMPT, t5xxl="",
                    empty_padding="none")
    assert no_t5[0][0].shape == (1, 77, 4096)  # no T5: ComfyUI pads the CLIP states to T5-XXL's width
    assert torch.equal(no_t5[0][0][..., :tiny_sd3.T5], both[0][0][:, :77]) and not no_t5[0][0][..., tiny_sd3.T5:].any()
    (padded,) = call(sd3_nodes.clip_text_encode_sd3, env, clip=clip, clip_l=PROMPT, clip_g=PROMPT, t5xxl="",
                     empty_padding="empty_prompt")
    assert padded[0][0].shape[1] == 77 + sd3.T5_TOKENS
    (other_l,) = call(sd3_nodes.clip_text_encode_sd3, env, clip=clip, clip_l="a dog", clip_g=PROMPT, t5xxl=PROMPT,
                      empty_padding="none")
    l_width = tiny_sd3.CLIP_L
    assert not torch.equal(other_l[0][0][..., :l_width], both[0][0][..., :l_width])
    assert torch.equal(other_l[0][0][..., l_width:tiny_sd3.CLIP_L + tiny_sd3.CLIP_G][:, :77],
                       both[0][0][..., l_width:tiny_sd3.CLIP_L + tiny_sd3.CLIP_G][:, :77])


def test_comfyui_api_sd3_graph_runs_unchanged(env):
    """ComfyUI's SD3.5 template shape: a checkpoint without text encoders, TripleCLIPLoader,
    ModelSamplingSD3, EmptySD3LatentImage; equal to StableDiffusion3Pipeline."""
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd3-large-noclip.safetensors"}},
        "11": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": SPLIT["clip_l"],
                                                            "clip_name2": SPLIT["clip_g"], "clip_name3": SPLIT["t5"]}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 3.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["11", 0]}},
        "71": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["11", 0]}},
        "135": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["13", 0], "seed": 5, "steps": 4, "cfg": 4.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["71", 0],
                                                   "latent_image": ["135", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd3"}},
    }
    outcome = Executor(default_registry(), env).run(parse(json.loads(json.dumps(graph))))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    theirs = tiny_sd3.pipeline("large")(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                                        num_inference_steps=4, guidance_scale=4.5, output_type="np",
                                        generator=torch.Generator().manual_seed(5)).images
    assert np.abs(outcome.results["8"][0].numpy() - theirs).max() <= PIXEL_TOL


# -- detection and bad input --------------------------------------------------------------------


def test_detection_claims_sd3_only():
    import tiny_flux

    sd3_keys = {k: tuple(v.shape) for k, v in tiny_sd3.original_transformer("large").items()}
    flux_keys = {k: tuple(v.shape) for k, v in tiny_flux.bfl_transformer("dev").items()}
    assert families.for_unet(sd3_keys) is sd3.FAMILY
    assert families.for_unet(flux_keys).name.startswith("flux")
    assert not sd3.FAMILY.claims_unet(flux_keys) and not sd3.FAMILY.claims_unet(
        {"model.diffusion_model." + k: v for k, v in flux_keys.items()})
    assert not any(f.claims_unet(sd3_keys) for f in families.ALL if f.name.startswith("flux"))
    assert not sd3.FAMILY.claims_unet({"model.diffusion_model.input_blocks.0.0.weight": (1,)})


def test_checkpoint_without_encoders_names_them(env):
    record = Called()
    model, clip, vae = _checkpoint(env, "tiny-sd3-large-noclip.safetensors", record)
    assert any("CLIP-L" in m and "CLIP-G" in m and "T5-XXL" in m for m in record.messages), record.messages
    with pytest.raises(NodeError) as err:
        _encode(env, clip, PROMPT)
    assert err.value.input_name == "clip" and "TripleCLIPLoader" in str(err.value)
    record = Called()
    _, clip, _ = _checkpoint(env, "tiny-sd3-large-not5.safetensors", record)
    assert any("T5-XXL" in m and "CLIP-L" not in m for m in record.messages), record.messages
    cond = _encode(env, clip, PROMPT)  # ComfyUI's rule: no T5 tokens, CLIP states padded to T5-XXL's 4096
    assert cond[0][0].shape == (1, 77, 4096)
    assert cond[0][1]["pooled_output"].shape == (1, tiny_sd3.CLIP_L + tiny_sd3.CLIP_G)


def test_clip_loader_sd3_with_one_encoder_gives_zeros_for_the_rest(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["clip_g"], type="sd3")
    cond = _encode(env, clip, PROMPT)
    states, pooled = cond[0][0], cond[0][1]["pooled_output"]
    assert states.shape == (1, 77, 4096) and pooled.shape == (1, 768 + tiny_sd3.CLIP_G)
    assert not states[..., :768].any() and states[..., 768:768 + tiny_sd3.CLIP_G].any()
    assert not pooled[:, :768].any() and not states[..., 768 + tiny_sd3.CLIP_G:].any()
    (dual,) = call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["clip_g"], clip_name2=SPLIT["clip_l"],
                   type="sd3")
    both = _encode(env, dual, PROMPT)[0][0]
    width = tiny_sd3.CLIP_L + tiny_sd3.CLIP_G
    full = _encode(env, _checkpoint(env)[1], PROMPT)[0][0]
    assert both.shape == (1, 77, 4096) and torch.equal(both[..., :width], full[:, :77, :width])
    # the tiny transformer reads 96-wide text: a 4096-wide conditioning is refused on the input that carries it
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(NodeError) as err:
        call(sampling.ksampler, env, model=_model("large"), seed=0, steps=2, cfg=1.0, sampler_name="euler",
             scheduler="normal", positive=cond, negative=cond, latent_image=empty)
    assert err.value.input_name == "positive" and "4096 wide" in str(err.value)
    pe, ne, pp, npl = _embeds("large")
    with pytest.raises(NodeError) as err:  # the input that carries it, whichever side
        call(sampling.ksampler, env, model=_model("large"), seed=0, steps=2, cfg=2.0, sampler_name="euler",
             scheduler="normal", positive=[[pe, {"pooled_output": pp}]], negative=cond, latent_image=empty)
    assert err.value.input_name == "negative"


def test_a_clip_l_only_conditioning_on_sd3_names_the_input(env):
    sd1_like = [[torch.randn(1, 77, tiny_sd3.T5), {"pooled_output": None}]]
    pe, _, pp, _ = _embeds("large")
    with pytest.raises(NodeError) as err:
        call(sampling.ksampler, env, model=_model("large"), seed=0, steps=2, cfg=2.0, sampler_name="euler",
             scheduler="normal", positive=[[pe, {"pooled_output": pp}]], negative=sd1_like,
             latent_image={"samples": torch.zeros(1, 16, 8, 8)})
    assert err.value.input_name == "negative" and "pooled_output" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.clip_text_encode_sd3, env, clip=ClipHandle(family=families.by_name("sd1"), tokenizers={}),
             clip_l="a", clip_g="a", t5xxl="a", empty_padding="none")
    assert err.value.input_name == "clip"


def test_a_mismatched_sd3_file_names_family_and_keys(env, root):
    from safetensors.torch import save_file

    state = tiny_sd3.original_transformer("large")
    state.pop("joint_blocks.0.x_block.mlp.fc1.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "diffusion_models" / "broken.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken.safetensors")
    assert err.value.input_name == "unet_name"
    assert "SD3" in str(err.value) and "joint_blocks.0.x_block.mlp.fc1.weight" in str(err.value)


def test_prompt_weights_reach_both_clips_and_t5(env):
    """ComfyUI's weight syntax: CLIP tokens by nodes.families.text's rule, T5 tokens by t5_weights'; the pooled
    output stays the prompt's (weights never apply to it)."""
    _, clip, _ = _checkpoint(env)
    plain, weighted = _encode(env, clip, PROMPT), _encode(env, clip, "a (red barn:1.4) in a field")
    states, base = weighted[0][0], plain[0][0]
    assert states.shape == base.shape
    width = tiny_sd3.CLIP_L + tiny_sd3.CLIP_G
    assert (states[:, :77, :width] - base[:, :77, :width]).abs().max() > 1e-3  # the CLIP part moved
    assert (states[:, 77:] - base[:, 77:]).abs().max() > 1e-3  # the T5 part moved
    assert torch.equal(states[:, :1], base[:, :1])  # the start token has weight 1
    # the same tokens (batched with the empty prompt, so equal up to float rounding)
    assert torch.allclose(weighted[0][1]["pooled_output"], plain[0][1]["pooled_output"], atol=1e-5)


def test_skip_layer_guidance_equals_sd3_pipelines_skip_guidance_layers(env):
    """SkipLayerGuidanceSD3 with a percent window covering the same steps as diffusers' step window
    (steps 2..4 of 6: start 0.2, stop 0.7) equals StableDiffusion3Pipeline's skip_guidance_layers."""
    from nodes.samplers import flow

    steps, cfg, shift = 6, 4.0, 3.0
    sigmas = [float(s) for s in flow.scheduler(sd3.FAMILY.scheduler_config(), "normal", steps, 8, 8).sigmas]

    def percent(sigma: float) -> float:  # ComfyUI's percent for a level on the shift-3 flow schedule
        return 1.0 - sigma / (shift - (shift - 1.0) * sigma)

    start, end = percent((sigmas[1] + sigmas[2]) / 2), percent((sigmas[4] + sigmas[5]) / 2)
    pe, ne, pp, npl = _embeds("large")
    empty = {"samples": torch.zeros(1, 16, 8, 8)}

    def kiln(model):
        (out,) = call(sampling.ksampler, env, model=model, seed=5, steps=steps, cfg=cfg, sampler_name="euler",
                      scheduler="normal", positive=[[pe, {"pooled_output": pp}]],
                      negative=[[ne, {"pooled_output": npl}]], latent_image=empty)
        return tiny_models.decode(tiny_sd3.components("large")["vae"], out["samples"])

    (slg,) = call(sd3_nodes.skip_layer_guidance_sd3, env, model=_model("large"), layers="1", scale=2.5,
                  start_percent=start, end_percent=end)
    ours = kiln(slg)
    with torch.no_grad():
        theirs = tiny_sd3.pipeline("large")(
            prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npl,
            height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg, skip_guidance_layers=[1],
            skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.7,
            output_type="pt", generator=torch.Generator().manual_seed(5)).images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(_model("large"))).abs().max() > 0.003  # the guidance changes the image
    (same,) = call(sd3_nodes.skip_layer_guidance_sd3, env, model=_model("large"), layers="", scale=2.5)
    assert same.patches.skip_layers is None
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.skip_layer_guidance_sd3, env, model=_model("large"), layers="7, 8, 9")
    assert err.value.input_name == "layers" and "0..1" in str(err.value)


def test_latent_space_and_preview_are_sd3s():
    raw = torch.randn(1, 16, 4, 4)
    assert torch.allclose(sd3.SD3_LATENT.to_model(raw), (raw - 0.0609) * 1.5305)
    assert torch.allclose(sd3.SD3_LATENT.from_model(sd3.SD3_LATENT.to_model(raw)), raw, atol=1e-6)
    preview = sd3.SD3_LATENT.preview_rgb(torch.zeros(16, 4, 4))  # the bias alone: ComfyUI's (0.2394, 0.2135, 0.1925)
    assert preview.shape == (4, 4, 3) and preview[0, 0].tolist() == [158, 155, 152]


def test_triple_clip_loader_refuses_a_wrong_set_by_input(env):
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.triple_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["clip_l"],
             clip_name3=SPLIT["t5"])
    assert err.value.input_name == "clip_name1" and "sd3" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.triple_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["unet"],
             clip_name3=SPLIT["t5"])
    assert err.value.input_name == "clip_name2"


def test_a_flux_lora_on_sd3_names_the_input(env, root):
    from safetensors.torch import save_file

    from nodes import lora

    (root / "loras").mkdir(exist_ok=True)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4)},
              str(root / "loras" / "flux-on-sd3.safetensors"))
    (model,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["unet"])
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, env, model=model, lora_name="flux-on-sd3.safetensors", strength_model=1.0)
    assert err.value.input_name == "lora_name" and "sd3" in str(err.value) and "FLUX LoRA" in str(err.value)


def test_a_diffusers_sd3_folder_loads_the_same_weights(env, root):
    """CheckpointLoader on StableDiffusion3Pipeline.save_pretrained's folder: the pipeline's own weights,
    the scheduler's shift, and the same image as the single file."""
    tiny_sd3.pipeline("large").save_pretrained(str(root / "checkpoints" / "tiny-sd3-diffusers"),
                                               safe_serialization=True)
    model, clip, vae = _checkpoint(env, "tiny-sd3-diffusers")
    parts = tiny_sd3.components("large")
    with model.unet() as net:
        assert _same(net, parts["transformer"])
    for module in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        with clip.encoder(module) as te:
            assert _same(te, parts[module]), module
    assert model.scheduler_config["shift"] == 3.0 and model.latent.scale == sd3.SD3_LATENT.scale
    assert torch.equal(_encode(env, clip, PROMPT)[0][0], _embeds("large")[0])


def test_comfyuis_sd35_simple_example_template_runs_unchanged(env):
    """ComfyUI's own ``sd3.5_simple_example`` editor file (its template package), only the checkpoint, size,
    steps and seed overridden: an empty negative prompt at cfg 4.01, euler on sgm_uniform (the uniform
    grid), equal to StableDiffusion3Pipeline."""
    import comfyui_workflow_templates

    from engine.formats import parse_document

    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    registry = default_registry()
    document = json.loads((folder / "sd3.5_simple_example.json").read_text(encoding="utf-8"))
    wf = parse_document(document, registry).with_overrides({
        "4.ckpt_name": "tiny-sd3-large.safetensors", "53.width": SIZE, "53.height": SIZE, "3.steps": 4,
        "3.seed": 11})
    assert (wf.nodes["3"].inputs["scheduler"], wf.nodes["3"].inputs["cfg"]) == ("sgm_uniform", 4.01)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    prompt, negative = wf.nodes["16"].inputs["text"], wf.nodes["40"].inputs["text"]
    assert negative == "" and len(prompt) > 100
    theirs = tiny_sd3.pipeline("large")(prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE,
                                        num_inference_steps=4, guidance_scale=4.01, output_type="np",
                                        generator=torch.Generator().manual_seed(11)).images
    assert np.abs(outcome.results["8"][0].numpy() - theirs).max() <= PIXEL_TOL


def test_t5_tokenizer_options_and_clip_kinds(env):
    """T5TokenizerOptions pads SD3's T5 by ComfyUI's rule instead of diffusers' 256; a 768-wide CLIP with a
    text projection (SD3's clip_l.safetensors) reads as CLIP-L, a wider one as OpenCLIP."""
    from nodes.checkpoint import detect as det

    _, clip, _ = _checkpoint(env)
    (short,) = call(text.t5_tokenizer_options, env, clip=clip, min_padding=0, min_length=0)
    parts = tiny_sd3.components("large")
    ids = parts["tokenizer_3"](PROMPT, return_tensors="pt").input_ids  # the prompt and its end token, unpadded
    cond = _encode(env, short, PROMPT)[0][0]
    with torch.no_grad():
        assert cond.shape[1] == 77 + ids.shape[1] and torch.equal(cond[:, 77:], parts["text_encoder_3"](ids)[0])
    key = "text_model.embeddings.token_embedding.weight"
    assert det.text_kind({key: (49408, 768), "text_projection.weight": (768, 768)}, "transformers", "") == "openai"
    assert det.text_kind({key: (49408, 1280), "text_projection.weight": (1280, 1280)}, "transformers", "") == \
        "openclip"


def test_unet_loader_reads_a_diffusers_layout_transformer(env, root):
    from safetensors.torch import save_file

    theirs = tiny_sd3.components("medium")["transformer"]
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
              str(root / "diffusion_models" / "tiny-sd3-medium-diffusers.safetensors"))
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-sd3-medium-diffusers.safetensors")
    assert model.family is sd3.FAMILY
    with model.unet() as ours:
        assert _same(ours, theirs) and ours.config.dual_attention_layers == (0,)


def test_a_clip_l_file_without_projection_gives_the_unprojected_pooled_output(env, root):
    """ComfyUI reads SD3's CLIP-L pooled output unprojected: a clip_l file without text_projection (FLUX's)
    loads for SD3 with the identity in its place."""
    from safetensors.torch import save_file

    state = tiny_sd3.clip_state("text_encoder")
    state.pop("text_projection.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "text_encoders" / "plain-clip_l.safetensors"))
    (clip,) = call(sd3_nodes.triple_clip_loader, env, clip_name1=SPLIT["t5"], clip_name2="plain-clip_l.safetensors",
                   clip_name3=SPLIT["clip_g"])
    pooled = _encode(env, clip, PROMPT)[0][1]["pooled_output"]
    clip_l, tok = tiny_sd3.components("large")["text_encoder"], tiny_sd3.components("large")["tokenizer"]
    ids = tok([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unprojected = clip_l.text_model(ids).pooler_output
        projected = clip_l(ids).text_embeds
    assert torch.allclose(pooled[:, :tiny_sd3.CLIP_L], unprojected, atol=1e-6)
    assert (unprojected - projected).abs().max() > 1e-3  # the tiny projection is not the identity


def test_unet_loader_fp8_keeps_sd3_linear_weights_in_8_bits(env):
    from nodes.runtime.fp8 import fp8_bytes

    record = Called()
    (model,) = call(split_loaders.unet_loader, env, record, unet_name=SPLIT["unet"], weight_dtype="fp8_e4m3fn")
    with model.unet() as net:
        assert fp8_bytes(net) > 0 and net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert not any("applied to FLUX and SD3 transformers only" in m for m in record.messages)
    pe, ne, pp, npl = _embeds("large")
    cond, empty = [[pe, {"pooled_output": pp}]], {"samples": torch.zeros(1, 16, 8, 8)}
    images = []
    for handle in (model, _model("large")):
        (out,) = call(sampling.ksampler, env, model=handle, seed=1, steps=3, cfg=1.0, sampler_name="euler",
                      scheduler="normal", positive=cond, negative=cond, latent_image=empty)
        images.append(tiny_models.decode(tiny_sd3.components("large")["vae"], out["samples"]))
    gap = (images[0] - images[1]).abs().max()
    assert 0 < gap < 0.1  # fp8 rounding moves pixels a little, not the picture
