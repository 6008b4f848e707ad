"""A denoiser placed block by block goes back whole once it fits again (ModelManager._fit_denoiser).

The model manager asks its one offload rule (``offload_plan``) at every use of the denoiser, not only
at its first: when memory was short at load (a small CPU RAM budget here, or a faked GPU budget) the
model is paged, and when memory has been freed since (the budget raised, another model unloaded to
make room for a third, idle modules that can leave the device) the next job runs it whole. Each test
checks the switch really happened (hooks gone, block files deleted, layer classes restored, bytes
counted in RAM again) and that results equal the never-offloaded model's, LoRAs included.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_flux

from engine.context import Environment, Paths
from node_call import call
from nodes import lora, split_loaders
from nodes.runtime import offload
from nodes.runtime.measure import module_bytes
from nodes.runtime.models import ModelManager
from test_flux_lora import flux_lora_root  # noqa: F401 (a fixture)
from test_offload import FLUX, _env, _img2img, _sd1_job, _write_sd1_conv_loras, whole  # noqa: F401 (a fixture)
from test_offload_load import DEEP, deep_root  # noqa: F401 (a fixture)

LORA = "flux-bfl.safetensors"


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _is_whole(net: torch.nn.Module) -> bool:
    """No trace of the offloading left: no placement, no diffusers hook, no run-time patched layer class,
    no forward bound on an instance."""
    return (offload.offloaded(net) is None and not any(hasattr(m, "_diffusers_hook") for m in net.modules())
            and not any(type(m).__name__.startswith("Cast") for m in net.modules())
            and not any("forward" in vars(m) for m in net.modules()))


def _blob(nbytes: int) -> torch.nn.Module:
    """A stand-in for another model's module holding ``nbytes`` of weights."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(nbytes // 4))
    return module


def test_a_flux_model_paged_on_a_short_host_runs_whole_once_the_budget_grows(flux_lora_root, tmp_path, whole):
    env = _env(flux_lora_root, tmp_path, "data", cpu_budget_bytes=1 << 20)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    net = model.peek()
    info = offload.offloaded(net)
    assert info is not None and info.paged and Path(info.folder).is_dir()
    (lora_model,) = call(lora.lora_loader_model_only, env, model=model, lora_name=LORA, strength_model=1.0)
    # the LoRA while paged (run beside the placeholders), as before
    assert (_img2img(env, lora_model) - whole["lora"]).abs().max() <= 1e-5
    assert offload.offloaded(model.peek()) is info and not env.models.counters.get("made_whole")  # still short
    assert env.models.stats()["bytes"] == 0

    env.models.cpu_budget_bytes = 1 << 34  # memory freed: the next job finds room for the whole model
    with_lora = _img2img(env, lora_model)  # the same LoRA'd handle, now patched into the whole weights in place
    net = model.peek()
    assert _is_whole(net) and env.models.counters["made_whole"] == 1
    assert not Path(info.folder).exists()  # the block files left with the placement
    assert info.folder not in Path("/proc/self/maps").read_text()  # and no weight still maps one (disk freed)
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert env.models.stats()["bytes"] == module_bytes(net)  # counted in RAM again
    assert (with_lora - whole["lora"]).abs().max() <= 1e-5
    assert (with_lora - whole["plain"]).abs().max() > 1e-3  # not vacuous: the LoRA counts
    after = _state(net)
    assert (_img2img(env, model) - whole["plain"]).abs().max() <= 1e-5
    reference = _env(flux_lora_root, tmp_path, "reference")  # never offloaded: the values read back are the file's
    (ref,) = call(split_loaders.unet_loader, reference, unet_name=FLUX)
    base = _state(ref.peek())
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)  # LoRA taken out exactly
    assert env.models.counters["block_offloads"] == 1 and env.models.counters["made_whole"] == 1


def test_a_model_paged_beside_another_runs_whole_once_that_one_was_unloaded(flux_lora_root, tmp_path, whole):
    """CPU host: the transformer fits the budget alone but not beside an idle model; loading a third
    model unloads that one (least recently used), and the next job runs the transformer whole."""
    probe = _env(flux_lora_root, tmp_path, "probe", offload_mode="on")
    size = module_bytes(call(split_loaders.unet_loader, probe, unet_name=FLUX)[0].peek())
    small = 4096
    budget = size + small + 1024
    env = _env(flux_lora_root, tmp_path, "data", cpu_budget_bytes=budget)
    env.models.acquire(("other",), lambda m: {"unet": _blob(budget - small + 64)})
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    assert offload.offloaded(model.peek()).paged  # short beside "other": built straight into blocks
    assert (_img2img(env, model) - whole["plain"]).abs().max() <= 1e-5
    assert offload.offloaded(model.peek()) is not None  # "other" still held: still paged
    env.models.acquire(("third",), lambda m: {"vae": _blob(small)})
    assert ("other",) not in env.models and ("third",) in env.models
    ours = _img2img(env, model)
    assert _is_whole(model.peek()) and env.models.counters["made_whole"] == 1
    assert (ours - whole["plain"]).abs().max() <= 1e-5
    assert sum(e["bytes"] for e in env.models.stats()["entries"]) <= budget


def test_the_placement_stays_while_another_job_runs_the_model(flux_lora_root, tmp_path):
    env = _env(flux_lora_root, tmp_path, "data", cpu_budget_bytes=1 << 20)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    with model.unet() as running:
        env.models.cpu_budget_bytes = 1 << 34
        with model.unet() as second:  # another lane: switching now would pull the weights from under the first
            assert second is running and offload.offloaded(second).paged
    assert not env.models.counters.get("made_whole")
    with model.unet() as net:
        assert _is_whole(net)
    env.models.offload_mode = "on"  # the rule again, the other way: forced block by block at the next use
    with model.unet() as net:
        assert offload.offloaded(net).paged and any(Path(offload.offloaded(net).folder).iterdir())
        again = offload.offloaded(net).folder
    assert (env.models.counters["block_offloads"], env.models.counters["made_whole"]) == (2, 1)
    env.models.offload_mode = "auto"  # and back: whole, the second folder gone too
    with model.unet() as net:
        assert _is_whole(net) and not Path(again).exists() and env.models.counters["made_whole"] == 2


def test_forced_offloading_never_returns_whole(flux_lora_root, tmp_path):
    env = _env(flux_lora_root, tmp_path, "data", offload_mode="on", cpu_budget_bytes=1 << 34)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    for _ in range(2):
        with model.unet() as net:
            assert offload.offloaded(net).paged
    assert not env.models.counters.get("made_whole")


@pytest.mark.parametrize("name,stored", [("deep-flux-fp8.safetensors", torch.float8_e4m3fn),
                                         ("deep-flux-bf16.safetensors", torch.bfloat16)])
def test_linears_held_as_stored_stay_so_when_a_paged_model_returns_whole(deep_root, tmp_path, name, stored):
    """fp8 and bf16 linear weights are held as stored on this fp32 host (fp8.held_dtype), their layers
    CastLinear: back whole, they stay so, exactly as a whole load holds them."""
    from safetensors.torch import load_file

    from nodes.checkpoint.split import load_unet_file

    path = deep_root / "diffusion_models" / name
    if not path.exists():
        bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(deep_root / "diffusion_models" / DEEP).items()}
        tiny_flux._save(path, bf16)
    reference = load_unet_file(path, torch.float32).modules["unet"]
    env = _env(deep_root, tmp_path, "data", cpu_budget_bytes=1024)  # the file is small
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert offload.offloaded(model.peek()).paged
    env.models.cpu_budget_bytes = 1 << 34
    with model.unet() as net:
        assert offload.offloaded(net) is None and env.models.counters["made_whole"] == 1
        ours = tiny_flux.forward(net)
    q = net.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == stored and type(q).__name__ == "CastLinear"  # casts per call still
    assert type(net.norm_out.linear) is type(reference.norm_out.linear)
    assert [type(m) for m in net.modules()] == [type(m) for m in reference.modules()]
    base = reference.state_dict()

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    assert all(v.dtype == base[k].dtype and torch.equal(raw(v), raw(base[k])) for k, v in net.state_dict().items())
    assert (ours - tiny_flux.forward(reference)).abs().max() <= 1e-5


def test_an_sd1_unet_paged_with_a_conv_lora_runs_whole_with_it_after_the_budget_grows(tiny_models_dir, tmp_path):
    """Convolutions and norms go back to their torch classes (the LoRA then lands in the weights in
    place) and the whole UNet gives the never-offloaded UNet's latents, plain and with a LoCon."""
    import tiny_models
    from nodes.loaders import checkpoint_loader

    ckpt = tiny_models.checkpoint_name("sd1")
    ref_env = _env(tiny_models_dir, tmp_path, "whole")
    (ref, _, _) = call(checkpoint_loader, ref_env, ckpt_name=ckpt)
    _write_sd1_conv_loras(Path(tiny_models_dir) / "loras", ref.peek())
    expected = {"plain": _sd1_job(ref_env, ref), "lora": _sd1_job(ref_env, ref, "offload-locon.safetensors")}
    base = _state(ref.peek())

    env = _env(tiny_models_dir, tmp_path, "paged", cpu_budget_bytes=1 << 20)
    (model, _, _) = call(checkpoint_loader, env, ckpt_name=ckpt)
    (lora_model,) = call(lora.lora_loader_model_only, env, model=model, lora_name="offload-locon.safetensors",
                         strength_model=0.8)  # _sd1_job's strength
    assert (_sd1_job(env, lora_model) - expected["lora"]).abs().max() <= 1e-5
    unet = model.peek()
    assert offload.offloaded(unet).paged and type(unet.down_blocks[0].resnets[0].conv1).__name__ == "CastConv2d"
    env.models.cpu_budget_bytes = 1 << 34
    with_lora = _sd1_job(env, lora_model)  # the same LoRA'd handle across the switch
    assert _is_whole(unet) and type(unet.down_blocks[0].resnets[0].conv1) is torch.nn.Conv2d
    assert (with_lora - expected["lora"]).abs().max() <= 1e-5
    assert (with_lora - expected["plain"]).abs().max() > 1e-3
    assert (_sd1_job(env, model) - expected["plain"]).abs().max() <= 1e-5
    after = _state(unet)
    assert all(torch.equal(after[k], base[k]) for k in base)  # the base exactly, LoRA taken out


def test_the_compile_note_follows_the_placement_the_next_use_will_make(tiny_models_dir, tmp_path):
    """--compile on: a denoiser that stays paged runs eagerly (no note); once it fits, the next use
    makes it whole and compiles it, so the node says so beforehand. Nothing is run (no compile here)."""
    import tiny_models
    from nodes.loaders import checkpoint_loader

    env = _env(tiny_models_dir, tmp_path, "data", compile_mode="on", cpu_budget_bytes=1 << 20)
    (model, _, _) = call(checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    assert offload.offloaded(model.peek()).paged and model.compile_note() is None
    env.models.cpu_budget_bytes = 1 << 34
    note = model.compile_note()
    assert note and "compiling the denoiser" in note
    assert offload.offloaded(model.peek()).paged  # asking placed nothing


class _OnDevice(torch.nn.Linear):
    """An idle module "on the GPU" without a GPU: it lives on the meta device, and leaving it
    (ModelManager._make_room's ``.to("cpu")``) gives it empty CPU storage of the same size."""

    def to(self, *args, **kwargs):  # noqa: D102
        return self.to_empty(device=torch.device(*args))


def _moves_to_meta_for_cuda(net: torch.nn.Module) -> None:
    """The denoiser's own move to "cuda" lands on the meta device (shapes kept, values dropped);
    every other move (offloading's to the CPU) is the real one."""
    def to(*args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            return torch.nn.Module.to(net, "meta")
        return torch.nn.Module.to(net, *args, **kwargs)

    net.to = to


def test_on_a_gpu_an_offloaded_denoiser_returns_whole_when_evicting_idle_modules_makes_room(flux_lora_root):
    """The GPU rule without a GPU (as test_offload_load's): a faked device budget, modules on the
    meta device standing for modules on the GPU. Offloaded to CPU memory while short; whole on the
    device at the next use once the room, counting an idle module that can leave, holds it; and
    that module is then moved off the device to make the room."""
    manager = ModelManager(device="cuda", device_budget_bytes=1024)
    with torch.device("meta"):
        idle = _OnDevice(64, 64)
    manager.acquire(("idle",), lambda m: {"vae": idle})
    env = Environment(paths=Paths.under(flux_lora_root / "unused", models=flux_lora_root), models=manager)
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    _moves_to_meta_for_cuda(model.peek())
    with model.unet() as net:
        info = offload.offloaded(net)
        assert info is not None and info.rest == "cpu" and all(p.device.type == "cpu" for p in net.parameters())
    size, idle_bytes = module_bytes(net), module_bytes(idle)
    manager.device_budget_bytes = size - 1  # free size - 1 - idle; counting the idle module, size - 1: short
    with model.unet() as net:
        assert offload.offloaded(net) is info
    manager.device_budget_bytes = size + idle_bytes - 1  # room only once the idle module leaves
    assert manager.counters["offloads"] == 0 and not manager.counters.get("made_whole")
    with model.unet() as net:
        assert _is_whole(net) and all(p.device.type == "meta" for p in net.parameters())
    assert idle.weight.device.type == "cpu" and manager.counters["offloads"] == 1  # evicted to make the room
    assert manager.counters["made_whole"] == 1 and manager.counters["onloads"] == 1
    assert manager.counters["block_offloads"] == 1
