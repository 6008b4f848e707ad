"""FLUX LoRAs in the three layouts people download, against diffusers' FluxPipeline.load_lora_weights.

One LoRA is trained-shaped with PEFT on the tiny FLUX transformer (random,
non-zero factors on attention, MLP and modulation layers of both block kinds and
the final layer) and saved by diffusers' ``FluxPipeline.save_lora_weights``
(``transformer.<module>.lora_A/B`` keys). The test then writes the same factors
in the original (BFL) layout ComfyUI uses and in kohya's, with its own
conversion below: fused ``qkv`` / ``linear1`` modules get the stacked ``down``
factors and a block-diagonal ``up`` (exactly the same delta), the final
modulation's halves swap, kohya's ``up`` is rescaled for its ``alpha``.
Kiln loads the split BFL transformer through UNETLoader, adds the LoRA with
LoraLoaderModelOnly and samples with KSampler; every file must give diffusers'
pixels within 1/255 at strength 1 and 0.5.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

import tiny_flux
import tiny_models
from engine.context import NodeError
from node_call import Called, call, environment_over
from nodes import lora, split_loaders
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a lighthouse on a cliff"
RANK, ALPHA = 4, 2.0
STEPS, SEED = 4, 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "norm_out.linear", "x_embedder"]
#: diffusers module -> original (BFL) module, written out here (not Kiln's table); "{d}"/"{s}": block index
_RENAMES = {"transformer_blocks.{d}.attn.to_out.0": "double_blocks.{d}.img_attn.proj",
            "transformer_blocks.{d}.attn.to_add_out": "double_blocks.{d}.txt_attn.proj",
            "transformer_blocks.{d}.ff.net.0.proj": "double_blocks.{d}.img_mlp.0",
            "transformer_blocks.{d}.ff.net.2": "double_blocks.{d}.img_mlp.2",
            "transformer_blocks.{d}.ff_context.net.0.proj": "double_blocks.{d}.txt_mlp.0",
            "transformer_blocks.{d}.ff_context.net.2": "double_blocks.{d}.txt_mlp.2",
            "transformer_blocks.{d}.norm1.linear": "double_blocks.{d}.img_mod.lin",
            "transformer_blocks.{d}.norm1_context.linear": "double_blocks.{d}.txt_mod.lin",
            "single_transformer_blocks.{s}.proj_out": "single_blocks.{s}.linear2",
            "single_transformer_blocks.{s}.norm.linear": "single_blocks.{s}.modulation.lin",
            "proj_out": "final_layer.linear", "x_embedder": "img_in"}
_FUSED = {"double_blocks.{d}.img_attn.qkv": ["transformer_blocks.{d}.attn.to_" + q for q in "qkv"],
          "double_blocks.{d}.txt_attn.qkv": [f"transformer_blocks.{{d}}.attn.add_{q}_proj" for q in "qkv"],
          "single_blocks.{s}.linear1": [f"single_transformer_blocks.{{s}}.attn.to_{q}" for q in "qkv"]
          + ["single_transformer_blocks.{s}.proj_mlp"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down, up) of a PEFT LoRA on a copy of the tiny transformer."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(tiny_flux.components("dev")["transformer"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                           target_modules=TARGETS))
    state = get_peft_model_state_dict(transformer)
    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = (state[key].detach().clone(), state[module + ".lora_B.weight"].detach() * 0.3)
    return out


def _clip_factors() -> dict[str, torch.Tensor]:
    """A PEFT LoRA on a copy of the tiny FLUX's CLIP-L (attention projections), its state as diffusers saves it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    clip = copy.deepcopy(tiny_flux.components("dev")["text_encoder"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(22)
        clip.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(clip).items()}


def _bfl(factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same deltas under the original layout's module names."""
    out = {}
    for module, (down, up) in factors.items():
        for pattern, bfl in _RENAMES.items():
            if module == pattern.replace("{d}", "0").replace("{s}", "0"):
                out[bfl.replace("{d}", "0").replace("{s}", "0")] = (down, up)
    for bfl, parts in _FUSED.items():
        names = [p.replace("{d}", "0").replace("{s}", "0") for p in parts]
        downs, ups = zip(*(factors[n] for n in names))
        out[bfl.replace("{d}", "0").replace("{s}", "0")] = (torch.cat(downs), torch.block_diag(*ups))
    down, up = factors["norm_out.linear"]  # diffusers (scale, shift) -> BFL (shift, scale)
    out["final_layer.adaLN_modulation.1"] = (down, torch.cat(up.chunk(2)[::-1]))
    return out


@pytest.fixture(scope="module")
def flux_lora_root(tmp_path_factory, tiny_models_dir) -> Path:
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    import tiny_models

    root = tmp_path_factory.mktemp("flux-lora")
    tiny_flux._save(root / "diffusion_models" / "tiny-flux-dev.safetensors", tiny_flux.bfl_transformer("dev"))
    (root / "checkpoints").mkdir()
    sd1 = tiny_models.checkpoint_name("sd1")
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / sd1, root / "checkpoints" / sd1)  # links are refused
    loras = root / "loras"
    factors = _factors()
    peft = {}
    for module, (down, up) in factors.items():
        peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"] = down, up
    FluxPipeline.save_lora_weights(str(loras), transformer_lora_layers=peft, weight_name="flux-peft.safetensors")
    FluxPipeline.save_lora_weights(str(loras), transformer_lora_layers=peft, text_encoder_lora_layers=_clip_factors(),
                                   weight_name="flux-peft-te.safetensors")
    tiny_flux._save(root / "diffusion_models" / "tiny-flux-dev-fp8.safetensors",
                    {"model.diffusion_model." + k: v for k, v in tiny_flux.to_fp8(tiny_flux.bfl_transformer("dev")).items()})
    tiny_flux._save(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    bfl = _bfl(factors)
    assert len(bfl) == len(factors) - 7  # 3 + 3 + 4 fused into 3
    save_file({f"diffusion_model.{m}.{k}": t.contiguous() for m, (down, up) in bfl.items()
               for k, t in (("lora_A.weight", down), ("lora_B.weight", up))}, str(loras / "flux-bfl.safetensors"))
    kohya = {}
    for m, (down, up) in bfl.items():
        base = "lora_unet_" + m.replace(".", "_")
        kohya[base + ".lora_down.weight"] = down.contiguous()
        kohya[base + ".lora_up.weight"] = (up * (down.shape[0] / ALPHA)).contiguous()  # alpha/rank undoes it
        kohya[base + ".alpha"] = torch.tensor(ALPHA)
    save_file(kohya, str(loras / "flux-kohya.safetensors"))
    return root


@pytest.fixture()
def env(flux_lora_root, tmp_path):
    yield from environment_over(flux_lora_root, tmp_path)


def _cond():
    pipe = tiny_flux.pipeline("dev")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, device="cpu", max_sequence_length=512)
    return embeds, pooled


def _decode(raw: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_flux.components("dev")["vae"], raw)


def _kiln(env, model, lora_name: str | None = None, strength: float = 1.0, rec: Called | None = None):
    if lora_name is not None:
        (model,) = call(lora.lora_loader_model_only, env, rec, model=model, lora_name=lora_name,
                        strength_model=strength)
    embeds, pooled = _cond()
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    (out,) = call(ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=1.0, sampler_name="euler",
                  scheduler="normal", positive=cond, negative=cond,
                  latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    return out["samples"]


@pytest.fixture(scope="module")
def reference(flux_lora_root) -> dict[float, torch.Tensor]:
    """diffusers' FluxPipeline with the diffusers-format file loaded, at adapter weight 1, 0.5 and without."""
    parts = dict(tiny_flux.components("dev"), transformer=copy.deepcopy(tiny_flux.components("dev")["transformer"]))
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = _cond()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                        num_inference_steps=STEPS, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED),
                        output_type="pt").images.permute(0, 2, 3, 1)

    images = {0.0: run()}
    pipe.load_lora_weights(str(flux_lora_root / "loras"), weight_name="flux-peft.safetensors", adapter_name="a")
    images[1.0] = run()
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    images[0.5] = run()
    return images


@pytest.mark.parametrize("fmt", ["peft", "bfl", "kohya"])
def test_flux_lora_equals_diffusers_load_lora_weights(env, reference, fmt):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    rec = Called()
    for strength in (1.0, 0.5):
        ours = _decode(_kiln(env, model, f"flux-{fmt}.safetensors", strength, rec))
        assert (ours - reference[strength]).abs().max() <= PIXEL_TOL, (fmt, strength)
    assert (reference[1.0] - reference[0.0]).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (reference[1.0] - reference[0.5]).abs().max() > 0.01
    from safetensors import safe_open

    with safe_open(str(env.paths.models.root / "loras" / "flux-peft.safetensors"), "pt") as f:
        patched = len(list(f.keys())) // 2  # every module of the file, fused ones split back
    assert f"{patched} modules patched" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages


def test_strength_zero_is_no_lora_and_the_weights_are_restored_exactly(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    with model.unet() as net:
        before = {k: v.clone() for k, v in net.state_dict().items()}
    plain = _kiln(env, model)
    assert torch.equal(_kiln(env, model, "flux-bfl.safetensors", 0.0), plain)
    assert not torch.equal(_kiln(env, model, "flux-kohya.safetensors", 1.0), plain)
    with model.unet() as net:
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_kiln(env, model), plain)


def test_flux_lora_on_sd1_and_sd1_lora_on_flux_are_named_errors(env, flux_lora_root):
    from safetensors.torch import save_file

    from nodes import loaders

    model, clip, _ = call(loaders.checkpoint_loader, env, ckpt_name="tiny-sd1.safetensors")
    for name in ("flux-peft.safetensors", "flux-bfl.safetensors", "flux-kohya.safetensors"):
        with pytest.raises(NodeError) as err:
            call(lora.lora_loader, env, model=model, clip=clip, lora_name=name, strength_model=1.0,
                 strength_clip=1.0)
        assert err.value.input_name == "lora_name" and "sd1" in str(err.value)
        assert "FLUX LoRA" in str(err.value), str(err.value)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
              str(flux_lora_root / "loras" / "sd1-unet.safetensors"))
    (flux_model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, env, model=flux_model, lora_name="sd1-unet.safetensors",
             strength_model=1.0)
    assert err.value.input_name == "lora_name" and "flux" in str(err.value) and "SD LoRA" in str(err.value)


def test_a_flux_lora_with_a_clip_l_part_equals_diffusers(env, flux_lora_root):
    """LoraLoader on UNETLoader + DualCLIPLoader (flux): the CLIP-L part (diffusers' ``text_encoder.`` keys)
    patches Kiln's CLIP-L; prompt encoding included, the image equals FluxPipeline with the file loaded."""
    from diffusers import FluxPipeline

    from nodes.flux_nodes import clip_text_encode_flux

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1="tiny-clip_l.safetensors",
                   clip_name2="tiny-t5xxl.safetensors", type="flux")

    def kiln(strength_clip: float) -> torch.Tensor:
        rec = Called()
        m, c = call(lora.lora_loader, env, rec, model=model, clip=clip, lora_name="flux-peft-te.safetensors",
                    strength_model=1.0, strength_clip=strength_clip)
        assert "in text_encoder" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages
        (cond,) = call(clip_text_encode_flux, env, clip=c, clip_l=PROMPT, t5xxl=PROMPT, guidance=3.5)
        (out,) = call(ksampler, env, model=m, seed=SEED, steps=STEPS, cfg=1.0, sampler_name="euler",
                      scheduler="normal", positive=cond, negative=cond,
                      latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
        return _decode(out["samples"])

    parts = dict(tiny_flux.components("dev"))
    parts.update(transformer=copy.deepcopy(parts["transformer"]), text_encoder=copy.deepcopy(parts["text_encoder"]))
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(flux_lora_root / "loras"), weight_name="flux-peft-te.safetensors")
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(SEED), output_type="pt").images.permute(0, 2, 3, 1)
    ours = kiln(1.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(0.0)).abs().max() > 0.02  # the CLIP-L part matters (measured 0.05): not vacuous


def test_a_lora_on_fp8_weights_runs_beside_them_and_equals_diffusers_on_the_same_weights(env, flux_lora_root):
    """fp8 linear weights keep their bytes: the LoRA is added to the layer's output in the compute
    dtype (adding its small delta into fp8 would round most of it away). Reference: FluxPipeline
    on the fp8 values upcast, with the diffusers file loaded."""
    from diffusers import FluxPipeline

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev-fp8.safetensors")
    with model.unet() as net:
        stored = {k: v.clone() for k, v in net.state_dict().items()}
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    plain = _kiln(env, model)
    ours = _decode(_kiln(env, model, "flux-bfl.safetensors", 1.0))
    with model.unet() as net:
        assert all(torch.equal(stored[k].view(torch.uint8) if stored[k].dtype == torch.float8_e4m3fn else stored[k],
                               v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
                   for k, v in net.state_dict().items())
        assert not any("kiln_lora" in vars(m) for m in net.modules())
    assert torch.equal(_kiln(env, model), plain)

    transformer = copy.deepcopy(tiny_flux.components("dev")["transformer"])
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.ndim == 2 and name.endswith(".weight"):
                p.copy_(p.to(torch.float8_e4m3fn).to(torch.float32))
    pipe = FluxPipeline(**dict(tiny_flux.components("dev"), transformer=transformer))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(flux_lora_root / "loras"), weight_name="flux-peft.safetensors")
    embeds, pooled = _cond()
    with torch.no_grad():
        theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                      num_inference_steps=STEPS, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED),
                      output_type="pt").images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - _decode(plain)).abs().max() > 0.02


def test_kohyas_t5_keys_patch_flux_t5(env, flux_lora_root):
    """sd-scripts' FLUX trainer writes T5 modules as ``lora_te3_<module>`` (ComfyUI's numbering):
    they patch DualCLIPLoader's T5 by exactly ``alpha / rank * up @ down``, and only while in use."""
    from safetensors.torch import save_file

    module = "encoder.block.0.layer.0.SelfAttention.q"
    down, up = torch.randn(RANK, 32) * 0.1, torch.randn(32, RANK) * 0.1
    save_file({f"lora_te3_{module.replace('.', '_')}.lora_down.weight": down,
               f"lora_te3_{module.replace('.', '_')}.lora_up.weight": up,
               f"lora_te3_{module.replace('.', '_')}.alpha": torch.tensor(ALPHA)},
              str(flux_lora_root / "loras" / "flux-t5-kohya.safetensors"))
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1="tiny-clip_l.safetensors",
                   clip_name2="tiny-t5xxl.safetensors", type="flux")
    rec = Called()
    _, patched_clip = call(lora.lora_loader, env, rec, model=model, clip=clip, lora_name="flux-t5-kohya.safetensors",
                           strength_model=1.0, strength_clip=0.5)
    assert "1 in text_encoder_2" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages
    with clip.encoder("text_encoder_2") as t5:
        base = t5.get_parameter(module + ".weight").detach().clone()
    with patched_clip.encoder("text_encoder_2") as t5:
        assert torch.allclose(t5.get_parameter(module + ".weight"), base + 0.5 * ALPHA / RANK * (up @ down), atol=1e-6)
    with clip.encoder("text_encoder_2") as t5:
        assert torch.equal(t5.get_parameter(module + ".weight"), base)


#: XLabs' processor -> the diffusers modules its factors cover (q, k, v stacked row-wise), written out here
_XLABS = {"double_blocks.0.processor.qkv_lora1": [f"transformer_blocks.0.attn.to_{q}" for q in "qkv"],
          "double_blocks.0.processor.qkv_lora2": [f"transformer_blocks.0.attn.add_{q}_proj" for q in "qkv"],
          "double_blocks.0.processor.proj_lora1": ["transformer_blocks.0.attn.to_out.0"],
          "double_blocks.0.processor.proj_lora2": ["transformer_blocks.0.attn.to_add_out"],
          "single_blocks.0.processor.qkv_lora": [f"single_transformer_blocks.0.attn.to_{q}" for q in "qkv"],
          "single_blocks.0.processor.proj_lora": ["single_transformer_blocks.0.proj_out"]}
#: the same modules under ComfyUI's names (its conversion of USO's LoRA writes these)
_COMFY_XLABS = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
                "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
                "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
                "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
                "single_blocks.0.processor.qkv_lora": "single_blocks.0.linear1_qkv",
                "single_blocks.0.processor.proj_lora": "single_blocks.0.linear2"}


@pytest.fixture(scope="module")
def xlabs_reference(flux_lora_root) -> torch.Tensor:
    """An XLabs-layout file (its FLUX trainer's, USO's) and ComfyUI's renaming of it, both exactly the PEFT
    factors on the modules XLabs covers; diffusers' FluxPipeline.load_lora_weights reads the XLabs file
    (its own converter) for the reference image."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    factors = _factors()
    xlabs, comfy = {}, {}
    for processor, modules in _XLABS.items():
        downs, ups = zip(*(factors[m] for m in modules))
        down, up = torch.cat(downs).contiguous(), (4 * torch.block_diag(*ups)).contiguous()  # attention only: louder
        xlabs[f"{processor}.down.weight"], xlabs[f"{processor}.up.weight"] = down, up
        comfy[f"diffusion_model.{_COMFY_XLABS[processor]}.lora_down.weight"] = down
        comfy[f"diffusion_model.{_COMFY_XLABS[processor]}.lora_up.weight"] = up
    loras = flux_lora_root / "loras"
    save_file(xlabs, str(loras / "flux-xlabs.safetensors"))
    save_file(comfy, str(loras / "flux-xlabs-comfy.safetensors"))
    parts = dict(tiny_flux.components("dev"), transformer=copy.deepcopy(tiny_flux.components("dev")["transformer"]))
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras), weight_name="flux-xlabs.safetensors", adapter_name="x")
    embeds, pooled = _cond()
    with torch.no_grad():
        image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                     num_inference_steps=STEPS, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED),
                     output_type="pt").images.permute(0, 2, 3, 1)
    return image


@pytest.mark.parametrize("name", ["flux-xlabs.safetensors", "flux-xlabs-comfy.safetensors"])
def test_an_xlabs_layout_lora_equals_diffusers(env, reference, xlabs_reference, name):
    """XLabs' processor names (``qkv_lora1`` ... ``proj_lora``, ``.down/.up.weight``, no alpha) and ComfyUI's
    ``linear1_qkv`` for a single block's q, k, v rows patch what diffusers' XLabs converter patches."""
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    rec = Called()
    ours = _decode(_kiln(env, model, name, 1.0, rec))
    assert (ours - xlabs_reference).abs().max() <= PIXEL_TOL
    assert (xlabs_reference - reference[0.0]).abs().max() > 0.02  # the LoRA changes the image
    patched = sum(len(modules) for modules in _XLABS.values())  # fused q, k, v counted one by one
    assert f"{patched} modules patched" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages
