"""Chroma1-Radiance (pixel-space Chroma): no reference implementation can run here (diffusers has none and
ComfyUI is not installed), so each new part is checked against its formulas written out by hand, the shared
trunk against diffusers' ChromaTransformer2DModel, and the sampling against a plain loop over the network:

* the trunk equals diffusers' ChromaTransformer2DModel on the same weights and tokens (the hidden states
  entering its final norm);
* the patch embedder equals each patch's weights-times-pixels; the NeRF head equals a per-patch loop over its
  formulas (cosine features, generated and normalised matrices, RMS norms, the 3x3 head), at any tile size;
* an x0 file's prediction becomes the velocity (x - x0) / sigma;
* the file loads through UNETLoader from ComfyUI's layout (prefix or not); damaged files name file and keys;
* VAELoader's pixel_space, EmptyChromaRadianceLatentImage and ChromaRadianceOptions do what ComfyUI's do;
* ComfyUI's template runs from its editor file on the tiny files and equals a hand-driven Euler loop with
  CFG over the network on its own sigmas; another seed or prompt moves the picture clearly.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tiny_chroma_radiance as tiny
from engine.context import NodeError
from flow_family_files import env, models_root, registry, run  # noqa: F401  (fixtures)
from node_call import Called, call
from nodes import loaders, split_loaders
from nodes.checkpoint.chroma_radiance_net import patch_ids

root = models_root(tiny.make_models_folder, "chroma-radiance-models")
FILE, FILE_V, T5 = "tiny-chroma-radiance.safetensors", "tiny-chroma-radiance-v.safetensors", "tiny-t5xxl.safetensors"
TEMPLATE = "image_chroma1_radiance_text_to_image.json"
SUB = "762:"  # the template's nodes sit in its subgraph node 762


def _inputs(seed: int = 0, size: tuple[int, int] = (8, 12)):
    g = torch.Generator().manual_seed(seed)
    net = tiny.network(True)
    x = torch.rand(2, 3, size[0], size[1], generator=g) * 2 - 1
    context = torch.randn(2, 5, net.config.joint_attention_dim, generator=g)
    return net, x, context, torch.tensor([0.8, 0.35])


def test_trunk_equals_diffusers_chroma_transformer_on_the_same_tokens():
    from diffusers import ChromaTransformer2DModel

    net, x, context, sigma = _inputs()
    stock = ChromaTransformer2DModel(**net.config.trunk_config).eval()
    state = {k: v for k, v in net.trunk.state_dict().items()}
    hidden = stock.inner_dim
    state |= {"x_embedder.weight": torch.eye(hidden), "x_embedder.bias": torch.zeros(hidden)}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("norm_out.", "proj_out.")) for k in missing)
    seen = {}
    stock.norm_out.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0]))
    with torch.no_grad():
        tokens = net.embed(x)
        ours = net.trunk_tokens(tokens, sigma, context, 2, 3)
        stock(hidden_states=tokens, timestep=sigma, encoder_hidden_states=context,
              txt_ids=torch.zeros(5, 3), img_ids=patch_ids(2, 3, None, torch.float32), return_dict=False)
    gap = (ours - seen["h"]).abs().max().item()
    print(f"trunk vs diffusers ChromaTransformer2DModel: {gap:.2e}")
    assert gap <= 1e-5 and ours.abs().mean() > 0.1


def test_patch_embedder_is_each_patchs_weights_times_its_pixels():
    net, x, _, _ = _inputs()
    w, b = net.img_in_patch.weight.detach(), net.img_in_patch.bias.detach()
    p = tiny.PATCH
    with torch.no_grad():
        ours = net.embed(x)
    flat = w.reshape(w.shape[0], -1)
    hand = torch.stack([torch.stack([flat @ x[i, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1) + b
                                     for r in range(2) for c in range(3)]) for i in range(2)])
    gap = (ours - hand).abs().max().item()
    print(f"patch embedder vs formula: {gap:.2e}")
    assert gap <= 1e-5


def _rms(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6) * scale


def _hand_head(net, pixels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The NeRF head from its formulas, one patch and one pixel place at a time."""
    b, c, h, w = pixels.shape
    p, f, width, ratio = tiny.PATCH, tiny.NERF_FREQS, tiny.NERF_HIDDEN, tiny.NERF_RATIO
    emb = net.nerf_image_embedder.embedder[0]
    feats = torch.zeros(b, width, h, w)
    for i in range(b):
        for r in range(h // p):
            for col in range(w // p):
                s = hidden[i, r * (w // p) + col]
                rows = []
                for py in range(p):
                    for px in range(p):
                        dct = [math.cos(math.pi * fx * px / (p - 1)) * math.cos(math.pi * fy * py / (p - 1))
                               / (1 + fx * fy) for fx in range(f) for fy in range(f)]
                        rows.append(torch.cat([pixels[i, :, r * p + py, col * p + px], torch.tensor(dct)]))
                v = torch.stack(rows) @ emb.weight.T + emb.bias  # [p*p, width]
                for block in net.nerf_blocks:
                    gen = block.param_generator(s)
                    n = width * width * ratio
                    gate = gen[:n].reshape(width, width * ratio)
                    value = gen[n:2 * n].reshape(width, width * ratio)
                    out = gen[2 * n:].reshape(width * ratio, width)
                    gate, value, out = (m / m.norm(dim=0, keepdim=True).clamp_min(1e-12) for m in (gate, value, out))
                    u = _rms(v, block.norm.scale)
                    v = (torch.nn.functional.silu(u @ gate) * (u @ value)) @ out + v
                for k in range(p * p):
                    feats[i, :, r * p + k // p, col * p + k % p] = v[k]
    head = net.nerf_final_layer_conv
    normed = _rms(feats.movedim(1, -1), head.norm.scale).movedim(-1, 1)
    return torch.nn.functional.conv2d(normed, head.conv.weight, head.conv.bias, padding=1)


def test_nerf_head_equals_its_formulas_at_any_tile_size():
    net, x, _, _ = _inputs(1)
    hidden = torch.randn(2, 6, net.trunk.inner_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hand = _hand_head(net, x, hidden)
        outs = {}
        for tile in (0, 1, 5, 512):
            net.tile = tile
            outs[tile] = net.head(x, hidden)
        net.tile = 512
    gap = (outs[512] - hand).abs().max().item()
    print(f"NeRF head vs formulas: {gap:.2e}; tiles 0/1/5 vs 512: "
          f"{max((outs[t] - outs[512]).abs().max().item() for t in (0, 1, 5)):.2e}")
    assert gap <= 1e-5 and hand.abs().mean() > 0.01
    assert all(torch.allclose(outs[t], outs[512], atol=1e-6) for t in (0, 1, 5))


def test_a_size_off_the_patch_grid_is_padded_circularly_and_cropped_back():
    net, _, context, sigma = _inputs(5)
    x = torch.rand(2, 3, 10, 13, generator=torch.Generator().manual_seed(6)) * 2 - 1
    padded = torch.cat([torch.cat([x, x[:, :, :, :3]], dim=3), torch.cat([x, x[:, :, :, :3]], dim=3)[:, :, :2]], dim=2)
    assert padded.shape[-2:] == (12, 16)
    with torch.no_grad():
        ours = net.raw(x, sigma, context)
        whole = net.raw(padded, sigma, context)
    assert ours.shape == x.shape and torch.allclose(ours, whole[..., :10, :13], atol=1e-6)


def test_x0_file_returns_the_velocity_and_a_velocity_file_its_output():
    net, x, context, sigma = _inputs(2)
    with torch.no_grad():
        x0 = net.raw(x, sigma, context)
        v = net(x, sigma, context)
        vnet = tiny.network(False)
        assert torch.equal(vnet(x, sigma, context), vnet.raw(x, sigma, context))
    assert torch.allclose(v, (x - x0) / sigma.view(-1, 1, 1, 1), atol=1e-6)
    assert (v - x0).abs().max() > 0.1


@pytest.mark.parametrize("name,x0", [(FILE, True), (FILE_V, False)])
def test_unet_loader_reads_comfyuis_layout(env, name, x0):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family.name == "chroma_radiance" and model.latent.channels == 3 and model.latent.downscale == 1
    with model.unet() as wrapped:
        module = getattr(wrapped, "kiln_network", wrapped)
        assert module.config.x0 is x0 and module.config.head == "conv" and module.config.patch_size == tiny.PATCH
        ours = {k: v.float() for k, v in module.state_dict().items()}
    theirs = tiny.network(x0).state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k].float()).abs().max().item() for k in ours) <= 1e-2  # bf16 at most


def test_damaged_radiance_file_names_file_and_keys(env, root):
    from safetensors.torch import save_file

    state = tiny.original_state(True)
    state.pop("nerf_blocks.1.norm.scale")
    state["nerf_blocks.0.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / "broken-radiance.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-radiance.safetensors")
    text = str(err.value)
    assert err.value.input_name == "unet_name" and "broken-radiance.safetensors" in text
    assert "Chroma1-Radiance" in text and "nerf_blocks.1.norm.scale" in text and "nerf_blocks.0.extra.weight" in text


def test_pixel_space_vae_maps_0_1_to_minus_1_1_and_back(env):
    (vae,) = call(loaders.vae_loader, env, vae_name="pixel_space")
    assert loaders.vae_loader.input("vae_name").choice_list(env)[-1] == "pixel_space"
    image = torch.rand(1, 8, 12, 3)
    latent = vae.encode(image)
    assert latent.shape == (1, 3, 8, 12) and torch.allclose(latent, image.permute(0, 3, 1, 2) * 2 - 1)
    z = torch.linspace(-1.5, 1.5, 3 * 8 * 12).reshape(1, 3, 8, 12)
    assert torch.allclose(vae.decode(z), ((z + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))


def test_empty_latent_and_options(env):
    from nodes.chroma_radiance_nodes import chroma_radiance_options, empty_chroma_radiance_latent_image

    (latent,) = call(empty_chroma_radiance_latent_image, env, width=48, height=32, batch_size=2)
    assert latent["samples"].shape == (2, 3, 32, 48) and not latent["samples"].any()
    (model,) = call(split_loaders.unet_loader, env, unet_name=FILE)
    (same,) = call(chroma_radiance_options, env, model=model, preserve_wrapper=True, start_sigma=1.0, end_sigma=0.0,
                   nerf_tile_size=-1)
    assert same is model
    rec = Called()
    (tiled,) = call(chroma_radiance_options, env, rec, model=model, preserve_wrapper=True, start_sigma=1.0,
                    end_sigma=0.0, nerf_tile_size=64)
    assert tiled.extra["chroma_radiance_options"]["nerf_tile_size"] == 64
    assert any("memory setting" in m for m in rec.messages)


# -- ComfyUI's template, as its editor saved it -------------------------------------------------------------


def _template():
    import importlib

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    return json.loads((folder / TEMPLATE).read_text(encoding="utf-8"))


def _run_template(registry, env, seed: int = 11, prompt: str | None = None):
    from engine.formats import parse_document

    overrides = {f"{SUB}731.unet_name": FILE, f"{SUB}733.clip_name": T5, f"{SUB}760.width": 32, f"{SUB}760.height": 16,
                 f"{SUB}751.steps": 4, f"{SUB}718.noise_seed": seed}
    if prompt is not None:
        overrides[f"{SUB}693.text"] = prompt
    wf = parse_document(_template(), registry).with_overrides(overrides)
    return wf, run(registry, env, wf)


def _hand_loop(env, pos_text: str, neg_text: str, sigmas: torch.Tensor, seed: int, cfg: float) -> torch.Tensor:
    """Euler with CFG over the tiny network, driven by hand: x = sigma0 noise, x += (s' - s) v, then pixels."""
    from nodes.latent import seeded_noise

    (clip,) = call(split_loaders.clip_loader, env, clip_name=T5, type="chroma")
    clip = replace(clip, t5_padding=(0, 0))
    pos, neg = (clip.encode(t)[0][0].float() for t in (pos_text, neg_text))
    net = tiny.network(True)
    x = seeded_noise((1, 3, 16, 32), [seed]) * sigmas[0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sig = s.reshape(1).float()
            c, u = net(x, sig, pos), net(x, sig, neg)
            x = x + (s_next - s) * (u + cfg * (c - u))
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def test_template_runs_from_its_editor_file_and_equals_a_hand_loop(registry, env):
    wf, outcome = _run_template(registry, env)
    ours = outcome.results[SUB + "298"][0]
    sigmas = outcome.results[SUB + "751"][0]
    assert ours.shape == (1, 16, 32, 3) and sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
    hand = _hand_loop(env, wf.nodes[SUB + "693"].inputs["text"], wf.nodes[SUB + "728"].inputs["text"], sigmas, 11, 3.5)
    gap = (ours - hand).abs().max().item()
    print(f"template vs hand loop: {gap * 255:.4f}/255")
    assert gap <= 1 / 255 and ((ours > 0.02) & (ours < 0.98)).float().mean() > 0.3  # not a clamped picture
    _, other_seed = _run_template(registry, env, seed=12)
    _, other_prompt = _run_template(registry, env, prompt="a red bicycle leaning on a wall")
    seed_move = (other_seed.results[SUB + "298"][0] - ours).abs().mean().item()
    prompt_move = (other_prompt.results[SUB + "298"][0] - ours).abs().mean().item()
    print(f"mean move: seed {seed_move * 255:.2f}/255, prompt {prompt_move * 255:.2f}/255")
    assert seed_move > 20 * max(gap, 1e-4) and prompt_move > 20 * max(gap, 1e-4) and min(seed_move, prompt_move) > 0.01


def test_ksampler_with_the_masked_prompt_equals_a_hand_loop_at_comfyuis_fixed_shift(env):
    """KSampler euler/simple with Kiln's default T5 encoding (diffusers' text mask): the sigmas are FLUX
    [dev]'s at mu = 1.15 whatever the size (ComfyUI's ModelSamplingFlux default), written out here, and the
    network sees the mask extended over the image tokens, as Chroma's does."""
    from nodes.chroma_radiance_nodes import empty_chroma_radiance_latent_image
    from nodes.families.chroma import MASK
    from nodes.latent import seeded_noise
    from nodes.sampling import ksampler

    (model,) = call(split_loaders.unet_loader, env, unet_name=FILE)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=T5, type="chroma")
    (vae,) = call(loaders.vae_loader, env, vae_name="pixel_space")
    (latent,) = call(empty_chroma_radiance_latent_image, env, width=32, height=16, batch_size=1)
    pos, neg = clip.encode("a lighthouse on a cliff"), clip.encode("blurry")
    (out,) = call(ksampler, env, model=model, seed=7, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple",
                  positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    ours = vae.decode(out["samples"])
    t = torch.linspace(1.0, 1 / 3, 3, dtype=torch.float64)
    sigmas = torch.cat([math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)), torch.zeros(1, dtype=torch.float64)]).float()
    net = tiny.network(True)
    tokens = net.tokens_for(16, 32)
    (ps, pe), (ns, ne) = pos[0], neg[0]
    pmask, nmask = (torch.cat([e[MASK].float().reshape(1, -1), torch.ones(1, tokens)], dim=1) for e in (pe, ne))
    assert pmask[0, :ps.shape[1]].sum() < ps.shape[1]  # the mask hides padding: not vacuous

    def loop(pmask, nmask):
        x = seeded_noise((1, 3, 16, 32), [7]) * sigmas[0]
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                sig = s.reshape(1)
                c, u = net(x, sig, ps.float(), attention_mask=pmask), net(x, sig, ns.float(), attention_mask=nmask)
                x = x + (s_next - s) * (u + 3.0 * (c - u))
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    hand, unmasked = loop(pmask, nmask), loop(None, None)
    gap, mask_move = (ours - hand).abs().max().item(), (unmasked - hand).abs().max().item()
    print(f"KSampler vs hand loop (masked prompt): {gap * 255:.4f}/255; without the mask: {mask_move * 255:.2f}/255")
    assert gap <= 1 / 255 and ((hand > 0.02) & (hand < 0.98)).float().mean() > 0.3 and mask_move > 10 * gap


def test_older_linear_head_files_read_as_such():
    """Files before the conv head end in ``nerf_final_layer.{norm.scale,linear.*}`` (ComfyUI's "linear" head)."""
    from nodes.checkpoint import chroma_radiance_keys as keys
    from nodes.checkpoint.chroma_radiance_load import build_transformer
    from nodes.checkpoint.chroma_radiance_net import ChromaRadianceTransformer

    config = dict(tiny.network(True).config)
    net = ChromaRadianceTransformer(**{**config, "head": "linear", "x0": False}).eval()
    state = keys.diffusers_to_original(dict(net.state_dict()))
    assert "nerf_final_layer.linear.weight" in state and not any(k.startswith("nerf_final_layer_conv") for k in state)
    loaded = build_transformer(state, "old-radiance.safetensors", torch.float32)
    assert loaded.config.head == "linear" and not loaded.config.x0
    _, x, context, sigma = _inputs(8)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, context), net(x, sigma, context))
        head = net.nerf_final_layer
        feats = torch.randn(1, tiny.NERF_HIDDEN, 4, 4)
        hand = (_rms(feats.movedim(1, -1), head.norm.scale) @ head.linear.weight.T + head.linear.bias).movedim(-1, 1)
        assert torch.allclose(head(feats), hand, atol=1e-6)


def test_img2img_through_pixel_space_equals_a_hand_loop_from_the_picture(env):
    """VAEEncode (pixel_space) then KSampler at denoise 0.2: ComfyUI's tail of a 20-step schedule (mu 1.15),
    started from sigma0 * noise + (1 - sigma0) * the picture in -1..1, equals the loop by hand."""
    from nodes.latent import seeded_noise
    from nodes.sampling import ksampler
    from nodes.vae import vae_encode

    (model,) = call(split_loaders.unet_loader, env, unet_name=FILE_V)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=T5, type="chroma")
    clip = replace(clip, t5_padding=(1, 0))
    (vae,) = call(loaders.vae_loader, env, vae_name="pixel_space")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([xx, yy, 1 - xx], dim=-1).unsqueeze(0)
    (latent,) = call(vae_encode, env, pixels=image, vae=vae)
    pos, neg = clip.encode("a sunset"), clip.encode("")
    (out,) = call(ksampler, env, model=model, seed=3, steps=4, cfg=2.0, sampler_name="euler", scheduler="simple",
                  positive=pos, negative=neg, latent_image=latent, denoise=0.2)
    ours = vae.decode(out["samples"])
    t = torch.linspace(1.0, 1 / 20, 20, dtype=torch.float64)
    sigmas = torch.cat([math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)), torch.zeros(1, dtype=torch.float64)])
    sigmas = sigmas[16:].float()
    net = tiny.network(False)

    def loop(start: torch.Tensor) -> torch.Tensor:
        x = seeded_noise((1, 3, 16, 32), [3]) * sigmas[0] + (1 - sigmas[0]) * start
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                c, u = net(x, s.reshape(1), pos[0][0].float()), net(x, s.reshape(1), neg[0][0].float())
                x = x + (s_next - s) * (u + 2.0 * (c - u))
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    hand, blank = loop(image.permute(0, 3, 1, 2) * 2 - 1), loop(torch.zeros(1, 3, 16, 32))
    gap, picture_move = (ours - hand).abs().max().item(), (blank - hand).abs().max().item()
    print(f"img2img (denoise 0.2) vs hand loop: {gap * 255:.4f}/255; from a blank start: {picture_move * 255:.1f}/255")
    assert gap <= 1 / 255 and ((hand > 0.02) & (hand < 0.98)).float().mean() > 0.3 and picture_move > 10 / 255


def test_example_workflow_runs_on_the_tiny_files(registry, env):
    """workflows/chroma-radiance-txt2img.json (KSampler euler/beta at shift 1, T5TokenizerOptions' one pad
    token, pixel_space) runs on the tiny files under its parameters, and its seed moves the picture."""
    from engine.workflow import load

    path = Path(__file__).resolve().parent.parent / "workflows" / "chroma-radiance-txt2img.json"
    outs = []
    for seed in (1, 2):
        wf = load(path).with_overrides({"diffusion_model": FILE, "t5xxl": T5, "width": 32, "height": 16,
                                        "steps": 3, "seed": seed})
        outs.append(run(registry, env, wf).results["10"][0])
    assert outs[0].shape == (1, 16, 32, 3) and torch.isfinite(outs[0]).all()
    assert (outs[0] - outs[1]).abs().mean() > 0.05


def test_released_shapes_give_comfyuis_configuration():
    """At the released sizes (built on the meta device: no memory) the file's shapes give ComfyUI's model
    detection values: hidden 3072 in 24 heads (rotary axes 16/56/56), 19 double and 38 single blocks, the
    approximator 64 -> 5120 in 5 layers, patch 16, NeRF width 64, 4 blocks of ratio 4, 8 frequencies, conv head."""
    from nodes.checkpoint import chroma_radiance_keys as keys
    from nodes.checkpoint.chroma_radiance_net import ChromaRadianceTransformer

    trunk = dict(patch_size=1, in_channels=3072, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                 approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)
    with torch.device("meta"):
        net = ChromaRadianceTransformer(trunk, joint_attention_dim=4096, x0=True)
        state = keys.diffusers_to_original(dict(net.state_dict()), x0=True)
    config = keys.transformer_config({k: tuple(v.shape) for k, v in state.items()})
    assert config["trunk_config"] == {**trunk, "out_channels": None}
    assert {k: config[k] for k in ("channels", "patch_size", "nerf_hidden", "nerf_depth", "nerf_mlp_ratio",
                                   "nerf_freqs", "head", "x0")} == dict(channels=3, patch_size=16, nerf_hidden=64,
                                                                        nerf_depth=4, nerf_mlp_ratio=4, nerf_freqs=8,
                                                                        head="conv", x0=True)
    assert state["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert state["single_blocks.0.linear1.weight"].shape == (3072 * 7, 3072)
    assert not any(k.startswith(("img_in.", "final_layer.")) for k in state)
