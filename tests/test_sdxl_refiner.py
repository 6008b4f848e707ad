"""SDXL refiner checkpoints: detected, loaded, encoded and sampled as diffusers does.

A tiny random model with sd_xl_refiner_1.0's layout (OpenCLIP bigG alone at
``conditioner.embedders.0.model.``, attention only in the middle two of four UNet
levels, a size embedding of pooled text + five time ids) is saved as one file and
loaded through CheckpointLoaderSimple. Its img2img run with CLIPTextEncodeSDXLRefiner
equals diffusers' StableDiffusionXLImg2ImgPipeline (text_encoder_2 only,
requires_aesthetics_score=True) on the same weights, seed and aesthetic scores; plain
CLIPTextEncode gives diffusers' (and ComfyUI's) default scores. ComfyUI's own
"SDXL base + refiner" template runs end to end on tiny base and refiner files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from engine.context import Environment, NodeError, Paths
from engine.executor import Executor
from engine.formats import parse_document
from engine.registry import default_registry
from node_call import Called, call
from nodes import loaders, text
from nodes.checkpoint.tiny import REFINER
from nodes.latent import add_noise
from nodes.runtime.models import ModelManager
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
REFINER_FILE = "tiny-sdxl-refiner.safetensors"
POS, NEG = "a red barn in a field", "blurry"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_models_dir) -> Path:
    """A models folder of this module's own: the session's tiny SDXL base plus a tiny refiner."""
    root = tmp_path_factory.mktemp("refiner-models")
    (root / "checkpoints").mkdir()
    base = tiny_models.checkpoint_name("sdxl")
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / base, root / "checkpoints" / base)
    tiny_models.save_single_file(REFINER, root / "checkpoints" / REFINER_FILE)
    tiny_models.save_diffusers(REFINER, root / "checkpoints" / "tiny-sdxl-refiner-diffusers")
    return root


@pytest.fixture
def env(models_dir, tmp_path):
    environment = Environment(paths=Paths.under(tmp_path / "data", models=models_dir),
                              models=ModelManager(device="cpu"))
    yield environment
    environment.models.unload_all(collect=False)


def _decode(parts: dict, samples: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(parts["vae"], samples)


def test_refiner_file_loads_as_its_own_family(env):
    rec = Called()
    model, clip, vae = call(loaders.checkpoint_loader, env, rec, ckpt_name=REFINER_FILE)
    assert model.family.name == "sdxl-refiner" and clip.family is model.family
    assert any("sdxl-refiner" in m for m in rec.messages)
    assert set(clip.tokenizers) == {"tokenizer_2"}
    parts = tiny_models.components(REFINER)
    with model.unet() as unet:
        assert unet.config.addition_time_embed_dim == 8
        assert unet.config.projection_class_embeddings_input_dim == 5 * 8 + 64
        ours, ref = unet.state_dict(), parts["unet"].state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    # The same model as a diffusers folder (text_encoder_2 only, requires_aesthetics_score) is the refiner too.
    folder_model, folder_clip, _ = call(loaders.checkpoint_loader, env, ckpt_name="tiny-sdxl-refiner-diffusers")
    assert folder_model.family is model.family and set(folder_clip.tokenizers) == {"tokenizer_2"}
    # SDXL base still loads as base from the same folder.
    base = call(loaders.checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sdxl"))[0]
    assert base.family.name == "sdxl"


def test_unet_loader_tells_a_refiner_unet_from_a_base_one(env, models_dir):
    """UNet-only files (ComfyUI's UNETLoader): the refiner's size embedding is its context width plus
    five time ids; base's is pooled + six against a wider context."""
    from safetensors.torch import load_file, save_file

    from nodes import split_loaders

    folder = models_dir / "diffusion_models"
    folder.mkdir(exist_ok=True)
    for source, name in ((REFINER_FILE, "refiner-unet.safetensors"),
                         (tiny_models.checkpoint_name("sdxl"), "base-unet.safetensors")):
        state = load_file(str(models_dir / "checkpoints" / source))
        save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, str(folder / name))
    refiner = call(split_loaders.unet_loader, env, unet_name="refiner-unet.safetensors")[0]
    base = call(split_loaders.unet_loader, env, unet_name="base-unet.safetensors")[0]
    assert (refiner.family.name, base.family.name) == ("sdxl-refiner", "sdxl")
    with refiner.unet() as unet:
        ours, ref = unet.state_dict(), tiny_models.components(REFINER)["unet"].state_dict()
        assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _kiln_img2img(env, pos, neg, init, seed=42, strength=0.6, steps=10, cfg=7.5):
    model = call(loaders.checkpoint_loader, env, ckpt_name=REFINER_FILE)[0]
    lat, = call(add_noise, env, model=model, latent={"samples": init}, strength=strength, seed=seed)
    out, = call(ksampler, env, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                scheduler="normal", positive=pos, negative=neg, latent_image=lat, denoise=1.0)
    return out["samples"]


def test_refiner_img2img_equals_diffusers_refiner_pipeline(env):
    clip = call(loaders.checkpoint_loader, env, ckpt_name=REFINER_FILE)[1]
    parts = tiny_models.components(REFINER)
    scale = float(parts["vae"].config.scaling_factor)
    # 128 px: at 64 the tiny UNet's deepest block is 1x1, where GroupNorm normalises two numbers per group
    # and turns the CPU's rounding (another kernel on another CPU) into differences of several /255
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7)) * 4

    def refiner_cond(prompt, ascore):
        return call(text.clip_text_encode_sdxl_refiner, env, ascore=ascore, width=128, height=128, text=prompt,
                    clip=clip)[0]

    pipe = tiny_models.pipeline(REFINER)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score

    def reference(score, neg_score):
        return pipe(prompt=POS, negative_prompt=NEG, image=init * scale, strength=0.6, num_inference_steps=10,
                    guidance_scale=7.5, aesthetic_score=score, negative_aesthetic_score=neg_score,
                    generator=torch.Generator().manual_seed(42), output_type="pt").images.permute(0, 2, 3, 1)

    ours = _decode(parts, _kiln_img2img(env, refiner_cond(POS, 7.0), refiner_cond(NEG, 3.0), init))
    ref = reference(7.0, 3.0)
    assert ours.shape == ref.shape == (1, 128, 128, 3)
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: the aesthetic score reaches the UNet (diffusers' defaults 6 / 2.5 give another picture).
    default = reference(6.0, 2.5)
    assert (default - ref).abs().max().item() > 0.01
    # Plain CLIPTextEncode (ComfyUI's own refiner template uses it): the default scores, 6 and 2.5 by side.
    plain = [call(text.clip_text_encode, env, text=t, clip=clip)[0] for t in (POS, NEG)]
    ours_plain = _decode(parts, _kiln_img2img(env, *plain, init))
    assert (ours_plain - default).abs().max().item() <= PIXEL_TOL


def test_sdxl_base_prompt_on_the_refiner_is_an_error_naming_the_input(env):
    """SDXL base's CLIP (CLIP-L + bigG, wider) on the refiner: the sampler names the input."""
    base_clip = call(loaders.checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sdxl"))[1]
    refiner_model, refiner_clip, _ = call(loaders.checkpoint_loader, env, ckpt_name=REFINER_FILE)
    wrong = call(text.clip_text_encode, env, text=POS, clip=base_clip)[0]
    right = call(text.clip_text_encode, env, text=NEG, clip=refiner_clip)[0]
    for pos, neg, bad in ((wrong, right, "positive"), (right, wrong, "negative")):
        with pytest.raises(NodeError) as err:
            call(ksampler, env, model=refiner_model, seed=1, steps=2, cfg=7.0, sampler_name="euler",
                 scheduler="normal", positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                 denoise=1.0)
        assert err.value.input_name == bad
        assert "128 wide" in str(err.value) and "sdxl-refiner" in str(err.value)


def _broken(models_dir: Path, name: str, edit) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(str(models_dir / "checkpoints" / REFINER_FILE))
    edit(state)
    save_file(state, str(models_dir / "checkpoints" / name))
    return name


@pytest.mark.parametrize("name,edit,needle", [
    ("refiner-no-text-block.safetensors",
     lambda s: s.pop("conditioner.embedders.0.model.transformer.resblocks.1.ln_1.weight"),
     "under conditioner.embedders.0.model. weights do not fit the detected architecture (missing "
     "['text_model.encoder.layers.1.layer_norm1.weight']"),
    ("refiner-no-unet-key.safetensors",
     lambda s: s.pop("model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"),
     "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"),
    ("refiner-odd-size-embedding.safetensors",
     lambda s: s.update({"model.diffusion_model.label_emb.0.0.weight":
                         torch.zeros(s["model.diffusion_model.label_emb.0.0.weight"].shape[0], 103)}),
     "model.diffusion_model.label_emb.0.0.weight"),
])
def test_a_refiner_whose_keys_do_not_fit_names_node_input_and_keys(env, models_dir, name, edit, needle):
    _broken(models_dir, name, edit)
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name=name)
    assert err.value.input_name == "ckpt_name"
    assert name in str(err.value) and needle in str(err.value)
    # Through the executor the failure names the node too.
    doc = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}}
    registry = default_registry()
    outcome = Executor(registry, env).run(parse_document(doc, registry))
    assert outcome.status == "failed"
    assert outcome.error.node_id == "1" and outcome.error.node_type == "CheckpointLoader"
    assert outcome.error.input_name == "ckpt_name"
    assert needle in outcome.error.message


def _template() -> dict:
    import comfyui_workflow_templates

    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    return json.loads((folder / "sdxl_refiner_prompt_example.json").read_text(encoding="utf-8"))


def test_comfyui_sdxl_base_and_refiner_template_runs_on_tiny_models(env):
    """ComfyUI's template as shipped: base KSamplerAdvanced (steps 0..switch, leftover noise), refiner
    KSamplerAdvanced (switch..end, no new noise), decoded with the refiner's VAE, plain CLIPTextEncode."""
    registry = default_registry()
    base = parse_document(_template(), registry)
    assert {n.type for n in base.nodes.values()} >= {"CheckpointLoaderSimple", "KSamplerAdvanced", "CLIPTextEncode"}

    def run(switch: int):
        wf = base.with_overrides({"4.ckpt_name": tiny_models.checkpoint_name("sdxl"), "12.ckpt_name": REFINER_FILE,
                                  "5.width": 64, "5.height": 64, "10.steps": 6, "11.steps": 6,
                                  "10.end_at_step": switch, "11.start_at_step": switch,
                                  "10.noise_seed": 5, "19.filename_prefix": f"refined{switch}"})
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        files = sorted(env.paths.output.root.glob(f"refined{switch}*.png"))
        assert len(files) == 1
        return np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.float32)

    refined, unrefined = run(4), run(6)
    assert refined.shape == (64, 64, 3) and np.isfinite(refined).all()
    # The refiner's two steps changed the picture the base left at step 4 (at 6 the refiner runs none).
    assert np.abs(refined - unrefined).max() > 2
