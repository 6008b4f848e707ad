"""nodes.runtime.models on its own: model identity (file_key) and placement on a real GPU.

The loader tests (test_loaders.py) run the manager on the CPU with real
checkpoints; what only a GPU exercises, moving modules on and off the device,
pinning and LRU offload, is tested here with plain torch modules.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodes.runtime.models import ModelManager, file_key


def _bump_mtime(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_a_diffusers_folder_is_a_new_model_when_any_component_changes(tmp_path: Path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\0" * 64)
    first = file_key(folder, "checkpoint")
    assert file_key(folder, "checkpoint") == first
    assert file_key(folder, "vae") != first  # the kind is part of the identity
    (tmp_path / "link").symlink_to(folder)
    assert file_key(tmp_path / "link", "checkpoint") == first  # one copy whatever the name

    _bump_mtime(weights)  # a nested file touched: the folder's own mtime does not change
    touched = file_key(folder, "checkpoint")
    assert touched != first

    st = weights.stat()
    weights.write_bytes(b"\0" * 65)  # same mtime, different size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_key(folder, "checkpoint") != touched


cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_the_best_device_is_cuda_in_half_precision():
    import torch

    manager = ModelManager()
    assert (manager.device, manager.is_gpu, manager.dtype) == ("cuda", True, torch.float16)


@cuda
def test_modules_in_use_stay_pinned_and_idle_ones_leave_least_recently_used_first():
    import torch

    mods = {name: torch.nn.Linear(256, 256) for name in "abc"}
    size = sum(t.numel() * t.element_size() for t in mods["a"].parameters())
    manager = ModelManager(device_budget_bytes=int(size * 2.5))
    key = ("test", "abc", 0, 0)
    load = lambda m: mods  # noqa: E731

    with manager.use(key, "a", load) as a:
        with manager.use(key, "b", load) as b:
            assert a.weight.device.type == b.weight.device.type == "cuda"
            with manager.use(key, "c", load) as c:  # over budget, but a and b are in use: nothing moves
                assert {m.weight.device.type for m in (a, b, c)} == {"cuda"}
    assert manager.counters["offloads"] == 0
    assert manager.free() == 3 * size and all(m.weight.device.type == "cpu" for m in mods.values())

    with manager.use(key, "a", load):
        pass
    with manager.use(key, "b", load):
        pass
    # a and b idle on the device (a used longer ago); c needs room for one more
    with manager.use(key, "c", load) as c:
        assert c.weight.device.type == "cuda"
        assert mods["a"].weight.device.type == "cpu" and mods["b"].weight.device.type == "cuda"
    out = c(torch.ones(1, 256, device="cuda"))  # the module left on the device still computes there
    assert out.device.type == "cuda"
    stats = manager.stats()
    assert stats["entries"][0]["modules"]["b"]["device"].startswith("cuda")
    assert stats["entries"][0]["modules"]["a"]["device"] == "cpu"


def test_text_encoders_leave_the_device_after_use_only_when_memory_is_short():
    from nodes.runtime.models import leaves_after_use

    mib = 1 << 20
    # room for the denoiser and VAE still to come: the encoder stays for the next prompt
    assert not leaves_after_use("text_encoder", free_bytes=4000 * mib, pending_bytes=3500 * mib)
    assert not leaves_after_use("text_encoder_2", free_bytes=100 * mib, pending_bytes=0)
    # short: what comes next would not fit, or the activation reserve is already eaten into
    assert leaves_after_use("text_encoder", free_bytes=3000 * mib, pending_bytes=3500 * mib)
    assert leaves_after_use("text_encoder_2", free_bytes=-1, pending_bytes=0)
    # the denoiser and the VAE never leave on their own: they run again at once
    assert not leaves_after_use("unet", free_bytes=-1, pending_bytes=10 * mib)
    assert not leaves_after_use("vae", free_bytes=0, pending_bytes=10 * mib)


@cuda
def test_a_text_encoder_leaves_the_gpu_after_encoding_when_the_denoiser_would_not_fit():
    import torch

    mods = {"text_encoder": torch.nn.Linear(256, 256), "unet": torch.nn.Linear(512, 512)}
    te_size = sum(t.numel() * t.element_size() for t in mods["text_encoder"].parameters())
    key = ("test", "te", 0, 0)
    roomy = ModelManager(device_budget_bytes=te_size * 100)
    with roomy.use(key, "text_encoder", lambda m: mods):
        pass
    assert mods["text_encoder"].weight.device.type == "cuda"  # room for the UNet: it stays
    roomy.free()
    short = ModelManager(device_budget_bytes=te_size * 2)  # the UNet (4x the encoder) would not fit beside it
    with short.use(key, "text_encoder", lambda m: mods) as te:
        assert te.weight.device.type == "cuda"
    assert mods["text_encoder"].weight.device.type == "cpu" and short.counters["offloads"] == 1


def _encoder(width: int = 64) -> tuple:
    """(a module whose part ``tower`` is left to build on first use, as Krea 2's Qwen3-VL leaves its vision
    tower: nodes.runtime.deferred; the list its builder appends to at each build)."""
    import torch

    from nodes.runtime import deferred

    module = torch.nn.Module()
    module.body = torch.nn.Linear(width, width)
    built = []

    def build() -> torch.nn.Module:
        built.append(1)
        return torch.nn.Linear(width, 2 * width)

    deferred.defer(module, "tower", build)
    return module, built


def test_a_deferred_part_is_built_by_the_use_that_names_it_counted_and_placed_with_its_module():
    """A use without ``parts`` never builds the part; the first use naming it builds it once, its bytes join
    the entry's and it goes where the module sits (here the "meta" device, a stand-in for a GPU: placing
    moves a module there without copying data)."""
    import torch

    from nodes.runtime import deferred
    from nodes.runtime.measure import module_bytes

    module, built = _encoder()
    body = module_bytes(module)
    manager = ModelManager(device="meta", device_budget_bytes=1 << 30)
    key = ("test", "deferred", 0, 0)
    load = lambda m: {"enc": module}  # noqa: E731

    with manager.use(key, "enc", load) as enc:
        assert enc.body.weight.device.type == "meta" and enc.tower is None
    assert built == [] and manager.stats()["entries"][0]["bytes"] == body and deferred.pending(module) == ("tower",)

    with manager.use(key, "enc", load, parts=("tower",)) as enc:
        assert isinstance(enc.tower, torch.nn.Linear) and enc.tower.weight.device.type == "meta"
    tower = module_bytes(module.tower)
    assert tower > 0 and built == [1] and deferred.pending(module) == ()
    assert manager.stats()["entries"][0]["bytes"] == body + tower and manager.counters["parts"] == 1

    with manager.use(key, "enc", load, parts=("tower",)):
        pass
    assert built == [1] and manager.counters["parts"] == 1  # kept: built once
    assert manager.stats()["entries"][0]["modules"]["enc"]["bytes"] == body + tower


def test_a_deferred_part_is_built_on_the_cpu_where_its_module_is():
    from nodes.runtime import deferred

    module, built = _encoder()
    manager = ModelManager(device="cpu")
    with manager.use(("test", "cpu", 0, 0), "enc", lambda m: {"enc": module}, parts=("tower", "missing")) as enc:
        assert enc.tower.weight.device.type == "cpu" and enc.tower.weight.dtype == enc.body.weight.dtype
    assert built == [1] and manager.counters["onloads"] == 0
    assert not deferred.has_part(module, "missing") and deferred.build(module, "tower") is None


@cuda
def test_a_deferred_part_makes_room_on_the_gpu_and_leaves_with_its_module():
    import torch

    module, _ = _encoder(256)
    other = torch.nn.Linear(256, 512)
    size = sum(t.numel() * t.element_size() for t in module.body.parameters())
    manager = ModelManager(device_budget_bytes=int(size * 3.5))  # body + other, then the tower (2 bodies)
    key = ("test", "gpu", 0, 0)
    load = lambda m: {"enc": module, "other": other}  # noqa: E731
    with manager.use(key, "other", load):
        pass
    with manager.use(key, "enc", load):
        pass
    assert other.weight.device.type == module.body.weight.device.type == "cuda"
    with manager.use(key, "enc", load, parts=("tower",)) as enc:
        assert enc.tower.weight.device.type == "cuda"
        assert other.weight.device.type == "cpu"  # the idle module made room for the tower
    manager.free()
    assert module.body.weight.device.type == module.tower.weight.device.type == "cpu"
