"""What the flow-transformer family tests (FLUX, Chroma, FLUX.2, Qwen-Image, Z-Image, SD3) share.

The tiny models' files in ComfyUI's split layout, the loader tests' fixtures (a models folder
written once per module, an Environment over it, the registry, a graph run that must succeed),
and handles over in-memory models for tests that call the sampler directly. Each family's own
tests keep what they check; only the plumbing that was copied between them lives here.

Fixtures: a test module binds ``root = models_root(make, name)`` and imports ``env`` and
``registry`` from here (``# noqa: F401``); ``env`` stands on whatever ``root`` the module binds.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.context import Environment
from node_call import call, environment_over
from tiny_flux import _save as save_state  # one safetensors file (contiguous; its folders made as needed)

# -- the tiny models' files -----------------------------------------------------------------------


def save_split_transformer(folder: Path, stem: str, state: dict, diffusers_keys: dict | None = None) -> None:
    """A transformer as people download it into ``diffusion_models/``: ``stem.safetensors`` with its
    own keys, ``stem-prefixed.safetensors`` under ``model.diffusion_model.`` (ComfyUI's saved
    checkpoints), and, where given, ``stem-diffusers-keys.safetensors`` with diffusers' names."""
    save_state(folder / f"{stem}.safetensors", state)
    save_state(folder / f"{stem}-prefixed.safetensors", {"model.diffusion_model." + k: v for k, v in state.items()})
    if diffusers_keys is not None:
        save_state(folder / f"{stem}-diffusers-keys.safetensors", diffusers_keys)


def with_chat_template(tokenizer: Any, template: str) -> Any:
    """A copy of ``tokenizer`` with ``template`` as its chat template, for a reference pipeline: Kiln's own
    tokenizers are shared by later loads on the thread (nodes/checkpoint/tokenizer_memo.py) and stay as built.
    A shallow copy: the template is the copy's own attribute, and the Rust backend the two share is set up
    for truncation and padding by every call anyway (a deep copy of a Qwen vocabulary took ~1.2 s)."""
    import copy

    own = copy.copy(tokenizer)
    own.chat_template = template
    return own


def quiet_pipeline(cls: Any, parts: dict[str, Any], **extra: Any) -> Any:
    """A diffusers pipeline (a class, or the name of one of diffusers') over the tiny ``parts`` with its
    progress bar off, and its language-model text encoders scoring the last token only (below)."""
    if isinstance(cls, str):
        import diffusers

        cls = getattr(diffusers, cls)
    pipe = cls(**dict(parts), **extra)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        score_last_token_only(part)
    return pipe


def score_last_token_only(model: Any) -> None:
    """Make ``model`` (a transformers language model; anything else is left alone) score only the last
    token when its caller does not say otherwise, as Kiln calls it (nodes.families.text.without_logits).

    The pipelines call their text encoders for hidden states, and transformers also runs the output head
    over every prompt token: with the tiny models' real vocabularies (~152k) and widths of 32 that head is
    most of a reference encoding's work. The hidden states, and so every result a test compares, are the
    same; a pipeline that read every token's logits would now fail, not pass. A forward pre-hook on the
    instance, so the pipelines' own calls get it (tests/test_flux2.py reads Kiln's arguments before it)."""
    from nodes.families.text import without_logits

    if not without_logits(model) or getattr(model, "_scores_last_token_only", False):
        return
    model.register_forward_pre_hook(lambda _m, args, kwargs: (args, {"logits_to_keep": 1, **kwargs}), with_kwargs=True)
    model._scores_last_token_only = True


def pipeline_images(make: Callable[[Any], Any], img2img: Any, **kwargs: Any) -> Any:
    """diffusers' images for ``kwargs``: from ``make(None)`` (text to image), or from ``make(img2img)``
    whose preprocessing hands the given ``image`` (a latent) straight through, as these pipelines
    resize their input before they check for a latent."""
    import torch

    pipe = make(img2img)
    if img2img is not None:
        pipe.image_processor.preprocess = lambda image, **_: image
    with torch.no_grad():
        return pipe(**kwargs).images


def txt2img_graph(loader: dict, *, prompt: str, negative: str, size: int, seed: int, steps: int, cfg: float,
                  scheduler: str, latent: str = "EmptySD3LatentImage", prefix: str = "kiln") -> dict:
    """An API-format text-to-image graph: the ``loader`` nodes (with ``_model``, ``_clip`` and ``_vae``
    naming their outputs), CLIPTextEncode "2" and "3", the empty ``latent`` "4", KSampler "5" (euler),
    VAEDecode "6" and SaveImage "7"."""
    graph = {
        **loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": loader["_clip"]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": loader["_clip"]}},
        "4": {"class_type": latent, "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": loader["_model"], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": scheduler,
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": loader["_vae"]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    return {k: v for k, v in graph.items() if not k.startswith("_")}


def checkpoint_loader(name: str) -> dict:
    """CheckpointLoaderSimple "1" on ``name``, as ``txt2img_graph``'s loader."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "_model": ["1", 0], "_clip": ["1", 1], "_vae": ["1", 2]}


# -- the loader tests' fixtures -------------------------------------------------------------------


def models_root(make: Callable[[Path], Path], name: str) -> Any:
    """A module-scoped ``root`` fixture: ``make`` writes the family's files once into a fresh folder."""

    @pytest.fixture(scope="module")
    def root(tmp_path_factory) -> Path:
        return make(tmp_path_factory.mktemp(name))

    return root


@pytest.fixture()
def env(root: Path, tmp_path: Path) -> Iterator[Environment]:
    """An Environment over the module's ``root`` models folder (see node_call.environment_over)."""
    yield from environment_over(root, tmp_path)


@pytest.fixture(scope="module")
def registry() -> Any:
    from engine.registry import default_registry

    return default_registry()


def run(registry: Any, env: Environment, wf: Any) -> Any:
    """Run a parsed workflow; it must succeed (the error's message is the failure's)."""
    from engine.executor import Executor

    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def template_file_errors(registry: Any, document: dict, root: Path) -> tuple[Any, set[tuple[str, str]]]:
    """(ComfyUI ``document`` parsed, its validation errors as {(node type, input)}) in an empty models
    folder under ``root``: it must be invalid, and no node type may be unknown (only inputs fail)."""
    from engine.context import Environment, Paths
    from engine.formats import parse_document
    from engine.validate import WorkflowInvalid, validate

    wf = parse_document(document, registry)
    with pytest.raises(WorkflowInvalid) as err:
        validate(wf, registry, Environment(paths=Paths.under(root)))
    unknown = {e.node_type for e in err.value.errors if e.type == "unknown_node_type"}
    assert not unknown
    return wf, {(e.node_type, e.input_name) for e in err.value.errors if e.type != "unknown_node_type"}


def unet_weights(model: Any) -> dict:
    """Copies of a loaded MODEL's transformer weights, to compare loaders bit for bit."""
    with model._use_unet() as net:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def fp8_sampling_gap(env: Environment, unet_name: str, clip: Any, weight: Callable[[Any], Any], *, prompt: str,
                     negative: str, scheduler: str, channels: int = 16) -> float:
    """UNETLoader at weight_dtype default and fp8_e4m3fn: ``weight(net)`` is stored in fp8 exactly when
    asked (and the MODEL says so). Returns how far apart the two sampled latents are (KSampler euler,
    seed 3, 3 steps, cfg 4, an 8x8 latent of ``channels``), relative to the largest value of the default one."""
    import torch

    from nodes import split_loaders
    from nodes.sampling import ksampler

    latents = {}
    for weight_dtype in ("default", "fp8_e4m3fn"):
        (model,) = call(split_loaders.unet_loader, env, unet_name=unet_name, weight_dtype=weight_dtype)
        with model._use_unet() as net:
            stored = weight(net).dtype
        assert (stored == torch.float8_e4m3fn) == (weight_dtype != "default") == bool(model.extra.get("fp8"))
        (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler=scheduler,
                      positive=clip.encode(prompt), negative=clip.encode(negative),
                      latent_image={"samples": torch.zeros(1, channels, 8, 8)}, denoise=1.0)
        latents[weight_dtype] = out["samples"]
    return float((latents["default"] - latents["fp8_e4m3fn"]).abs().max() / latents["default"].abs().max())


# -- handles over in-memory models ----------------------------------------------------------------


def model_over(family: Any, transformer: Any) -> Any:
    """A MODEL handle over an in-memory transformer (no loader, no model manager)."""
    from nodes.handles import ModelHandle

    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


def clip_over(family: Any, tokenizer: Any, encoder: Any, **options: Any) -> Any:
    """A CLIP handle over an in-memory tokenizer and text encoder."""
    from nodes.handles import ClipHandle

    return ClipHandle(family, {"tokenizer": tokenizer}, _use=lambda name: contextlib.nullcontext(encoder), **options)


# -- ComfyUI templates and state dicts ------------------------------------------------------------


def template(name: str) -> dict:
    """A ComfyUI template as its editor saved it (the comfyui-workflow-templates-json package)."""
    import json

    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / name).read_text(encoding="utf-8"))


def qwen3vl_comfy_state(state: dict, keep_rest: bool) -> dict:
    """A transformers Qwen3VLForConditionalGeneration ``state`` in ComfyUI's qwen3vl layout: the language
    model under ``model.``, the vision tower under ``visual.``; the rest (``lm_head``) kept when ``keep_rest``."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v.contiguous()
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual."):]] = v.contiguous()
        elif keep_rest:
            out[k] = v.contiguous()
    return out


def same_state(got: dict, want: dict) -> bool:
    """Whether two state dicts hold the same keys with bit-identical tensors."""
    import torch

    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
