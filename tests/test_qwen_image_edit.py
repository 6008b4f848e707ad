"""Qwen-Image-Edit on a tiny random model, from ComfyUI's split files through Kiln's real loaders
and nodes, against diffusers' QwenImageEditPipeline (one picture) and QwenImageEditPlusPipeline (two).

The tiny Qwen-Image (tests/tiny_qwen_image.py) is saved as ComfyUI's files: the transformer, the
Qwen2.5-VL text encoder with its vision tower under ``visual.``, the VAE in the Wan layout. Kiln runs
TextEncodeQwenImageEdit(Plus) for the prompt and the negative (each with the pictures and the VAE,
as ComfyUI's templates wire them) and KSampler with cfg; diffusers runs the pipeline from the same
pictures with true_cfg_scale. The decoded images agree within 1/255 per pixel, and each test shows
that the pictures, the reference latents alone and the vision tokens alone move the result.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_qwen_image
import tiny_qwen_image_edit
from node_call import call, environment_over
from nodes import loaders, split_loaders
from nodes.families import flux_references
from nodes.families import qwen_image_edit as qe
from nodes.qwen_edit_nodes import text_encode_qwen_image_edit, text_encode_qwen_image_edit_plus
from nodes.sampling import ksampler

PROMPT = "turn the sky purple"
NEGATIVE = "blurry"
SIZE = 64
TOL = 1 / 255 + 1e-6
FILES = dict(unet="tiny-qwen_image.safetensors", clip="tiny-qwen_2.5_vl.safetensors",
             vae="tiny-qwen_image_vae.safetensors")


def save_split_files(root):
    """ComfyUI's three files of the tiny model under ``root`` (models folders)."""
    return tiny_qwen_image.save_split(root, FILES, tiny_qwen_image.components())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_split_files(tmp_path_factory.mktemp("qwen-edit-models"))


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


@pytest.fixture()
def small_pictures(monkeypatch):
    tiny_qwen_image_edit.shrink_picture_area(monkeypatch)


@pytest.fixture()
def loaded(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name=FILES["unet"], weight_dtype="default")
    (clip,) = call(split_loaders.clip_loader, env, clip_name=FILES["clip"], type="qwen_image")
    (vae,) = call(loaders.vae_loader, env, vae_name=FILES["vae"])
    return model, clip, vae


def image_of(picture) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def pictures() -> list:
    return [tiny_qwen_image_edit.picture(0, 160, 112), tiny_qwen_image_edit.picture(1, 96, 128)]


def kiln(env, loaded, images: list, plus: bool, *, prompt: str = PROMPT, vae_on: bool = True,
         refs: list | None = None, cond_edit=None, seed: int = 5, steps: int = 2, cfg: float = 4.0,
         out_refs: list | None = None) -> np.ndarray:
    """Kiln's image. The prompt's node gets the VAE (``vae_on``); the negative's gets none and is
    given the prompt's reference latents, which the node would make the same (the VAE encode is the
    slow part of these tests). ``refs``: reference latents to use instead (both
    nodes then run without the VAE); ``out_refs`` receives those used."""
    model, clip, vae = loaded
    node = text_encode_qwen_image_edit_plus if plus else text_encode_qwen_image_edit
    named = {f"image{k + 1}": im for k, im in enumerate(images)} if plus else {"image": images[0]}
    given = {"vae": vae} if vae_on and refs is None else {}
    (pos,) = call(node, env, clip=clip, prompt=prompt, **given, **named)
    (neg,) = call(node, env, clip=clip, prompt=NEGATIVE, **named)
    if refs is None:
        refs = pos[0][1].get(flux_references.LATENTS)
    if out_refs is not None:
        out_refs.extend(refs or ())
    if refs:
        pos, neg = ([[t, {**extra, flux_references.LATENTS: list(refs)}] for t, extra in c] for c in (pos, neg))
    if cond_edit is not None:
        pos, neg = cond_edit(pos), cond_edit(neg)
    latent = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
    (out,) = call(ksampler, env, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
    return vae.decode(out["samples"]).numpy()


def diffusers(pics: list, plus: bool, *, seed: int = 5, steps: int = 2, cfg: float = 4.0) -> np.ndarray:
    pipe = tiny_qwen_image_edit.pipeline(plus)
    with torch.no_grad():
        return pipe(image=pics if plus else pics[0], prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE,
                    width=SIZE, num_inference_steps=steps, true_cfg_scale=cfg, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("plus", [False, True], ids=["edit-one-picture", "edit-plus-two-pictures"])
def test_edit_equals_qwen_image_edit_pipelines(env, loaded, plus, small_pictures):
    """TextEncodeQwenImageEdit = QwenImageEditPipeline (one picture); TextEncodeQwenImageEditPlus =
    QwenImageEditPlusPipeline (two). Not vacuous: removing the reference latents moves the image, and
    so does reading other pictures with the vision tower under the same reference latents."""
    pics = pictures() if plus else pictures()[:1]
    images = [image_of(p) for p in pics]
    refs: list = []
    ours = kiln(env, loaded, images, plus, out_refs=refs)
    assert len(refs) == len(pics)
    theirs = diffusers(pics, plus)
    gap = float(np.abs(ours - theirs).max())
    print(f"{'edit plus' if plus else 'edit'} gap {gap * 255:.5f}/255")
    assert gap <= TOL
    others = [1 - im for im in images]  # the negatives of the pictures, read by the vision tower
    no_refs = kiln(env, loaded, images, plus, vae_on=False)
    vision = kiln(env, loaded, others, plus, refs=refs)
    moves = {name: float(np.abs(ours - x).max()) * 255 for name, x in (("references", no_refs), ("vision", vision))}
    print("moves (/255)", moves)
    assert moves["references"] > 10, moves
    # the vision tokens move the pixels, and below the prompt's states equal the pipeline's
    # encode_prompt while other pictures change them
    assert moves["vision"] > 1.0, moves
    _, clip, _ = loaded
    node = text_encode_qwen_image_edit_plus if plus else text_encode_qwen_image_edit
    names = [f"image{k + 1}" for k in range(len(pics))] if plus else ["image"]
    (cond,) = call(node, env, clip=clip, prompt=PROMPT, **dict(zip(names, images)))
    (cond_others,) = call(node, env, clip=clip, prompt=PROMPT, **dict(zip(names, others)))
    pipe = tiny_qwen_image_edit.pipeline(plus)
    area = qe.PLUS_VISION_AREA if plus else qe.AREA
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompt=PROMPT, image=[qe.resized(p, area) for p in pics])
    assert states.shape == cond[0][0].shape
    assert float((states - cond[0][0]).abs().max()) < 1e-5
    assert float((cond_others[0][0] - cond[0][0]).abs().max()) > 0.1


def test_index_timestep_zero_equals_the_pipeline_with_zero_cond_t(env, loaded, small_pictures):
    """Qwen-Image-Edit-2511 (ComfyUI's templates: FluxKontextMultiReferenceLatentMethod
    index_timestep_zero) modulates the reference tokens at time 0: diffusers' zero_cond_t."""
    from nodes.kontext import flux_kontext_multi_reference_latent_method as method_node

    pics = pictures()[:1]

    def zero(c):
        (out,) = call(method_node, env, conditioning=c, reference_latents_method="index_timestep_zero")
        return out

    refs: list = []
    ours = kiln(env, loaded, [image_of(pics[0])], True, cond_edit=zero, out_refs=refs)
    transformer = tiny_qwen_image.components()["transformer"]
    modules = [transformer, *transformer.transformer_blocks]
    for m in modules:
        m.zero_cond_t = True
    try:
        theirs = diffusers(pics, True)
    finally:
        for m in modules:
            m.zero_cond_t = False
    gap = float(np.abs(ours - theirs).max())
    moved = float(np.abs(ours - kiln(env, loaded, [image_of(pics[0])], True, refs=refs)).max())
    print(f"index_timestep_zero gap {gap * 255:.5f}/255, moves {moved * 255:.2f}/255")
    assert gap <= TOL and moved > 2 / 255


def test_pictures_are_read_at_the_release_areas(env, loaded):
    """The other tests shrink the picture area (tiny_qwen_image_edit.shrink_picture_area); this one
    checks the release's: about 1024x1024 for Edit's picture and every VAE picture, 384x384 for
    Plus's vision tower, rounded as diffusers rounds. Edit's prompt states at the real area equal
    QwenImageEditPipeline's encode_prompt on the picture its own rule resizes."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    assert qe.AREA == plus.VAE_IMAGE_SIZE == 1024 * 1024
    assert qe.PLUS_VISION_AREA == plus.CONDITION_IMAGE_SIZE
    for ratio in (1.0, 160 / 112, 96 / 128, 21 / 9, 0.4):
        for area in (qe.AREA, qe.PLUS_VISION_AREA):
            assert qe.calculate_dimensions(area, ratio) == edit.calculate_dimensions(area, ratio)[:2] \
                == plus.calculate_dimensions(area, ratio)
    pic = pictures()[0]
    _, clip, _ = loaded
    (cond,) = call(text_encode_qwen_image_edit, env, clip=clip, prompt=PROMPT, image=image_of(pic))
    width, height, _ = edit.calculate_dimensions(1024 * 1024, pic.width / pic.height)
    pipe = tiny_qwen_image_edit.pipeline(plus=False)
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompt=PROMPT, image=pipe.image_processor.resize(pic, height, width))
    assert states.shape == cond[0][0].shape
    assert float((states - cond[0][0]).abs().max()) < 1e-5
