"""Image nodes run through the real Executor on real files (no mocks).

Images are drawn in the tests; the URL tests serve them from a real HTTP server
on 127.0.0.1.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nodes.grid
import nodes.image
from engine.context import Environment, JobInfo
from engine.executor import Executor
from engine.registry import Registry
from engine.validate import WorkflowInvalid
from engine.workflow import parse
from nodes import image_io

import torch  # noqa: E402


@pytest.fixture
def registry() -> Registry:
    r = Registry()
    r.add_module(nodes.image)
    r.add_module(nodes.grid)
    return r


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def run(registry, env, nodes_doc, executor=None, **kwargs):
    ex = executor or Executor(registry, env)
    events = []
    outcome = ex.run(parse({"version": 1, "nodes": nodes_doc}), on_event=events.append, **kwargs)
    outcome.events = events
    return outcome


def load_and_save(name, **load_inputs):
    return {
        "1": {"type": "LoadImage", "inputs": {"image": name, **load_inputs}},
        "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    }


def load_image(registry, env, name, **inputs):
    outcome = run(registry, env, load_and_save(name, **inputs))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["1"]


def halves(w, h, left, right, mode="RGB"):
    arr = np.zeros((h, w, len(mode)), dtype=np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2:] = right
    return Image.fromarray(arr, mode)


# -- LoadImage -----------------------------------------------------------------------

def test_load_image_takes_comfyui_annotated_names(registry, env):
    """ComfyUI's mask editor sets LoadImage to "clipspace/<file> [input]": Kiln loads the same file,
    and MASK is 1 where the painter made the picture transparent."""
    folder = Path(env.paths.input.root) / "clipspace"
    folder.mkdir(parents=True)
    im = Image.new("RGBA", (16, 8), (10, 20, 30, 255))
    im.paste((10, 20, 30, 0), (2, 1, 6, 5))
    im.save(folder / "clipspace-mask-1.png")
    out = load_image(registry, env, "clipspace/clipspace-mask-1.png [input]", background="none")
    mask = out[1][0].numpy()
    expected = np.zeros((8, 16), dtype=np.float32)
    expected[1:5, 2:6] = 1.0
    assert np.array_equal(mask, expected)
    assert np.allclose(out[0][0].numpy(), np.array([10, 20, 30]) / 255.0)
    with pytest.raises(WorkflowInvalid) as info:
        run(registry, env, load_and_save("clipspace/clipspace-mask-1.png [output]"))
    assert "output/clipspace/clipspace-mask-1.png" in info.value.errors[0].message, "looked in the output folder"

def test_exif_orientation_is_applied(registry, env):
    # Stored 40 wide x 20 high, red left / blue right; orientation 6 means "rotate 90
    # degrees clockwise to display", which puts the red half on top of a 20x40 image.
    im = halves(40, 20, (255, 0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(env.paths.input.root / "rotated.jpg", quality=95, exif=exif)
    pixels, mask = load_image(registry, env, "rotated.jpg")
    assert tuple(pixels.shape) == (1, 40, 20, 3)
    top, bottom = pixels[0, 5, 10], pixels[0, 35, 10]
    assert top[0] > 0.8 and top[2] < 0.2, top
    assert bottom[2] > 0.8 and bottom[0] < 0.2, bottom
    assert tuple(mask.shape) == (1, 64, 64) and float(mask.abs().sum()) == 0.0


def test_alpha_becomes_mask_and_is_flattened(registry, env):
    # Left half fully transparent (stored colour green), right half opaque blue.
    im = halves(16, 16, (0, 255, 0, 0), (0, 0, 255, 255), mode="RGBA")
    im.save(env.paths.input.root / "alpha.png")
    pixels, mask = load_image(registry, env, "alpha.png")
    assert tuple(pixels.shape) == (1, 16, 16, 3) and tuple(mask.shape) == (1, 16, 16)
    assert torch.allclose(mask[0, :, :8], torch.ones(16, 8)) and float(mask[0, :, 8:].sum()) == 0.0
    assert torch.allclose(pixels[0, :, :8], torch.ones(16, 8, 3))  # flattened onto white
    assert torch.allclose(pixels[0, :, 8:], torch.tensor([0.0, 0.0, 1.0]).expand(16, 8, 3))
    kept, _ = load_image(registry, env, "alpha.png", background="none")  # ComfyUI's behaviour
    assert torch.allclose(kept[0, :, :8], torch.tensor([0.0, 1.0, 0.0]).expand(16, 8, 3))


def test_palette_transparency_gives_a_mask(registry, env):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))
    im.info["transparency"] = 1
    im.save(env.paths.input.root / "pal.png", transparency=1)
    pixels, mask = load_image(registry, env, "pal.png", background="black")
    assert float(mask[0, :, :5].min()) == 1.0 and float(mask[0, :, 5:].max()) == 0.0
    assert float(pixels[0, :, :5].max()) == 0.0 and float(pixels[0, 0, 9, 0]) == 1.0


def _failure(registry, env, name):
    outcome = run(registry, env, load_and_save(name))
    assert outcome.status == "failed"
    err = outcome.error
    assert (err.node_id, err.node_type, err.input_name) == ("1", "LoadImage", "image")
    return err.message


def test_corrupt_truncated_tiny_and_oversize_files_are_clear_errors(registry, env):
    root = env.paths.input.root
    (root / "text.png").write_bytes(b"this is not an image at all")
    assert "not an image" in _failure(registry, env, "text.png")

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _failure(registry, env, "truncated.png")

    Image.new("RGB", (1, 1)).save(root / "dot.png")
    assert "1x1" in _failure(registry, env, "dot.png")

    # The pixel limit is checked from the header, at validation (the resource budget's
    # probe), before anything runs: a file whose pixel data is garbage is refused for
    # its size, not for its corruption.
    env.settings.max_image_pixels = 50 * 50
    (root / "bomb.png").write_bytes(data[:200])
    with pytest.raises(WorkflowInvalid) as info:
        run(registry, env, load_and_save("bomb.png"))
    (err,) = info.value.errors
    assert (err.node_id, err.node_type, err.input_name) == ("1", "LoadImage", "image")
    assert "64x64" in err.message and "limit of 2500" in err.message


def test_missing_file_and_escaping_paths_fail_validation(registry, env, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(outside)
    for name in ("missing.png", "../outside.png", str(outside)):
        with pytest.raises(WorkflowInvalid) as info:
            run(registry, env, load_and_save(name))
        (err,) = info.value.errors
        assert (err.node_id, err.node_type, err.input_name, err.type) == \
            ("1", "LoadImage", "image", "custom_validation_failed")
    # The CLI allows filesystem paths: then the same absolute path loads.
    env.settings.allow_absolute_paths = True
    pixels, _ = load_image(registry, env, str(outside))
    assert float(pixels[0, 0, 0, 0]) == pytest.approx(9 / 255)


def test_edited_file_reruns_and_touched_file_does_not(registry, env):
    path = env.paths.input.root / "edit.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    ex = Executor(registry, env)
    first = run(registry, env, load_and_save("edit.png"), executor=ex)
    assert first.executed == ["1", "2"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    again = run(registry, env, load_and_save("edit.png"), executor=ex)
    assert again.executed == [] and again.cached == ["2"]  # the output is cached; its input is not even needed
    Image.new("RGB", (16, 16), (200, 20, 30)).save(path)
    edited = run(registry, env, load_and_save("edit.png"), executor=ex)
    assert edited.executed == ["1", "2"]
    assert float(edited.results["1"][0][0, 0, 0, 0]) == pytest.approx(200 / 255)


# -- URLs ------------------------------------------------------------------------------

@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_images(registry, env, http_root):
    www, base = http_root
    Image.new("RGB", (24, 16), (0, 128, 255)).save(www / "pic.png")
    (www / "page.html").write_text("<html>not an image</html>")
    with pytest.raises(WorkflowInvalid, match="turned off"):
        run(registry, env, load_and_save(f"{base}/pic.png"))
    env.settings.allow_url_images = True
    env.settings.url_allow_hosts = ("127.0.0.1",)  # the test server is on loopback
    pixels, _ = load_image(registry, env, f"{base}/pic.png")
    assert tuple(pixels.shape) == (1, 16, 24, 3)
    assert "not an image" in _failure(registry, env, f"{base}/page.html")
    assert "HTTP 404" in _failure(registry, env, f"{base}/nothing.png")
    env.settings.url_max_bytes = 20
    Image.new("RGB", (24, 16), (1, 2, 3)).save(www / "big.png")
    assert "limit of 20 bytes" in _failure(registry, env, f"{base}/big.png")


# -- ImageResize -----------------------------------------------------------------------

def _resize(registry, env, **inputs):
    Image.fromarray(np.full((75, 100, 3), 255, dtype=np.uint8)).save(env.paths.input.root / "src.png")
    doc = {
        "1": {"type": "LoadImage", "inputs": {"image": "src.png"}},
        "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], **inputs}},
        "3": {"type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    outcome = run(registry, env, doc)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    image, w, h = outcome.results["2"]
    messages = [e.message for e in outcome.events if e.type == "node_message"]
    assert messages == outcome.outputs["2"]["text"]
    return image, w, h, messages[0], outcome


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_resize_modes_give_the_stated_size(registry, env, mode):
    image, w, h, message, _ = _resize(registry, env, width=64, height=64, mode=mode, pad_color="#ff0000")
    assert (w, h) == (64, 64) and tuple(image.shape) == (1, 64, 64, 3)
    assert message == f"100x75 -> 64x64 ({mode})"
    corner = image[0, 0, 32].tolist()
    if mode == "pad":  # 100x75 fits as 64x48: 8 rows of red padding above and below
        assert corner == [1.0, 0.0, 0.0]
        assert image[0, 8:56].min() > 0.99
    else:
        assert min(corner) > 0.99


def test_resize_rounds_to_multiples_and_says_so(registry, env):
    image, w, h, message, _ = _resize(registry, env, width=0, height=0, mode="stretch", multiple_of="64")
    assert (w, h) == (128, 64) and tuple(image.shape) == (1, 64, 128, 3)
    assert message == "100x75 -> 128x64 (stretch); 100x75 rounded to a multiple of 64"
    _, w, h, message, _ = _resize(registry, env, width=50, height=0, mode="crop", multiple_of="8")
    assert (w, h) == (48, 40) and "50x38 rounded to a multiple of 8" in message


@pytest.mark.parametrize("colour", ["reddish", "#fff", "ff0000", " #ff0000"])
def test_bad_pad_colour_fails_validation(registry, env, colour):
    """pad_color is read by the COLOR values' one rule (engine.types.parse_color): #rrggbb, nothing looser."""
    with pytest.raises(WorkflowInvalid) as info:
        _resize(registry, env, pad_color=colour, mode="pad")
    assert [(e.node_id, e.input_name) for e in info.value.errors] == [("2", "pad_color")]


# -- SaveImage / PreviewImage ----------------------------------------------------------

def _save_doc(prefix="Kiln"):
    return {
        "1": {"type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_save_names_count_up_atomically_and_pixels_round_trip(registry, env):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(env.paths.input.root / "in.png")
    out = env.paths.output.root
    Image.new("RGB", (8, 8)).save(out / "Kiln_00007_.png")  # an older file: the counter continues after it
    names = []
    for _ in range(2):
        outcome = run(registry, env, _save_doc(), force=True)
        names += [i["filename"] for i in outcome.outputs["2"]["images"]]
        assert outcome.outputs["2"]["images"][0]["type"] == "output"
    assert names == ["Kiln_00008_.png", "Kiln_00009_.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".kiln-")]  # no temp files left
    assert np.array_equal(np.asarray(Image.open(out / names[0])), arr)


def test_concurrent_saves_never_share_a_name(tmp_path):
    im = Image.new("RGB", (8, 8))
    names: list[str] = []

    def worker():
        for _ in range(5):
            names.append(image_io.write_png_atomic(im, tmp_path, "c", image_io.png_text({}), 1))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == [f"c_{i:05d}_.png" for i in range(1, 21)]


def test_save_embeds_both_workflow_formats_and_parameters(registry, env):
    Image.new("RGB", (16, 16)).save(env.paths.input.root / "in.png")
    wf = parse({"version": 1, "params": {"prefix": "2.filename_prefix"}, "nodes": _save_doc("sub/dir/Kiln")})
    job = JobInfo(id="j1", workflow=wf.to_api(), kiln_workflow=wf.to_kiln(),
                  extra_pnginfo={"workflow": {"nodes": [], "links": []}}, params={"1.image": "in.png"})
    outcome = Executor(registry, env).run(wf, job=job)
    (saved,) = outcome.outputs["2"]["images"]
    assert saved == {"filename": "Kiln_00001_.png", "subfolder": "sub/dir", "type": "output"}
    text = Image.open(env.paths.output.root / "sub" / "dir" / "Kiln_00001_.png").text
    assert json.loads(text["kiln_workflow"]) == wf.to_kiln()
    assert json.loads(text["prompt"]) == wf.to_api()
    assert parse(json.loads(text["prompt"])).nodes["2"].inputs["filename_prefix"] == "sub/dir/Kiln"
    assert json.loads(text["workflow"]) == {"nodes": [], "links": []}
    assert json.loads(text["parameters"]) == {"prefix": "sub/dir/Kiln", "1.image": "in.png"}

    env.settings.embed_workflow = False
    outcome = Executor(registry, env).run(wf, job=job)
    assert Image.open(env.paths.output.root / "sub" / "dir" / "Kiln_00002_.png").text == {}


@pytest.mark.parametrize("prefix", ["../escape", "/abs/Kiln", "sub/", "a/../../b"])
def test_prefix_must_stay_in_the_output_folder(registry, env, prefix):
    Image.new("RGB", (16, 16)).save(env.paths.input.root / "in.png")
    with pytest.raises(WorkflowInvalid) as info:
        run(registry, env, _save_doc(prefix))
    assert [(e.node_id, e.input_name) for e in info.value.errors] == [("2", "filename_prefix")]


def test_preview_goes_to_temp(registry, env):
    Image.new("RGB", (16, 16)).save(env.paths.input.root / "in.png")
    doc = {"1": {"type": "LoadImage", "inputs": {"image": "in.png"}},
           "2": {"type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    (item,) = run(registry, env, doc).outputs["2"]["images"]
    assert item["type"] == "temp" and (env.paths.temp.root / item["filename"]).is_file()
    assert not list(env.paths.output.root.iterdir())


def test_node_modules_do_not_import_torch_at_import_time():
    import subprocess
    import sys

    code = "import sys, nodes.image, nodes.grid; print('torch' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


def test_image_grid_places_every_image_under_its_label(registry, env):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 24), colour).save(env.paths.input.root / f"c{i}.png")
    doc = {str(i): {"type": "LoadImage", "inputs": {"image": f"c{i}.png"}} for i in range(3)}
    doc["9"] = {"type": "ImageGrid", "inputs": {"image1": ["0", 0], "image2": ["1", 0], "image4": ["2", 0],
                                                 "labels": "red\ngreen\n" + "a very long label " * 5, "columns": 2}}
    doc["10"] = {"type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    outcome = run(registry, env, doc)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    grid = outcome.results["9"][0]
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    h, w = int(grid.shape[1]), int(grid.shape[2])
    gap = 2
    assert w == 2 * 32 + 3 * gap  # two columns of 32 px cells
    assert h > 2 * 24 + 3 * gap  # two rows plus the label bands
    pixels = (grid[0].numpy() * 255).round().astype(int)
    band = (h - 3 * gap) // 2 - 24
    assert tuple(pixels[gap + 5, gap + 5]) == colours[0]
    assert tuple(pixels[gap + 5, 2 * gap + 32 + 5]) == colours[1]
    assert tuple(pixels[2 * gap + 24 + band + 5, gap + 5]) == colours[2]
    # labels are drawn (dark pixels) in the band under the first cell
    label_band = pixels[gap + 24: gap + 24 + band, gap: gap + 32]
    assert (label_band.sum(axis=-1) < 200).any()


def test_image_grid_without_labels_has_no_band(registry, env):
    Image.new("RGB", (16, 16), (10, 20, 30)).save(env.paths.input.root / "a.png")
    doc = {"1": {"type": "LoadImage", "inputs": {"image": "a.png"}},
           "2": {"type": "ImageGrid", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
           "3": {"type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    outcome = run(registry, env, doc)
    grid = outcome.results["2"][0]
    assert tuple(grid.shape) == (1, 16 + 2 * 2, 2 * 16 + 3 * 2, 3)


def test_every_node_family_registers_and_a_missing_one_fails(monkeypatch):
    """FAMILIES names exactly the modules that define nodes, and a wrong name is an error.

    A typo in FAMILIES (or a deleted family module) used to be skipped silently,
    so a whole family of nodes could vanish from the editor without a word.
    """
    import importlib
    import pkgutil

    import nodes
    from engine.node import NodeSpec

    defining = set()
    for info in pkgutil.iter_modules(nodes.__path__):
        module = importlib.import_module(f"nodes.{info.name}")
        if any(isinstance(v, NodeSpec) for v in vars(module).values()):
            defining.add(info.name)
    assert set(nodes.FAMILIES) == defining

    registry = Registry()
    nodes.register(registry)
    assert {"LoadImage", "VAEEncode", "KSampler", "CheckpointLoaderSimple", "CLIPTextEncode"} <= set(registry.names())

    monkeypatch.setattr(nodes, "FAMILIES", (*nodes.FAMILIES, "imgae"))
    with pytest.raises(ModuleNotFoundError, match="nodes.imgae"):
        nodes.register(Registry())


# -- LoadImageOutput -------------------------------------------------------------------

def test_load_image_output_reads_a_result_back_from_the_output_folder(registry, env):
    """A SaveImage result loads again by its name (plain or ComfyUI's "[output]" form), and the
    combo lists the output folder's images; a same-named input file is not what it reads, and a
    name leaving the folder is refused at validation."""
    halves(8, 8, (200, 0, 0), (0, 0, 200)).save(env.paths.output.root / "result.png")
    env.paths.input.root.mkdir(parents=True, exist_ok=True)
    halves(8, 8, (0, 200, 0), (0, 200, 0)).save(env.paths.input.root / "result.png")
    spec = registry.get("LoadImageOutput")
    assert "result.png [output]" in spec.inputs[0].choice_list(env)
    for name in ("result.png", "result.png [output]"):
        doc = {"1": {"type": "LoadImageOutput", "inputs": {"image": name}},
               "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "again"}}}
        outcome = run(registry, env, doc)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        pixels = outcome.results["1"][0]
        assert pixels.shape == (1, 8, 8, 3) and pixels[0, 0, 0, 0] > 0.7 and pixels[0, 0, 0, 1] < 0.1
    with pytest.raises(WorkflowInvalid) as err:
        run(registry, env, {"1": {"type": "LoadImageOutput", "inputs": {"image": "../escape.png"}},
                            "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})
    assert "inside the output folder" in str(err.value)
