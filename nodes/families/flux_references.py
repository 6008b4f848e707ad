"""Reference latents (FLUX.1 Kontext): images the transformer attends to beside the one it denoises.

An edit model such as FLUX.1 Kontext is an ordinary FLUX transformer trained to read
more image tokens than it writes: the clean latent of each reference image is cut
into 2x2 patches like the noisy latent and appended to its token sequence, and the
output keeps only the noisy latent's tokens. What tells the references apart from
the image being made is their position ids. With one reference every rule below
gives ids (1, row, column), diffusers' FluxKontextPipeline's; for several, ComfyUI's
three layouts (its ``reference_latents_method``):

* ``offset`` (the default): index 1 for all, each next reference placed beside or
  below the ones before (whichever keeps the covered area more square), so their
  positions never overlap;
* ``index``: reference k gets index k, every one at offset (0, 0);
* ``uxo`` (UNO/USO): index 0 like the image itself, placed diagonally past the
  image's bottom-right corner and past each other.

The references travel on the CONDITIONING (``extra["reference_latents"]``, raw VAE
latents as ReferenceLatent stores them, and ``extra["reference_latents_method"]``),
so a prompt with references and one without cannot share a network call: their token
sequences differ. :func:`call_key` is what the denoiser groups calls by.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from nodes.families.base import ConditioningError, LatentFormat
from nodes.families.input_checks import pad_to_patches

#: Conditioning keys (ComfyUI's names).
LATENTS = "reference_latents"
METHOD = "reference_latents_method"
METHODS = ("offset", "index", "uxo")


@dataclass(frozen=True)
class References:
    """One network call's references: model-space latents [rows, C, h, w] and their layout."""

    latents: tuple
    method: str = "offset"


def call_key(extra: dict) -> Hashable:
    """Conditionings evaluated in one call must have the same references (the same objects:
    equal tensors held twice are told apart, which only costs a second call)."""
    latents = extra.get(LATENTS) or ()
    return tuple(id(r) for r in latents), extra.get(METHOD, "offset") if latents else None


def for_call(extras: list[dict], rows_each: int, latent: LatentFormat, device: Any, dtype: Any) -> References | None:
    """The references of a call over ``extras`` (one per conditioning, each ``rows_each`` rows),
    which share a :func:`call_key`; None without references."""
    import torch

    first = extras[0]
    raw = first.get(LATENTS) or ()
    if not raw:
        return None
    name = first.get("_input", "positive")
    method = first.get(METHOD, "offset")
    if method == "index_timestep_zero":
        raise ConditioningError("reference_latents_method index_timestep_zero (references modulated at time 0, "
                                "for Qwen-Image-Edit and FLUX.2) is not something a FLUX.1 transformer can do; "
                                "FLUX.1 Kontext takes offset, index or uxo/uno", name)
    if method not in METHODS:
        raise ConditioningError(f"unknown reference_latents_method {method!r} (expected one of "
                                f"{', '.join(METHODS)})", name)
    out = []
    for k, ref in enumerate(raw):
        if getattr(ref, "ndim", None) != 4 or ref.shape[1] != latent.channels:
            shape = list(getattr(ref, "shape", ()))
            raise ConditioningError(f"reference latent {k + 1} has shape {shape}; this model takes "
                                    f"[batch, {latent.channels}, h, w] latents (encode the image with this "
                                    "model's VAE)", name)
        if ref.shape[0] not in (1, rows_each):
            raise ConditioningError(f"reference latent {k + 1} holds {ref.shape[0]} images for a batch of "
                                    f"{rows_each}: give one reference image, or one per image", name)
        one = latent.to_model(ref.to(torch.float32)).expand(rows_each, -1, -1, -1)
        out.append(torch.cat([one] * len(extras)).to(device=device, dtype=dtype))
    return References(tuple(out), method)


def indexed_call(extras: list[dict], rows_each: int, latent: LatentFormat, device: Any, dtype: Any,
                 placement: str) -> dict[str, Any]:
    """``network_kwargs`` for a network that places reference k by its index k itself (FLUX.2, FLUX.3):
    ``{"reference_latents": ...}`` (:func:`for_call`), or {} without references. Another placement method
    (FluxKontextMultiReferenceLatentMethod's offset or uxo) cannot be followed and is refused, naming the
    network's own rule (``placement``)."""
    method = extras[0].get(METHOD)
    if extras[0].get(LATENTS) and method not in (None, "index"):
        raise ConditioningError(f"reference_latents_method {method!r}: {placement}; remove "
                                "FluxKontextMultiReferenceLatentMethod or set it to index",
                                extras[0].get("_input", "positive"))
    references = for_call(extras, rows_each, latent, device, dtype)
    return {} if references is None else {"reference_latents": references}


def placements(sizes: list[tuple[int, int]], image: tuple[int, int], method: str) -> list[tuple[int, int, int]]:
    """(index, row offset, column offset) in latent pixels of references of ``sizes`` beside an
    image latent of size ``image`` (ComfyUI's three rules, see the module docstring)."""
    out = []
    covered_h = covered_w = index = 0
    for h, w in sizes:
        if method == "index":
            index += 1
            out.append((index, 0, 0))
        elif method == "uxo":
            out.append((0, _ceil2(image[0]) + covered_h, _ceil2(image[1]) + covered_w))
            covered_h, covered_w = covered_h + h, covered_w + w
        else:
            top, left = (0, covered_w) if h + covered_h > w + covered_w else (covered_h, 0)
            out.append((1, top, left))
            covered_h, covered_w = max(covered_h, h + top), max(covered_w, w + left)
    return out


def _ceil2(n: int) -> int:
    return (n + 1) // 2 * 2


def patch_ids(h: int, w: int, index: int, top: int, left: int, device: Any, dtype: Any) -> "Any":
    """Position ids [ceil(h/2) * ceil(w/2), 3] of a latent's 2x2 patches: (index, row, column),
    rows and columns counted from the patch the offsets (latent pixels, rounded) fall in."""
    import torch

    rows, cols = (h + 1) // 2, (w + 1) // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(rows)[:, None] + (top + 1) // 2
    ids[..., 2] += torch.arange(cols)[None, :] + (left + 1) // 2
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def tokens(refs: References, image: tuple[int, int], pack: Any) -> tuple["Any", "Any"]:
    """The references' patch tokens [rows, n, 4C] and their ids [n, 3], to append to the image's.
    A side of odd length is padded by wrapping around (ComfyUI's rule) so it cuts into patches."""
    import torch

    first = refs.latents[0]
    chunks, ids = [], []
    sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in refs.latents]
    for ref, (index, top, left) in zip(refs.latents, placements(sizes, image, refs.method)):
        h, w = ref.shape[-2:]
        ref = pad_to_patches(ref, 2)
        chunks.append(pack(ref))
        ids.append(patch_ids(h, w, index, top, left, first.device, first.dtype))
    return torch.cat(chunks, dim=1), torch.cat(ids)
