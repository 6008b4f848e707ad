"""UpscaleModelLoader and ImageUpscaleWithModel on a small ESRGAN built with spandrel's own classes.

The network has random weights, is saved to .safetensors in a models folder and is
loaded through the node; its output must equal spandrel's own call on the same file.
Tiled runs are compared with the untiled result: blending the overlaps must bring it
closer than cutting tiles edge to edge.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.context import Environment, NodeError
from node_call import Called, call, environment_over
from nodes import upscale
from nodes.upscale_models import spandrel

REPO = Path(__file__).resolve().parent.parent


def make_esrgan(path: Path, scale: int = 2, seed: int = 0) -> Path:
    """A small ESRGAN (8 filters, 1 RRDB block) with random weights, saved as spandrel reads ESRGAN files."""
    from safetensors.torch import save_file

    spandrel()  # imports spandrel (with the torchvision stand-in where torchvision is absent)
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture
def env(tmp_path) -> Environment:
    yield from environment_over(None, tmp_path)


@pytest.fixture
def esrgan(env) -> Path:
    return make_esrgan(Path(env.paths.models.root) / "upscale_models" / "tiny-esrgan-2x.safetensors")


def reference(path: Path, image: torch.Tensor) -> torch.Tensor:
    """spandrel's own call: load the file with its ModelLoader and run the whole image."""
    descriptor = spandrel().ModelLoader().load_from_file(str(path)).eval()
    with torch.inference_mode():
        return descriptor(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)


def test_the_node_equals_spandrels_own_call(env, esrgan):
    rec = Called()
    (handle,) = call(upscale.upscale_model_loader, env, rec, model_name="tiny-esrgan-2x.safetensors")
    assert handle.scale == 2 and handle.architecture == "ESRGAN" and "ESRGAN, 2x" in rec.messages[0]
    assert upscale.upscale_model_loader.inputs[0].choice_list(env) == ["tiny-esrgan-2x.safetensors"]
    image = torch.rand(1, 20, 24, 3)
    (out,) = call(upscale.image_upscale_with_model, env, upscale_model=handle, image=image)
    expected = reference(esrgan, image)
    assert out.shape == (1, 40, 48, 3) and torch.allclose(out, expected, atol=1e-6)
    assert float(out.std()) > 0.01  # a picture, not a constant
    # loaded once by the model manager, however many nodes ask
    call(upscale.upscale_model_loader, env, model_name="tiny-esrgan-2x.safetensors")
    assert env.models.counters["loads"] == 1


def test_a_handle_uses_the_network_the_manager_holds_after_an_eviction(env, esrgan):
    """A cached handle outlives the manager's entry: after an unload the next use reloads the file and
    runs the reloaded network (on a GPU the evicted one is no longer on the device)."""
    (handle,) = call(upscale.upscale_model_loader, env, model_name="tiny-esrgan-2x.safetensors")
    with handle.module() as before:
        first = before.model
    env.models.unload_all(collect=False)
    image = torch.rand(1, 8, 8, 3)
    (out,) = call(upscale.image_upscale_with_model, env, upscale_model=handle, image=image)
    with handle.module() as after:
        assert after.model is not first
        assert all(p.device == torch.device(env.models.device) for p in after.model.parameters())
    assert env.models.counters["loads"] == 2 and torch.allclose(out, reference(esrgan, image), atol=1e-6)


def test_tiles_are_blended_towards_the_untiled_result(env, esrgan):
    (handle,) = call(upscale.upscale_model_loader, env, model_name="tiny-esrgan-2x.safetensors")
    torch.manual_seed(1)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 14), size=(48, 56), mode="bilinear").movedim(1, -1)
    whole = reference(esrgan, image)
    rec = Called()
    (blended,) = call(upscale.image_upscale_with_model, env, rec, upscale_model=handle, image=image, tile_size=32,
                      overlap=16)
    (cut,) = call(upscale.image_upscale_with_model, env, upscale_model=handle, image=image, tile_size=32, overlap=0)
    assert len(rec.progress) == 4 and blended.shape == whole.shape == (1, 96, 112, 3)
    err_blended, err_cut = (blended - whole).abs(), (cut - whole).abs()
    # Measured: mean 0.00012 / max 0.0051 blended (the overlap is capped at a quarter of the tile: 8 px)
    # against mean 0.00041 / max 0.022 cut edge to edge.
    assert float(err_blended.mean()) < 0.5 * float(err_cut.mean())
    assert float(err_blended.max()) < 0.5 * float(err_cut.max())


def test_alpha_is_kept_and_the_budget_holds(env, esrgan):
    (handle,) = call(upscale.upscale_model_loader, env, model_name="tiny-esrgan-2x.safetensors")
    rgba = torch.rand(1, 16, 16, 4)
    rgba[..., 3] = 1.0
    (out,) = call(upscale.image_upscale_with_model, env, upscale_model=handle, image=rgba)
    assert out.shape == (1, 32, 32, 4) and float(out[..., 3].min()) == 1.0
    assert torch.allclose(out[..., :3], reference(esrgan, rgba[..., :3]), atol=1e-6)
    env.settings.max_image_pixels = 1000
    with pytest.raises(NodeError, match="2x upscaled image would be 32x32 = 1024 pixels") as err:
        call(upscale.image_upscale_with_model, env, upscale_model=handle, image=rgba)
    assert err.value.input_name == "image"


def test_files_spandrel_cannot_read_are_clear_node_errors(env):
    from safetensors.torch import save_file

    folder = Path(env.paths.models.root) / "upscale_models"
    folder.mkdir(parents=True)
    (folder / "garbage.safetensors").write_bytes(b"this is not a model" * 10)
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(folder / "unknown.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("pickles can run code",))

    torch.save({"model": Evil()}, str(folder / "evil.pth"))
    cases = {"garbage.safetensors": "not a readable .safetensors file",
             "unknown.safetensors": "spandrel does not recognise the architecture of unknown.safetensors",
             "evil.pth": "needs arbitrary code to load"}
    for name, message in cases.items():
        with pytest.raises(NodeError, match=message) as err:
            call(upscale.upscale_model_loader, env, model_name=name)
        assert err.value.input_name == "model_name"
    problems = upscale.upscale_model_loader.validate(env, {"model_name": "missing.safetensors"})
    assert problems and problems[0][0] == "model_name" and "no model named" in problems[0][1]


def test_importing_spandrel_leaves_no_stand_in_behind():
    code = ("import importlib.util, sys; import nodes.upscale_models as u; u.spandrel(); "
            "print(importlib.util.find_spec('torchvision') is None, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    absent, leaked = out.stdout.split()
    assert leaked == "False" or absent == "False"  # a stand-in never outlives the import
