"""The content safety filter on a tiny random StableDiffusionSafetyChecker (tests/tiny_safety.py).

Node level: SafetyCheckerLoader reads the checker as a single file (the layout of
Stable Diffusion repositories) and as a diffusers folder; its flags equal diffusers'
``StableDiffusionPipeline.run_safety_checker`` on the same images; each mode of
SafetyFilter does what it says; foreign files and unknown modes are refused with
the node, input and reason. Guard level: with a guard installed, SaveImage,
PreviewImage and sampler previews are checked whatever the graph, and the result
is carried in the ui, the PNG text and the job's artifacts.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
import tiny_safety
from engine.context import Environment, NodeError, Paths
from engine.events import Preview, Progress
from engine.executor import Executor
from engine.guard import GuardRefused, artifacts
from engine.registry import default_registry
from engine.validate import WorkflowInvalid
from engine.workflow import parse
from node_call import Called, call
from nodes.runtime.models import ModelManager
from nodes.safety import safety_checker_loader, safety_filter
from nodes.safety.guard import build_guard
from nodes.safety.modes import blur_sigma

FILE, FOLDER = "tiny-checker.safetensors", "tiny-checker-diffusers"


@pytest.fixture(scope="module")
def safety_models(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("safety-models")
    tiny_safety.save_models(root)
    shutil.copy(tiny_models_dir / "checkpoints" / tiny_models.checkpoint_name("sd1"),
                root / "safety_checker" / "sd1-checkpoint.safetensors")
    return root


@pytest.fixture
def env(safety_models, tmp_path):
    env = Environment(paths=Paths.under(tmp_path / "data", models=safety_models), models=ModelManager(device="cpu"))
    tiny_safety.image_a().save(env.paths.input.root / "a.png")
    tiny_safety.image_b().save(env.paths.input.root / "b.png")
    yield env
    env.models.unload_all(collect=False)


def as_image(*images: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))


def noise_image(seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8), "RGB")


def load(env, name: str):
    return call(safety_checker_loader, env, checker_name=name)[0]


# -- the classifier ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [FILE, FOLDER])
def test_flags_equal_diffusers_run_safety_checker(env, name):
    from diffusers import StableDiffusionPipeline

    batch = [tiny_safety.image_a(), tiny_safety.image_b(), noise_image().resize((64, 64))]
    images = as_image(*batch)
    flags = load(env, name).flags(images)

    parts = dict(tiny_models.components("sd1"))
    pipe = StableDiffusionPipeline(**parts, safety_checker=tiny_safety.build_checker(),
                                   feature_extractor=tiny_safety.processor(), requires_safety_checker=True)
    decoded = images.permute(0, 3, 1, 2) * 2 - 1  # what the pipeline's VAE decode hands it
    _, expected = pipe.run_safety_checker(decoded.clone(), "cpu", torch.float32)
    assert flags == list(expected)
    assert flags == [True, False, True]  # the fixture's thresholds: everything but B


def test_the_single_file_and_the_folder_are_the_same_checker(env):
    a, b = load(env, FILE), load(env, FOLDER)
    with a.module() as ma, b.module() as mb:
        assert ma.config.vision_config.num_attention_heads == mb.config.vision_config.num_attention_heads == 2
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_folder_with_the_first_published_config_shape_loads(env, tmp_path):
    """The first safety_checker/config.json files gave only "vision_config_dict" (transformers reads it)."""
    folder = env.paths.models.root / "safety_checker" / "old-style"
    shutil.copytree(env.paths.models.root / "safety_checker" / FOLDER, folder, dirs_exist_ok=True)
    try:
        raw = json.loads((folder / "config.json").read_text())
        vision = raw.pop("vision_config")
        raw["vision_config_dict"] = {k: vision[k] for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
            "image_size")}
        raw.pop("text_config", None)
        (folder / "config.json").write_text(json.dumps(raw))
        images = as_image(tiny_safety.image_a(), tiny_safety.image_b())
        assert load(env, "old-style").flags(images) == load(env, FOLDER).flags(images) == [True, False]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("name,reason", [
    ("clip-text.safetensors", "not a StableDiffusionSafetyChecker"),
    ("clip-text-diffusers", "declares CLIPTextModel"),
    ("sd1-checkpoint.safetensors", "looks like a Stable Diffusion checkpoint"),
])
def test_a_checker_of_another_architecture_is_refused(env, name, reason):
    with pytest.raises(NodeError) as err:
        load(env, name)
    assert reason in str(err.value) and name in str(err.value)
    assert err.value.input_name == "checker_name"


def test_a_missing_checker_fails_validation_naming_node_and_input(env):
    wf = parse({"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"type": "SafetyCheckerLoader", "inputs": {"checker_name": "nope.safetensors"}},
        "3": {"type": "SafetyFilter", "inputs": {"images": ["1", 0], "safety_checker": ["2", 0], "mode": "smudge"}},
        "4": {"type": "SaveImage", "inputs": {"images": ["3", 0]}}}})
    with pytest.raises(WorkflowInvalid) as err:
        Executor(default_registry(), env).plan(wf)
    found = {(e.node_id, e.input_name) for e in err.value.errors}
    assert found == {("2", "checker_name"), ("3", "mode")}


# -- the modes --------------------------------------------------------------------------------

def high_frequency(image: torch.Tensor) -> float:
    """Mean absolute second difference [H,W,C]: detail, blind to smooth gradients."""
    return float((image[:, 2:] - 2 * image[:, 1:-1] + image[:, :-2]).abs().mean()
                 + (image[2:] - 2 * image[1:-1] + image[:-2]).abs().mean())


def test_each_mode_does_what_it_says(env):
    from scipy.ndimage import gaussian_filter

    checker = load(env, FILE)
    images = as_image(tiny_safety.image_a(), tiny_safety.image_b())
    results = {}
    for mode in ("flag", "blur", "black", "drop"):
        record = Called()
        out, flags = call(safety_filter, env, record, images=images.clone(), safety_checker=checker, mode=mode)
        results[mode] = out
        assert flags == [True, False] and record.ui["filtered"] == [True, False]
        assert record.messages and record.messages[0].startswith("safety filter: 1 of 2 image(s) flagged")
    assert torch.equal(results["flag"], images)
    assert torch.equal(results["black"][0], torch.zeros_like(images[0]))
    assert torch.equal(results["drop"], images[1:])
    for mode in ("blur", "black"):
        assert torch.equal(results[mode][1], images[1])  # the image that passed is untouched
    blurred, original = results["blur"][0], images[0]
    sigma = blur_sigma(64, 64)
    reference = np.stack([gaussian_filter(original[..., c].numpy(), sigma, mode="nearest", truncate=3.0)
                          for c in range(3)], axis=-1)
    assert np.abs(blurred.numpy() - reference).max() < 1e-4  # a Gaussian blur, checked against scipy's
    assert high_frequency(blurred) < high_frequency(original) / 10
    assert abs(float(blurred.mean() - original.mean())) < 0.02  # colours survive, detail does not


def test_drop_of_every_image_gives_an_empty_batch(env):
    checker = load(env, FILE)
    record = Called()
    out, flags = call(safety_filter, env, record, images=as_image(tiny_safety.image_a()), safety_checker=checker,
                      mode="drop")
    assert out.shape == (0, 64, 64, 3) and flags == [True]
    assert record.messages == ["safety filter: 1 of 1 image(s) flagged, dropped"]


def test_an_unknown_mode_is_refused_by_the_node(env):
    with pytest.raises(NodeError) as err:
        call(safety_filter, env, images=as_image(tiny_safety.image_b()), safety_checker=load(env, FILE),
             mode="smudge")
    assert err.value.input_name == "mode" and "flag, blur, black, drop" in str(err.value)


# -- the guard --------------------------------------------------------------------------------

def graph_without_filter(prefix: str = "kept") -> dict:
    return {"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix + "-a"}},
        "4": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix + "-b"}},
        "5": {"type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}


def read_png(env, entry) -> tuple[np.ndarray, dict]:
    root = env.paths.output if entry["type"] == "output" else env.paths.temp
    with Image.open(root.resolve(entry["filename"], entry["subfolder"])) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, dict(im.text)


def test_the_guard_blurs_what_any_output_node_saves_and_says_so(env):
    env.output_guard = build_guard(env, "blur", FILE)
    outcome = Executor(default_registry(), env).run(parse(graph_without_filter()))
    assert outcome.status == "succeeded", outcome.error
    a = np.asarray(tiny_safety.image_a(), dtype=np.float32) / 255.0
    b = np.asarray(tiny_safety.image_b(), dtype=np.float32) / 255.0
    for node_id, source, flagged in (("3", a, True), ("4", b, False), ("5", a, True)):
        [entry] = outcome.outputs[node_id]["images"]
        assert entry["filtered"] is flagged
        pixels, text = read_png(env, entry)
        assert json.loads(text["kiln_safety"]) == {"filtered": flagged, "mode": "blur", "checker": FILE}
        if flagged:
            assert high_frequency(torch.from_numpy(pixels)) < high_frequency(torch.from_numpy(source)) / 10
        else:
            assert np.array_equal(pixels, source)
    reasons = {(x["node_id"], x["finish_reason"]) for x in artifacts(outcome.outputs)}
    assert reasons == {("3", "FILTER"), ("4", "SUCCESS"), ("5", "FILTER")}


def test_the_guard_in_drop_mode_saves_no_flagged_file(env):
    env.output_guard = build_guard(env, "drop", FILE)
    outcome = Executor(default_registry(), env).run(parse(graph_without_filter("drop")))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["3"] == {"images": [], "dropped": [{"index": 0, "filtered": True}]}
    assert [e["filtered"] for e in outcome.outputs["4"]["images"]] == [False]
    assert sorted(p.name for p in env.paths.output.root.iterdir()) == ["drop-b_00001_.png"]
    assert not list(env.paths.temp.root.glob("*.png"))
    assert [x["finish_reason"] for x in artifacts({"3": outcome.outputs["3"]})] == ["FILTER"]


@pytest.mark.parametrize("mode,frames,filtered", [("blur", 2, True), ("drop", 1, False)])
def test_an_animation_is_guarded_frame_by_frame(env, mode, frames, filtered):
    """SaveAnimatedPNG passes its frames through the guard like SaveImage: blurred frames stamp the
    file filtered, dropped ones leave the animation and are listed."""
    env.output_guard = build_guard(env, mode, FILE)
    graph = {"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"type": "SaveAnimatedPNG", "inputs": {"images": ["3", 0], "filename_prefix": "anim", "fps": 6.0,
                                                    "compress_level": 4}}}}
    outcome = Executor(default_registry(), env).run(parse(graph))
    assert outcome.status == "succeeded", outcome.error
    [entry] = outcome.outputs["4"]["images"]
    assert entry["filtered"] is filtered
    with Image.open(env.paths.output.resolve(entry["filename"], entry["subfolder"])) as im:
        assert im.n_frames == frames
        assert json.loads(im.text["kiln_safety"])["filtered"] is filtered
    assert ("dropped" in outcome.outputs["4"]) is (mode == "drop")


def jpeg(image: Image.Image) -> Preview:
    import io

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return Preview(buf.getvalue(), "image/jpeg", image.width, image.height)


@pytest.mark.parametrize("mode", ["blur", "drop"])
def test_every_preview_passes_the_guard(env, mode):
    """The executor runs every progress preview through the guard: blurred or not sent."""
    from engine import types as T
    from engine.node import Input, Output, define_node
    from engine.registry import Registry

    frames = {"a": jpeg(tiny_safety.image_a()), "b": jpeg(tiny_safety.image_b())}

    @define_node("Previews", inputs=[Input("which", T.STRING)], outputs=[Output("x", T.STRING)], output_node=True)
    def previews(ctx, which):
        for i, name in enumerate(which.split(",")):
            ctx.progress(i + 1, 2, preview=frames[name])
        return (which,)

    registry = Registry()
    registry.add(previews)
    env.output_guard = build_guard(env, mode, FILE)
    env.output_guard.preview_share = 1.0  # check every one, however long checks take
    events = []
    Executor(registry, env).run(parse({"version": 1, "nodes": {"1": {"type": "Previews", "inputs": {
        "which": "a,b"}}}}), on_event=events.append)
    sent = [e.preview for e in events if isinstance(e, Progress)]
    assert len(sent) == 2
    assert sent[1] is frames["b"]  # B passes untouched
    if mode == "drop":
        assert sent[0] is None
    else:
        with Image.open(__import__("io").BytesIO(sent[0].data)) as im:
            shown = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        assert high_frequency(shown) < high_frequency(as_image(tiny_safety.image_a())[0]) / 5


def test_the_guard_refuses_to_start_without_a_usable_checker(env):
    with pytest.raises(GuardRefused) as err:
        build_guard(env, "blur", "missing.safetensors")
    text = str(err.value)
    assert str(env.paths.models.root / "safety_checker") in text and "StableDiffusionSafetyChecker" in text
    with pytest.raises(GuardRefused, match="unknown mode 'smudge'"):
        build_guard(env, "smudge", FILE)
    with pytest.raises(GuardRefused, match="needs --safety-checker"):
        build_guard(env, "blur", "")
    with pytest.raises(GuardRefused, match="not a StableDiffusionSafetyChecker"):
        build_guard(env, "blur", "clip-text.safetensors")


def test_an_output_node_that_saves_around_the_guard_fails_and_its_file_is_removed(env):
    """A third-party node with its own PNG writer cannot slip an image past an enforced filter."""
    from engine import types as T
    from engine.node import Input, Result, define_node
    from engine.registry import Registry

    @define_node("OwnWriter", inputs=[Input("name", T.STRING)], output_node=True)
    def own_writer(ctx, name):
        tiny_safety.image_a().save(ctx.env.paths.output.root / name)
        return Result(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})

    registry = Registry()
    registry.add(own_writer)
    wf = parse({"version": 1, "nodes": {"7": {"type": "OwnWriter", "inputs": {"name": "sneaky.png"}}}})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded"  # no guard: the node's business
    env.output_guard = build_guard(env, "blur", FILE)
    outcome = Executor(registry, env).run(wf, force=True)
    assert outcome.status == "failed" and outcome.error.node_id == "7"
    assert "safety filter is on" in outcome.error.message and "removed" in outcome.error.message
    assert not (env.paths.output.root / "sneaky.png").exists() and outcome.outputs == {}


def test_previews_the_guard_has_no_time_to_check_are_not_sent(env):
    """Checks take at most ``preview_share`` of the time: a preview right after a check is withheld."""
    guard = build_guard(env, "blur", FILE)
    guard.preview_share = 1e-6  # the next check may start only a million check-times later
    b = jpeg(tiny_safety.image_b())
    assert guard.check_preview(b) is b  # checked, passes
    assert guard.check_preview(b) is None  # not checked, so not sent
    guard.preview_share = 1.0
    assert guard.check_preview(b) is None  # the wait set by the last check still stands
    guard._next_preview_check = 0.0
    assert guard.check_preview(b) is b
