"""FluxKVCache on a tiny FLUX.2 [dev]: ComfyUI's node patches any FLUX.2 (the network [klein] and [dev] share).

diffusers has no [dev] KV pipeline; its KV path is the transformer's (``kv_cache_mode``), which takes
[dev]'s guidance embedding into the references' time-0 modulation as into the image's. The reference
here is Flux2KleinKVPipeline's loop over the [dev] transformer (references computed and cached at the
first step, image tokens alone after), with the guidance value Flux2Pipeline would pass added to each
of its transformer calls (the KV pipeline passes none, as [klein] has no guidance embedder). Kiln's
[dev] edit with FluxKVCache and FluxGuidance equals it within 1/255 per pixel, and with
FluxDisableGuidance equals the loop as it is; the cache, the guidance value and the references each
move the image (not vacuous).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

import tiny_flux2dev
from flow_family_files import model_over, quiet_pipeline
from node_call import Recorder
from nodes.families import flux2_dev
from nodes.flux2_nodes import flux_kv_cache
from test_flux2 import PIXEL_TOL, PROMPT, SIZE, _image, _vae


def kiln(guidance: float | None, *, cached: bool = True, references: tuple[torch.Tensor, ...] = (),
         seed: int = 5, steps: int = 4) -> np.ndarray:
    """Kiln's [dev] edit: the pipeline's own prompt embeddings at ComfyUI's ids (tests/test_flux2_dev.py shows
    CLIPLoader's equal them), FluxGuidance (None: FluxDisableGuidance), ReferenceLatent per image."""
    from nodes.flux_nodes import flux_disable_guidance, flux_guidance
    from nodes.kontext import reference_latent
    from nodes.sampling import ksampler

    ctx, vae = Recorder().ctx, _vae()
    positive = [[tiny_flux2dev.prompt_embeds(PROMPT).float(), {}]]
    (positive,) = flux_disable_guidance(ctx, positive) if guidance is None else flux_guidance(ctx, positive, guidance)
    for image in references:
        (positive,) = reference_latent(ctx, positive, {"samples": vae.encode(image)})
    model = model_over(flux2_dev.FAMILY, tiny_flux2dev.components()["transformer"])
    if cached:
        (model,) = flux_kv_cache(ctx, model)
    latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
    (out,) = ksampler(ctx, model, seed, steps, 1.0, "euler", "normal", positive, positive, latent)
    return vae.decode(out["samples"]).numpy()


@functools.lru_cache(maxsize=None)
def kv_loop(guidance: float | None, seeds: tuple[int, ...], seed: int = 5) -> np.ndarray:
    """Flux2KleinKVPipeline's image on the [dev] transformer, each transformer call given ``guidance`` (None:
    none, as the pipeline passes); the references are ``_image(s)`` for ``seeds``. The pipeline's KV
    processors and the guidance hook are taken off again, so other tests see the model as built."""
    from PIL import Image

    transformer = tiny_flux2dev.components()["transformer"]
    saved = transformer.attn_processors

    def with_guidance(module, args, kwargs):
        kwargs["guidance"] = torch.full([kwargs["hidden_states"].shape[0]], float(guidance))
        return args, kwargs

    hook = transformer.register_forward_pre_hook(with_guidance, with_kwargs=True) if guidance is not None else None
    try:
        pipe = quiet_pipeline("Flux2KleinKVPipeline", tiny_flux2dev.components(), is_distilled=True)
        images = [Image.fromarray((_image(s)[0].numpy() * 255).round().astype(np.uint8)) for s in seeds]
        with torch.no_grad():
            return pipe(image=images or None, prompt_embeds=tiny_flux2dev.padded(tiny_flux2dev.prompt_embeds(PROMPT)),
                        height=SIZE, width=SIZE, num_inference_steps=4, output_type="np",
                        generator=torch.Generator().manual_seed(seed)).images
    finally:
        if hook is not None:
            hook.remove()
        transformer.set_attn_processor(saved)


def test_dev_edit_with_the_cache_equals_the_kv_loop_with_its_guidance():
    refs = (_image(11), _image(12))
    ours = kiln(4.0, references=refs)
    assert np.abs(ours - kv_loop(4.0, (11, 12))).max() <= PIXEL_TOL
    # causal references differ from the plain [dev] edit's full attention; the guidance reaches the cached path
    assert np.abs(ours - kiln(4.0, cached=False, references=refs)).max() > 0.005
    assert np.abs(ours - kv_loop(2.0, (11, 12))).max() > 0.005
    assert np.abs(ours - kv_loop(4.0, (11,))).max() > 0.005  # both references count


def test_dev_edit_without_guidance_equals_the_kv_loop_as_it_is():
    assert np.abs(kiln(None, references=(_image(11),)) - kv_loop(None, (11,))).max() <= PIXEL_TOL


def test_without_references_the_cache_changes_nothing_on_dev():
    assert np.array_equal(kiln(4.0, steps=2), kiln(4.0, cached=False, steps=2))
