"""HiDream-E1 (E1-Full, E1.1) instruction editing on the tiny HiDream, through ComfyUI's two templates.

diffusers has no E1 pipeline, so the reference is diffusers' ``HiDreamImageTransformer2DModel`` driven by
hand as ComfyUI's HiDream model drives it (nodes.families.hidream_edit states the facts): the prompts
encoded by ``HiDreamImagePipeline.encode_prompt``, the source picture through the VAE into model space,
set beside the noisy latent along the width and cut into patches here (positions over the joined grid,
no padding), the output's first columns kept; DualCFGGuider's regular rule (cfg_function between the
negative and cond2, CFGNorm on that pair, plus cfg_conds times cond1's push from cond2) in denoised space;
Euler stepped in a plain loop over the sigmas the graph's BasicScheduler gives; the VAE decodes.
The E1 transformer is the tiny I1 one saved under the templates' E1 names (the files are I1's key for key).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hidream
import tiny_qwen_image_edit
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, template  # noqa: F401 (fixtures)

E1_1, E1_FULL = "hidream_e1_1.json", "hidream_e1_full.json"
STEPS = 3


root = models_root(tiny_hidream.make_models_folder, "hidream-e1-models")


@pytest.fixture(scope="module")
def pipe():
    return tiny_hidream.pipeline()


# -- the reference ---------------------------------------------------------------------------------


def _patches(joined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """2x2 patch tokens of ``joined`` [1, C, H, W] (row-in-patch, column-in-patch, channel) and their
    (0, row, column) positions, written with unfold (the module under test reshapes)."""
    _, c, h, w = joined.shape
    cells = joined.unfold(2, 2, 2).unfold(3, 2, 2)  # [1, C, rows, cols, 2, 2]
    tokens = cells.permute(0, 2, 3, 4, 5, 1).reshape(1, (h // 2) * (w // 2), 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(1, -1, 3).float()
    return tokens, ids, [(h // 2, w // 2)]


def _velocity(x, sigma, prompt, source):
    """The flow velocity at ``x``: the negated transformer output (the pipeline's sign), with ``source``
    beside ``x`` when given."""
    transformer = tiny_hidream.components()["transformer"]
    t5, llama, pooled = prompt
    common = dict(timesteps=torch.tensor([sigma * 1000.0]), encoder_hidden_states_t5=t5,
                  encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)
    h, w = x.shape[-2:]
    if source is None:
        return -transformer(hidden_states=_wrapped(x), **common)[0][..., :h, :w]
    tokens, ids, sizes = _patches(_wrapped(torch.cat([x, source], dim=-1)))
    out = transformer(hidden_states=tokens, img_ids=ids, img_sizes=sizes,
                      hidden_states_masks=torch.ones(tokens.shape[:2]), **common)[0]
    return -out[..., :h, :w]


def _wrapped(latent: torch.Tensor) -> torch.Tensor:
    """An odd side padded by one row or column wrapped around from the other edge (ComfyUI's rule)."""
    h, w = latent.shape[-2:]
    return torch.nn.functional.pad(latent, (0, w % 2, 0, h % 2), mode="circular")


def _encode(pipe, text):
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                                    device=torch.device("cpu"))
    return t5, llama, pooled


def _source_latent(picture: np.ndarray) -> torch.Tensor:
    vae = tiny_hidream.components()["vae"]
    pixels = torch.from_numpy(picture.copy()).float().div(255).permute(2, 0, 1)[None] * 2 - 1
    raw = vae.encode(pixels).latent_dist.mean
    return (raw - vae.config.shift_factor) * vae.config.scaling_factor


def reference(pipe, picture: np.ndarray, texts: tuple[str, str, str], negative_has_source: bool, seed: int,
              sigmas: list[float], cfg_conds: float, cfg_cond2_negative: float, cfg_norm: float | None,
              use_source: bool = True) -> np.ndarray:
    """The edit by hand (module docstring). ``texts``: cond1, cond2 (both with the source), the negative;
    ``use_source`` False: the same guidance with the source left out everywhere (HiDream-I1's reading)."""
    vae = tiny_hidream.components()["vae"]
    with torch.no_grad():
        source = _source_latent(picture)
        cond1, cond2, negative = (_encode(pipe, t) for t in texts)
        noise = torch.randn(source.shape, generator=torch.Generator("cpu").manual_seed(seed))
        empty = (torch.zeros_like(source) - vae.config.shift_factor) * vae.config.scaling_factor
        x = sigmas[0] * noise + (1 - sigmas[0]) * empty
        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            beside = source if use_source else None
            d_p = x - sigma * _velocity(x, sigma, cond1, beside)
            d_m = x - sigma * _velocity(x, sigma, cond2, beside)
            d_n = x - sigma * _velocity(x, sigma, negative, beside if negative_has_source else None)
            pair = d_n + cfg_cond2_negative * (d_m - d_n)
            if cfg_norm is not None:
                ratio = d_m.norm(dim=1, keepdim=True) / (pair.norm(dim=1, keepdim=True) + 1e-8)
                pair = pair * ratio.clamp(0.0, 1.0) * cfg_norm
            denoised = pair + cfg_conds * (d_p - d_m)
            x = denoised + (x - denoised) * (following / sigma)
        image = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


# -- the templates ------------------------------------------------------------------------------


def _of(wf, kind: str):
    (node,) = [n for n in wf.nodes.values() if n.type == kind]
    return node


def _template(registry, env, name: str, picture_seed: int, width: int, height: int, steps: int = STEPS):
    """The template parsed from its editor file, reading a ``width`` x ``height`` picture (saved at that
    size, so the template's scaling node keeps it: ImageScale at that size, ImageScaleToTotalPixels at
    its area in 8-pixel steps), its models under their own names, ``steps`` steps. Returns (workflow,
    the picture as uint8)."""
    wf = parse_document(template(name), registry)
    picture = tiny_qwen_image_edit.picture(picture_seed, width, height)
    picture.save(env.paths.input.root / f"source{picture_seed}.png")
    _of(wf, "LoadImage").inputs["image"] = f"source{picture_seed}.png"
    if name == E1_FULL:
        _of(wf, "ImageScale").inputs.update(width=width, height=height)
    else:
        _of(wf, "ImageScaleToTotalPixels").inputs.update(megapixels=width * height / 2 ** 20, resolution_steps=8)
    _of(wf, "BasicScheduler").inputs["steps"] = steps
    return wf, np.asarray(picture.convert("RGB"))


def _texts(wf) -> tuple[str, str, str, bool]:
    """cond1, cond2 and the negative's prompts as the template wires them, and whether its negative
    carries the source (InstructPixToPixConditioning's output) or is a bare prompt."""
    guider = _of(wf, "DualCFGGuider").inputs
    instruct = _of(wf, "InstructPixToPixConditioning").inputs

    def text(link) -> str:
        return wf.nodes[link.node_id].inputs["text"]

    negative = guider["negative"]
    with_source = wf.nodes[negative.node_id].type == "InstructPixToPixConditioning"
    assert guider["cond1"].node_id == guider["cond2"].node_id == _of(wf, "InstructPixToPixConditioning").id
    return text(instruct["positive"]), text(instruct["negative"]), text(negative), with_source


def _run(registry, env, wf):
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    image = outcome.results[_of(wf, "VAEDecode").id][0].numpy()[0]
    sigmas = outcome.results[_of(wf, "BasicScheduler").id][0]
    return image, [float(s) for s in sigmas]


def _weights_as_stored(wf):
    """UNETLoader's weight dtype set to default: E1.1's template asks for fp8_e4m3fn_fast, whose rounding
    the float32 reference does not share (the template as shipped runs in
    test_the_e1_templates_run_as_shipped)."""
    _of(wf, "UNETLoader").inputs["weight_dtype"] = "default"
    return wf


def _reference_for(pipe, wf, picture, sigmas, cfg_norm, texts=None, source=True):
    *wired, with_source = _texts(wf)
    guider = _of(wf, "DualCFGGuider").inputs
    return reference(pipe, picture, tuple(texts or wired), with_source, _of(wf, "RandomNoise").inputs["noise_seed"],
                     sigmas, guider["cfg_conds"], guider["cfg_cond2_negative"], cfg_norm, source)


@pytest.mark.parametrize("name,size,settings,checks_moves", [
    (E1_FULL, (32, 64), ("normal", "euler", 5.0, 2.0, None), True),   # joined latent 8 x 8: square
    (E1_FULL, (40, 64), ("normal", "euler", 5.0, 2.0, None), False),  # 8 x 5 beside 8 x 5: patches straddle the seam
    (E1_1, (80, 136), ("simple", "euler", 3.0, 1.5, 1.0), True),      # 17 x 20, padded to 18 x 20 (the bare call 18 x 10)
])
def test_the_e1_templates_equal_the_transformer_driven_by_hand(registry, env, pipe, name, size, settings, checks_moves):
    """Each template from its editor file, as shipped but for the picture's size, the step count and the
    weight dtype, on the tiny files under its own names, equals the hand-driven reference within 1/255
    per pixel, odd latent sides among them (wrapped to whole patches, cropped back); another source
    picture or another instruction moves the reference far more than that gap (checked once per
    template: two more references each; no source at all is the next test's reading)."""
    wf, picture = _template(registry, env, name, 1, *size)
    scheduler, sampler = _of(wf, "BasicScheduler").inputs, _of(wf, "KSamplerSelect").inputs
    guider = _of(wf, "DualCFGGuider").inputs
    norm = [n.inputs["strength"] for n in wf.nodes.values() if n.type == "CFGNorm"]
    cfg_norm = norm[0] if norm else None
    assert (scheduler["scheduler"], sampler["sampler_name"], guider["cfg_conds"], guider["cfg_cond2_negative"],
            cfg_norm) == settings and guider["style"] == "regular"
    ours, sigmas = _run(registry, env, _weights_as_stored(wf))
    assert len(sigmas) == STEPS + 1 and sigmas[0] == pytest.approx(1.0)
    want = _reference_for(pipe, wf, picture, sigmas, cfg_norm)
    assert ours.shape == want.shape == (size[1], size[0], 3)
    gap = np.abs(ours - want).max()
    print(f"{name} {size}: gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    if not checks_moves:
        return
    *texts, _ = _texts(wf)
    moved = {
        "another source": _reference_for(pipe, wf, np.asarray(tiny_qwen_image_edit.picture(7, *size).convert("RGB")),
                                         sigmas, cfg_norm),
        "another instruction": _reference_for(pipe, wf, picture, sigmas, cfg_norm,
                                              texts=("make the sky green",) + tuple(texts[1:]))}
    moved = {k: float(np.abs(ours - v).max()) for k, v in moved.items()}
    print(f"moved by {', '.join(f'{k} {v * 255:.2f}/255' for k, v in moved.items())}")
    assert all(v > max(100 * gap, 1 / 255) for v in moved.values()), moved


def test_the_source_sits_beside_the_picture_as_the_transformer_patches_a_wide_latent():
    """The network's joined tokens equal diffusers' own patching of the joined latent where that latent is
    square (diffusers pads nothing there): the same output, cropped to the picture, bit for bit, an odd
    height wrapped around by hand too; the reference's unfold patching agrees."""
    from nodes.families import hidream

    transformer = tiny_hidream.components()["transformer"]
    network = hidream.HiDreamNetwork(transformer)
    g = torch.Generator().manual_seed(0)
    x, source = torch.randn(2, 16, 8, 4, generator=g), torch.randn(2, 16, 8, 4, generator=g)
    t5 = torch.randn(2, 7, tiny_hidream.T5, generator=g)
    llama = torch.randn(tiny_hidream.LLAMA_LAYERS, 2, 5, tiny_hidream.LLAMA, generator=g)
    pooled = torch.randn(2, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G, generator=g)
    common = dict(encoder_hidden_states_llama3=llama, pooled_embeds=pooled)
    with torch.no_grad():
        ours = network(x, torch.tensor([700.0, 700.0]), t5, image_cond=source, **common)[0]
        theirs = transformer(hidden_states=torch.cat([x, source], dim=-1), timesteps=torch.tensor([700.0, 700.0]),
                             encoder_hidden_states_t5=t5, return_dict=False, **common)[0]
        alone = network(x, torch.tensor([700.0, 700.0]), t5, **common)[0]
        by_hand = [_velocity(x[k:k + 1], 0.7, (t5[k:k + 1], llama[:, k:k + 1], pooled[k:k + 1]), source[k:k + 1])
                   for k in range(2)]
    assert ours.shape == x.shape
    assert torch.equal(ours, -theirs[..., :4])
    with torch.no_grad():  # an odd height: the joined 7 x 8 latent wrapped to 8 x 8, the output cropped back
        odd = network(x[..., :7, :], torch.tensor([700.0, 700.0]), t5, image_cond=source[..., :7, :], **common)[0]
        wrapped = torch.cat([x[..., :7, :], source[..., :7, :]], dim=-1)
        wrapped = torch.cat([wrapped, wrapped[..., :1, :]], dim=-2)
        theirs_odd = transformer(hidden_states=wrapped, timesteps=torch.tensor([700.0, 700.0]),
                                 encoder_hidden_states_t5=t5, return_dict=False, **common)[0]
    assert odd.shape == (2, 16, 7, 4) and torch.equal(odd, -theirs_odd[..., :7, :4])
    assert torch.allclose(torch.cat(by_hand), ours, atol=1e-5)
    assert (ours - alone).abs().max() > 0.05  # the source is read


def test_a_source_of_another_height_is_refused_naming_the_input():
    from nodes.families import hidream
    from nodes.families.base import ConditioningError

    network = hidream.HiDreamNetwork(tiny_hidream.components()["transformer"])
    text = dict(encoder_hidden_states_llama3=torch.zeros(2, 1, 5, tiny_hidream.LLAMA),
                pooled_embeds=torch.zeros(1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G))
    with pytest.raises(ConditioningError, match="high"):
        network(torch.zeros(1, 16, 8, 4), torch.tensor([500.0]), torch.zeros(1, 7, tiny_hidream.T5),
                image_cond=torch.zeros(1, 16, 6, 4), **text)


def test_a_source_from_another_vae_is_refused_naming_the_input():
    """Four-channel latents (an SD VAE's) on the conditioning: the message says which VAE to use."""
    from nodes.families import hidream
    from nodes.families.base import ConditioningError

    extra = {"pooled_output": torch.zeros(1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G),
             hidream.LLAMA: torch.zeros(1, 2, 5, tiny_hidream.LLAMA), "concat_latent_image": torch.zeros(1, 4, 8, 8),
             "_input": "cond2"}
    with pytest.raises(ConditioningError, match="this model's VAE") as err:
        hidream.FAMILY.network_kwargs([extra], 1, (64, 64), torch.device("cpu"), torch.float32)
    assert err.value.input_name == "cond2"


@pytest.mark.parametrize("name", [E1_FULL, E1_1])
def test_the_e1_templates_run_as_shipped(registry, env, name):
    """The templates with their own settings (E1.1's UNETLoader fp8_e4m3fn_fast weights; E1-Full's 768 x 768
    ImageScale brought down to 64 x 64, E1.1's one-megapixel area to 0.01 in 16-pixel steps), two steps: a
    finite picture of the scaled size, which the seed moves."""
    wf = parse_document(template(name), registry)
    tiny_qwen_image_edit.picture(3, 96, 80).save(env.paths.input.root / "in.png")
    _of(wf, "LoadImage").inputs["image"] = "in.png"
    if name == E1_FULL:
        assert (_of(wf, "ImageScale").inputs["width"], _of(wf, "ImageScale").inputs["height"]) == (768, 768)
        _of(wf, "ImageScale").inputs.update(width=64, height=64)
    else:
        assert _of(wf, "UNETLoader").inputs["weight_dtype"] == "fp8_e4m3fn_fast"
        _of(wf, "ImageScaleToTotalPixels").inputs.update(megapixels=0.01, resolution_steps=16)  # the node's least
    _of(wf, "BasicScheduler").inputs["steps"] = 2
    ours, _ = _run(registry, env, wf)
    assert ours.shape == ((64, 64, 3) if name == E1_FULL else (96, 112, 3)) and np.isfinite(ours).all()
    _of(wf, "RandomNoise").inputs["noise_seed"] += 1
    other, _ = _run(registry, env, wf)
    assert np.abs(ours - other).max() > 0.02


def test_the_same_graph_without_the_source_is_hidream_i1_and_differs(registry, env, pipe):
    """E1-Full's template with DualCFGGuider's cond1 and cond2 taken straight from the prompts (no
    InstructPixToPixConditioning on them: nothing carries the source) reads the picture alone, as I1
    would: it equals the reference with the source left out within 1/255 and is far from the edit."""
    import copy

    from engine.workflow import Link

    wf, picture = _template(registry, env, E1_FULL, 1, 32, 64)
    edit, sigmas = _run(registry, env, wf)
    want = _reference_for(pipe, copy.deepcopy(wf), picture, sigmas, None, source=False)
    instruct = _of(wf, "InstructPixToPixConditioning").inputs
    guider = _of(wf, "DualCFGGuider").inputs
    guider["cond1"], guider["cond2"] = (Link(instruct[k].node_id, instruct[k].output) for k in ("positive", "negative"))
    bare, _ = _run(registry, env, wf)
    gap = np.abs(bare - want).max()
    print(f"without the source: gap {gap * 255:.5f}/255, from the edit {np.abs(bare - edit).max() * 255:.2f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(bare - edit).max() > 100 * max(gap, 1e-4)
