"""FluxKVCache on a tiny FLUX.2 [klein]: the reference images' keys and values computed once per run.

Kiln's edit with FluxKVCache equals diffusers' Flux2KleinKVPipeline (its reference for the klein KV
model) within 1/255 per pixel, and differs from the plain klein edit (the references attend only
to themselves there: not vacuous). Every call after a run's first feeds only the image tokens; a
guided run that reuses the cache equals one that recomputes the references at every call; the run
leaves the transformer as it found it.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux2
from engine.context import NodeError
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import Recorder
from nodes.families import reference_kv
from nodes.flux2_nodes import flux_kv_cache
from test_flux2 import PROMPT, PIXEL_TOL, SIZE, _clip, _image, _model, _vae
from test_flux2_loading import SPLIT

root = models_root(tiny_flux2.make_models_folder, "flux2-kv-models")


def kiln(cfg: float = 1.0, *, cached: bool = True, references: tuple[torch.Tensor, ...] = (),
         seed: int = 5, steps: int = 4) -> torch.Tensor:
    from nodes.kontext import reference_latent
    from nodes.sampling import ksampler

    clip, vae = _clip(), _vae()
    positive, negative = clip.encode(PROMPT), clip.encode("")
    for image in references:
        (positive,) = reference_latent(Recorder().ctx, positive, {"samples": vae.encode(image)})
        (negative,) = reference_latent(Recorder().ctx, negative, {"samples": vae.encode(image)})
    model = _model()
    if cached:
        (model,) = flux_kv_cache(Recorder().ctx, model)
    latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return vae.decode(out["samples"])


def kv_pipeline(images: list, *, size: int = SIZE, seed: int = 5, prompt: str = PROMPT) -> np.ndarray:
    """Flux2KleinKVPipeline's image. Its constructor swaps the shared tiny transformer's attention
    processors for the KV ones; they are put back, so other tests see the model as built."""
    from PIL import Image

    transformer = tiny_flux2.components()["transformer"]
    saved = transformer.attn_processors
    try:
        pipe = tiny_flux2.pipeline(distilled=True, cls="Flux2KleinKVPipeline")
        pil = [Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)) if torch.is_tensor(im) else im
               for im in images]
        with torch.no_grad():
            return pipe(image=pil or None, prompt=prompt, height=size, width=size, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(seed), output_type="np").images
    finally:
        transformer.set_attn_processor(saved)


def test_edit_with_the_cache_equals_the_klein_kv_pipeline():
    first, second = _image(11), _image(12)
    ours = kiln(references=(first, second)).numpy()
    assert np.abs(ours - kv_pipeline([first, second])).max() <= PIXEL_TOL
    # causal references are another model than the klein edit's full attention, and both images count
    assert np.abs(ours - kiln(cached=False, references=(first, second)).numpy()).max() > 0.005
    assert np.abs(ours - kiln(references=(first,)).numpy()).max() > 0.005


def test_later_calls_feed_only_the_image_tokens_and_the_run_leaves_the_model_as_it_was(monkeypatch):
    from nodes.families import flux2

    transformer = tiny_flux2.components()["transformer"]
    built = []  # the references' inputs are built only when their keys and values are computed
    reference_inputs = flux2.Flux2Network.reference_inputs
    monkeypatch.setattr(flux2.Flux2Network, "reference_inputs", lambda net, refs: built.append(1) or
                        reference_inputs(net, refs))
    before = {name: type(p) for name, p in transformer.attn_processors.items()}
    seen: list[tuple[str | None, int]] = []

    def record(module, args, kwargs):
        seen.append((kwargs.get("kv_cache_mode"), kwargs["hidden_states"].shape[1]))

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        kiln(4.0, references=(_image(),), steps=3)
    finally:
        hook.remove()
    image_tokens = (SIZE // 16) ** 2  # the positive and the negative side are called apart, each with its own set
    assert seen == [("extract", 2 * image_tokens)] * 2 + [("cached", image_tokens)] * 4
    assert len(built) == 2
    assert not hasattr(transformer, reference_kv.RUN_CACHE)
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == before


def test_a_guided_run_reusing_the_cache_equals_one_recomputing_it(monkeypatch):
    """At cfg 4 the negative carries the references too; their keys and values are the same for both sides
    and every step, so reusing them changes nothing against extracting them at every call."""
    ref = _image()
    reused = kiln(4.0, references=(ref,))
    call = reference_kv.call
    monkeypatch.setattr(reference_kv, "call", lambda t, cache, *a, **k: call(t, {}, *a, **k))
    recomputed = kiln(4.0, references=(ref,))
    assert (reused - recomputed).abs().max() <= 1e-5
    assert (reused - kiln(1.0, references=(ref,))).abs().max() > 0.005  # the guidance matters: two sides ran


def test_without_references_the_cache_changes_nothing():
    assert torch.equal(kiln(), kiln(cached=False))


def test_the_node_returns_a_new_handle_and_refuses_other_families():
    import tiny_flux

    from flow_family_files import model_over
    from nodes.families import flux

    model = _model()
    (cached,) = flux_kv_cache(Recorder().ctx, model)
    assert cached.patches.reference_kv and not model.patches.reference_kv
    with pytest.raises(NodeError) as err:
        flux_kv_cache(Recorder().ctx, model_over(flux.FAMILY, tiny_flux.components()["transformer"]))
    assert err.value.input_name == "model" and "FLUX.2" in str(err.value) and "model is flux" in str(err.value)


def test_comfyuis_klein_kv_edit_template_equals_the_kv_pipeline(registry, env):
    """image_flux2_klein_9b_kv_image_edit.json as ComfyUI's editor saved it: two images, each scaled and
    encoded into a ReferenceLatent on the prompt and its ConditioningZeroOut, FluxKVCache on the model,
    CFGGuider cfg 1 with Flux2Scheduler at the first image's size. On the tiny files it equals
    Flux2KleinKVPipeline given the same two scaled images."""
    from engine.formats import parse_document
    from nodes.sample_image import draw_landscape

    draw_landscape(64, 64).save(env.paths.input.root / "man.png")
    draw_landscape(64, 64).transpose(0).rotate(90).save(env.paths.input.root / "outfit.png")
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / "image_flux2_klein_9b_kv_image_edit.json").read_text(encoding="utf-8"))
    overrides = {"126.unet_name": SPLIT["unet"], "133.clip_name": SPLIT["clip"], "127.vae_name": SPLIT["vae"],
                 "76.image": "man.png", "81.image": "outfit.png", "130.megapixels": 0.01,
                 "131.megapixels": 0.01, "130.resolution_steps": 16, "131.resolution_steps": 16,
                 "125.noise_seed": 21}
    wf = parse_document(document, registry).with_overrides(overrides)
    outcome = run(registry, env, wf)
    (ours,) = [v[0].numpy() for k, v in outcome.results.items() if wf.nodes[k].type == "VAEDecode"]
    first, second = (outcome.results[k][0] for k in ("130", "131"))
    size = ours.shape[1]
    assert ours.shape == (1, size, size, 3) and first.shape == second.shape == (1, size, size, 3)
    prompt = wf.nodes["135"].inputs["text"]
    theirs = kv_pipeline([first, second], size=size, seed=21, prompt=prompt)
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - kv_pipeline([first], size=size, seed=21, prompt=prompt)).max() > 2 / 255
