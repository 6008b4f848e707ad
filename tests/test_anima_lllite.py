"""AnimaLLLiteApply on tiny random files: the patched DiT against the LLLite's facts computed by hand
(nodes.control.anima_lllite's docstring) on the same weights, strength 0 and the window, ComfyUI's two LLLite
templates run from their editor files, and the errors for a file of another shape."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_anima
import tiny_anima_lllite
from engine.executor import Executor
from engine.formats import parse_document
from engine.validate import validate
from flow_family_files import env, models_root, registry, template  # noqa: F401 (fixtures)
from node_call import call
from nodes import anima_nodes, model_patch_nodes, split_loaders
from nodes.control import anima_lllite
from nodes.families import anima
from nodes.samplers.model_sampling import for_model

root = models_root(lambda r: tiny_anima_lllite.make_files(tiny_anima.make_models_folder(r)), "anima-lllite-models")
#: Each LLLite target's linear layer in diffusers' Cosmos block (the DiT Kiln loads).
DIFFUSERS = {"self_attn_q_proj": "attn1.to_q", "self_attn_k_proj": "attn1.to_k", "self_attn_v_proj": "attn1.to_v",
             "cross_attn_q_proj": "attn2.to_q", "mlp_layer1": "ff.net.0.proj"}


# -- the facts, by hand --------------------------------------------------------------------------------------


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _group_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    groups = 8
    while groups > 1 and x.shape[1] % groups:
        groups //= 2
    g = x.reshape(x.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def _encode(p: dict, pixels: torch.Tensor) -> torch.Tensor:
    c = "lllite_conditioning1."

    def conv(x, n, **kw):
        return F.conv2d(x, p[c + n + ".weight"], p[c + n + ".bias"], **kw)

    def gn(x, n):
        return _group_norm(x, p[c + n + ".weight"], p[c + n + ".bias"])

    x = _silu(gn(conv(pixels, "conv1", stride=4), "norm1"))
    x = _silu(gn(conv(x, "conv2", padding=1), "norm2"))
    x = _silu(gn(conv(x, "conv3", stride=4), "norm3"))
    x = x + conv(_silu(gn(conv(_silu(gn(x, "resblocks.0.norm1")), "resblocks.0.conv1", padding=1),
                          "resblocks.0.norm2")), "resblocks.0.conv2", padding=1)
    branches = [_silu(gn(conv(x, "aspp.branches.0.0"), "aspp.branches.0.1")),
                _silu(gn(conv(x, "aspp.branches.1.0", padding=2, dilation=2), "aspp.branches.1.1"))]
    pooled = _silu(gn(conv(x.mean(dim=(2, 3), keepdim=True), "aspp.global_conv.0"), "aspp.global_conv.1"))
    branches.append(pooled.expand_as(x))  # a 1x1 picture resized bilinearly is that value everywhere
    x = _silu(gn(conv(torch.cat(branches, 1), "aspp.proj.0"), "aspp.proj.1"))
    tokens = conv(x, "proj").flatten(2).transpose(1, 2)
    return F.layer_norm(tokens, (tokens.shape[-1],), p[c + "out_norm.weight"], p[c + "out_norm.bias"])


def _correct(p: dict, m: str, x: torch.Tensor, emb: torch.Tensor, strength: float) -> torch.Tensor:
    c = emb.expand(x.shape[0], -1, -1) + p[m + "depth_embed"]  # one picture for every row
    gamma, beta = (c @ p[m + "cond_to_film.weight"].T + p[m + "cond_to_film.bias"]).chunk(2, -1)
    h = _silu(x @ p[m + "down.weight"].T + p[m + "down.bias"])
    h = torch.cat([c, h], -1) @ p[m + "mid.weight"].T + p[m + "mid.bias"]
    h = _silu(h * (1 + gamma) + beta)
    return x + (h @ p[m + "up.weight"].T + p[m + "up.bias"]) * strength


@contextlib.contextmanager
def _by_hand(net, p: dict, emb: torch.Tensor, strength: float):
    """The DiT with the facts' corrections put on by this test: each target linear's input corrected."""
    handles = []
    for block in range(2):
        for target, path in DIFFUSERS.items():
            m = f"lllite_dit_blocks_{block}_{target}."

            def hook(module, args, m=m):
                return (_correct(p, m, args[0], emb, strength), *args[1:])

            handles.append(net.get_submodule(f"transformer_blocks.{block}.{path}").register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _setup(env, patch_name: str):
    (model,) = call(split_loaders.unet_loader, env, unet_name="anima-base-v1.0.safetensors")
    (patch,) = call(model_patch_nodes.model_patch_loader, env, name=patch_name)
    (clip,) = call(split_loaders.clip_loader, env, clip_name="qwen_3_06b_base.safetensors", type="stable_diffusion")
    states, extra = clip.encode("a cat in a hat")[0]
    return model, patch, states, extra[anima.T5_IDS]


def _run(model, x, t, states, ids, patched=None):
    with model._use_unet() as net, torch.no_grad():
        wrapped = anima.FAMILY.wrap_network(net)
        hooks = anima_lllite.applied(wrapped, patched.patches.lllite, for_model(patched).schedule, anima.FAMILY) \
            if patched is not None else contextlib.nullcontext()
        with hooks:
            return wrapped(x, t, states.expand(x.shape[0], -1, -1), t5_ids=[ids] * x.shape[0])[0]


def _picture(seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [3, 4])
def test_the_patched_dit_is_the_facts_by_hand(env, channels):
    name = tiny_anima_lllite.ANY_CONTROL if channels == 3 else tiny_anima_lllite.INPAINTING
    model, patch, states, ids = _setup(env, name)
    image = _picture(3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 0.8
    (patched,) = call(anima_nodes.anima_lllite_apply, env, model=model, model_patch=patch, image=image, strength=0.7,
                      start_percent=0.0, end_percent=1.0, mask=mask)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.7])  # 64 px: the picture needs no resizing
    ours = _run(model, x, t, states, ids, patched)
    p = {k: v.float() for k, v in tiny_anima_lllite.state(channels).items()}
    pixels = image.movedim(-1, 1) * 2 - 1
    if channels == 4:  # the inpainting file zeroes the masked picture (its metadata) and reads the mask
        kept = (mask >= 0.5).float()[:, None]
        pixels = torch.cat([pixels * (1 - kept), kept * 2 - 1], 1)
    emb = _encode(p, pixels)
    assert emb.shape == (1, 16, tiny_anima_lllite.EMB)  # one per 2x2 patch of the 8x8 latent
    with model._use_unet() as net, _by_hand(net, p, emb, 0.7):
        theirs = _run(model, x, t, states, ids)
    plain = _run(model, x, t, states, ids)
    print(f"channels {channels}: by hand {float((ours - theirs).abs().max()):.2e}, "
          f"control moves {float((ours - plain).abs().max()):.3f}")
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the control moves the output


def test_strength_zero_and_the_window_leave_the_model_alone(env):
    model, patch, states, ids = _setup(env, tiny_anima_lllite.ANY_CONTROL)
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7])
    plain = _run(model, x, t, states, ids)
    kw = dict(model=model, model_patch=patch, image=_picture(3), start_percent=0.0, end_percent=1.0)
    (zero,) = call(anima_nodes.anima_lllite_apply, env, strength=0.0, **kw)
    assert zero is model and torch.equal(_run(model, x, t, states, ids, zero), plain)
    # t 0.7 is sigma 2.33; start_percent 0.9 begins at a lower level (EDM log-linear 80 .. 0.002): off
    (late,) = call(anima_nodes.anima_lllite_apply, env, strength=1.0, **{**kw, "start_percent": 0.9})
    assert late.patches.lllite[0].sigma_start < 2.33
    assert torch.equal(_run(model, x, t, states, ids, late), plain)
    (on,) = call(anima_nodes.anima_lllite_apply, env, strength=1.0, **kw)
    assert model.patches.lllite == () and len(on.patches.lllite) == 1  # the loaded model keeps no patch
    moved = _run(model, x, t, states, ids, on)
    other = call(anima_nodes.anima_lllite_apply, env, strength=1.0, **{**kw, "image": _picture(4)})[0]
    assert (_run(model, x, t, states, ids, other) - moved).abs().max() > 1e-2  # the picture matters


def test_a_file_of_another_shape_is_refused_naming_the_input(env, registry):
    model, _, _, _ = _setup(env, tiny_anima_lllite.ANY_CONTROL)
    (other,) = call(model_patch_nodes.model_patch_loader, env, name="anima-lllite-other-width.safetensors")
    assert other.config["model_dim"] == 48
    _input_image(env, "wired_serenity_cyber_figure.png")
    wf = _any_control_workflow(registry)
    outcome = Executor(registry, env).run(wf.with_overrides({"88:86.name": "anima-lllite-other-width.safetensors",
                                                             "88:107.value": 2}))
    assert outcome.status == "failed"
    assert outcome.error.node_type == "AnimaLLLiteApply" and outcome.error.input_name == "model_patch"
    assert "48 wide" in outcome.error.message and "32" in outcome.error.message
    from engine.context import NodeError

    with pytest.raises(NodeError) as err:  # a LLLite is not a DiffSynth ControlNet
        call(model_patch_nodes.qwen_image_diffsynth_controlnet, env, model=model, model_patch=other, vae=None,
             image=_picture(1), strength=1.0)
    assert err.value.input_name == "model_patch" and "AnimaLLLiteApply" in str(err.value)


def test_a_damaged_file_is_refused_naming_the_file(env, root):
    from safetensors.torch import save_file

    from engine.context import NodeError

    state = tiny_anima_lllite.state(3)
    state["lllite_dit_blocks_1_mlp_layer1.mid.weight"] = state["lllite_dit_blocks_1_mlp_layer1.mid.weight"][:, :5].contiguous()
    save_file(state, str(root / "model_patches" / "broken-lllite.safetensors"), metadata=tiny_anima_lllite.METADATA[3])
    with pytest.raises(NodeError) as err:
        call(model_patch_nodes.model_patch_loader, env, name="broken-lllite.safetensors")
    assert err.value.input_name == "name" and "broken-lllite.safetensors" in str(err.value)
    assert "lllite_dit_blocks_1_mlp_layer1.mid.weight" in str(err.value)


# -- ComfyUI's templates ---------------------------------------------------------------------------------------


def _input_image(env, name: str, seed: int = 0) -> bool:
    from PIL import Image

    from nodes.sample_image import draw_landscape

    picture = draw_landscape(64, 64) if seed == 0 else Image.fromarray(
        (_picture(seed)[0].numpy() * 255).astype(np.uint8))
    picture.save(env.paths.input.root / name)
    return True


def _any_control_workflow(registry):
    """The template with its picture scaled to the smallest total (0.01 MP, ~100 px) rather than 1 MP."""
    document = template("image_anima_lllite_any_control_to_image.json")
    resize = next(n for n in document["nodes"] if n["id"] == 75)
    assert resize["widgets_values"][:2] == ["scale total pixels", 1]
    resize["widgets_values"][1] = 0.01
    return parse_document(document, registry)


def _any_control(registry, env, seed: int = 0) -> np.ndarray:
    _input_image(env, "wired_serenity_cyber_figure.png", seed)
    outcome = Executor(registry, env).run(_any_control_workflow(registry).with_overrides({"88:107.value": 3}))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["88:105"][0].numpy()


def _inpainting(registry, env, strength: float = 1.0) -> np.ndarray:
    from PIL import Image

    _input_image(env, "goat_horned_spirit_girl.png")
    painting = np.zeros((64, 64, 4), dtype=np.uint8)
    painting[16:48, 16:48] = (255, 255, 255, 255)  # painted: to repaint
    folder = env.paths.temp.root / "painter"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(painting).save(folder / "painter-694-1784648658071.png")
    document = template("image_anima_lllite_image_inpainting.json")
    # its spare ResizeImageMaskNode (696, "resize the input image if it's oversized") has nothing linked in or
    # out: no output needs it, so its missing input is reported, not refused, and the template runs as it is
    wf = parse_document(document, registry)
    assert [e.node_id for e in validate(wf, registry, env).ignored] == ["696"]
    outcome = Executor(registry, env).run(wf.with_overrides({"88:81.width": 64, "88:81.height": 64,
                                                             "88:108.value": 3, "88:87.strength": strength}))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["88:105"][0].numpy()


def test_the_any_control_template_runs_and_its_picture_steers_it(registry, env):
    image = _any_control(registry, env)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and np.isfinite(image).all()
    moved = np.abs(image - _any_control(registry, env, seed=5)).max()
    print(f"any control: another picture moves the image by {moved * 255:.1f}/255")
    assert moved > 0.02  # another control picture


def test_the_inpainting_template_runs_with_its_painted_mask(registry, env):
    image = _inpainting(registry, env)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    moved = np.abs(image - _inpainting(registry, env, strength=0.0)).max()
    print(f"inpainting: strength 1 against 0 moves the image by {moved * 255:.1f}/255")
    assert moved > 0.02  # the LLLite acts
