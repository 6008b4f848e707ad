"""ComfyUI's scaled fp8 files (``*_fp8_scaled``, ``t5xxl_fp8_e4m3fn_scaled``) through the real loader nodes.

The tiny FLUX, Chroma, SD3 and T5 (tests/tiny_*.py) are quantised here as ComfyUI's tools write
them: each linear weight ``W`` stored as ``fp8(W / s)`` beside a float32 ``.scale_weight`` ``s``
(one number, or one per output row: the fused ``qkv`` / ``linear1`` weights and the swapped final
modulation get per-row scales, so the key conversion's splits are exercised), some layers with a
``.scale_input``, and the ``scaled_fp8`` marker. The same weights dequantised (``fp8 * s`` in float32)
are saved as a plain file: the scaled file must load to those very effective weights, kept in fp8,
and sample the same pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_chroma
import tiny_flux
import tiny_sd3
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from node_call import Called, call, environment_over
from nodes import loaders, split_loaders
from nodes.runtime.fp8 import cast_linear_class, fp8_bytes, weight_scale

FP8 = torch.float8_e4m3fn
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry, dark"
SIZE = 32
PER_ROW = ("qkv", "linear1", "adaLN_modulation", "norm_out", "SelfAttention.q.", "wo.")


def quantise(state: dict, prefix: str = "", storage: torch.dtype = FP8) -> tuple[dict, dict]:
    """(scaled fp8 file, its dequantised float32 twin) of ``state``, both under ``prefix`` (``storage``: the
    scaled weights' dtype)."""
    scaled, plain = {}, {}
    for i, (k, v) in enumerate(sorted(state.items())):
        if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() and "embed_tokens" not in k \
                and not k.startswith("shared"):
            w = v.detach().float()
            per_row = any(p in k for p in PER_ROW)
            s = (w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()) / 448.0
            s = s.clamp_min(1e-8)
            q = (w / s).to(storage)
            scaled[prefix + k] = q
            scaled[prefix + k[: -len("weight")] + "scale_weight"] = s.to(torch.float32)
            if i % 3 == 0:  # as fp8-matmul files carry; ComfyUI's cast path ignores it
                scaled[prefix + k[: -len("weight")] + "scale_input"] = torch.tensor(0.75)
            plain[prefix + k] = q.float() * s
        else:
            scaled[prefix + k] = plain[prefix + k] = v.detach()
    scaled[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return scaled, plain


def _t5() -> dict:
    return tiny_flux.t5_state()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaled-fp8-models")
    save = tiny_flux._save
    for name, state, prefix in (("flux", tiny_flux.bfl_transformer("dev"), "model.diffusion_model."),
                                ("chroma", tiny_chroma.original_transformer(), ""),
                                ("sd3", tiny_sd3.original_transformer("large"), "")):
        scaled, plain = quantise(state, prefix)
        save(root / "diffusion_models" / f"{name}-scaled.safetensors", scaled)
        save(root / "diffusion_models" / f"{name}-dequant.safetensors", plain)
    t5_scaled, t5_plain = quantise(_t5())
    save(root / "text_encoders" / "t5-scaled.safetensors", t5_scaled)
    save(root / "text_encoders" / "t5-dequant.safetensors", t5_plain)
    save(root / "text_encoders" / "clip_l.safetensors", tiny_flux.clip_l_state())
    save(root / "vae" / "flux-ae.safetensors", tiny_flux.vae_state())
    for name, module in (("sd3-clip_l", "text_encoder"), ("sd3-clip_g", "text_encoder_2")):
        save(root / "text_encoders" / f"{name}.safetensors", tiny_sd3.clip_state(module))
    save(root / "text_encoders" / "sd3-t5.safetensors", tiny_sd3.t5_state())
    save(root / "vae" / "sd3-vae.safetensors", tiny_sd3.vae_state())
    aio = {}
    for prefix, state in (("model.diffusion_model.", tiny_flux.bfl_transformer("dev")),
                          ("text_encoders.t5xxl.transformer.", _t5())):
        pair = quantise(state, prefix)
        aio[True] = {**aio.get(True, {}), **pair[0]}
        aio[False] = {**aio.get(False, {}), **pair[1]}
    whole = tiny_sd3.single_file("large")
    inner = [p for p in ("model.diffusion_model.", "text_encoders.t5xxl.transformer.")]
    rest = {k: v for k, v in whole.items() if not k.startswith(tuple(inner))}
    pairs = [quantise({k[len(p):]: v for k, v in whole.items() if k.startswith(p)}, p) for p in inner]
    save(root / "checkpoints" / "sd3-scaled.safetensors", {**rest, **pairs[0][0], **pairs[1][0]})
    save(root / "checkpoints" / "sd3-dequant.safetensors", {**rest, **pairs[0][1], **pairs[1][1]})
    for scaled in (True, False):
        rest = {"text_encoders.clip_l.transformer." + k: v for k, v in tiny_flux.clip_l_state().items()}
        rest.update({"vae." + k: v for k, v in tiny_flux.vae_state().items()})
        save(root / "checkpoints" / f"flux-aio-{'scaled' if scaled else 'dequant'}.safetensors", {**aio[scaled], **rest})
    return root


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _effective(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each linear layer's weight as it computes with it in float32 (its scale applied)."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().float()
            scale = weight_scale(m)
            out[name] = w * scale.float() if scale is not None else w
    return out


def _compare(scaled_net, plain_net) -> tuple[int, int]:
    """Asserts equal effective weights and the rest of the state; returns (scaled layers, fp8 bytes)."""
    a, b = _effective(scaled_net), _effective(plain_net)
    assert set(a) == set(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:3]
    sa, sb = scaled_net.state_dict(), plain_net.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa if not k.endswith(".weight") or sa[k].ndim != 2)
    layers = [m for m in scaled_net.modules() if weight_scale(m) is not None]
    assert layers and all(type(m) is cast_linear_class() and m.weight.dtype == FP8 for m in layers)
    return len(layers), fp8_bytes(scaled_net)


@pytest.mark.parametrize("family", ["flux", "chroma", "sd3"])
def test_unet_loader_keeps_fp8_with_scales_and_equals_the_dequantised_file(env, family):
    rec = Called()
    (scaled,) = call(split_loaders.unet_loader, env, rec, unet_name=f"{family}-scaled.safetensors")
    (plain,) = call(split_loaders.unet_loader, env, unet_name=f"{family}-dequant.safetensors")
    with scaled.unet() as a, plain.unet() as b:
        layers, held = _compare(a, b)
        full = sum(m.weight.numel() * 4 for m in b.modules() if isinstance(m, torch.nn.Linear))
        fused = [n for n, m in a.named_modules() if weight_scale(m) is not None and weight_scale(m).unique().numel() > 1]
    assert fused  # per-row scales reached split layers
    assert f"fp8 weights kept fp8 and cast per layer, {layers} of them times their file's scales" in rec.messages[0]
    assert held * 4 == full  # every linear weight held in one byte, the dequantised twin's in four
    print(f"{family}: {layers} scaled layers, {held} fp8 bytes vs {full} float32")


def test_weight_dtype_is_ignored_for_a_scaled_file(env):
    """As ComfyUI: a scaled file's own fp8 storage stands; e5m2 would lose its mantissa bits."""
    (scaled,) = call(split_loaders.unet_loader, env, unet_name="flux-scaled.safetensors", weight_dtype="fp8_e5m2")
    (plain,) = call(split_loaders.unet_loader, env, unet_name="flux-dequant.safetensors")
    with scaled.unet() as a, plain.unet() as b:
        _compare(a, b)


@pytest.mark.parametrize("name,t5", [("flux-aio", "text_encoder_2"), ("sd3", "text_encoder_3")])
def test_checkpoint_loader_reads_a_scaled_all_in_one_file(env, name, t5):
    (m1, c1, _) = call(loaders.checkpoint_loader, env, ckpt_name=f"{name}-scaled.safetensors")
    (m2, c2, _) = call(loaders.checkpoint_loader, env, ckpt_name=f"{name}-dequant.safetensors")
    with m1.unet() as a, m2.unet() as b:
        _compare(a, b)
    with c1.encoder(t5) as a, c2.encoder(t5) as b:
        assert any(weight_scale(m) is not None for m in a.modules())
        ea, eb = _effective(a), _effective(b)
        assert all(torch.equal(ea[k], eb[k]) for k in eb)


def test_scaled_t5_through_clip_loaders_equals_the_dequantised_file(env):
    from nodes.text import clip_text_encode

    (s,) = call(split_loaders.clip_loader, env, clip_name="t5-scaled.safetensors", type="chroma")
    (p,) = call(split_loaders.clip_loader, env, clip_name="t5-dequant.safetensors", type="chroma")
    with s.encoder("text_encoder") as a, p.encoder("text_encoder") as b:
        ea, eb = _effective(a), _effective(b)
        assert set(ea) == set(eb) and all(torch.equal(ea[k], eb[k]) for k in eb)
        kept = [n for n, m in a.named_modules() if weight_scale(m) is not None]
        wo = [m for n, m in a.named_modules() if n.endswith("DenseReluDense.wo")]
        assert kept and all(m.weight.dtype == FP8 for n, m in a.named_modules() if n in kept)
        assert wo and all(m.weight.dtype == torch.float32 for m in wo)  # T5 keeps wo in full precision
    (cs,) = call(clip_text_encode, env, text=PROMPT, clip=s)
    (cp,) = call(clip_text_encode, env, text=PROMPT, clip=p)
    assert torch.equal(cs[0][0], cp[0][0])
    (dual,) = call(split_loaders.dual_clip_loader, env, clip_name1="clip_l.safetensors",
                   clip_name2="t5-scaled.safetensors", type="flux")
    (cd,) = call(clip_text_encode, env, text=PROMPT, clip=dual)
    assert cd[0][0].shape[-1] == tiny_flux.TEXT


def _graph(family: str, unet: str) -> dict:
    clip = {
        "flux": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                            "clip_name2": "t5-dequant.safetensors", "type": "flux"}},
        "chroma": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5-dequant.safetensors", "type": "chroma"}},
        "sd3": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "sd3-clip_l.safetensors",
                                                             "clip_name2": "sd3-clip_g.safetensors",
                                                             "clip_name3": "sd3-t5.safetensors"}},
    }[family]
    cfg = 1.0 if family == "flux" else 4.0
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": clip,
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sd3-vae.safetensors" if family == "sd3"
                                                    else "flux-ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 3, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": family}},
    }


@pytest.mark.parametrize("family", ["flux", "chroma", "sd3"])
def test_sampling_a_scaled_file_equals_sampling_the_dequantised_one(env, family):
    registry = default_registry()
    images = []
    for unet in (f"{family}-scaled.safetensors", f"{family}-dequant.safetensors"):
        outcome = Executor(registry, env).run(parse(_graph(family, unet)))
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        images.append(outcome.results["8"][0].numpy())
    diff = float(np.abs(images[0] - images[1]).max())
    print(f"{family}: max pixel difference {diff}")
    assert diff <= 1 / 255 and images[0].std() > 0.005


def _broken(root: Path, name: str, change) -> str:
    scaled, _ = quantise(tiny_flux.bfl_transformer("dev"))
    change(scaled)
    tiny_flux._save(root / "diffusion_models" / name, scaled)
    return name


def test_a_scale_without_its_weight_is_an_error_naming_file_and_key(env, root):
    name = _broken(root, "orphan-scale.safetensors",
                   lambda s: s.update({"double_blocks.0.img_attn.nothing.scale_weight": torch.tensor(1.0)}))
    with pytest.raises(Exception) as caught:
        call(split_loaders.unet_loader, env, unet_name=name)
    assert name in str(caught.value) and "double_blocks.0.img_attn.nothing.scale_weight" in str(caught.value)


def test_a_malformed_scale_is_an_error_naming_file_and_key(env, root):
    key = "double_blocks.0.img_attn.qkv.scale_weight"
    name = _broken(root, "bad-scale.safetensors", lambda s: s.update({key: torch.ones(3, 2)}))
    with pytest.raises(Exception) as caught:
        call(split_loaders.unet_loader, env, unet_name=name)
    assert name in str(caught.value) and key in str(caught.value) and "(3, 2)" in str(caught.value)


def test_a_scaled_model_paged_to_disk_keeps_its_scales(root, tmp_path):
    """The scales are buffers: block files carry them, whether the model is built straight into its
    disk blocks (the manager asked before building) or built whole and paged later."""
    from nodes.checkpoint.split import load_unet_file
    from nodes.runtime import offload

    from nodes.checkpoint import flux_blocks
    from nodes.checkpoint.tensors import LazyState
    from nodes.runtime.measure import module_bytes

    path = root / "diffusion_models" / "flux-scaled.safetensors"
    whole = load_unet_file(path, torch.float32).modules["unet"]
    asked = []
    straight = load_unet_file(path, torch.float32, offload=lambda n, b: asked.append(n) or offload.Plan(
        onload="cpu", rest="disk", note="test")).modules["unet"]
    assert offload.offloaded(straight).paged
    header = flux_blocks.held_bytes(flux_blocks.strip_prefix(LazyState.open(path), "model.diffusion_model."),
                                    torch.float32)
    assert asked == [header] == [module_bytes(whole)]  # the size asked from the header is the built model's
    assert sum(weight_scale(m) is not None for m in straight.modules()) == \
        sum(weight_scale(m) is not None for m in whole.modules()) > 0
    later = load_unet_file(path, torch.float32).modules["unet"]
    offload.offload_blocks(later, "cpu", "disk", "test: paged", folder_root=str(tmp_path))
    assert offload.offloaded(later).paged
    reference = tiny_flux.forward(whole)
    assert torch.equal(tiny_flux.forward(straight), reference) and torch.equal(tiny_flux.forward(later), reference)
    plain = load_unet_file(path.with_name("flux-dequant.safetensors"), torch.float32).modules["unet"]
    assert torch.equal(tiny_flux.forward(whole), tiny_flux.forward(plain))


@pytest.mark.parametrize("dora", [False, True])
def test_a_lora_on_a_scaled_model_equals_it_on_the_dequantised_one(env, root, dora):
    """The LoRA runs beside the fp8 weight (whose layer applies the scale); on the float32 twin it is added
    in place: the same sum, rounded differently. A DoRA module needs the weight itself: the scaled layer
    builds it per call from fp8 * scale (nodes.runtime.fp8's ``kiln_deltas``)."""
    from lora_support import flux_lora_beside_stored_vs_dequantised

    lora_name = f"scaled-test-{'dora' if dora else 'lora'}.safetensors"
    diff, effect = flux_lora_beside_stored_vs_dequantised(
        env, root, ("flux-scaled.safetensors", "flux-dequant.safetensors"), lora_name,
        ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1",
         "double_blocks.0.img_attn.proj"), dora="double_blocks.0.img_attn.proj" if dora else None)
    print(f"{lora_name} on scaled vs dequantised: {diff:.2e} (the LoRA moves the output by {effect:.2e})")
    assert diff <= 1e-5 and effect > 1e-2


# -- the newer per-layer marking (.comfy_quant) ---------------------------------------------------


def _quant_marker(fmt: str) -> torch.Tensor:
    import json

    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def quantise_mixed(state: dict, prefix: str = "", always: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """An "fp8mixed" file as ComfyUI's MixedPrecisionOps reads it: every other linear weight fp8 with one
    ``weight_scale`` and a ``comfy_quant`` marker (some with an ``input_scale``), the rest left float32
    (``always``: weights quantised wherever they fall); and its dequantised twin."""
    scaled, plain = {}, {}
    linears = [k for k, v in sorted(state.items()) if v.ndim == 2 and k.endswith(".weight")]
    for k, v in state.items():
        scaled[prefix + k] = plain[prefix + k] = v.detach()
    for i, k in enumerate(linears):
        if i % 2 and not any(a in k for a in always):
            continue
        layer = prefix + k[: -len(".weight")]
        s = state[k].detach().float().abs().max() / 448.0
        q = (state[k].detach().float() / s).to(FP8)
        scaled[layer + ".weight"], plain[layer + ".weight"] = q, q.float() * s
        scaled[layer + ".weight_scale"] = s.to(torch.float32)
        scaled[layer + ".comfy_quant"] = _quant_marker("float8_e4m3fn")
        if i % 4 == 0:
            scaled[layer + ".input_scale"] = torch.tensor(0.5)
    return scaled, plain


@pytest.fixture(scope="module")
def mixed_root(root) -> Path:
    for name, state, prefix in (("flux", tiny_flux.bfl_transformer("dev"), "model.diffusion_model."),
                                ("sd3", tiny_sd3.original_transformer("large"), "")):
        scaled, plain = quantise_mixed(state, prefix)
        tiny_flux._save(root / "diffusion_models" / f"{name}-mixed.safetensors", scaled)
        tiny_flux._save(root / "diffusion_models" / f"{name}-mixed-dequant.safetensors", plain)
    scaled, plain = quantise_mixed(_t5())
    tiny_flux._save(root / "text_encoders" / "t5-mixed.safetensors", scaled)
    tiny_flux._save(root / "text_encoders" / "t5-mixed-dequant.safetensors", plain)
    return root


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_comfy_quant_mixed_file_equals_its_dequantised_twin(env, mixed_root, family):
    (mixed,) = call(split_loaders.unet_loader, env, unet_name=f"{family}-mixed.safetensors")
    (plain,) = call(split_loaders.unet_loader, env, unet_name=f"{family}-mixed-dequant.safetensors")
    with mixed.unet() as a, plain.unet() as b:
        layers, held = _compare(a, b)
        floats = [m for m in a.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]
    assert layers and floats  # mixed: fp8 layers with scales beside float32 ones
    print(f"{family} mixed: {layers} fp8 layers ({held} bytes), {len(floats)} float32 layers")


def test_a_comfy_quant_t5_through_clip_loader(env, mixed_root):
    (s,) = call(split_loaders.clip_loader, env, clip_name="t5-mixed.safetensors", type="chroma")
    (p,) = call(split_loaders.clip_loader, env, clip_name="t5-mixed-dequant.safetensors", type="chroma")
    with s.encoder("text_encoder") as a, p.encoder("text_encoder") as b:
        ea, eb = _effective(a), _effective(b)
        assert set(ea) == set(eb) and all(torch.equal(ea[k], eb[k]) for k in eb)
        assert any(weight_scale(m) is not None for m in a.modules())


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update({"double_blocks.0.img_attn.qkv.comfy_quant": _quant_marker("nvfp4")}), "'nvfp4'"),
    (lambda s: s.pop("double_blocks.0.img_attn.qkv.weight_scale"), "double_blocks.0.img_attn.qkv.weight_scale"),
    (lambda s: s.update({"double_blocks.0.img_attn.qkv.comfy_quant": torch.tensor([1, 2, 3], dtype=torch.uint8)}),
     "double_blocks.0.img_attn.qkv.comfy_quant"),
])
def test_a_comfy_quant_file_the_facts_do_not_cover_is_an_error_naming_file_and_key(env, root, change, words):
    scaled, _ = quantise_mixed(tiny_flux.bfl_transformer("dev"), always=("img_attn.qkv",))
    change(scaled)
    name = f"bad-quant-{len(words)}.safetensors"
    tiny_flux._save(root / "diffusion_models" / name, scaled)
    with pytest.raises(Exception) as caught:
        call(split_loaders.unet_loader, env, unet_name=name)
    assert name in str(caught.value) and words in str(caught.value)


def test_a_scale_on_a_bf16_weight_is_kept_through_the_managers_widening(env, root):
    """A CPU manager upcasts linear weights kept bf16 only for being narrow (ModelManager.widen_if_room); a
    scaled one keeps its CastLinear, which alone applies the scale."""
    scaled, plain = quantise(tiny_flux.bfl_transformer("dev"), storage=torch.bfloat16)
    tiny_flux._save(root / "diffusion_models" / "flux-bf16-scaled.safetensors", scaled)
    tiny_flux._save(root / "diffusion_models" / "flux-bf16-dequant.safetensors", plain)
    (a_model,) = call(split_loaders.unet_loader, env, unet_name="flux-bf16-scaled.safetensors")
    (b_model,) = call(split_loaders.unet_loader, env, unet_name="flux-bf16-dequant.safetensors")
    with a_model.unet() as a, b_model.unet() as b:
        ea, eb = _effective(a), _effective(b)
        assert all(torch.equal(ea[k], eb[k]) for k in eb)
        kept = [m for m in a.modules() if weight_scale(m) is not None]
        assert kept and all(type(m) is cast_linear_class() and m.weight.dtype == torch.bfloat16 for m in kept)
        assert torch.equal(tiny_flux.forward(a), tiny_flux.forward(b))
