"""LoRA: the loader nodes against diffusers' load_lora_weights + fuse_lora on the same weights.

LoRA files are made here the way people get them: trained adapters (PEFT, with
random non-zero factors so they change the output) saved by diffusers'
``save_lora_weights`` (diffusers/PEFT keys), and the same factors written in
kohya's key layout with an alpha (A1111/kohya keys, original-layout UNet names for
SDXL as kohya's SDXL trainer writes them). Kiln reads both through the real loader
and must give diffusers' fused pipeline's pixels within 1/255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import load
from node_call import Called, call
from nodes import loaders, lora, text

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
RANK = 4


def _adapted(variant: str) -> dict:
    """Fresh components (the checkpoint's weights) with random LoRA adapters on UNet and text encoders."""
    from peft import LoraConfig

    parts = tm.fresh_components(variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        parts["unet"].add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]))
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name].add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for module in parts.values():
        if isinstance(module, torch.nn.Module):  # tame the random factors: a LoRA nudges, it does not replace
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.data.mul_(0.2)
    return parts


def _peft_state(parts: dict) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(parts["unet"]).items()}
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            state.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(parts[name]).items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def _kohya_state(parts: dict, alpha: float, original_names: bool) -> dict[str, torch.Tensor]:
    """The same factors in kohya's layout; lora_up scaled so that alpha/rank gives the same delta."""
    from nodes.checkpoint.to_original import unet_to_original

    unet = parts["unet"]
    rename = {}
    if original_names:
        weights = {n[: -len(".base_layer.weight")] + ".weight": None for n, _ in unet.named_parameters()
                   if n.endswith(".base_layer.weight")}
        for key, param in unet_to_original({k: k for k in weights}, dict(unet.config)).items():
            rename[param[: -len(".weight")]] = key[len("model.diffusion_model."): -len(".weight")]
    out = {}
    for key, value in _peft_state(parts).items():
        target, module = key.split(".", 1)
        module, kind = module.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if "text_encoder_2" in parts else "lora_te_",
                  "text_encoder_2": "lora_te2_"}[target]
        if target == "unet":
            module = rename.get(module, module)
        elif not module.startswith("text_model."):
            module = "text_model." + module
        base = prefix + module.replace(".", "_")
        if kind.startswith("A"):
            out[base + ".lora_down.weight"] = value
            out[base + ".alpha"] = torch.tensor(alpha)
        else:
            out[base + ".lora_up.weight"] = value * (RANK / alpha)
    return out


@pytest.fixture(scope="module")
def lora_files(tiny_models_dir):
    from safetensors.torch import save_file

    folder = Path(tiny_models_dir) / "loras"
    folder.mkdir(exist_ok=True)
    for variant in ("sd1", "sdxl"):
        parts = _adapted(variant)
        save_file(_peft_state(parts), str(folder / f"{variant}-peft.safetensors"))
        save_file(_kohya_state(parts, alpha=2.0, original_names=variant == "sdxl"),
                  str(folder / f"{variant}-kohya.safetensors"))
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4)}, str(folder / "unrelated.safetensors"))
    return folder


def _run_img2img(env, lora_name: str | None, strength: float, variant: str, seed: int = 7):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    params = dict(checkpoint=tm.checkpoint_name(variant), image="init.png", width=SIZE, height=SIZE, prompt=PROMPT,
                  negative=NEGATIVE, strength=0.6, steps=6, cfg=7.0, sampler="euler", scheduler="normal", seed=seed)
    if lora_name is None:
        wf = load(REPO / "workflows" / "img2img.json").with_overrides(params)
    else:
        wf = load(REPO / "workflows" / "img2img-lora.json").with_overrides(
            dict(params, lora=lora_name, lora_strength=strength))
    outcome = Executor(default_registry(), env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def _diffusers_reference(variant: str, lora_path: Path, init_latent: torch.Tensor) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if variant == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = tm.pipeline(variant, cls=cls, parts=tm.fresh_components(variant))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    pipe.fuse_lora(lora_scale=1.0)
    extra = {"aesthetic_score": 6.0} if variant == "sdxl" else {}
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init_latent * pipe.vae.config.scaling_factor,
                strength=0.6, num_inference_steps=6, guidance_scale=7.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(7), **extra).images


@pytest.mark.parametrize("variant,fmt", [("sd1", "peft"), ("sd1", "kohya"), ("sdxl", "peft"), ("sdxl", "kohya")])
def test_lora_equals_diffusers_fused_lora(tiny_env, lora_files, variant, fmt):
    name = f"{variant}-{fmt}.safetensors"
    plain = _run_img2img(tiny_env, None, 0.0, variant)
    outcome = _run_img2img(tiny_env, name, 1.0, variant)
    kiln = outcome.results["9"][0].numpy()
    reference = _diffusers_reference(variant, lora_files / name, outcome.results["6"][0]["samples"])
    assert np.abs(kiln - reference).max() <= 1 / 255
    assert np.abs(kiln - plain.results["9"][0].numpy()).max() > 5 / 255  # the LoRA changed the picture


def test_strength_zero_is_no_lora_and_the_base_model_is_restored(tiny_env, lora_files):
    plain = _run_img2img(tiny_env, None, 0.0, "sd1").results["9"][0]
    zero = _run_img2img(tiny_env, "sd1-kohya.safetensors", 0.0, "sd1").results["9"][0]
    assert torch.equal(plain, zero)
    _run_img2img(tiny_env, "sd1-kohya.safetensors", 1.0, "sd1")  # patches, then restores
    after = _run_img2img(tiny_env, None, 0.0, "sd1").results["9"][0]
    assert torch.equal(plain, after)
    stats = tiny_env.models.stats()
    assert stats["loaded"] == 1  # one copy of the checkpoint whatever the LoRA combination


def test_stacked_loras_add_up(tiny_env, lora_files):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    rec = Called()
    m1, c1 = call(lora.lora_loader, tiny_env, rec, model=model, clip=clip, lora_name="sd1-peft.safetensors",
                  strength_model=0.5, strength_clip=0.5)
    m2, c2 = call(lora.lora_loader, tiny_env, rec, model=m1, clip=c1, lora_name="sd1-peft.safetensors",
                  strength_model=0.5, strength_clip=0.5)
    one, _ = call(lora.lora_loader, tiny_env, rec, model=model, clip=clip, lora_name="sd1-peft.safetensors",
                  strength_model=1.0, strength_clip=1.0)
    assert len(m2.loras) == 2 and model.loras == ()
    assert any("modules patched" in m for m in rec.messages)
    with m2.unet() as unet:
        stacked = {k: v.clone() for k, v in unet.state_dict().items()}
    with one.unet() as unet:
        single = unet.state_dict()
        assert all(torch.allclose(stacked[k], single[k], atol=1e-6) for k in single)
    with model.unet() as unet:
        assert not all(torch.equal(stacked[k], v) for k, v in unet.state_dict().items())
    a = call(text.clip_text_encode, tiny_env, text="a cat", clip=c2)[0][0][0]
    b = call(text.clip_text_encode, tiny_env, text="a cat", clip=clip)[0][0][0]
    assert not torch.equal(a, b)


def test_bad_loras_are_named_errors(tiny_env, lora_files):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader, tiny_env, model=model, clip=clip, lora_name="unrelated.safetensors",
             strength_model=1.0, strength_clip=1.0)
    assert err.value.input_name == "lora_name" and "0 of" in str(err.value)
    with pytest.raises(NodeError) as err:  # an SDXL LoRA on an SD1 model
        call(lora.lora_loader, tiny_env, model=model, clip=clip, lora_name="sdxl-kohya.safetensors",
             strength_model=1.0, strength_clip=1.0)
    assert err.value.input_name == "lora_name" and "another model family" in str(err.value)


def test_strength_outside_the_schema_and_missing_file_fail_validation(tiny_env, lora_files):
    from engine.validate import WorkflowInvalid, validate

    wf = load(REPO / "workflows" / "img2img-lora.json").with_overrides(
        dict(checkpoint=tm.checkpoint_name("sd1"), lora="sd1-peft.safetensors", lora_strength=1000))
    with pytest.raises(WorkflowInvalid) as err:
        validate(wf, default_registry(), tiny_env)
    assert any(e.input_name == "strength_model" for e in err.value.errors)
    wf = load(REPO / "workflows" / "img2img-lora.json").with_overrides(
        dict(checkpoint=tm.checkpoint_name("sd1"), lora="missing.safetensors"))
    with pytest.raises(WorkflowInvalid) as err:
        validate(wf, default_registry(), tiny_env)
    assert any(e.input_name == "lora_name" for e in err.value.errors)


def test_changing_only_the_lora_strength_reruns_nothing_upstream(tiny_env, lora_files):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(tiny_env.paths.input.root / "init.png")
    executor = Executor(default_registry(), tiny_env)
    base = dict(checkpoint=tm.checkpoint_name("sd1"), image="init.png", width=SIZE, height=SIZE, steps=4,
                lora="sd1-peft.safetensors", lora_strength=0.5)
    wf = load(REPO / "workflows" / "img2img-lora.json")
    assert executor.run(wf.with_overrides(base)).status == "succeeded"
    events = []
    assert executor.run(wf.with_overrides(dict(base, lora_strength=0.7)), on_event=events.append).status == "succeeded"
    ran = {e.node_id for e in events if e.type == "node_started"}
    assert ran.isdisjoint({"1", "4", "5", "6"})  # checkpoint, image, resize, VAE encode stay cached
    assert {"11", "8", "9"} <= ran


def test_locon_convolution_factors_patch_conv_weights(tiny_env, lora_files):
    """LoCon: kohya factors for a 3x3 convolution ([rank, in, 3, 3] down, [out, rank, 1, 1] up)."""
    from safetensors.torch import save_file

    model = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))[0]
    with model.unet() as unet:
        conv = unet.down_blocks[0].resnets[0].conv1.weight.detach().clone()
    out_c, in_c = conv.shape[:2]
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, in_c, 3, 3, generator=g), torch.randn(out_c, 2, 1, 1, generator=g)
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up,
               "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0)},
              str(lora_files / "locon.safetensors"))
    patched = call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="locon.safetensors",
                   strength_model=0.7)[0]
    expected = conv + 0.7 * 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(conv.shape)
    with patched.unet() as unet:
        assert torch.allclose(unet.down_blocks[0].resnets[0].conv1.weight, expected, atol=1e-6)
    with model.unet() as unet:
        assert torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, conv)
