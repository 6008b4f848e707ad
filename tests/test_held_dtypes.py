"""Linear weights held as the file stores them (nodes.runtime.fp8.held_dtype). T5-XXL's 4.7 B parameters
are 19 GB in fp32 and FLUX's 12 B are 48 GB, so a CPU host computing in fp32 keeps the linear weights
of a fp16, bf16 or fp8 file in that dtype and casts each per call.

The result must be the one of the model upcast whole at load, bit for bit (casting per call gives
the same values), the bytes held must shrink by what the narrower storage saves, T5's ``wo`` (before
which T5 casts its activations to that weight's dtype) must be held in the compute dtype, and a LoRA
on the kept layers must equal the LoRA on the upcast model: it runs beside the weight, since adding it
into a fp16 weight would round it to fp16.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_flux
from engine.context import Environment, Paths
from node_call import Called, call
from nodes import lora, split_loaders
from nodes.runtime.models import ModelManager

STORED = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
LORA = "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"  # a kept layer, kohya's T5 name
LORA_WO = "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo"  # a layer held in the compute dtype


def _stored(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file: every float tensor in ``dtype``, as t5xxl_fp16 files hold them (fp8: the 2-D weights only,
    as t5xxl_fp8_e4m3fn files hold them, the rest fp16)."""
    if dtype == torch.float8_e4m3fn:
        return {k: v.to(dtype) if v.ndim == 2 and k.endswith(".weight") and "shared" not in k else v.half()
                for k, v in state.items()}
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5-storage")
    base = tiny_flux.t5_state()
    for name, dtype in STORED.items():
        tiny_flux._save(root / "text_encoders" / f"t5-{name}.safetensors", _stored(base, dtype))
    both = _stored(base, torch.float16)  # the tied embedding stored under both its names, as some files do
    both["encoder.embed_tokens.weight"] = both["shared.weight"].clone()
    tiny_flux._save(root / "text_encoders" / "t5-both-names.safetensors", both)
    tiny_flux._save(root / "text_encoders" / "clip_l.safetensors", tiny_flux.clip_l_state())
    bfl = tiny_flux.bfl_transformer("dev")
    tiny_flux._save(root / "diffusion_models" / "flux.safetensors", bfl)
    tiny_flux._save(root / "diffusion_models" / "flux-bf16.safetensors", {k: v.bfloat16() for k, v in bfl.items()})
    tiny_flux._save(root / "diffusion_models" / "flux-bf16-upcast.safetensors",
                    {k: v.bfloat16().float() for k, v in bfl.items()})
    g = torch.Generator().manual_seed(7)
    wi, wo = base["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"], base["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    (root / "loras").mkdir()
    save_file({f"{LORA}.lora_down.weight": torch.randn(2, wi.shape[1], generator=g) * 0.3,
               f"{LORA}.lora_up.weight": torch.randn(wi.shape[0], 2, generator=g) * 0.3,
               f"{LORA_WO}.lora_down.weight": torch.randn(2, wo.shape[1], generator=g) * 0.3,
               f"{LORA_WO}.lora_up.weight": torch.randn(wo.shape[0], 2, generator=g) * 0.3},
              str(root / "loras" / "t5.safetensors"))
    return root


def _env(root: Path, tmp_path: Path, budget: int | None = None) -> Environment:
    return Environment(paths=Paths.under(tmp_path / "data", models=root),
                       models=ModelManager(device="cpu", cpu_budget_bytes=budget))


def _short_of_widening(path: Path) -> int:
    """A RAM budget that holds the model at ``path`` (a transformer file or a pipeline folder) with its
    bf16 linears as stored but not upcast, so the manager keeps them narrow (ModelManager.widen_if_room)."""
    from nodes.checkpoint.load import load_checkpoint
    from nodes.checkpoint.split import load_unet_file
    from nodes.runtime import fp8
    from nodes.runtime.measure import module_bytes

    loaded = (load_checkpoint if path.is_dir() else load_unet_file)(path, torch.float32)
    extra = fp8.widening_bytes(loaded.modules["unet"])
    assert extra > 0
    return sum(module_bytes(m) for m in loaded.modules.values()) + extra // 2


def _upcast_reference(name: str) -> torch.nn.Module:
    """transformers' T5 holding the file's values upcast to fp32: what the loader built before."""
    from safetensors.torch import load_file

    ref = copy.deepcopy(tiny_flux.components("dev")["text_encoder_2"]).float()
    state = {k: v.float() for k, v in load_file(str(name)).items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    ref.load_state_dict(state)
    return ref.eval()


def _encode(t5: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[37, 1782, 19, 3, 9, 1300, 3, 5, 1] + [0] * 7])
    with torch.no_grad():
        return t5(ids)[0]


def _t5(env: Environment, name: str, rec: Called | None = None):
    (clip,) = call(split_loaders.dual_clip_loader, env, rec, clip_name1="clip_l.safetensors",
                   clip_name2=f"t5-{name}.safetensors", type="flux")
    return clip


@pytest.mark.parametrize("name", list(STORED))
def test_a_narrow_t5_file_stays_narrow_and_encodes_as_the_upcast_model(root, tmp_path, name):
    env = _env(root, tmp_path)
    clip = _t5(env, name)
    ref = _upcast_reference(root / "text_encoders" / f"t5-{name}.safetensors")
    with clip.encoder("text_encoder_2") as t5:
        block = t5.encoder.block[0]
        kept = [block.layer[0].SelfAttention.q, block.layer[1].DenseReluDense.wi_0, block.layer[1].DenseReluDense.wi_1]
        assert all(layer.weight.dtype == STORED[name] for layer in kept), [layer.weight.dtype for layer in kept]
        assert block.layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # T5 casts its input to wo's dtype
        assert t5.shared.weight.dtype == torch.float32 and block.layer[0].layer_norm.weight.dtype == torch.float32
        # the embedding tied under two names is one upcast copy (0.5 GB for T5-XXL), not two
        assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
        held = sum(p.numel() * p.element_size() for p in t5.parameters())
        full = sum(p.numel() * 4 for p in t5.parameters())
        narrow = sum(m.weight.numel() for m in t5.modules()
                     if isinstance(m, torch.nn.Linear) and m.weight.dtype == STORED[name])
        assert held == full - narrow * (4 - STORED[name].itemsize) and held < full
        ours = _encode(t5)
    assert torch.equal(ours, _encode(ref))  # the same values: the cast per call is the upcast at load
    assert ours.dtype == torch.float32


def test_a_t5_file_with_the_embedding_under_both_names_holds_one_copy(root, tmp_path):
    """transformers ties encoder.embed_tokens to shared; a file may store both (0.5 GB each in fp32 for
    T5-XXL): one is held, under both names, and the size reported before building counts it once."""
    from nodes.checkpoint.flux_load import t5_held_bytes
    from nodes.checkpoint.tensors import LazyState
    from nodes.runtime.measure import module_bytes

    path = root / "text_encoders" / "t5-both-names.safetensors"
    with _t5(_env(root, tmp_path), "both-names").encoder("text_encoder_2") as t5:
        assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
        assert t5_held_bytes(LazyState.open(path), "", torch.float32) == module_bytes(t5)
        assert torch.equal(_encode(t5), _encode(_upcast_reference(root / "text_encoders" / "t5-fp16.safetensors")))


def test_a_lora_on_a_narrow_t5_equals_it_on_the_upcast_model(root, tmp_path):
    """Beside the fp16 weights of wi_0 (added into them it would be rounded to fp16), into wo (held in fp32)."""
    from safetensors.torch import load_file

    env = _env(root, tmp_path)
    clip = _t5(env, "fp16")
    (model,) = call(split_loaders.unet_loader, env, unet_name="flux.safetensors")
    with clip.encoder("text_encoder_2") as t5:
        plain = _encode(t5)
        stored = {k: v.clone() for k, v in t5.state_dict().items()}
    rec = Called()
    _, patched = call(lora.lora_loader, env, rec, model=model, clip=clip, lora_name="t5.safetensors",
                      strength_model=1.0, strength_clip=0.8)
    assert "2 modules patched (2 in text_encoder_2)" in rec.messages[0], rec.messages
    with patched.encoder("text_encoder_2") as t5:
        ours = _encode(t5)
    ref = _upcast_reference(root / "text_encoders" / "t5-fp16.safetensors")
    factors = load_file(str(root / "loras" / "t5.safetensors"))
    with torch.no_grad():
        for key, layer in ((LORA, ref.encoder.block[0].layer[1].DenseReluDense.wi_0),
                           (LORA_WO, ref.encoder.block[1].layer[1].DenseReluDense.wo)):
            layer.weight += 0.8 * factors[f"{key}.lora_up.weight"] @ factors[f"{key}.lora_down.weight"]
    expected = _encode(ref)
    assert (ours - expected).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-2  # not vacuous: the LoRA changes the encoding
    with clip.encoder("text_encoder_2") as t5:  # the stored weights are as loaded afterwards
        assert all(torch.equal(v, stored[k]) for k, v in t5.state_dict().items())
        assert torch.equal(_encode(t5), plain)


def test_a_bf16_flux_transformer_stays_bf16_when_ram_is_short_and_samples_as_the_upcast_model(root, tmp_path):
    """ComfyUI's flux1-dev.safetensors is bf16 (23.8 GB): upcast whole for the CPU it would take 48 GB."""
    from lora_support import flux_sample

    env = _env(root, tmp_path, _short_of_widening(root / "diffusion_models" / "flux-bf16.safetensors"))
    rec = Called()
    (kept,) = call(split_loaders.unet_loader, env, rec, unet_name="flux-bf16.safetensors")
    assert "bf16 weights kept bf16 and cast per layer" in rec.messages[0], rec.messages
    (upcast,) = call(split_loaders.unet_loader, _env(root, tmp_path), unet_name="flux-bf16-upcast.safetensors")
    with kept.unet() as net, upcast.unet() as ref:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
        assert net.x_embedder.weight.dtype == torch.bfloat16 and net.x_embedder.bias.dtype == torch.float32
        assert net.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
        held = sum(p.numel() * p.element_size() for p in net.parameters())
        assert held < 0.6 * sum(p.numel() * p.element_size() for p in ref.parameters())
    assert torch.equal(flux_sample(env, kept), flux_sample(env, upcast))


def test_a_bf16_flux_transformer_is_upcast_at_load_when_the_ram_budget_holds_it(root, tmp_path):
    """Kept bf16, each call casts every weight: about 40 % of a FLUX step on a CPU. Where the budget holds the
    upcast beside what is loaded, the manager upcasts at load (the same values), and fp8 stays fp8."""
    from lora_support import flux_sample

    env = _env(root, tmp_path)
    rec = Called()
    (widened,) = call(split_loaders.unet_loader, env, rec, unet_name="flux-bf16.safetensors")
    assert "bf16 weights upcast to float32" in rec.messages[0] and "kept bf16" not in rec.messages[0], rec.messages
    (upcast,) = call(split_loaders.unet_loader, env, unet_name="flux-bf16-upcast.safetensors")
    with widened.unet() as net, upcast.unet() as ref:
        q = net.transformer_blocks[0].attn.to_q
        assert q.weight.dtype == torch.float32 and type(q) is torch.nn.Linear
        assert [type(m) for m in net.modules()] == [type(m) for m in ref.modules()]
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
    # the manager counts what it holds: the widened entry's bytes, not the file's
    assert sum(e.nbytes for e in env.models._entries.values()) == 2 * sum(
        p.numel() * p.element_size() for p in ref.parameters())
    expected = flux_sample(env, upcast)
    assert torch.equal(flux_sample(env, widened), expected)
    # RAM grows short (the budget shrinks): the next use narrows it back rather than paging it to disk
    from nodes.checkpoint import flux_blocks
    from nodes.checkpoint.tensors import LazyState
    from nodes.runtime import offload

    whole = sum(p.numel() * p.element_size() for p in ref.parameters())
    narrow = flux_blocks.held_bytes(LazyState.open(root / "diffusion_models" / "flux-bf16.safetensors"), torch.float32)
    env.models.cpu_budget_bytes = whole + narrow + (whole - narrow) // 2
    with widened.unet() as net:
        q = net.transformer_blocks[0].attn.to_q
        assert q.weight.dtype == torch.bfloat16 and type(q).__name__ == "CastLinear"
        assert offload.offloaded(net) is None and env.models.counters["narrowed"] == 1
    assert sum(e.nbytes for e in env.models._entries.values()) == whole + narrow
    assert torch.equal(flux_sample(env, widened), expected)
    env.models.cpu_budget_bytes = 1 << 34  # roomy again: fp8 would fit upcast, and stays fp8 by choice
    fp8_file = root / "diffusion_models" / "flux-fp8.safetensors"
    tiny_flux._save(fp8_file, tiny_flux.to_fp8(tiny_flux.bfl_transformer("dev")))
    (fp8,) = call(split_loaders.unet_loader, env, unet_name="flux-fp8.safetensors")
    with fp8.unet() as net:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_the_size_a_flux_checkpoint_reports_before_building_counts_its_t5_as_held(tmp_path):
    """An all-in-one FLUX file with a fp16 T5: the bytes of the load's other modules, asked before the
    transformer is built, are those the built CLIP-L, T5 and VAE hold (T5's linears in fp16)."""
    from nodes.checkpoint.load import load_checkpoint
    from nodes.runtime.measure import module_bytes

    aio = {"model.diffusion_model." + k: v for k, v in tiny_flux.bfl_transformer("dev").items()}
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in tiny_flux.clip_l_state().items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in _stored(tiny_flux.t5_state(), torch.float16).items()})
    aio.update({"vae." + k: v for k, v in tiny_flux.vae_state().items()})
    path = tiny_flux._save(tmp_path / "flux-aio.safetensors", aio)
    asked = []
    loaded = load_checkpoint(path, torch.float32, offload=lambda n, b: asked.append(b))
    others = sum(module_bytes(loaded.modules[name]) for name in ("text_encoder", "text_encoder_2", "vae"))
    t5 = loaded.modules["text_encoder_2"]
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16  # not vacuous
    assert len(asked) == 1 and abs(asked[0] - others) <= 1024, (asked, others)  # CLIP-L's position ids: no file tensor
    upcast = sum(v.numel() * 4 for k, v in aio.items() if not k.startswith("model.diffusion_model."))
    assert upcast - others > 16 * 1024  # not vacuous: counted upcast, the T5 is 32 KB more


def _flux_folder(folder: Path, dtype: torch.dtype) -> Path:
    """The tiny FLUX pipeline folder with its transformer and T5 saved in ``dtype`` (the hub's FLUX.1 is
    bf16, its T5 sharded with transformers' index json: the T5 here is sharded too)."""
    import shutil

    tiny_flux.save_diffusers("dev", folder)
    parts = tiny_flux.components("dev")
    for sub, module, shard in (("transformer", parts["transformer"], None), ("text_encoder_2", parts["text_encoder_2"], "400KB")):
        shutil.rmtree(folder / sub)
        held = copy.deepcopy(module).to(torch.bfloat16)
        if dtype != torch.bfloat16:  # the same values, stored upcast
            held = held.to(dtype)
        held.save_pretrained(str(folder / sub), safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return folder


def test_a_bf16_flux_diffusers_folder_holds_its_transformer_and_t5_as_stored(tmp_path):
    """The hub's FLUX.1 folder (bf16 transformer, sharded bf16 T5): held as the split files are, 23.8 GB
    instead of 47.6 GB on a CPU, and sampling exactly as the same values stored upcast."""
    from lora_support import flux_sample

    from nodes import loaders

    models = tmp_path / "models"
    _flux_folder(models / "checkpoints" / "flux-bf16", torch.bfloat16)
    _flux_folder(models / "checkpoints" / "flux-upcast", torch.float32)
    assert len(list((models / "checkpoints" / "flux-bf16" / "text_encoder_2").glob("model-*.safetensors"))) > 1
    env = _env(models, tmp_path, _short_of_widening(models / "checkpoints" / "flux-bf16"))
    rec = Called()
    kept, clip, _ = call(loaders.checkpoint_loader, env, rec, ckpt_name="flux-bf16")
    assert "bf16 weights kept bf16 and cast per layer" in rec.messages[0], rec.messages
    upcast, upcast_clip, _ = call(loaders.checkpoint_loader, _env(models, tmp_path), ckpt_name="flux-upcast")
    with kept.unet() as net, upcast.unet() as ref:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
        assert net.x_embedder.bias.dtype == torch.float32 and net.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
        assert ref.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32  # not vacuous
        held = sum(p.numel() * p.element_size() for p in net.parameters())
        assert held < 0.6 * sum(p.numel() * p.element_size() for p in ref.parameters())
    with clip.encoder("text_encoder_2") as t5, upcast_clip.encoder("text_encoder_2") as t5_ref:
        block = t5.encoder.block[0]
        assert block.layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
        assert block.layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
        assert torch.equal(_encode(t5), _encode(t5_ref))
    assert torch.equal(flux_sample(env, kept), flux_sample(env, upcast))
