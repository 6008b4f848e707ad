"""The resource budget: a job that would allocate too much is refused before anything runs.

The declarations are the real nodes' (EmptyLatentImage, ImageResize); the checks
run through the real validation, the real CLI and a real server.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from engine import types as T
from engine.budget import Size, parse_bytes, parse_pixels
from engine.context import Environment, Paths
from engine.node import Input, Output, define_node
from engine.registry import default_registry
from engine.validate import OVER_BUDGET, WorkflowInvalid, validate
from engine.workflow import parse
from test_cli import kiln


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    env = Environment(paths=Paths.under(tmp_path))
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "input" / "photo.png")
    return env


def resize_job(width: int, height: int) -> dict:
    return {"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": width, "height": height}},
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0]}}}}


def latent_job(width: int, height: int, batch: int) -> dict:
    # EmptyLatentImage -> a pass-through consumer that is an output node: PreviewImage needs
    # an IMAGE, so decode-free: route the latent through nothing and pick it as the output.
    return {"version": 1, "nodes": {"1": {"type": "EmptyLatentImage",
                                          "inputs": {"width": width, "height": height, "batch_size": batch}}}}


def refusal(doc: dict, registry, env, outputs=None):
    with pytest.raises(WorkflowInvalid) as info:
        validate(parse(doc), registry, env, outputs)
    errors = [e for e in info.value.errors if e.type == OVER_BUDGET]
    assert errors, [str(e) for e in info.value.errors]
    return errors


def test_a_huge_resize_is_refused_naming_node_input_and_limit(registry, env):
    (e,) = refusal(resize_job(16384, 16384), registry, env)
    assert (e.node_id, e.node_type, e.input_name) == ("2", "ImageResize", "width")
    assert "16384x16384" in e.message and str(8192 * 8192) in e.message and "--max-image-pixels" in e.message
    assert e.extra["limit"] == 8192 * 8192
    # an ordinary size passes, and the limit is the setting's
    validate(parse(resize_job(1024, 768)), registry, env)
    env.settings.max_image_pixels = 1000 * 700
    (e,) = refusal(resize_job(1024, 768), registry, env)
    assert e.extra["limit"] == 700000


def test_a_latent_batch_over_the_memory_budget_names_the_batch_input(registry, env):
    env.settings.max_image_pixels = 16384 * 16384
    (e,) = refusal(latent_job(16384, 16384, 4096), registry, env, outputs=["1"])
    assert (e.node_id, e.node_type, e.input_name) == ("1", "EmptyLatentImage", "batch_size")
    assert "x 4096 images" in e.message and "--max-job-memory" in e.message
    # 16384^2/64 latent cells * 4 channels * 4 bytes * 4096 images
    assert "274.9 GB" in e.message or "256.0 GB" in e.message
    # a small budget refuses even a normal batch; the default (half the host's memory) does not
    validate(parse(latent_job(512, 512, 4)), registry, env, ["1"])
    env.settings.max_job_bytes = 64 * 1024
    (e,) = refusal(latent_job(512, 512, 4), registry, env, outputs=["1"])
    assert e.extra["limit"] == 64 * 1024


def test_sizes_follow_links_and_upscale_factors_multiply_them(registry, env):
    # A node that scales its input, declared the same way a library node would be.
    @define_node("TestScaleBy", inputs=[Input("image", T.IMAGE), Input("scale_by", T.FLOAT, default=2.0)],
                 outputs=[Output("IMAGE", T.IMAGE)], size=Size(scale="scale_by", like="image"))
    def scale_by(ctx, image, scale_by):
        raise AssertionError("validation must refuse before anything runs")

    registry.add(scale_by)
    try:
        doc = resize_job(2048, 2048)
        doc["nodes"]["4"] = {"type": "TestScaleBy", "inputs": {"image": ["2", 0], "scale_by": 8.0}}
        doc["nodes"]["3"]["inputs"]["images"] = ["4", 0]
        (e,) = refusal(doc, registry, env)
        assert (e.node_id, e.input_name) == ("4", "scale_by") and "16384x16384" in e.message
        doc["nodes"]["4"]["inputs"]["scale_by"] = 2.0
        validate(parse(doc), registry, env)
    finally:
        registry._specs.pop("TestScaleBy")


def test_a_size_declaration_must_name_real_inputs():
    with pytest.raises(ValueError, match="size names unknown input"):
        define_node("Bad", inputs=[Input("w", T.INT)], size=Size(width="width"))(lambda ctx, w: None)


def test_option_values_parse():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000
    assert parse_pixels("8192x4096") == 8192 * 4096 and parse_pixels("100") == 100
    for bad in ("-1G", "lots"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_kiln_validate_and_run_take_the_limits_as_options(tmp_path: Path):
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 48), (200, 40, 10)).save(tmp_path / "input" / "photo.png")
    (tmp_path / "job.json").write_text(json.dumps(resize_job(1024, 1024)))
    ok = kiln("validate", "job.json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = kiln("validate", "job.json", "--max-image-pixels", "512x512", cwd=tmp_path)
    assert refused.returncode == 2
    assert "over_budget" in refused.stderr and "node 2 (ImageResize), input 'width'" in refused.stderr
    assert "Traceback" not in refused.stderr
    run = kiln("run", "job.json", "--max-job-memory", "1M", cwd=tmp_path)
    assert run.returncode == 2 and "over the budget of 1.0 MB" in run.stderr
    assert not (tmp_path / "output").exists() or not list((tmp_path / "output").iterdir())


async def test_the_server_refuses_an_over_budget_job_with_400(aiohttp_client, tmp_path: Path, registry):
    from engine.server.app import make_app

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=registry)
    Image.new("RGB", (64, 48)).save(tmp_path / "data" / "input" / "photo.png")
    client = await aiohttp_client(app)
    r = await client.post("/api/jobs", json={"workflow": resize_job(16384, 16384)})
    assert r.status == 400
    (e,) = (await r.json())["errors"]
    assert (e["type"], e["node_id"], e["input_name"]) == (OVER_BUDGET, "2", "width")
    r = await client.post("/prompt", json={"prompt": parse(resize_job(16384, 16384)).to_api()})
    assert r.status == 400
    assert (await r.json())["node_errors"]["2"]["errors"][0]["type"] == OVER_BUDGET


def _graph(*nodes: tuple[str, dict]) -> dict:
    """A chain: node i takes node i-1's first output on the input named by its '<-' key."""
    out = {}
    for i, (node_type, inputs) in enumerate(nodes, start=1):
        inputs = dict(inputs)
        link = inputs.pop("<-", None)
        if link:
            inputs[link] = [str(i - 1), 0]
        out[str(i)] = {"type": node_type, "inputs": inputs}
    return {"version": 1, "nodes": out}


@pytest.mark.parametrize("node_type,inputs,input_name", [
    ("ImageScale", {"upscale_method": "bilinear", "width": 16384, "height": 16384, "crop": "disabled"}, "width"),
    ("ImageScaleBy", {"upscale_method": "bilinear", "scale_by": 8.0}, "scale_by"),
    ("ImageScaleToTotalPixels", {"upscale_method": "bilinear", "megapixels": 16.0}, "megapixels"),
    ("ImagePadForOutpaint", {"left": 0, "top": 0, "right": 0, "bottom": 16000, "feathering": 0}, "bottom"),
])
def test_every_image_sizing_node_is_checked_before_it_runs(registry, env, node_type, inputs, input_name):
    """The issue-11 nodes declare their sizes too: 64x48 made 16384 wide, 8x, 16 MP or 16000 taller
    are each over a limit of 500x300 pixels."""
    env.settings.max_image_pixels = 500 * 300
    (e,) = refusal(_graph(("LoadImage", {"image": "photo.png"}), (node_type, {"<-": "image", **inputs}),
                          ("SaveImage", {"<-": "images"})), registry, env)
    assert (e.node_id, e.node_type, e.input_name) == ("2", node_type, input_name)
    assert "--max-image-pixels" in e.message


def test_repeated_batches_multiply_and_latent_upscales_scale(registry, env):
    env.settings.max_job_bytes = 64 << 20  # 64 MB
    ok = _graph(("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
                ("RepeatLatentBatch", {"<-": "samples", "amount": 4}),
                ("LatentUpscaleBy", {"<-": "samples", "upscale_method": "bilinear", "scale_by": 2.0}))
    validate(parse(ok), registry, env, ["3"])
    ok["nodes"]["2"]["inputs"]["amount"] = 64  # 16 MB of 1024 px latents, then 64 MB more at 2048 px
    (e,) = refusal(ok, registry, env, outputs=["3"])
    assert (e.node_id, e.input_name) == ("3", "scale_by") and "x 64 images" in e.message


def test_load_image_size_comes_from_the_file_header(registry, env, tmp_path):
    """A huge input file is refused at validation, before a pixel is decoded."""
    Image.new("1", (9000, 8000)).save(tmp_path / "input" / "huge.png")  # 1 bit/px: small on disk
    env.settings.max_image_pixels = 8192 * 8192
    (e,) = refusal(_graph(("LoadImage", {"image": "huge.png"}), ("SaveImage", {"<-": "images"})), registry, env)
    assert (e.node_id, e.node_type) == ("1", "LoadImage") and "9000x8000" in e.message
    # the header's size is carried on: a resize of the 64x48 photo by 2 stays small
    validate(parse(_graph(("LoadImage", {"image": "photo.png"}),
                          ("ImageScaleBy", {"<-": "image", "upscale_method": "bilinear", "scale_by": 2.0}),
                          ("SaveImage", {"<-": "images"}))), registry, env)


def test_a_vae_decode_too_large_for_the_host_is_refused_and_the_tiled_node_passes(registry, env, tmp_path):
    """The VAE's full-resolution activations (measured, nodes/vae.py) count while it runs."""
    env.settings.max_job_bytes = 2 << 30  # 2 GB: a 2048^2 decode needs about 16 GB
    env.settings.max_image_pixels = 4096 * 4096
    doc = {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "any.safetensors"}},
        "2": {"type": "EmptyLatentImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1}},
        "3": {"type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"type": "SaveImage", "inputs": {"images": ["3", 0]}}}}
    (tmp_path / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "checkpoints" / "any.safetensors").write_bytes(b"")
    (e,) = refusal(doc, registry, env)
    assert (e.node_id, e.node_type) == ("3", "VAEDecode")
    assert "while this node runs" in e.message and "tiled node" in e.message
    doc["nodes"]["3"]["type"] = "VAEDecodeTiled"
    doc["nodes"]["3"]["inputs"].update({"tile_size": 512, "overlap": 64})
    try:
        validate(parse(doc), registry, env)
    except WorkflowInvalid as exc:  # the empty checkpoint may be refused; never for the budget
        assert not [err for err in exc.errors if err.type == OVER_BUDGET], [str(err) for err in exc.errors]
