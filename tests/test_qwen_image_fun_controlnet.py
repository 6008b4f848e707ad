"""alibaba-pai's Fun ControlNet Union for Qwen-Image-2512 on the tiny Qwen-Image, against a hand restatement.

No diffusers pipeline runs this ControlNet, so the reference is QwenImagePipeline whose transformer, at
every call, first computes the Fun ControlNet's samples by the rule as ComfyUI states it (restated here
with plain module calls, not Kiln's code) and hands them over as ``controlnet_block_samples``: the hint
latent (VAE mean, per-channel normalised) with 17 zero channels, 2x2-packed into 132 features, through
``control_img_in`` and ``before_proj`` onto the transformer's ``img_in`` of the latent; the control
blocks run on the transformer's embedded prompt, time and rotary positions with no text mask; each
block's ``after_proj`` output times the strength is added after transformer block ``k * N // n``; each
side of true CFG with its own prompt. The tiny file is saved as the release is (``control_img_in``,
``control_blocks.*`` with diffusers' block names, ``before_proj`` on block 0).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tiny_qwen_image
from node_call import call, environment_over
from nodes.controlnet import controlnet_apply_advanced, controlnet_loader
from test_qwen_image import NEGATIVE, PIXEL_TOL, PROMPT, SIZE
from test_qwen_image_controlnet import CFG, SEED, STEPS, hint_image, kiln, prompts
from test_qwen_image_controlnet import _vae

FUN = "Qwen-Image-2512-Fun-Controlnet-Union-tiny.safetensors"
BLOCKS, IN_FEATURES = 2, 132


@functools.lru_cache(maxsize=None)
def fun_modules() -> dict:
    """The tiny Fun ControlNet as plain modules: ``img_in`` (132 -> width), ``blocks`` (Qwen-Image blocks),
    ``before`` (block 0's) and ``after`` (one per block), random weights."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    width = tiny_qwen_image.HEADS * tiny_qwen_image.HEAD_DIM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        mods = {"img_in": torch.nn.Linear(IN_FEATURES, width),
                "blocks": torch.nn.ModuleList(QwenImageTransformerBlock(width, tiny_qwen_image.HEADS,
                                                                        tiny_qwen_image.HEAD_DIM)
                                              for _ in range(BLOCKS)),
                "before": torch.nn.Linear(width, width),
                "after": torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(BLOCKS))}
        with torch.no_grad():
            for name, m in mods.items():
                for p in m.parameters():  # the hint's input layer strong, so the hint shows
                    p.add_(torch.randn_like(p) * (0.3 if name == "img_in" else 0.05))
    return {k: m.eval().requires_grad_(False) for k, m in mods.items()}


def fun_state() -> dict:
    mods = fun_modules()
    state = {f"control_img_in.{k}": v for k, v in mods["img_in"].state_dict().items()}
    for i, block in enumerate(mods["blocks"]):
        state |= {f"control_blocks.{i}.{k}": v for k, v in block.state_dict().items()}
        state |= {f"control_blocks.{i}.after_proj.{k}": v for k, v in mods["after"][i].state_dict().items()}
    state |= {f"control_blocks.0.before_proj.{k}": v for k, v in mods["before"].state_dict().items()}
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("qwen-fun")
    (root / "models" / "controlnet").mkdir(parents=True)
    save_file(fun_state(), str(root / "models" / "controlnet" / FUN))
    yield from environment_over(root / "models", root)


def apply(env, strength: float = 1.0, image=None):
    cn = call(controlnet_loader, env, control_net_name=FUN)[0]
    positive, negative = prompts()
    return call(controlnet_apply_advanced, None, positive=positive, negative=negative, control_net=cn,
                image=hint_image() if image is None else image, strength=strength, start_percent=0.0,
                end_percent=1.0, vae=_vae())


def hint_tokens(image: torch.Tensor) -> torch.Tensor:
    """The restated hint: the VAE's mean latent, normalised, 17 zero channels, 2x2 patches channel-major."""
    vae = tiny_qwen_image.components()["vae"]
    pixels = (image.movedim(-1, 1) * 2 - 1)[:, :, None]
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    z = torch.cat([(raw - mean) / std, torch.zeros(1, 17, *raw.shape[2:])], dim=1)
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def reference(monkeypatch, strength: float, image: torch.Tensor | None = None, prompt: str = PROMPT,
              negative: str = NEGATIVE, size: int = SIZE, steps: int = STEPS, cfg: float = CFG, seed: int = SEED,
              shift: float | None = None) -> torch.Tensor:
    """QwenImagePipeline with the restated Fun ControlNet; ``shift``: a fixed shift (ModelSamplingAuraFlow)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_qwen_image.components()["transformer"]
    mods, hint, plain = fun_modules(), hint_tokens(hint_image() if image is None else image), transformer.forward

    def forward(hidden_states, encoder_hidden_states=None, timestep=None, img_shapes=None, **kw):
        hidden = transformer.img_in(hidden_states)
        text = transformer.txt_in(transformer.txt_norm(encoder_hidden_states))
        temb = transformer.time_text_embed(timestep, hidden)
        rotary = transformer.pos_embed(img_shapes, max_txt_seq_len=encoder_hidden_states.shape[1], device="cpu")
        state = mods["before"](mods["img_in"](hint.expand(hidden.shape[0], -1, -1))) + hidden
        samples = [torch.zeros_like(hidden)] * len(transformer.transformer_blocks)
        for k, block in enumerate(mods["blocks"]):
            text, state = block(hidden_states=state, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                temb=temb, image_rotary_emb=rotary)
            samples[k * len(samples) // BLOCKS] = mods["after"][k](state) * strength
        return plain(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                     img_shapes=img_shapes, controlnet_block_samples=samples, **kw)

    monkeypatch.setattr(transformer, "forward", forward)
    pipe = tiny_qwen_image.pipeline()
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift,
                                                                     use_dynamic_shifting=False, shift_terminal=None)
    with torch.no_grad():
        out = pipe(prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
                   true_cfg_scale=cfg, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    return out.permute(0, 2, 3, 1)


def test_loader_reads_the_fun_controlnet(env):
    cn = call(controlnet_loader, env, control_net_name=FUN)[0]
    assert cn.family.name == "qwen_image" and cn.config["kiln_qwen_fun"] and cn.config["in_features"] == IN_FEATURES
    with cn.use() as net:
        own = {k: v for k, v in net.state_dict().items()}
        assert own.keys() == fun_state().keys()
        assert all(torch.equal(v, fun_state()[k]) for k, v in own.items())


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_txt2img_equals_the_restated_rule(env, monkeypatch, strength):
    ours = kiln(*apply(env, strength))  # before the reference patches the shared transformer
    plain = kiln(*prompts())
    other = kiln(*apply(env, strength, image=hint_image().flip(2)))
    theirs = reference(monkeypatch, strength)
    gap = float((ours - theirs).abs().max())
    print(f"Fun ControlNet strength {strength}: max diff {gap * 255:.4f}/255")
    assert gap <= PIXEL_TOL
    assert (ours - plain).abs().max() > 0.02  # the ControlNet moves the image
    assert (ours - other).abs().max() > 0.02  # so does the hint


def test_strength_zero_is_no_controlnet_and_each_side_reads_its_own_prompt(env):
    from nodes.families import qwen_image

    assert torch.equal(kiln(*apply(env, 0.0)), kiln(*prompts()))
    positive, negative = apply(env)
    assert positive[0][1]["control"].prompt is None  # not the InstantX rule
    assert not qwen_image.FAMILY.controlnet_reads_positive_prompt(positive[0][1]["control"].net.config)


# -- ComfyUI's image_qwen_Image_2512_controlnet.json ------------------------------------------------

def test_comfyui_2512_controlnet_template_equals_the_restated_rule(tmp_path, monkeypatch):
    """The template from its editor file on the tiny split files and the tiny Fun ControlNet under the
    template's file name (only file names, sizes, steps and seed overridden; its Lightning switch stays
    off): LoadImage, ResizeImageMaskNode to a total pixel count, Canny, ControlNetApplyAdvanced,
    ModelSamplingAuraFlow 3.1, KSampler euler/simple cfg 4. Fed the template's own Canny hint, the
    restated rule at shift 3.1 gives the same image."""
    import importlib
    import json
    from pathlib import Path

    from PIL import Image
    from safetensors.torch import save_file

    from engine.executor import Executor
    from engine.formats import parse_document
    from engine.registry import default_registry
    from test_qwen_image_controlnet import photo
    from test_qwen_image_loading import SPLIT, _of_type

    registry = default_registry()
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    wf = parse_document(json.loads((folder / "image_qwen_Image_2512_controlnet.json").read_text(encoding="utf-8")),
                        registry)
    models = tiny_qwen_image.make_models_folder(tmp_path / "models")
    (models / "controlnet").mkdir()
    (models / "loras").mkdir()
    (loader,), (lora,) = _of_type(wf, "ControlNetLoader"), _of_type(wf, "LoraLoaderModelOnly")
    save_file(fun_state(), str(models / "controlnet" / loader.inputs["control_net_name"]))
    save_file({}, str(models / "loras" / lora.inputs["lora_name"]))  # switched off: must exist, never loads
    env = next(environment_over(models, tmp_path))
    picture = np.clip(np.rint((photo()[0] * 0.5 + hint_image()[0] * 0.5).numpy() * 255), 0, 255).astype(np.uint8)
    env.paths.input.root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(env.paths.input.root / "tiny-shot.png")
    (unet,), (clip,), (vae,), (load,) = (_of_type(wf, t) for t in ("UNETLoader", "CLIPLoader", "VAELoader",
                                                                  "LoadImage"))
    (resize,), (sampler,), (shift,) = (_of_type(wf, t) for t in ("ResizeImageMaskNode", "KSampler",
                                                                  "ModelSamplingAuraFlow"))
    assert round(float(shift.inputs["shift"]), 4) == 3.1 and sampler.inputs["scheduler"] == "simple"
    unet.inputs["unet_name"], clip.inputs["clip_name"], vae.inputs["vae_name"] = SPLIT["unet"], SPLIT["clip"], \
        SPLIT["vae"]
    load.inputs["image"] = "tiny-shot.png"
    resize.inputs["resize_type.megapixels"] = 112 * 112 / (1024 * 1024)  # 64x64 -> 112x112
    steps = next(n for n in _of_type(wf, "PrimitiveInt") if n.inputs["value"] == 50)  # the switch's "off" side
    steps.inputs["value"] = STEPS
    sampler.inputs["seed"] = SEED
    cfg = next(float(n.inputs["value"]) for n in _of_type(wf, "PrimitiveFloat") if float(n.inputs["value"]) != 1.0)
    outcome = Executor(registry, env).run(wf)
    env.models.unload_all(collect=False)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    (canny,), (save,) = _of_type(wf, "Canny"), _of_type(wf, "SaveImage")
    hint = outcome.results[canny.id][0]
    ours = outcome.results[save.inputs["images"].node_id][0]
    assert ours.shape == (1, 112, 112, 3) and hint.shape == (1, 112, 112, 3) and float(hint.max()) == 1.0
    apply_node = next(iter(_of_type(wf, "ControlNetApplyAdvanced")))
    pos, neg = (wf.nodes[apply_node.inputs[k].node_id].inputs["text"] for k in ("positive", "negative"))
    theirs = reference(monkeypatch, 1.0, image=hint, prompt=pos, negative=neg, size=112, cfg=cfg, shift=3.1)
    gap = float((ours - theirs).abs().max())
    print(f"2512 ControlNet template gap {gap * 255:.4f}/255")
    assert gap <= PIXEL_TOL
