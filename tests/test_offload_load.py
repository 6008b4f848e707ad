"""Loading a FLUX transformer straight into blocks paged to disk (nodes.checkpoint.flux_blocks), and the
model manager's one offload rule (ModelManager.offload_plan) asked before and after building.

The straight load must give the module a whole load followed by offloading gives (same outputs,
LoRAs included), and must never hold the whole weight set: every tensor read from the file is
tracked until its memory is freed, so a regression to "build whole, then page out" shows its peak.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_flux
from engine.context import Environment, Paths
from node_call import call
from nodes import split_loaders
from nodes.checkpoint import flux_blocks
from nodes.checkpoint.load import load_checkpoint
from nodes.checkpoint.split import load_unet_file
from nodes.checkpoint.tensors import LazyState
from nodes.runtime import offload
from nodes.runtime.measure import module_bytes
from nodes.runtime.models import ModelManager
from test_flux_lora import flux_lora_root  # noqa: F401 (a fixture)
from test_offload import FLUX, PIXEL_TOL, _decode, _env, _img2img, whole  # noqa: F401 (a fixture)

DEEP = "deep-flux.safetensors"


def _disk(n: int = 0, besides: int = 0) -> offload.Plan:
    return offload.Plan(onload="cpu", rest="disk", note="test: paged")


@pytest.fixture(scope="module")
def deep_root(tmp_path_factory) -> Path:
    """A tiny FLUX with 2 double and 4 single blocks (so one block is a small share of the weights), saved
    in the BFL layout in fp32, in bf16 and with fp8 linear weights, and as an all-in-one checkpoint."""
    from diffusers import FluxTransformer2DModel

    from nodes.checkpoint.flux_keys import diffusers_to_bfl

    root = tmp_path_factory.mktemp("deep-flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                     attention_head_dim=tiny_flux.HEAD_DIM, num_attention_heads=tiny_flux.HEADS,
                                     joint_attention_dim=tiny_flux.TEXT, pooled_projection_dim=tiny_flux.TEXT,
                                     guidance_embeds=True, axes_dims_rope=tiny_flux.AXES)
        for p in net.parameters():
            p.data.normal_(0, 0.05)
    bfl = diffusers_to_bfl(net.state_dict())
    tiny_flux._save(root / "diffusion_models" / DEEP, bfl)
    tiny_flux._save(root / "diffusion_models" / "deep-flux-fp8.safetensors",
                    {"model.diffusion_model." + k: v for k, v in tiny_flux.to_fp8(bfl).items()})
    tiny_flux._save(root / "diffusion_models" / "deep-flux-bf16.safetensors",
                    {"model.diffusion_model." + k: v.bfloat16() for k, v in bfl.items()})
    aio = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in tiny_flux.clip_l_state().items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in tiny_flux.t5_state().items()})
    aio.update({"vae." + k: v for k, v in tiny_flux.vae_state().items()})
    tiny_flux._save(root / "checkpoints" / "deep-flux-aio.safetensors", aio)
    tiny_flux._save(root / "diffusion_models" / "deep-flux-diffusers.safetensors", net.state_dict())
    return root


class _Alive:
    """Every tensor read from a file (LazyState), counted by its storage until that memory is freed."""

    def __init__(self) -> None:
        self.now = self.peak = self.total = 0
        self.seen: set[int] = set()

    def record(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        if storage.data_ptr() in self.seen:
            return
        size = storage.nbytes()
        self.seen.add(storage.data_ptr())
        self.now += size
        self.total += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, storage.data_ptr(), size)

    def _freed(self, ptr: int, size: int) -> None:
        self.now -= size
        self.seen.discard(ptr)


@pytest.fixture()
def alive(monkeypatch) -> _Alive:
    meter = _Alive()
    read = LazyState.__getitem__

    def recorded(self, key):
        t = read(self, key)
        meter.record(t)
        return t

    monkeypatch.setattr(LazyState, "__getitem__", recorded)
    return meter


@pytest.fixture()
def phase(alive, monkeypatch) -> list[int]:
    """The meter's peak while each paged denoiser itself is built (one entry per build)."""
    from nodes.checkpoint import paged as paged_module

    build, peaks = paged_module.build_paged, []

    def measured(*args, **kwargs):
        alive.peak = start = alive.now
        out = build(*args, **kwargs)
        peaks.append(alive.peak - start)
        return out

    monkeypatch.setattr(paged_module, "build_paged", measured)
    return peaks


def _block_bytes(path: Path) -> tuple[int, int]:
    """(bytes outside the blocks, bytes of the largest block) of a BFL file, from its header."""
    state = flux_blocks.strip_prefix(LazyState.open(path), "model.diffusion_model.") \
        if any(k.startswith("model.diffusion_model.") for k in LazyState.open(path)) else LazyState.open(path)
    held = {}
    for key, shape in state.shapes().items():
        parts = key.split(".")
        owner = ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else ""
        held[owner] = held.get(owner, 0) + 4 * int(torch.Size(shape).numel())
    return held.pop(""), max(held.values())


def test_loading_straight_into_blocks_never_holds_the_whole_weight_set(deep_root, alive):
    path = deep_root / "diffusion_models" / DEEP
    top, largest = _block_bytes(path)
    whole = load_unet_file(path, torch.float32).modules["unet"]
    whole_peak, total = alive.peak, alive.total
    assert whole_peak >= 0.95 * total  # the meter sees a whole load hold everything: it can fail
    alive.peak = alive.now  # what the whole model still holds is not the next load's
    before = alive.now
    paged = load_unet_file(path, torch.float32, offload=_disk).modules["unet"]
    assert alive.peak - before <= top + largest, (alive.peak - before, top, largest, total)
    assert alive.peak - before < 0.4 * total
    assert alive.now - before <= top  # afterwards only the parts outside the blocks are held
    info = offload.offloaded(paged)
    assert info is not None and info.paged and info.note == "test: paged"
    assert paged.single_transformer_blocks[3]._diffusers_hook.get_hook("group_offloading") is not None
    assert len(list(Path(info.folder).glob("*.safetensors"))) == 2 + 4 + 1  # the blocks and the rest
    assert (tiny_flux.forward(paged) - tiny_flux.forward(whole)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,fp8", [(DEEP, ""), ("deep-flux-fp8.safetensors", ""),
                                      (DEEP, "float8_e4m3fn"), ("deep-flux-bf16.safetensors", "")])
def test_the_size_asked_before_building_is_the_built_models_and_fp8_stays_fp8(deep_root, name, fp8):
    path = deep_root / "diffusion_models" / name
    whole = load_unet_file(path, torch.float32, fp8=fp8).modules["unet"]
    state = LazyState.open(path)
    state = flux_blocks.strip_prefix(state, "model.diffusion_model.") if name != DEEP else state
    assert flux_blocks.held_bytes(state, torch.float32, fp8) == module_bytes(whole)
    asked = []
    paged = load_unet_file(path, torch.float32, fp8=fp8, offload=lambda n, b: asked.append((n, b)) or _disk())
    paged = paged.modules["unet"]
    assert asked == [(module_bytes(whole), 0)]
    stored = {n: p.dtype for n, p in paged.named_parameters()}
    assert stored == {n: p.dtype for n, p in whole.named_parameters()}
    if name != DEEP or fp8:  # kept as stored (bf16 too: narrower than the fp32 compute dtype)
        assert stored["transformer_blocks.0.attn.to_q.weight"] == (torch.bfloat16 if "bf16" in name
                                                                   else torch.float8_e4m3fn)
    assert (tiny_flux.forward(paged) - tiny_flux.forward(whole)).abs().max() <= 1e-5


def test_a_single_file_flux_checkpoint_loads_its_transformer_straight_into_blocks(deep_root):
    path = deep_root / "checkpoints" / "deep-flux-aio.safetensors"
    whole = load_checkpoint(path, torch.float32)
    asked = []
    paged = load_checkpoint(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk())
    # the encoders and VAE as the file holds them (fp32, the compute dtype here): what the load also holds
    besides = sum(t.numel() * 4 for part in (tiny_flux.clip_l_state(), tiny_flux.t5_state(), tiny_flux.vae_state())
                  for t in part.values())
    assert asked == [(module_bytes(whole.modules["unet"]), besides)]
    assert offload.offloaded(paged.modules["unet"]).paged
    assert (tiny_flux.forward(paged.modules["unet"]) - tiny_flux.forward(whole.modules["unet"])).abs().max() <= 1e-5
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(paged.modules["text_encoder_2"](ids)[0], whole.modules["text_encoder_2"](ids)[0])


def test_unet_loader_on_a_short_host_builds_into_blocks_and_equals_the_whole_model(flux_lora_root, tmp_path, whole):
    env = _env(flux_lora_root, tmp_path, "data", cpu_budget_bytes=1 << 20)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    net = model.peek()  # loaded, not used yet: already paged, so it was built so
    info = offload.offloaded(net)
    assert info is not None and info.paged and "does not fit" in info.note
    assert env.models.counters["block_offloads"] == 1 and env.models.stats()["bytes"] == 0
    ours = _img2img(env, model)
    assert (ours - whole["plain"]).abs().max() <= 1e-5
    assert (_decode(ours) - _decode(whole["plain"])).abs().max() <= PIXEL_TOL
    with_lora = _img2img(env, model, lora_name="flux-bfl.safetensors")
    assert (with_lora - whole["lora"]).abs().max() <= 1e-5
    assert (with_lora - whole["plain"]).abs().max() > 1e-3
    assert env.models.counters["block_offloads"] == 1


def test_the_gpu_rule_decides_before_evicting_anything(flux_lora_root):
    """Without a GPU: a 'device' module is one on the meta device (not the CPU), and the device budget
    is faked. The denoiser does not fit even with the idle module evicted, so it goes block by block
    and the idle module stays where it is (moving a meta module to the CPU would raise)."""
    manager = ModelManager(device="cuda", device_budget_bytes=0)
    with torch.device("meta"):
        idle = torch.nn.Linear(16, 16)
    manager.acquire(("idle",), lambda m: {"vae": idle})
    env = Environment(paths=Paths.under(flux_lora_root / "unused", models=flux_lora_root), models=manager)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    size = module_bytes(model.peek())
    assert size > 2 * module_bytes(idle)
    manager.device_budget_bytes = size - 1  # free: size - 1 - idle; with the idle module evicted: size - 1
    assert manager.offload_plan(size - 1) is None  # fits once the idle module leaves: placed whole
    assert manager.offload_plan(size).rest == "cpu"
    assert manager.counters["offloads"] == 0  # deciding moved nothing
    with model.unet() as net:
        info = offload.offloaded(net)
        assert info.rest == "cpu" and "does not fit" in info.note
    assert idle.weight.device.type == "meta" and manager.counters["offloads"] == 0
    assert manager.counters["block_offloads"] == 1


def test_a_family_wrapper_exposes_its_network_for_the_placement(flux_lora_root, tmp_path):
    from nodes.families import flux

    env = _env(flux_lora_root, tmp_path, "data", offload_mode="on")
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    net = model.peek()
    wrapped = flux.FAMILY.wrap_network(net)
    assert wrapped.kiln_network is net and offload.offloaded(wrapped) is net.kiln_offload
    assert offload.compute_device(wrapped) == torch.device("cpu")


def test_a_bad_file_fails_before_any_block_is_written(deep_root, tmp_path):
    from nodes.checkpoint.flux_load import load_transformer_file
    from nodes.checkpoint.load import CheckpointError

    good = LazyState.open(deep_root / "diffusion_models" / DEEP).materialise()
    plan = offload.Plan(onload="cpu", rest="disk", note="test", folder_root=str(tmp_path))
    wrong = dict(good, **{"single_blocks.3.linear2.weight": torch.zeros(64, 100)})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*single_blocks\.3\.linear2\.weight.*\(64, 100\)"):
        load_transformer_file(wrong, "bad.safetensors", torch.float32, offload=lambda n, b: plan)
    lacking = {k: v for k, v in good.items() if k != "double_blocks.1.txt_mlp.0.bias"}
    with pytest.raises(CheckpointError, match=r"lacking\.safetensors.*missing.*double_blocks\.1\.txt_mlp\.0\.bias"):
        load_transformer_file(lacking, "lacking.safetensors", torch.float32, offload=lambda n, b: plan)
    assert list(tmp_path.iterdir()) == []  # no block folder was made


def _unet_forward(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False, **extra)[0]


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_an_sd_checkpoints_unet_loads_straight_into_blocks_and_equals_the_whole_load(tiny_models_dir, variant,
                                                                                       alive, phase):
    import tiny_models

    path = Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name(variant)
    whole = load_checkpoint(path, torch.float32)
    unet_bytes = module_bytes(whole.modules["unet"])
    besides = sum(module_bytes(m) for name, m in whole.modules.items() if name != "unet")
    whole_peak = alive.peak
    alive.peak = before = alive.now
    asked = []
    paged = load_checkpoint(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk())
    assert asked[0][0] == unet_bytes and 0.5 * besides < asked[0][1] <= 1.5 * besides
    unet = paged.modules["unet"]
    info = offload.offloaded(unet)
    assert info is not None and info.paged
    assert unet.down_blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    # the meter saw the whole load hold the UNet beside the rest; the straight load held the rest and at
    # most part of the UNet at once (its blocks went to disk as they were read)
    assert whole_peak >= besides + 0.9 * unet_bytes
    assert alive.peak - before < besides + unet_bytes // 2, (alive.peak - before, besides, unet_bytes)
    # building the UNet held at most its parts outside the blocks and one block (a whole build: all of it)
    sizes = [module_bytes(block) for _, _, block in offload.blocks(whole.modules["unet"])]
    assert phase[0] <= unet_bytes - sum(sizes) + max(sizes), (phase, unet_bytes, sizes)
    assert phase[0] < 0.8 * unet_bytes
    assert (_unet_forward(unet) - _unet_forward(whole.modules["unet"])).abs().max() <= 1e-5


@pytest.mark.parametrize("straight", [True, False], ids=["straight", "built-whole"])
def test_an_sd_unets_mid_block_is_paged_block_by_block_not_held_through_the_forward(tiny_models_dir, straight):
    """The mid block is no list entry of the UNet; left to diffusers it would join the group of everything
    outside the blocks, which stays in memory for the whole forward. Its own lists are paged instead."""
    import tiny_models

    path = Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sdxl")
    whole = load_checkpoint(path, torch.float32).modules["unet"]
    if straight:
        unet = load_checkpoint(path, torch.float32, offload=lambda n, b: _disk()).modules["unet"]
    else:
        unet = load_checkpoint(path, torch.float32).modules["unet"]
        offload.offload_blocks(unet, "cpu", "disk", "test: paged")
    assert offload.nested(unet) == ["mid_block"]
    always = unet._diffusers_hook.get_hook("group_offloading").group.modules  # brought in for the whole forward
    assert not any(m is unet.mid_block or m in list(unet.mid_block.modules()) for m in always)
    mid = [(name, i) for name, i, _ in offload.blocks(unet) if name.startswith("mid_block.")]
    assert ("mid_block.attentions", 0) in mid and ("mid_block.resnets", 1) in mid
    files = {p.name for p in Path(offload.offloaded(unet).folder).iterdir()}
    for block in (unet.mid_block.attentions[0], unet.mid_block.resnets[0]):
        group = block._diffusers_hook.get_hook("group_offloading").group
        assert group.modules == [block] and Path(group.safetensors_file_path).name in files
    assert (_unet_forward(unet) - _unet_forward(whole)).abs().max() <= 1e-5


def test_an_sd_unet_file_loads_straight_into_blocks(tiny_models_dir, tmp_path):
    """UNETLoader's SD path (an original-layout UNet alone, ComfyUI's diffusion_models file)."""
    import tiny_models

    full = LazyState.open(Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1"))
    path = tiny_flux._save(tmp_path / "sd1-unet.safetensors",
                           {k: full[k] for k in full if k.startswith("model.diffusion_model.")})
    whole = load_unet_file(path, torch.float32).modules["unet"]
    asked = []
    paged = load_unet_file(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk()).modules["unet"]
    assert asked == [(module_bytes(whole), 0)] and offload.offloaded(paged).paged
    assert (_unet_forward(paged) - _unet_forward(whole)).abs().max() <= 1e-5


def test_a_diffusers_layout_flux_file_loads_straight_into_blocks_with_no_conversion(deep_root, alive):
    """A FLUX transformer saved with diffusers' names in one file: the same path (paged.own_rows)."""
    path = deep_root / "diffusion_models" / "deep-flux-diffusers.safetensors"
    whole = load_unet_file(path, torch.float32).modules["unet"]
    assert alive.peak >= 0.95 * alive.total  # the whole load held everything: the meter can fail
    sizes = [module_bytes(block) for _, _, block in offload.blocks(whole)]
    top = module_bytes(whole) - sum(sizes)
    alive.peak = before = alive.now
    asked = []
    paged = load_unet_file(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk()).modules["unet"]
    assert asked == [(module_bytes(whole), 0)]
    assert offload.offloaded(paged).paged
    assert alive.peak - before <= top + max(sizes), (alive.peak - before, top, sizes)
    assert alive.peak - before < 0.4 * module_bytes(whole)
    assert (tiny_flux.forward(paged) - tiny_flux.forward(whole)).abs().max() <= 1e-5


def test_an_sd1_diffusers_folders_unet_loads_straight_into_blocks(tiny_models_dir, alive, phase):
    """A diffusers folder's unet/ (the module's own names): the same path, no conversion; the UNet is
    asked last, with the bytes of the folder's other components beside it."""
    import tiny_models
    path = Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1", "diffusers")
    whole = load_checkpoint(path, torch.float32)
    unet_bytes = module_bytes(whole.modules["unet"])
    besides = sum(module_bytes(m) for name, m in whole.modules.items() if name != "unet")
    asked = []
    paged = load_checkpoint(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk())
    assert asked == [(unet_bytes, besides)]
    unet = paged.modules["unet"]
    assert offload.offloaded(unet).paged and offload.offloaded(whole.modules["unet"]) is None
    sizes = [module_bytes(block) for _, _, block in offload.blocks(whole.modules["unet"])]
    assert len(phase) == 1 and phase[0] <= unet_bytes - sum(sizes) + max(sizes), (phase, unet_bytes, sizes)
    assert phase[0] < 0.8 * unet_bytes
    assert (_unet_forward(unet) - _unet_forward(whole.modules["unet"])).abs().max() <= 1e-5


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_a_sharded_flux_diffusers_folder_loads_its_transformer_straight_into_blocks(tmp_path, alive, phase, storage):
    """A FLUX pipeline folder whose transformer/ is sharded (index json + several files, as on the hub, in
    bf16 there: its linear weights stay bf16, and the size asked before reading is what they hold)."""
    import shutil

    from diffusers import FluxTransformer2DModel

    folder = tiny_flux.save_diffusers("dev", tmp_path / "flux-diffusers")
    net = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).to(storage)
    shutil.rmtree(folder / "transformer")
    net.save_pretrained(str(folder / "transformer"), safe_serialization=True, max_shard_size="200KB")
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 2  # really sharded
    whole = load_checkpoint(folder, torch.float32)
    assert whole.modules["unet"].transformer_blocks[0].attn.to_q.weight.dtype == storage
    unet_bytes = module_bytes(whole.modules["unet"])
    besides = sum(module_bytes(m) for name, m in whole.modules.items() if name != "unet")
    sizes = [module_bytes(block) for _, _, block in offload.blocks(whole.modules["unet"])]
    asked = []
    paged = load_checkpoint(folder, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk())
    assert asked == [(unet_bytes, besides)]
    unet = paged.modules["unet"]
    assert offload.offloaded(unet).paged and offload.offloaded(whole.modules["unet"]) is None
    assert len(phase) == 1 and phase[0] <= unet_bytes - sum(sizes) + max(sizes), (phase, unet_bytes, sizes)
    assert unet.transformer_blocks[0].attn.to_q.weight.dtype == storage
    assert (tiny_flux.forward(unet) - tiny_flux.forward(whole.modules["unet"])).abs().max() <= 1e-5


def test_a_bad_diffusers_folder_fails_by_name_before_any_block_is_written(tiny_models_dir, tmp_path):
    import shutil

    import tiny_models
    from safetensors.torch import save_file

    from nodes.checkpoint.load import CheckpointError

    folder = tmp_path / "bad-sd1"
    shutil.copytree(Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1", "diffusers"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = LazyState.open(weights).materialise()
    save_file({k: v for k, v in state.items() if k != "up_blocks.1.resnets.0.conv2.bias"}, str(weights))
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    plan = offload.Plan(onload="cpu", rest="disk", note="test", folder_root=str(blocks))
    with pytest.raises(CheckpointError, match=r"bad-sd1/unet.*missing.*up_blocks\.1\.resnets\.0\.conv2\.bias"):
        load_checkpoint(folder, torch.float32, offload=lambda n, b: plan)
    assert list(blocks.iterdir()) == []  # no block folder was made
