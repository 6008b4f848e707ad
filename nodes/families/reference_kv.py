"""Reference key/value caching for FLUX.2 [klein] and [dev] (ComfyUI's FluxKVCache node, diffusers'
Flux2KleinKVPipeline).

An edit with reference images lengthens every network call by the references' tokens, although
their part never changes: FLUX.2's KV variant ("klein 9B KV") was trained so that reference
tokens attend only to themselves, modulated at time 0. Their keys and values in every block are
then the same at every step, for the positive and the negative side alike, so the first call of a
run computes them ("extract") and every later call feeds only the image tokens and reads the
references' keys and values from the cache ("cached"). diffusers' Flux2Transformer2DModel does
both through its ``kv_cache_mode`` argument, with its KV attention processors in place.

The cache lives for one sampling run (:func:`applied`): a later run, another job or a LoRA'd copy of
the model starts empty. Within the run it is keyed by the call's reference set (the object the
family's ``network_kwargs`` built once for the run) and the batch size, and holds that object so its
identity cannot be reused.

[dev] runs the same network with a guidance embedder: ComfyUI's node patches any FLUX.2 alike, and
diffusers' transformer embeds the references' time 0 with the call's guidance, as it does the image's
time. No [dev] was trained for references that attend only to themselves (klein 9B KV was), so on
[dev] the cache is a speed-up that changes the image against the plain edit, in ComfyUI too.

Where ComfyUI differs: its FluxKVCache runs the first step with full attention (references also
attend to the image) and caches what that gives; Kiln follows diffusers' reference pipeline, whose
first step already has the references attend only to themselves, so every step sees the same
reference keys and values.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

#: The attribute :func:`applied` sets on the transformer for the run: {key: (references, Flux2KVCache)}.
RUN_CACHE = "kiln_reference_kv"


@contextlib.contextmanager
def applied(network: Any, on: bool) -> Iterator[None]:
    """While a sampling run goes on: the FLUX.2 transformer's attention processors swapped for
    diffusers' KV-aware ones (identical without KV arguments) and an empty per-run cache on it."""
    if not on:
        yield
        return
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)

    from nodes.runtime.compiled import eager_while_hooked

    transformer = getattr(network, "kiln_network", network)
    blocks = [(b.attn, Flux2KVAttnProcessor) for b in transformer.transformer_blocks] + \
             [(b.attn, Flux2KVParallelSelfAttnProcessor) for b in transformer.single_transformer_blocks]
    saved = [attn.processor for attn, _ in blocks]
    for attn, kind in blocks:
        attn.set_processor(kind())
    setattr(transformer, RUN_CACHE, {})
    try:
        with eager_while_hooked():
            yield
    finally:
        delattr(transformer, RUN_CACHE)
        for (attn, _), processor in zip(blocks, saved):
            attn.set_processor(processor)


def run_cache(transformer: Any) -> dict | None:
    """The running sampling run's cache, None when reference caching is off."""
    return getattr(transformer, RUN_CACHE, None)


def call(transformer: Any, cache: dict, references: Any, image_tokens: "Any", image_ids: "Any",
         reference_inputs: Callable[[], tuple[Any, Any]], **kwargs: Any) -> "Any":
    """The transformer's output for the image tokens, the references' keys and values taken from
    ``cache`` when this reference set and batch were seen in this run, computed and stored otherwise
    (the references go first, as diffusers' KV pipeline orders them). ``reference_inputs`` gives the
    references' tokens and position ids; it is called only on a miss, so cached calls skip building them."""
    import torch

    key = (id(references), image_tokens.shape[0])
    held = cache.get(key)
    if held is not None and held[0] is references:
        return transformer(hidden_states=image_tokens, img_ids=image_ids, kv_cache=held[1],
                           kv_cache_mode="cached", return_dict=False, **kwargs)[0]
    reference_tokens, reference_ids = reference_inputs()
    out, kv = transformer(hidden_states=torch.cat([reference_tokens, image_tokens], dim=1),
                          img_ids=torch.cat([reference_ids, image_ids]), kv_cache_mode="extract",
                          num_ref_tokens=reference_tokens.shape[1], ref_fixed_timestep=0.0,
                          return_dict=False, **kwargs)
    cache[key] = (references, kv)
    return out
