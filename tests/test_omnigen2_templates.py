"""ComfyUI's OmniGen2 templates (comfyui-workflow-templates-json), as its editor saved them.

``image_omnigen2_t2i`` (a subgraph: UNETLoader omnigen2_fp16, CLIPLoader omnigen2 on qwen_2.5_vl_fp16,
VAELoader ae, EmptySD3LatentImage, two CLIPTextEncode, DualCFGGuider 5 / 2 regular, BasicScheduler simple 20,
euler, RandomNoise, SamplerCustomAdvanced, VAEDecode) and ``image_omnigen2_image_edit`` (LoadImage,
ImageScaleToTotalPixels, VAEEncode, ReferenceLatent on both prompts, a second picture's nodes bypassed,
GetImageSize for the latent's size) validate with only their three model files missing and run on the tiny
files saved under the release's names, with smaller pictures and fewer steps. tests/test_omnigen2.py shows
what the parts compute; here the templates must run, and their inputs must move the picture.
"""
from __future__ import annotations

import shutil

import numpy as np

import tiny_omnigen2
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, run, template, template_file_errors  # noqa: F401 (fixtures)

T2I, EDIT = "image_omnigen2_t2i.json", "image_omnigen2_image_edit.json"
FILES = {"diffusion_models": "omnigen2_fp16.safetensors", "text_encoders": "qwen_2.5_vl_fp16.safetensors",
         "vae": "ae.safetensors"}
MISSING = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")}


def _release_names(root):
    tiny_omnigen2.make_models_folder(root)
    for folder, name in FILES.items():
        tiny = {"diffusion_models": tiny_omnigen2.UNET, "text_encoders": tiny_omnigen2.CLIP,
                "vae": tiny_omnigen2.VAE}[folder]
        shutil.copy(root / folder / tiny, root / folder / name)
    return root


root = models_root(_release_names, "omnigen2-templates")


def _of(wf, node_type):
    return [n for n in wf.nodes.values() if n.type == node_type]


def test_templates_validate_with_only_their_files_missing(registry, tmp_path):
    for name in (T2I, EDIT):
        wf, errors = template_file_errors(registry, template(name), tmp_path / name)
        assert errors <= MISSING | {("LoadImage", "image")} and MISSING <= errors, (name, errors)
        (clip,) = _of(wf, "CLIPLoader")
        assert clip.inputs["type"] == "omnigen2"
        (guider,) = _of(wf, "DualCFGGuider")
        assert (guider.inputs["cfg_conds"], guider.inputs["cfg_cond2_negative"], guider.inputs["style"]) == \
            (5, 2, "regular")


def _t2i(registry, prompt: str | None = None, seed: int | None = None):
    wf = parse_document(template(T2I), registry)
    (latent,), (sched,), (noise,) = _of(wf, "EmptySD3LatentImage"), _of(wf, "BasicScheduler"), _of(wf, "RandomNoise")
    assert (sched.inputs["scheduler"], sched.inputs["steps"]) == ("simple", 20)
    latent.inputs.update(width=64, height=48)
    sched.inputs["steps"] = 3
    if seed is not None:
        noise.inputs["noise_seed"] = seed
    if prompt is not None:
        encoders = _of(wf, "CLIPTextEncode")
        (positive,) = [n for n in encoders if "cat" in str(n.inputs.get("text", ""))] or encoders[:1]
        positive.inputs["text"] = prompt
    return wf


def _picture(outcome, wf):
    (save,) = [n for n in wf.nodes.values() if n.type.startswith("SaveImage")]
    return outcome.results[save.inputs["images"].node_id][0].numpy()


def test_t2i_template_runs_and_its_prompt_and_seed_matter(registry, env):
    wf = _t2i(registry)
    base = _picture(run(registry, env, wf), wf)
    assert base.shape == (1, 48, 64, 3) and np.isfinite(base).all()
    for what, other in (("prompt", _t2i(registry, prompt="a lighthouse at night")), ("seed", _t2i(registry, seed=5))):
        gap = np.abs(_picture(run(registry, env, other), other) - base).max()
        print(f"t2i {what}: max |diff| {gap * 255:.1f}/255")
        assert gap > 4 / 255, what


def _edit(registry, env, picture: int = 0, second: int | None = None):
    """The edit template on picture ``picture``; ``second``: its bypassed second-picture nodes switched on
    (its note: Ctrl + B) with picture ``second`` there."""
    from PIL import Image

    for k in {picture, second} - {None}:
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(env.paths.input.root / f"e{k}.png")
    document = template(EDIT)
    if second is not None:
        for node in document["nodes"]:
            node["mode"] = 0 if node.get("mode") == 4 else node.get("mode", 0)
    wf = parse_document(document, registry)
    for scale in _of(wf, "ImageScaleToTotalPixels"):
        # about 100 x 100 pixels in the template's own steps of 1: GetImageSize hands EmptySD3LatentImage a size
        # that is not a multiple of 16, which it floors to whole latent pixels as ComfyUI's does
        scale.inputs.update(megapixels=0.01)
    for load in _of(wf, "LoadImage"):
        load.inputs["image"] = f"e{second if load.id == '33' else picture}.png"
    (sched,) = _of(wf, "BasicScheduler")
    sched.inputs["steps"] = 2
    return wf


def test_edit_template_runs_and_its_picture_matters(registry, env):
    wf = _edit(registry, env)
    outcome = run(registry, env, wf)
    base = _picture(outcome, wf)
    assert base.ndim == 4 and np.isfinite(base).all()
    (guider,) = _of(wf, "DualCFGGuider")
    for name in ("cond1", "cond2"):  # both guided prompts carry the picture's reference latent
        cond = outcome.results[guider.inputs[name].node_id][0]
        assert len(cond[0][1]["reference_latents"]) == 1
    assert not outcome.results[guider.inputs["negative"].node_id][0][0][1].get("reference_latents")
    other = _edit(registry, env, picture=1)
    gap = np.abs(_picture(run(registry, env, other), other) - base).max()
    print(f"edit picture: max |diff| {gap * 255:.1f}/255")
    assert gap > 4 / 255


def test_edit_template_with_its_second_picture_switched_on(registry, env):
    """Both pictures reach both guided prompts, in order; the second one moves the result."""
    wf = _edit(registry, env, picture=0, second=2)
    outcome = run(registry, env, wf)
    (guider,) = _of(wf, "DualCFGGuider")
    for name in ("cond1", "cond2"):
        assert len(outcome.results[guider.inputs[name].node_id][0][0][1]["reference_latents"]) == 2
    base = _picture(outcome, wf)
    other = _edit(registry, env, picture=0, second=3)
    gap = np.abs(_picture(run(registry, env, other), other) - base).max()
    print(f"edit second picture: max |diff| {gap * 255:.1f}/255")
    assert gap > 4 / 255
