"""Marigold v2 (ComfyUI's image_marigold_v2_{depth,albedo,surface_normal}_estimation templates):
ModelSamplingAuraFlow's img_to_img_velocity sampling, SaveConditioning / ConditioningLoader and
MarigoldV2PostProcess, on the tiny Qwen-Image as ComfyUI's split files (tests/test_qwen_image_edit.py
writes them).

img_to_img_velocity is checked against the network called directly (``z - v`` from one euler step
over [0.5, 0]; KSampler's one step from sigma 1 takes the latent itself, whatever the seed); the
templates run from their editor files on tiny files saved under the names they ask for, with a
conditioning file SaveConditioning made from the tiny text encoder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tiny_qwen_image
import tiny_qwen_image_edit
from engine.context import NodeError
from engine.executor import Executor
from engine.formats import parse_document
from engine.registry import default_registry
from flow_family_files import template
from node_call import call, environment_over
from nodes import conditioning_files, custom_sampling, custom_schedulers, marigold, sd3_nodes
from nodes.samplers import velocity_rule
from test_qwen_image_edit import FILES, save_split_files

TEMPLATES = {"depth": "image_marigold_v2_depth_estimation.json",
             "albedo": "image_marigold_v2_albedo_estimation.json",
             "normals": "image_marigold_v2_surface_normal_estimation.json"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_split_files(tmp_path_factory.mktemp("marigold-models"))


@pytest.fixture(scope="module")
def env(root, tmp_path_factory):
    yield from environment_over(root, tmp_path_factory.mktemp("marigold-data"))


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def loaded(env):
    from nodes import loaders, split_loaders

    (model,) = call(split_loaders.unet_loader, env, unet_name=FILES["unet"], weight_dtype="default")
    (clip,) = call(split_loaders.clip_loader, env, clip_name=FILES["clip"], type="qwen_image")
    (vae,) = call(loaders.vae_loader, env, vae_name=FILES["vae"])
    return model, clip, vae


def velocity(z: torch.Tensor, sigma: float, embeds: torch.Tensor) -> torch.Tensor:
    """The tiny transformer's output on the model-space latent ``z`` at flow time ``sigma``, called
    directly (diffusers' 2x2 packing; the timestep in 0..1, as QwenImagePipeline passes it)."""
    net = tiny_qwen_image.components()["transformer"]
    b, c, h, w = z.shape
    tokens = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    with torch.no_grad():
        out = net(hidden_states=tokens, timestep=torch.full((b,), sigma), encoder_hidden_states=embeds,
                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def one_step(env, model, cond, samples: torch.Tensor, sampling: str) -> torch.Tensor:
    """The templates' sampling: DisableNoise, BasicGuider, euler over ManualSigmas "0.5, 0"."""
    (aura,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=1.73, sampling=sampling)
    (noise,) = call(custom_sampling.disable_noise, env)
    (guider,) = call(custom_sampling.basic_guider, env, model=aura, conditioning=cond)
    (sampler,) = call(custom_sampling.ksampler_select, env, sampler_name="euler")
    (sigmas,) = call(custom_schedulers.manual_sigmas, env, sigmas="0.5, 0")
    out, _ = call(custom_sampling.sampler_custom_advanced, env, noise=noise, guider=guider, sampler=sampler,
                  sigmas=sigmas, latent_image={"samples": samples})
    return out["samples"]


def test_img_to_img_velocity_is_the_latent_minus_the_network_output(env, loaded):
    """One euler step over [0.5, 0] gives z - v(z, 0.5), where the flow rule gives z - 0.5 v."""
    model, clip, _ = loaded
    cond = clip.encode("depth map")
    assert bool(cond[0][1][conditioning_files.QWEN_TEXT_MASK].all())  # no padding: the direct call needs no mask
    samples = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    z = model.latent.to_model(samples)
    v = velocity(z, 0.5, cond[0][0])
    got = one_step(env, model, cond, samples, "img_to_img_velocity")
    want = model.latent.from_model(z - v)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    flow = one_step(env, model, cond, samples, "flow")
    assert float((flow - model.latent.from_model(z - 0.5 * v)).abs().max()) < 1e-4 * float(want.abs().max())
    assert float((flow - got).abs().max()) > 0.1


def test_ksampler_takes_the_latent_itself_under_img_to_img_velocity(env, loaded):
    """KSampler honours the rule too: one step from sigma 1 mixes in no noise (any seed gives
    z - v(z, 1)); under the flow rule the start is pure noise, so the seed matters."""
    from nodes.sampling import ksampler

    model, clip, _ = loaded
    cond = clip.encode("depth map")
    samples = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    z = model.latent.to_model(samples)
    want = model.latent.from_model(z - velocity(z, 1.0, cond[0][0]))

    def sample(sampling: str, seed: int) -> torch.Tensor:
        (aura,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=1.73, sampling=sampling)
        (out,) = call(ksampler, env, model=aura, seed=seed, steps=1, cfg=1.0, sampler_name="euler",
                      scheduler="simple", positive=cond, negative=cond, latent_image={"samples": samples}, denoise=1.0)
        return out["samples"]

    for seed in (1, 2):
        assert float((sample("img_to_img_velocity", seed) - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert float((sample("flow", 1) - sample("flow", 2)).abs().max()) > 0.1


def test_sampling_is_an_optional_input_older_files_leave_at_flow(env, loaded, registry):
    """An editor file from before the input (the shift alone) loads with "flow"; the rule is a key of
    the MODEL's config that only img_to_img_velocity sets and a later model-sampling node clears."""
    def node(values):
        doc = {"nodes": [{"id": 1, "type": "ModelSamplingAuraFlow", "inputs": [{"name": "model", "type": "MODEL",
                                                                                "link": None}],
                          "outputs": [{"name": "MODEL", "type": "MODEL", "links": []}], "widgets_values": values}],
               "links": []}
        return parse_document(doc, registry).nodes["1"].inputs

    assert node([2.5]) == {"shift": 2.5}
    assert node([1.73, "img_to_img_velocity"]) == {"shift": 1.73, "sampling": "img_to_img_velocity"}
    assert registry.get("ModelSamplingAuraFlow").input("sampling").default == "flow"
    model = loaded[0]
    (plain,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=2.5)
    assert velocity_rule.KEY not in plain.scheduler_config and plain.scheduler_config["shift"] == 2.5
    (i2i,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=2.5, sampling="img_to_img_velocity")
    assert velocity_rule.rule(i2i.scheduler_config) == "img_to_img_velocity"
    (again,) = call(sd3_nodes.model_sampling_sd3, env, model=i2i, shift=3.0)
    assert velocity_rule.rule(again.scheduler_config) == "flow"
    with pytest.raises(NodeError) as err:
        call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=2.5, sampling="eps")
    assert err.value.input_name == "sampling"


# -- SaveConditioning / ConditioningLoader ---------------------------------------------------------


def save(env, conditioning, prefix: str = "conditioning/test") -> Path:
    out = call(conditioning_files.save_conditioning, env, conditioning=conditioning, filename_prefix=prefix)
    assert out == (conditioning,)
    files = sorted((Path(env.paths.output.root) / Path(prefix).parent).glob(Path(prefix).name + "_*_.safetensors"))
    return files[-1]


def load(env, root: Path, path: Path) -> list:
    (root / "embeddings").mkdir(exist_ok=True)
    shutil.copy(path, root / "embeddings" / path.name)
    return call(conditioning_files.conditioning_loader, env, conditioning_name=path.name)[0]


def test_save_then_load_gives_the_same_conditioning(env, root):
    """Embeds, a tensor option under ComfyUI's name (Qwen's text mask as attention_mask), a list
    option (two reference latents, as "<name>.<i>") and plain options (JSON metadata) come back."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(3)
    refs = [torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 6, 4, generator=g)]
    extra = {conditioning_files.QWEN_TEXT_MASK: torch.tensor([[1, 1, 1, 0]]), "reference_latents": refs,
             "reference_latents_method": "index_timestep_zero", "guidance": 2.5, "pooled_output": None}
    cond = [[torch.randn(1, 4, 64, generator=g), extra]]
    path = save(env, cond)
    assert path.name == "test_00001_.safetensors" and save(env, cond).name == "test_00002_.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"conditioning", "attention_mask", "reference_latents.0", "reference_latents.1"}
        assert json.loads(f.metadata()["conditioning_options"]) == {
            "reference_latents_method": "index_timestep_zero", "guidance": 2.5, "pooled_output": None}
    ((embeds, options),) = load(env, root, path)
    assert torch.equal(embeds, cond[0][0]) and set(options) == set(extra)
    assert torch.equal(options[conditioning_files.QWEN_TEXT_MASK], extra[conditioning_files.QWEN_TEXT_MASK])
    assert len(options["reference_latents"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(options["reference_latents"], refs))
    assert {k: options[k] for k in ("reference_latents_method", "guidance", "pooled_output")} == {
        "reference_latents_method": "index_timestep_zero", "guidance": 2.5, "pooled_output": None}


def test_conditioning_files_refuse_what_they_cannot_carry(env, root):
    from safetensors.torch import save_file

    embeds = torch.zeros(1, 2, 8)
    cases = [([[embeds, {}], [embeds, {}]], "save it before combining"),
             ([[embeds, {"guidance": {"a": 1}}]], "'guidance' is a dict"),
             ([[embeds, {"control": object()}]], "'control' has no place")]
    for cond, words in cases:
        with pytest.raises(NodeError) as err:
            call(conditioning_files.save_conditioning, env, conditioning=cond, filename_prefix="conditioning/bad")
        assert words in str(err.value) and err.value.input_name == "conditioning"
    folder = root / "embeddings"
    folder.mkdir(exist_ok=True)
    save_file({"embeds": embeds}, str(folder / "no-embeds.safetensors"))
    save_file({"conditioning": embeds, "area_map": embeds.clone()}, str(folder / "odd-option.safetensors"))
    save_file({"conditioning": embeds}, str(folder / "odd-plain.safetensors"),
              metadata={"conditioning_options": json.dumps({"lyrics_strength": 1.0})})
    for name, words in (("no-embeds.safetensors", "'no-embeds.safetensors' has no 'conditioning' tensor"),
                        ("odd-option.safetensors", "option 'area_map'"),
                        ("odd-plain.safetensors", "option 'lyrics_strength'")):
        with pytest.raises(NodeError) as err:
            call(conditioning_files.conditioning_loader, env, conditioning_name=name)
        assert words in str(err.value) and err.value.input_name == "conditioning_name"
    assert "odd-plain.safetensors" in conditioning_files._embeddings(env)  # the embeddings folder's listing


# -- MarigoldV2PostProcess -------------------------------------------------------------------------


def test_post_process_each_prediction_by_hand():
    image = torch.tensor([[[[0.0, 0.0, 0.0], [0.5, 0.5, 1.0]], [[1.0, 1.0, 1.0], [0.002, 0.5, 0.04]]]])

    def run(prediction):
        return call(marigold.marigold_v2_post_process, None, image=image, prediction=prediction)[0]

    # depth: means 0, 2/3, 1, 0.180667; near (small) bright over the image's own range
    means = torch.tensor([[0.0, 2 / 3], [1.0, 0.542 / 3]])
    depth = run("depth")
    assert depth.shape == (1, 2, 2, 3) and torch.allclose(depth, (1.0 - means)[None, ..., None].expand(1, 2, 2, 3))
    # normals: 2x - 1 made unit length (black is the unit vector along -(1, 1, 1))
    n = torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(run("normals")[0, 0, 1], n * 0.5 + 0.5)
    assert torch.allclose(run("normals")[0, 0, 0], torch.full((3,), 0.5 - 0.5 / 3 ** 0.5))
    # albedo: 12.92 x at and below 0.0031308, 1.055 x^(1/2.4) - 0.055 above
    albedo = run("albedo")
    assert torch.allclose(albedo[0, 1, 1], torch.tensor([0.002 * 12.92, 1.055 * 0.5 ** (1 / 2.4) - 0.055,
                                                         1.055 * 0.04 ** (1 / 2.4) - 0.055]))
    assert torch.allclose(albedo[0, 1, 0], torch.ones(3)) and torch.equal(albedo[0, 0, 0], torch.zeros(3))
    flat = call(marigold.marigold_v2_post_process, None, image=torch.full((1, 2, 2, 3), 0.3), prediction="depth")[0]
    assert torch.equal(flat, torch.zeros(1, 2, 2, 3))  # a flat depth: no range, no NaN


# -- the templates ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditioning_file(env, loaded) -> Path:
    """The tiny text encoder's prompt embedding, saved by SaveConditioning."""
    return save(env, loaded[1].encode("a depth map"), "conditioning/marigold")


@pytest.mark.parametrize("prediction", list(TEMPLATES))
def test_comfyui_marigold_templates_run(registry, env, root, loaded, conditioning_file, prediction):
    """Each template runs from its editor file on tiny files under its own names (the transformer as
    its int8 Edit file, a tiny LoRA, the tiny VAE, the saved conditioning) and post-processes its
    instance's prediction: depth grey in [0, 1] spanning it, normals unit vectors, albedo the sRGB
    transfer of the decode."""
    from flow_family_lora import lora_file, module_shapes, random_factors
    from safetensors.torch import save_file

    wf = parse_document(template(TEMPLATES[prediction]), registry)
    of = lambda t: next(n for n in wf.nodes.values() if n.type == t)  # noqa: E731
    assert of("MarigoldV2PostProcess").inputs["prediction"] == prediction  # the instance's, not the inner "depth"
    assert of("ModelSamplingAuraFlow").inputs["sampling"] == "img_to_img_velocity"
    transformer = tiny_qwen_image.components()["transformer"]
    for folder, name in (("diffusion_models", of("UNETLoader").inputs["unet_name"]),
                         ("vae", of("VAELoader").inputs["vae_name"])):
        source = root / folder / (FILES["unet"] if folder == "diffusion_models" else FILES["vae"])
        if not (root / folder / name).exists():
            shutil.copy(source, root / folder / name)
    (root / "loras").mkdir(exist_ok=True)
    blocks = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2")
    save_file(lora_file(random_factors(module_shapes(transformer, blocks), seed=11), "comfy"),
              str(root / "loras" / of("LoraLoaderModelOnly").inputs["lora_name"]))
    (root / "embeddings").mkdir(exist_ok=True)
    shutil.copy(conditioning_file, root / "embeddings" / of("ConditioningLoader").inputs["conditioning_name"])
    tiny_qwen_image_edit.picture(4, 64, 64).save(env.paths.input.root / of("LoadImage").inputs["image"])
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    (loaded_cond,) = outcome.results[of("ConditioningLoader").id]
    assert torch.equal(loaded_cond[0][0], loaded[1].encode("a depth map")[0][0])
    decoded = outcome.results[of("VAEDecode").id][0]
    out = outcome.results[of("MarigoldV2PostProcess").id][0]
    assert out.shape == decoded.shape == (1, 64, 64, 3) and bool(torch.isfinite(out).all())
    if prediction == "depth":
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
        assert float(out.min()) == 0.0 and abs(float(out.max()) - 1.0) < 1e-6
    elif prediction == "normals":
        assert torch.allclose((out * 2 - 1).norm(dim=-1), torch.ones(1, 64, 64), atol=1e-5)
    else:
        assert float((out - decoded).abs().max()) > 0.05
        assert torch.allclose(out, marigold.albedo_picture(decoded))
