"""GLIGENLoader and GLIGENTextBoxApply on the tiny SD 1.x checkpoint and a tiny GLIGEN file in
ComfyUI's layout (``<block>.fuser.*``, ``position_net.*``), loaded through Kiln's real loaders.

The reference is diffusers' StableDiffusionGLIGENPipeline over the same weights: its UNet built
with ``attention_type="gated"`` and the GLIGEN weights, run with ``gligen_scheduled_sampling_beta
=1.0`` (ComfyUI grounds every step; diffusers by default only the first 30%) and at cfg 1 (under
CFG diffusers also fuses the unconditional half, with its boxes masked; ComfyUI runs a negative
without boxes on the plain UNet, which is checked on the denoiser itself).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from engine.context import NodeError
from node_call import call, environment_over
from nodes import families
from nodes.families import grounding
from nodes.gligen import gligen_loader, gligen_textbox_apply
from nodes.latent import empty_latent_image
from nodes.loaders import checkpoint_loader
from nodes.sampling import ksampler
from nodes.text import clip_text_encode

PIXEL_TOL = 1 / 255 + 1e-6
QK_GAIN = 10.0
GLIGEN_FILE = "tiny-gligen.safetensors"
PROMPT, NEGATIVE = "a red barn in a field", "blurry"
STEPS, SEED = 8, 5
#: (phrase, (x, y, width, height) in pixels of the 64x64 image): two boxes, accumulated
BOXES = [("a purple bottle", (16, 8, 32, 40)), ("the sun", (40, 40, 16, 16))]


def _gated_unet() -> torch.nn.Module:
    """The tiny SD 1.x UNet rebuilt with GLIGEN's fusers and a position net for its 64-wide text,
    the fusers' gates open (a released GLIGEN's are; freshly built ones are zero)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    plain = tiny_models.components("sd1")["unet"]
    with torch.random.fork_rng():
        torch.manual_seed(11)
        config = {k: v for k, v in plain.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**{**config, "attention_type": "gated"})
        width = plain.config.cross_attention_dim
        unet.position_net = GLIGENTextBoundingboxProjection(positive_len=width, out_dim=width)
        missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all(".fuser." in k or k.startswith("position_net.") for k in missing)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.endswith("alpha_attn") or name.endswith("alpha_dense"):
                    p.fill_(0.8)
                elif ".fuser." in name or name.startswith("position_net."):
                    p.add_(torch.randn_like(p) * 0.05)
                if ".fuser.attn.to_q" in name or ".fuser.attn.to_k" in name:
                    p.mul_(QK_GAIN)  # sharper attention (4-wide heads), so where a box is shows
    return unet.eval()


def _save_gligen(unet: torch.nn.Module, path: Path) -> Path:
    """The gated UNet's GLIGEN weights as ComfyUI reads them: fusers under original block names."""
    from safetensors.torch import save_file

    plain = tiny_models.components("sd1")["unet"]
    paths = {id(m): n for n, m in plain.named_modules()}
    state = {}
    for original, block in grounding.transformer_blocks(plain, families.by_name("sd1")).items():
        for key, value in unet.get_submodule(paths[id(block)]).fuser.state_dict().items():
            state[f"{original}.fuser.{key}"] = value
    for key, value in unet.position_net.state_dict().items():
        state[f"position_net.{key}"] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def gated():
    return _gated_unet()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models_dir, gated) -> Path:
    root = tmp_path_factory.mktemp("gligen-models")
    for variant in ("sd1", "sd2", "sdxl"):
        name = tiny_models.checkpoint_name(variant)
        (root / "checkpoints").mkdir(exist_ok=True)
        shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / name, root / "checkpoints" / name)
    _save_gligen(gated, root / "gligen" / GLIGEN_FILE)
    shutil.copyfile(Path(tiny_models_dir) / "vae" / "tiny-vae.safetensors", root / "gligen" / "not-gligen.safetensors")
    return root


@pytest.fixture
def env(models, tmp_path):
    yield from environment_over(models, tmp_path)


def _sample(env, boxes=BOXES, cfg: float = 1.0, variant: str = "sd1", negative_boxes: bool = False) -> torch.Tensor:
    """Kiln's graph: checkpoint, prompts, GLIGEN boxes, KSampler txt2img; the raw latent."""
    model, clip, _ = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name(variant))
    pos, = call(clip_text_encode, env, text=PROMPT, clip=clip)
    neg, = call(clip_text_encode, env, text=NEGATIVE, clip=clip)
    gligen, = call(gligen_loader, env, gligen_name=GLIGEN_FILE)
    for phrase, (x, y, w, h) in boxes:
        pos, = call(gligen_textbox_apply, env, conditioning_to=pos, clip=clip, gligen_textbox_model=gligen,
                    text=phrase, width=w, height=h, x=x, y=y)
        if negative_boxes:
            neg, = call(gligen_textbox_apply, env, conditioning_to=neg, clip=clip, gligen_textbox_model=gligen,
                        text=phrase, width=w, height=h, x=x, y=y)
    empty, = call(empty_latent_image, env, width=64, height=64, batch_size=1)
    out, = call(ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=cfg, sampler_name="dpmpp_2m",
                scheduler="normal", positive=pos, negative=neg, latent_image=empty)
    return out["samples"]


def _decode(latent: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_models.components("sd1")["vae"], latent)


def _reference(gated, boxes=BOXES) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionGLIGENPipeline

    pos, _, _ = tiny_models.encoded_prompts("sd1", PROMPT, NEGATIVE)
    pipe = tiny_models.pipeline("sd1", cls=StableDiffusionGLIGENPipeline,
                                parts={**tiny_models.components("sd1"), "unet": gated})
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    # Kiln keeps boxes in latent units (pixels // 8) of the 8x8 latent
    xyxy = [[x // 8 / 8, y // 8 / 8, (x // 8 + w // 8) / 8, (y // 8 + h // 8) / 8] for _, (x, y, w, h) in boxes]
    images = pipe(prompt_embeds=pos[0][0], height=64, width=64, num_inference_steps=STEPS, guidance_scale=1.0,
                  gligen_scheduled_sampling_beta=1.0, gligen_phrases=[p for p, _ in boxes], gligen_boxes=xyxy,
                  generator=torch.Generator().manual_seed(SEED), output_type="pt").images
    return images.permute(0, 2, 3, 1)


def test_gligen_txt2img_equals_diffusers_gligen_pipeline(env, gated):
    ours = _decode(_sample(env))
    ref = _reference(gated)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: the boxes move the image, and moving a box moves it differently.
    plain = _decode(_sample(env, boxes=[]))
    moved_boxes = [BOXES[0], ("the sun", (0, 0, 16, 16))]
    moved = _decode(_sample(env, boxes=moved_boxes))
    print(f"parity {(ours - ref).abs().max().item():.2e}, boxes vs none {(ours - plain).abs().max().item():.3f}, "
          f"moved {(ours - moved).abs().max().item():.3f}")
    assert (ours - plain).abs().max().item() > 0.02
    assert (ours - moved).abs().max().item() > 0.02
    assert (moved - _reference(gated, moved_boxes)).abs().max().item() <= PIXEL_TOL


def test_negative_without_boxes_is_the_plain_unet(env, gated):
    """Under CFG the positive is fused and the negative is the plain UNet's prediction (ComfyUI's
    rule; diffusers' pipeline fuses the unconditional half too, with masked boxes)."""
    from nodes.families.denoiser import Denoiser

    model, clip, _ = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    pos, = call(clip_text_encode, env, text=PROMPT, clip=clip)
    neg, = call(clip_text_encode, env, text=NEGATIVE, clip=clip)
    gligen, = call(gligen_loader, env, gligen_name=GLIGEN_FILE)
    (phrase, (x, y, w, h)), = BOXES[:1]
    pos, = call(gligen_textbox_apply, env, conditioning_to=pos, clip=clip, gligen_textbox_model=gligen, text=phrase,
                width=w, height=h, x=x, y=y)
    plain = tiny_models.components("sd1")["unet"]
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(500)
    with torch.no_grad():
        denoiser = Denoiser(plain, families.by_name("sd1"), positive=pos, negative=neg, cfg=6.0, image_size=(64, 64),
                            batch=1)
        denoiser.model_output(sample, t)
        # the same [negative, positive] batch through the plain UNet: its negative row, bit for bit
        both = torch.cat([neg[0][0], pos[0][0]])
        uncond = plain(torch.cat([sample, sample]), t, encoder_hidden_states=both).sample[:1]
        ids = tiny_models.components("sd1")["tokenizer"]([phrase], return_tensors="pt").input_ids
        phrases = torch.zeros(1, 30, 64)
        phrases[0, 0] = tiny_models.components("sd1")["text_encoder"](ids).pooler_output[0]
        boxes = torch.zeros(1, 30, 4)
        boxes[0, 0] = torch.tensor([x // 8 / 8, y // 8 / 8, (x + w) // 8 / 8, (y + h) // 8 / 8])
        masks = torch.zeros(1, 30)
        masks[0, 0] = 1
        cond = gated(sample, t, encoder_hidden_states=pos[0][0], cross_attention_kwargs={
            "gligen": {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}}).sample
        unfused = plain(sample, t, encoder_hidden_states=pos[0][0]).sample
    assert torch.equal(denoiser.last_uncond, uncond)
    assert (denoiser.last_cond - cond).abs().max().item() < 5e-5  # measured 6.6e-6
    assert (cond - unfused).abs().max().item() > 1e-3
    # and a negative given boxes too is fused like the positive (ComfyUI: the conditioning decides)
    grounded = _decode(_sample(env, boxes=BOXES[:1], cfg=6.0, negative_boxes=True))
    assert (grounded - _decode(_sample(env, boxes=BOXES[:1], cfg=6.0))).abs().max().item() > 0.02


def test_cached_unet_is_unchanged_after_a_gligen_job(env):
    before = _sample(env, boxes=[])
    _sample(env)
    after = _sample(env, boxes=[])
    assert torch.equal(before, after)
    model, _, _ = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    with model.unet() as unet:
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
        assert not any(".fuser." in k or "position_net" in k for k in unet.state_dict())


def test_box_limit_and_wrong_inputs_are_named(env):
    model, clip, _ = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    pos, = call(clip_text_encode, env, text=PROMPT, clip=clip)
    gligen, = call(gligen_loader, env, gligen_name=GLIGEN_FILE)
    for i in range(grounding.MAX_OBJECTS):
        pos, = call(gligen_textbox_apply, env, conditioning_to=pos, clip=clip, gligen_textbox_model=gligen,
                    text=f"thing {i}", width=8, height=8, x=8 * (i % 8), y=8 * (i // 8))
    assert len(pos[0][1]["gligen"].boxes) == 30
    with pytest.raises(NodeError) as err:
        call(gligen_textbox_apply, env, conditioning_to=pos, clip=clip, gligen_textbox_model=gligen, text="one more",
             width=8, height=8, x=0, y=0)
    assert err.value.input_name == "conditioning_to" and "30" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(gligen_textbox_apply, env, conditioning_to=pos, clip=clip, gligen_textbox_model=model, text="x",
             width=8, height=8, x=0, y=0)
    assert err.value.input_name == "gligen_textbox_model"


def test_bad_files_are_refused_by_name(env):
    with pytest.raises(NodeError) as err:
        call(gligen_loader, env, gligen_name="not-gligen.safetensors")
    assert err.value.input_name == "gligen_name" and "not a GLIGEN file" in str(err.value)
    # an SD 2.x UNet (other widths) or an SDXL one (other blocks): the sampler names the input and the file
    for variant, why in (("sd2", "is 32 wide but that UNet block is 64"), ("sdxl", "this UNet has 8")):
        with pytest.raises(NodeError) as err:
            _sample(env, boxes=BOXES[:1], variant=variant)
        assert err.value.input_name == "positive"
        assert f"'{GLIGEN_FILE}' (GLIGENLoader) cannot drive this {variant} model" in str(err.value)
        assert why in str(err.value)


def test_gligen_template_converts_and_runs(env):
    import json

    import comfyui_workflow_templates

    from engine.executor import Executor
    from engine.formats import parse_document
    from engine.registry import default_registry

    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    doc = json.loads((folder / "gligen_textbox_example.json").read_text(encoding="utf-8"))
    registry = default_registry()
    wf = parse_document(doc, registry).with_overrides({
        "4.ckpt_name": tiny_models.checkpoint_name("sd1"), "10.gligen_name": GLIGEN_FILE,
        "5.width": 128, "5.height": 128, "3.steps": 3})
    assert {n.type for n in wf.nodes.values()} >= {"GLIGENLoader", "GLIGENTextBoxApply"}
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    image = outcome.results["8"][0]
    assert tuple(image.shape) == (1, 128, 128, 3)
    grounded = outcome.results["27"][0][0][1]["gligen"]  # two GLIGENTextBoxApply in a chain: both boxes
    assert [(b.height, b.width, b.y, b.x) for b in grounded.boxes] == [(38, 24, 34, 22), (18, 18, 2, 52)]




def test_a_compiled_unet_gives_the_eager_results_with_and_after_boxes(env):
    """Compiled mode compiles the UNet in place, and dynamo does not guard on module hooks
    (``skip_nnmodule_hook_guards``): a graph traced with the fusers hooked in would be reused by
    later plain calls, and one traced without them would ignore the boxes. Grounded calls run
    eagerly; before, between and after them the compiled UNet gives the eager results."""
    from torch._dynamo.utils import counters

    from nodes.families.denoiser import Denoiser

    _, clip, _ = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    plain, = call(clip_text_encode, env, text=PROMPT, clip=clip)
    gligen, = call(gligen_loader, env, gligen_name=GLIGEN_FILE)
    (phrase, (x, y, w, h)), = BOXES[:1]
    boxed, = call(gligen_textbox_apply, env, conditioning_to=plain, clip=clip, gligen_textbox_model=gligen,
                  text=phrase, width=w, height=h, x=x, y=y)
    eager = tiny_models.fresh_components("sd1")["unet"]
    compiled = tiny_models.fresh_components("sd1")["unet"]
    compiled.compile(backend="eager")
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    outs = []
    with torch.no_grad():
        for net in (eager, compiled):
            runs = [Denoiser(net, families.by_name("sd1"), positive=cond, negative=None, cfg=1.0,
                             image_size=(64, 64), batch=1) for cond in (plain, boxed, plain)]
            outs.append([run.model_output(sample, torch.tensor(500)) for run in runs])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*outs))
    assert (outs[0][1] - outs[0][0]).abs().max().item() > 1e-3  # the boxes act
    assert counters["stats"]["unique_graphs"] == 1  # the plain calls' graph, once
