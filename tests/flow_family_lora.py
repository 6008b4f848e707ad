"""What the flow-transformer LoRA tests (Chroma, FLUX.2, Qwen-Image, Z-Image) share: seeded random
factors, the files in the layouts people download, the hand-merged reference and the check itself.

Each family's module keeps what differs: which modules get factors, how its layouts name them, how
it samples and how its "by hand" weights are merged (the reference stays independent of Kiln's
LoRA code). The check is the same everywhere: through UNETLoader + LoraLoaderModelOnly + KSampler,
every file at strengths 1 and 0.5 equals the hand-merged model within 1/255, moves the image, and
leaves the loaded weights as they were.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from engine.context import Environment
from flow_family_files import model_over, save_state
from node_call import call

PIXEL_TOL = 1 / 255 + 1e-6
RANK = 4
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def random_factors(shapes: Iterable[tuple[str, tuple[int, int]]], seed: int) -> Factors:
    """module -> (down [RANK, in], up [out, RANK]), drawn in the given order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in shapes:
        out[name] = (torch.randn(RANK, cols, generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3)
    return out


def module_shapes(net: torch.nn.Module, names: Iterable[str]) -> list[tuple[str, tuple[int, int]]]:
    """(name, weight shape) of the named modules of ``net``, in order (for ``random_factors``)."""
    modules = dict(net.named_modules())
    return [(name, tuple(modules[name].weight.shape)) for name in names]


def fuse(factors: Factors, renames: dict[str, str], fused: dict[str, list[str]]) -> Factors:
    """The same deltas under original-layout names: plain modules renamed, fused ones (one original
    module for several diffusers ones) as stacked ``down`` and block-diagonal ``up``."""
    out = {renames[m]: f for m, f in factors.items() if m in renames}
    for name, parts in fused.items():
        downs, ups = zip(*(factors[p] for p in parts))
        out[name] = (torch.cat(downs), torch.block_diag(*ups))
    return out


def lora_file(factors: Factors, fmt: str) -> dict[str, torch.Tensor]:
    """A LoRA state dict in one layout: ``peft`` (``transformer.``) and ``comfy`` (``diffusion_model.``)
    with lora_A/lora_B; ``lightning`` (bare), ``kohya`` (``lora_unet_``) and ``lycoris``
    (``lycoris_``) with lora_down/lora_up/alpha, ``up`` doubled and alpha / rank = 1/2 undoing it."""
    out = {}
    for m, (down, up) in factors.items():
        if fmt in ("peft", "comfy"):
            base = ("transformer." if fmt == "peft" else "diffusion_model.") + m
            out |= {base + ".lora_A.weight": down, base + ".lora_B.weight": up}
            continue
        base = {"lightning": m, "kohya": "lora_unet_" + m.replace(".", "_"),
                "lycoris": "lycoris_" + m.replace(".", "_")}[fmt]
        out |= {base + ".lora_down.weight": down, base + ".lora_up.weight": up * 2.0,
                base + ".alpha": torch.tensor(down.shape[0] / 2.0)}
    return {k: v.contiguous() for k, v in out.items()}


def lora_root(root: Path, unet_name: str, transformer: dict, files: dict[str, Factors]) -> Path:
    """A models folder: the transformer as ``diffusion_models/unet_name`` and each ``fmt: factors`` as
    ``loras/<fmt>.safetensors`` in that layout."""
    save_state(root / "diffusion_models" / unet_name, transformer)
    for fmt, factors in files.items():
        save_state(root / "loras" / f"{fmt}.safetensors", lora_file(factors, fmt))
    return root


def merged_modules(family: Any, transformer: torch.nn.Module, factors: Factors, strength: float) -> Any:
    """A MODEL over a copy of ``transformer`` with W += strength * up @ down on each named module."""
    transformer = copy.deepcopy(transformer)
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (down, up) in factors.items():
            modules[name].weight += strength * up @ down
    return model_over(family, transformer)


def merged_in_layout(family: Any, transformer: torch.nn.Module, weights: dict[str, torch.Tensor], factors: Factors,
                     strength: float, convert: Callable[[dict], dict] | None = None) -> Any:
    """A MODEL over a copy of ``transformer`` holding ``weights`` (a layout's state dict) with
    W += strength * up @ down added by hand on each named module, then ``convert`` to the module's own
    names (None: ``weights`` already has them)."""
    weights = {k: v.clone() for k, v in weights.items()}
    for name, (down, up) in factors.items():
        weights[name + ".weight"] += strength * up @ down
    transformer = copy.deepcopy(transformer)
    transformer.load_state_dict(weights if convert is None else convert(weights))
    return model_over(family, transformer)


def sample(env: Environment, model: Any, clip: Any, decode: Callable[[torch.Tensor], torch.Tensor], *, steps: int,
           cfg: float, scheduler: str, latent: tuple[int, ...], negative: str = "blurry") -> torch.Tensor:
    """The image the LoRA tests compare: KSampler (euler, seed 3) on "a lighthouse" against ``negative``
    from an empty ``latent``, decoded."""
    from nodes.sampling import ksampler

    (out,) = call(ksampler, env, model=model, seed=3, steps=steps, cfg=cfg, sampler_name="euler", scheduler=scheduler,
                  positive=clip.encode("a lighthouse"), negative=clip.encode(negative),
                  latent_image={"samples": torch.zeros(latent)}, denoise=1.0)
    return decode(out["samples"])


def assert_lora_equals_merged(env: Environment, unet_name: str, lora_name: str, sample: Callable[[Any], torch.Tensor],
                              merged: Callable[[float], Any]) -> None:
    """The LoRA through the loader nodes equals ``merged(strength)`` at 1 and 0.5, changes the
    image, and the loaded model samples as before afterwards."""
    from nodes import lora, split_loaders

    (model,) = call(split_loaders.unet_loader, env, unet_name=unet_name)
    plain = sample(model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=lora_name,
                          strength_model=strength)
        ours = sample(patched)
        assert (ours - sample(merged(strength))).abs().max() <= PIXEL_TOL
        assert (ours - plain).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (sample(model) - plain).abs().max() == 0  # the loaded weights are restored after sampling


def weights_and_output(model: Any, forward: Callable[[torch.nn.Module], torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(a copy of the MODEL's network weights, ``forward`` of it) while the model holds its patches."""
    with model.unet() as net:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}, forward(net)


def assert_weights_merged_by_hand(env: Environment, unet_name: str, lora_name: str,
                                  merged: Callable[[float], torch.nn.Module],
                                  forward: Callable[[torch.nn.Module], torch.Tensor]
                                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """The LoRA through LoraLoaderModelOnly at strengths 1 and 0.5 holds ``merged(strength)``'s weights
    (each patched slice where it belongs, the rest untouched: 1e-6) and its prediction (1e-5), moves the
    prediction, patches exactly the weights the hand merge changes; strength 0 is the base model, and the
    loaded model is as it was afterwards. Returns (base weights, the weights at 0.5, the names moved)."""
    from nodes import lora, split_loaders

    (model,) = call(split_loaders.unet_loader, env, unet_name=unet_name)
    base_weights, base = weights_and_output(model, forward)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=lora_name,
                          strength_model=strength)
        weights, out = weights_and_output(patched, forward)
        want = merged(strength)
        for name, value in want.state_dict().items():
            assert torch.allclose(weights[name], value, atol=1e-6, rtol=0), name
        assert (out - forward(want)).abs().max() <= 1e-5
        assert (out - base).abs().max() > 1e-2  # not vacuous: the LoRA moves the prediction
    moved = {n for n in base_weights if not torch.equal(weights_and_output(patched, forward)[0][n], base_weights[n])}
    assert moved == {n for n, v in merged(1.0).state_dict().items() if not torch.equal(v, base_weights[n])}
    (off,) = call(lora.lora_loader_model_only, env, model=model, lora_name=lora_name, strength_model=0.0)
    assert torch.equal(weights_and_output(off, forward)[1], base)  # strength 0 is the base model
    assert torch.equal(weights_and_output(model, forward)[1], base)  # the loaded weights are restored after use
    return base_weights, weights, moved


def assert_refused(env: Environment, model: Any, clip: Any, family: str, cases: Iterable[tuple[str, str]]) -> None:
    """Each ``(lora file, words its message says)`` is an error on ``lora_name`` through LoraLoaderModelOnly
    (its message naming ``family``) and through LoraLoader (MODEL and CLIP)."""
    import pytest

    from engine.context import NodeError
    from nodes import lora

    for name, says in cases:
        with pytest.raises(NodeError) as err:
            call(lora.lora_loader_model_only, env, model=model, lora_name=name, strength_model=1.0)
        assert err.value.input_name == "lora_name" and family in str(err.value) and says in str(err.value)
        with pytest.raises(NodeError) as err:
            call(lora.lora_loader, env, model=model, clip=clip, lora_name=name, strength_model=1.0, strength_clip=1.0)
        assert err.value.input_name == "lora_name" and says in str(err.value)
